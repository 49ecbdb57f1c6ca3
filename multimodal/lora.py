"""Low-rank adapters (LoRA, Hu et al. 2021) for one task on top of a frozen shared backbone.

Why our own few dozen lines and not `peft`: peft wraps nn.Linear by replacing modules, which
renames the backbone's state-dict keys (a LoRA model would no longer load the base checkpoint or
exchange the same Flower arrays), and it cannot reach the MoE router, whose gate weight is a bare
Parameter used through F.linear. Here an adapter is a pair (A, B) per target weight W, with the
output of that layer becoming  W x + b + (alpha / r) * B A x  only while its task is active.
B starts at zero, so a fresh adapter is an exact no-op (tests check output equality).

Targets (ModelConfig.lora_targets): "attn" (q/k/v and output projections of every block),
"experts" (both layers of every routed expert), "shared" (the shared expert), "router" (the MoE
gate, on its float32 logits). Adapters live in `model.adapters[task]`; the base weights are
untouched, so a two-task checkpoint serves the first task exactly as the base version did.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("attn", "experts", "shared", "router")


def _safe(name: str) -> str:
    """Module path -> a ModuleDict key ('.' is not allowed there)."""
    return name.replace(".", "__")


class LoRA(nn.Module):
    """delta(x) = scale * B (A x), A: (r, d_in) Kaiming-uniform, B: (d_out, r) zeros."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear, as in the paper's code
        self.scale = alpha / rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.A.dtype), self.A), self.B) * self.scale


def target_layers(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    """name -> module for every layer the targets select (nn.Linear, or a moe.Router)."""
    from multimodal.moe import Router

    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise ValueError(f"unknown lora target(s) {bad}; known: {list(TARGETS)}")
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if not name.startswith("blocks."):
            continue
        parts = name.split(".")
        if isinstance(mod, Router):
            kind = "router"
        elif not isinstance(mod, nn.Linear):
            continue
        elif "attn" in parts:
            kind = "attn"
        elif "experts" in parts:
            kind = "experts"
        elif "shared" in parts:
            kind = "shared"
        else:
            continue
        if kind in targets:
            out[name] = mod
    return out


def build_adapters(layers: dict[str, nn.Module], rank: int, alpha: float) -> nn.ModuleDict:
    """One LoRA per target layer, keyed by its safe module path."""
    ad = nn.ModuleDict()
    for name, mod in layers.items():
        d_out, d_in = mod.weight.shape
        ad[_safe(name)] = LoRA(d_in, d_out, rank, alpha)
    return ad


def install_hooks(layers: dict[str, nn.Module], adapters: nn.ModuleDict,
                  active: Callable[[], nn.ModuleDict | None]) -> None:
    """Make each target layer add its adapter's delta while `active()` returns a task's adapters
    (None: the base model, untouched). Routers get the delta on their float32 gate logits."""
    from multimodal.moe import Router

    for name, mod in layers.items():
        key = _safe(name)
        if isinstance(mod, Router):
            def logit_delta(x: torch.Tensor, key: str = key) -> torch.Tensor | None:
                ad = active()
                return None if ad is None or key not in ad else ad[key].delta(x)
            mod.logit_delta = logit_delta
        else:
            def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor,
                     key: str = key) -> torch.Tensor | None:
                ad = active()
                return None if ad is None or key not in ad else out + ad[key].delta(inp[0])
            mod.register_forward_hook(hook)


def adapter_names(model: nn.Module, task: str) -> list[str]:
    """State-dict keys of one task's adapters."""
    return [k for k in model.state_dict() if k.startswith(f"adapters.{task}.")]
