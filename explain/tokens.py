"""Cheap re-evaluation of one case under many "what if" variants.

Modality Shapley values and EHR field ablations evaluate the same case with different modalities or
fields hidden. The CT and pathology encoders see identical pixels in every variant (GroupNorm: a
row's features never depend on other rows), so their tokens are computed once and replayed; only
the EHR encoder and the fusion blocks run per variant. The outputs are exactly what the full
model computes (tests compare against plain forwards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from multimodal.data import Batch
from multimodal.model import FedsightModel


class _ReplayTokens(nn.Module):
    """Stands in for an encoder: returns the cached (1, T, D) tokens for every row it gets."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        self.tokens = tokens
        self.n_tokens = tokens.shape[1]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.tokens.expand(inputs[0].shape[0], -1, -1)  # (P, T, D)


EncoderTokens = dict[str, torch.Tensor]  # modality -> (1, T, D) encoder output


@torch.no_grad()
def image_tokens(model: FedsightModel, batch: Batch, tokens: EncoderTokens | None = None
                 ) -> EncoderTokens:
    """CT and pathology encoder outputs of a one-case batch (present modalities only); entries
    already in `tokens` are kept, not recomputed."""
    out = dict(tokens or {})
    slots = {"ct": (batch.ct, batch.ct_present), "path": (batch.path, batch.path_present)}
    for m, (x, present) in slots.items():
        if m in model.encoders and bool(present[0]) and m not in out:
            out[m] = model.encoders[m](x[:1])  # (1, T, D)
    return out


@contextlib.contextmanager
def capture_tokens(model: FedsightModel, tokens: EncoderTokens, all_rows: bool = False
                   ) -> Iterator[None]:
    """Record (detached) into `tokens` the CT / pathology encoder outputs of row 0 (all_rows:
    of every encoded row) of whatever forward runs within the block, so a later replay needs
    no extra encoder pass. Modalities already in `tokens` are kept."""
    handles = []
    for m in ("ct", "path"):
        if m in model.encoders and m not in tokens:
            def hook(_mod: nn.Module, _inp: object, out: torch.Tensor, m: str = m) -> None:
                tokens[m] = out.detach() if all_rows else out.detach()[:1]
            handles.append(model.encoders[m].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replay_encoders(model: FedsightModel, tokens: EncoderTokens, modalities: tuple[str, ...]
                    ) -> Iterator[None]:
    """Within the block, the encoders of `modalities` return the cached `tokens` (from
    `image_tokens` of the same case). Not thread-safe: callers hold the model."""
    saved: dict[str, nn.Module] = {}
    try:
        for m in modalities:
            if m in tokens:
                saved[m] = model.encoders[m]
                model.encoders[m] = _ReplayTokens(tokens[m])
        yield
    finally:
        for m, enc in saved.items():
            model.encoders[m] = enc


def repeat_batch(batch: Batch, n: int) -> Batch:
    """A one-case batch repeated n times (views, no copies)."""
    return Batch(**{k: v.expand(n, *v.shape[1:]) for k, v in batch.__dict__.items()})
