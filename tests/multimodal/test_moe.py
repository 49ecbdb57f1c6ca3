from __future__ import annotations

import torch

from multimodal.moe import MoE, load_balancing_loss, router_z_loss


@torch.no_grad()
def _naive(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token reference: explicit softmax, top-2, renormalise, weighted sum + shared."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = moe.router.weight.float() @ x[t].float()  # (E,)
        probs = torch.exp(logits - logits.max())
        probs = probs / probs.sum()
        top = sorted(range(len(probs)), key=lambda e: -float(probs[e]))[:2]
        z = probs[top[0]] + probs[top[1]]
        for e in top:
            out[t] += probs[e] / z * moe.experts[e](x[t])
        out[t] += moe.shared(x[t])
    return out


def test_moe_matches_naive_reference() -> None:
    torch.manual_seed(0)
    moe = MoE(16, 24, n_experts=8, top_k=2, shared_expert=True, noise="gaussian").eval()
    torch.nn.init.normal_(moe.router.weight, std=0.5)  # sharp, tie-free routing
    x = torch.randn(40, 16)
    with torch.no_grad():
        fast = moe(x)
    torch.testing.assert_close(fast, _naive(moe, x), rtol=1e-5, atol=1e-5)
    # batched (B, T, D) input is the same computation
    torch.testing.assert_close(moe(x.view(4, 10, 16)).view(40, 16), moe(x))


def test_topk_weights_sum_to_one_and_noise_only_in_training() -> None:
    torch.manual_seed(0)
    moe = MoE(16, 24, n_experts=16, top_k=2, noise="gumbel")
    x = torch.randn(50, 16)
    moe.eval()
    w, i, p, _ = moe.router(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(50))
    assert w.shape == i.shape == (50, 2) and (i[:, 0] != i[:, 1]).all()
    w2, i2, _, _ = moe.router(x)
    assert torch.equal(i, i2) and torch.equal(w, w2)
    moe.train()
    moe.router.noise_scale = 1.0
    _, i3, _, _ = moe.router(x)
    assert not torch.equal(i, i3)
    moe.router.noise_scale = 0.0  # annealed to zero: training routing equals eval routing
    _, i4, _, _ = moe.router(x)
    assert torch.equal(i, i4)


def test_aux_losses() -> None:
    n, e = 64, 4
    uniform = torch.full((n, e), 1 / e)
    mask = torch.nn.functional.one_hot(torch.arange(n) % e, e)
    assert torch.isclose(load_balancing_loss(uniform, mask), torch.tensor(1.0))
    collapsed = torch.zeros(n, e)
    collapsed[:, 0] = 1
    onehot0 = torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), e)
    assert torch.isclose(load_balancing_loss(collapsed, onehot0), torch.tensor(float(e)))
    logits = torch.zeros(3, e)
    assert torch.isclose(router_z_loss(logits), torch.log(torch.tensor(float(e))) ** 2)


def test_router_runs_in_float32() -> None:
    moe = MoE(8, 8, n_experts=4, top_k=2)
    _, _, probs, logits = moe.router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32 and probs.dtype == torch.float32
