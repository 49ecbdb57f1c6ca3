from __future__ import annotations

import math

import pytest
import torch

from multimodal.moe import MoE, expert_capacity, load_balancing_loss, router_z_loss


@torch.no_grad()
def _naive(moe: MoE, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Per-token reference for one sample x (T, D): explicit softmax; tokens in order of their
    highest probability take their 2 most probable experts that have room (capacity=None: no
    limit); renormalise; weighted sum + shared expert."""
    out = torch.zeros_like(x)
    probs_of = []
    for t in range(x.shape[0]):
        logits = moe.router.weight.float() @ x[t].float()  # (E,)
        probs = torch.exp(logits - logits.max())
        probs_of.append(probs / probs.sum())
    load = [0] * moe.n_experts
    for t in sorted(range(x.shape[0]), key=lambda t: -float(probs_of[t].max())):
        probs = probs_of[t]
        room = [e for e in range(moe.n_experts) if capacity is None or load[e] < capacity]
        top = sorted(room, key=lambda e: -float(probs[e]))[:2]
        z = probs[top[0]] + probs[top[1]]
        for e in top:
            load[e] += 1
            out[t] += probs[e] / z * moe.experts[e](x[t])
        out[t] += moe.shared(x[t])
    return out


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_moe_matches_naive_reference(capacity_factor: float) -> None:
    torch.manual_seed(0)
    moe = MoE(16, 24, n_experts=8, top_k=2, shared_expert=True, noise="gaussian",
              capacity_factor=capacity_factor).eval()
    torch.nn.init.normal_(moe.router.weight, std=0.5)  # sharp, tie-free routing
    x = torch.randn(4, 10, 16)  # 4 samples of 10 tokens
    cap = expert_capacity(10, 8, 2, capacity_factor) if capacity_factor else None
    with torch.no_grad():
        fast = moe(x)
    ref = torch.stack([_naive(moe, x[i], cap) for i in range(4)])
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    # a sample's output does not depend on the other samples in the batch
    torch.testing.assert_close(moe(x[2:3]), fast[2:3])
    # a 2-D input is one sample
    torch.testing.assert_close(moe(x[1]), fast[1])


def test_capacity_bounds_every_experts_share_per_sample() -> None:
    torch.manual_seed(1)
    moe = MoE(16, 8, n_experts=16, top_k=2, capacity_factor=1.0).eval()
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    # Worst case for plain top-k: all 21 tokens of each sample nearly identical.
    x = torch.randn(6, 1, 16) + 0.01 * torch.randn(6, 21, 16)
    cap = expert_capacity(21, 16, 2, 1.0)
    assert cap == 3 == math.ceil(21 * 2 / 16)
    with torch.no_grad():
        moe(x)
    idx = moe.last_indices.view(6, 21, 2)
    for s in range(6):
        counts = torch.bincount(idx[s].reshape(-1), minlength=16)
        assert int(counts.max()) <= cap and int(counts.sum()) == 42
        assert (idx[s, :, 0] != idx[s, :, 1]).all()  # two distinct experts per token
    moe_free = MoE(16, 8, n_experts=16, top_k=2, capacity_factor=0.0).eval()
    moe_free.load_state_dict(moe.state_dict())
    with torch.no_grad():
        moe_free(x)
    free = torch.bincount(moe_free.last_indices.view(6, 42)[0], minlength=16)
    assert int(free.max()) > cap  # without capacity the identical tokens pile up


def test_capacity_is_always_feasible() -> None:
    for t in range(1, 40):
        for e in (2, 4, 16):
            for k in (1, 2):
                if k > e:
                    continue
                cap = expert_capacity(t, e, k, 1.0)
                # the last token still finds k experts with room, however the others chose
                assert e - ((t - 1) * k) // cap >= k


def test_topk_weights_sum_to_one_and_noise_only_in_training() -> None:
    torch.manual_seed(0)
    moe = MoE(16, 24, n_experts=16, top_k=2, noise="gumbel", capacity_factor=1.0)
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
