"""An INT8 inference copy of a trained model (PyTorch dynamic quantization; the model stays float).

`quantize_int8(model)` returns a deep copy whose nn.Linear layers hold int8 weights (per-tensor
scale) and quantize their input activations per call (torch.ao.quantization.quantize_dynamic);
convolutions, norms, embeddings and the learned per-field/per-expert parameters stay float32.

Why dynamic and Linear-only: static (calibrated) quantization of the 3D/2D convolutions needs
QuantStub/DeQuantStub around every conv island of a model whose forward branches on which
modalities a case has, with GroupNorm/GELU (no int8 kernels) between every conv. Measured
(docs/benchmarks.md, INT8): this copy is 30% smaller, no faster, and within 0.003 AUC, so the app
serves the float model; this function stays for re-measuring when the model changes.

Why a copy: quantized Linear layers have no autograd, and the explanations (Integrated Gradients,
Grad-CAM) need gradients through the float model, so the served float model must stay as it is.
"""

from __future__ import annotations

import copy
import io
from typing import Any, Final

import torch
from torch import nn
from torch.ao.quantization import quantize_dynamic

from vocab.errors import ConfigError

QUANTIZED_TYPES: Final = (nn.Linear,)


def quantize_int8(model: nn.Module, engine: str | None = None) -> nn.Module:
    """An eval-mode INT8 copy of `model` for probabilities only (no gradients through it).

    engine: torch.backends.quantized engine ("x86", "fbgemm", "qnnpack", ...); default: the
    current one. The input model is not modified (its weights, mode and gradients stay).
    """
    if engine is not None:
        supported = torch.backends.quantized.supported_engines
        if engine not in supported:
            raise ConfigError(f"quantized engine {engine!r} is not supported here; "
                              f"supported: {supported}")
        torch.backends.quantized.engine = engine
    float_copy = copy.deepcopy(model, _graph_free_memo(model)).eval()
    q = quantize_dynamic(float_copy, set(QUANTIZED_TYPES), dtype=torch.qint8, inplace=True)
    for p in q.parameters():  # what stays float is frozen too: this copy never trains
        p.requires_grad_(False)
    return q


def _graph_free_memo(model: nn.Module) -> dict[int, Any]:
    """deepcopy memo that copies tensors a forward left on modules (e.g. the MoE's last_aux, still
    attached to the autograd graph, which deepcopy refuses) as detached views."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for v in vars(m).values():
            for t in v if isinstance(v, tuple | list) else (v,):
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    memo[id(t)] = t.detach()
    return memo


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of torch.save(model.state_dict()): what a checkpoint of these weights would hold."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def quantized_share(model: nn.Module) -> float:
    """Fraction of the model's parameters held by layers quantize_int8 converts."""
    total = sum(p.numel() for p in model.parameters())
    q = sum(p.numel() for m in model.modules() if isinstance(m, QUANTIZED_TYPES)
            for p in m.parameters(recurse=False))
    return q / total if total else 0.0
