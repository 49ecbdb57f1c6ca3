"""Temperature scaling (Guo et al. 2017): one scalar T, logit / T, fitted by LBFGS on NLL."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature minimising the BCE of logits / T on (validation) cases; 1.0 if undefined."""
    keep = torch.isfinite(labels) & torch.isfinite(logits)
    x, y = logits[keep].double(), labels[keep].double()
    if x.numel() < 2 or y.min() == y.max():
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) > 0
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, 0.05), 20.0)
