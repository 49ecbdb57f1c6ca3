"""The Flower strategies driven through their hooks with fake reply Messages (no Grid, no
network): failing and outlier hospitals are left out with a reason per hospital, min-hospitals is
respected, an unused expert keeps the global copy, and FedProx / FedAdam merge to values computed
here by hand with numpy."""

from __future__ import annotations

import logging
import math
import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator.run_state import RunState
from coordinator.settings import RunSettings
from coordinator.strategy import PerExpertFedAvg, build_strategy, from_numpy, to_numpy
from vocab import records as K

E = "blocks.0.moe.experts"
NODES = {101: "a", 102: "b", 103: "c", 104: "d", 105: "e"}


SUPERLINK = 1  # Flower's SuperLink node id: the source of a reply it makes for a lost node


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def push(messages: list[Message]) -> None:
    """What every Flower grid does to the messages it pushes: give each its id."""
    for m in messages:
        m.metadata.__dict__["_message_id"] = str(uuid.uuid4())


@pytest.fixture(autouse=True)
def identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 9, 1, 1


def global_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "blocks.0.attn.qkv.weight": rng.normal(size=(3, 4)).astype(np.float32),
        f"{E}.0.fc1.weight": rng.normal(size=(4,)).astype(np.float32),
        f"{E}.1.fc1.weight": rng.normal(size=(4,)).astype(np.float32),
        "blocks.0.moe.router.weight": rng.normal(size=(2, 4)).astype(np.float32),
        "norm.steps": np.array(10, np.int64),
    }


def local(g: dict[str, np.ndarray], seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    """A hospital's trained weights: the global ones plus a small seeded step."""
    rng = np.random.default_rng(seed)
    out = {k: (v + scale * rng.normal(size=v.shape)).astype(v.dtype)
           if np.issubdtype(v.dtype, np.floating) else v + 3 for k, v in g.items()}
    return out


def reply(to: Message, state: dict[str, np.ndarray], n: int, tokens: tuple[float, float],
          loss: float = 0.5) -> Message:
    metrics = MetricRecord({K.NUM_EXAMPLES: n, K.TRAIN_LOSS: loss, K.TRAIN_SECONDS: 1.0,
                            f"{K.EXPERT_TOKENS_PREFIX}.0.0": tokens[0],
                            f"{K.EXPERT_TOKENS_PREFIX}.0.1": tokens[1]})
    out = Message(content=RecordDict({K.ARRAYS: from_numpy(state), K.METRICS: metrics}),
                  reply_to=to)
    out.metadata.__dict__["_reply_to_message_id"] = to.metadata.message_id
    return out


def failed(to: Message, reason: str = "Exception('fedsight-node: train failed (ValueError)')",
           from_superlink: bool = False) -> Message:
    """A failed reply: from the node itself, or (node lost) made by the SuperLink, whose own id
    is then the source - only the message it answers says which hospital it was for."""
    out = Message(error=Error(code=0, reason=reason), reply_to=to)
    out.metadata.__dict__["_reply_to_message_id"] = to.metadata.message_id
    if from_superlink:
        out.metadata.__dict__["_src_node_id"] = SUPERLINK
    return out


def strategy(nodes: list[int], **run: object) -> PerExpertFedAvg:
    settings = RunSettings.from_run_config({"min-hospitals": 2, **run})
    return build_strategy(settings, RunState("r", {}, 3),
                          identify=lambda grid, ids, taken: {i: NODES[i] for i in ids})


def configure(s: PerExpertFedAvg, g: dict[str, np.ndarray], nodes: list[int],
              server_round: int = 1) -> dict[str, Message]:
    msgs = list(s.configure_train(server_round, from_numpy(g), ConfigRecord({K.LR: 0.01}),
                                  FakeGrid(nodes)))
    push(msgs)
    return {NODES[m.metadata.dst_node_id]: m for m in msgs}


def by_hand(states: list[dict[str, np.ndarray]], examples: list[int],
            tokens: list[tuple[float, float]], g: dict[str, np.ndarray]
            ) -> dict[str, np.ndarray]:
    """The per-expert average written out for this module's five parameters."""
    w = np.array(examples, np.float64) / sum(examples)
    t0 = np.array([t[0] for t in tokens], np.float64)
    out = {}
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.moe.router.weight"):
        out[key] = sum(wi * s[key].astype(np.float64) for wi, s in zip(w, states, strict=True))
    out[f"{E}.0.fc1.weight"] = sum(ti / t0.sum() * s[f"{E}.0.fc1.weight"].astype(np.float64)
                                   for ti, s in zip(t0, states, strict=True))
    out[f"{E}.1.fc1.weight"] = g[f"{E}.1.fc1.weight"].astype(np.float64)  # nobody used it
    out["norm.steps"] = np.rint(sum(wi * s["norm.steps"] for wi, s in
                                    zip(w, states, strict=True)))
    return out


def test_round_merges_the_others_when_one_fails_and_one_is_an_outlier(
        caplog: pytest.LogCaptureFixture) -> None:
    g = global_state()
    nodes = list(NODES)
    s = strategy(nodes)
    msgs = configure(s, g, nodes)
    assert all(m.content[K.CONFIG][K.SERVER_ROUND] == 1 for m in msgs.values())
    assert all(m.content[K.CONFIG][K.STAGE] == 1 for m in msgs.values())  # stage1-rounds = 1
    good = {"a": (local(g, 1), 10, (30.0, 0.0)), "b": (local(g, 2), 30, (10.0, 0.0)),
            "c": (local(g, 3), 20, (5.0, 0.0))}
    outlier = {k: v * 0 + 40.0 if np.issubdtype(v.dtype, np.floating) else v
               for k, v in g.items()}
    replies = [reply(msgs[h], st, n, tok) for h, (st, n, tok) in good.items()]
    replies += [reply(msgs["d"], outlier, 50, (100.0, 0.0)), failed(msgs["e"])]
    with caplog.at_level(logging.WARNING, logger="flwr.fedsight"):
        arrays, metrics = s.aggregate_train(1, replies)

    assert arrays is not None and metrics is not None
    expected = by_hand([v[0] for v in good.values()], [v[1] for v in good.values()],
                       [v[2] for v in good.values()], g)
    merged = to_numpy(arrays)
    for key, want in expected.items():
        np.testing.assert_allclose(merged[key], want, rtol=1e-6, atol=1e-7, err_msg=key)
        assert merged[key].dtype == g[key].dtype, key
    np.testing.assert_array_equal(merged[f"{E}.1.fc1.weight"], g[f"{E}.1.fc1.weight"])
    assert metrics[K.NUM_EXAMPLES] == 60 and metrics["hospitals"] == 3

    rec = s.journal[1]
    assert rec.status == "aggregated"
    assert {h: r.outcome for h, r in rec.hospitals.items()} == {
        "a": "accepted", "b": "accepted", "c": "accepted", "d": "rejected", "e": "dropped"}
    assert "outlier" in rec.hospitals["d"].reason
    assert rec.hospitals["e"].reason == "reply failed: fedsight-node: train failed (ValueError)"
    wire = sum(len(Array(v).data) for v in g.values())  # serialised arrays, headers included
    assert rec.hospitals["a"].bytes_down == wire > sum(v.nbytes for v in g.values())
    logged = caplog.text
    assert "hospital d rejected" in logged and "hospital e dropped" in logged


def test_min_hospitals_keeps_the_global_model() -> None:
    g = global_state()
    nodes = [101, 102, 103]
    s = strategy(nodes, **{"min-hospitals": 3})
    msgs = configure(s, g, nodes)
    bad = local(g, 3)
    bad["blocks.0.attn.qkv.weight"][0, 0] = np.nan
    arrays, metrics = s.aggregate_train(1, [reply(msgs["a"], local(g, 1), 10, (1.0, 1.0)),
                                            reply(msgs["b"], local(g, 2), 10, (1.0, 1.0)),
                                            reply(msgs["c"], bad, 10, (1.0, 1.0))])
    assert arrays is None and metrics is None
    assert s.journal[1].status == "too-few-hospitals"
    assert "non-finite values in array 'blocks.0.attn.qkv.weight'" in \
        s.journal[1].hospitals["c"].reason


def test_examples_aggregation_averages_experts_by_examples_too() -> None:
    g = global_state()
    nodes = [101, 102]
    s = strategy(nodes, aggregation="examples")
    msgs = configure(s, g, nodes)
    sa, sb = local(g, 1), local(g, 2)
    arrays, _ = s.aggregate_train(1, [reply(msgs["a"], sa, 10, (0.0, 0.0)),
                                      reply(msgs["b"], sb, 30, (0.0, 0.0))])
    assert arrays is not None
    want = 0.25 * sa[f"{E}.1.fc1.weight"] + 0.75 * sb[f"{E}.1.fc1.weight"]
    np.testing.assert_allclose(to_numpy(arrays)[f"{E}.1.fc1.weight"], want, rtol=1e-6)


def test_fedprox_sends_mu_and_merges_like_fedavg() -> None:
    g = global_state()
    nodes = [101, 102]
    s = strategy(nodes, strategy="fedprox", **{"proximal-mu": 0.05})
    msgs = configure(s, g, nodes)
    for m in msgs.values():
        assert m.content[K.CONFIG][K.PROXIMAL_MU] == pytest.approx(0.05)
    sa, sb = local(g, 1), local(g, 2)
    arrays, _ = s.aggregate_train(1, [reply(msgs["a"], sa, 10, (3.0, 0.0)),
                                      reply(msgs["b"], sb, 30, (1.0, 0.0))])
    assert arrays is not None
    expected = by_hand([sa, sb], [10, 30], [(3.0, 0.0), (1.0, 0.0)], g)
    for key, want in expected.items():
        np.testing.assert_allclose(to_numpy(arrays)[key], want, rtol=1e-6, atol=1e-7)


def test_fedadam_steps_from_the_per_expert_aggregate() -> None:
    g = global_state()
    nodes = [101, 102]
    eta, tau, b1, b2 = 0.3, 1e-2, 0.9, 0.99  # beta defaults of Flower's FedAdam
    s = strategy(nodes, strategy="fedadam", **{"server-lr": eta, "server-tau": tau})
    sa, sb = local(g, 1), local(g, 2)
    tokens = [(3.0, 0.0), (1.0, 0.0)]
    expected_avg = by_hand([sa, sb], [10, 30], tokens, g)
    cur = {k: v.astype(np.float64) for k, v in g.items()}
    m_t = {k: np.zeros_like(v) for k, v in cur.items()}
    v_t = {k: np.zeros_like(v) for k, v in cur.items()}
    for rnd in (1, 2):  # two rounds: the second uses the first round's moments
        msgs = configure(s, {k: v.astype(g[k].dtype) for k, v in cur.items()}, nodes, rnd)
        arrays, _ = s.aggregate_train(rnd, [reply(msgs["a"], sa, 10, tokens[0]),
                                            reply(msgs["b"], sb, 30, tokens[1])])
        assert arrays is not None
        got = to_numpy(arrays)
        avg = by_hand([sa, sb], [10, 30], tokens, {k: v.astype(g[k].dtype)
                                                   for k, v in cur.items()})
        eta_norm = eta * math.sqrt(1 - b2 ** (rnd + 1)) / (1 - b1 ** (rnd + 1))
        new = {}
        for k in cur:
            delta = avg[k] - cur[k]
            m_t[k] = b1 * m_t[k] + (1 - b1) * delta
            v_t[k] = b2 * v_t[k] + (1 - b2) * delta ** 2
            new[k] = cur[k] + eta_norm * m_t[k] / (np.sqrt(v_t[k]) + tau)
        new[f"{E}.1.fc1.weight"] = cur[f"{E}.1.fc1.weight"]  # unused expert stays put
        new["norm.steps"] = np.rint(new["norm.steps"])
        for k, want in new.items():
            assert got[k].dtype == g[k].dtype, k
            np.testing.assert_allclose(got[k], want, rtol=2e-5, atol=2e-6, err_msg=f"{rnd} {k}")
        cur = {k: v.astype(np.float64) for k, v in got.items()}
    # Adam moved the shared weights, but not to the plain average (it is a different rule).
    assert not np.allclose(cur["blocks.0.attn.qkv.weight"],
                           expected_avg["blocks.0.attn.qkv.weight"], atol=1e-3)


def test_resumed_strategy_numbers_rounds_after_the_offset() -> None:
    g = global_state()
    nodes = [101, 102]
    settings = RunSettings.from_run_config({"min-hospitals": 2, "stage1-rounds": 1})
    s = build_strategy(settings, RunState("r", {}, 4, rounds_completed=2),
                       identify=lambda grid, ids, taken: {i: NODES[i] for i in ids})
    msgs = configure(s, g, nodes, server_round=1)
    assert {m.content[K.CONFIG][K.SERVER_ROUND] for m in msgs.values()} == {3}
    assert {m.content[K.CONFIG][K.STAGE] for m in msgs.values()} == {2}
    assert set(s.journal) == {3}


def test_evaluation_keeps_per_hospital_metrics_and_example_weighted_pool() -> None:
    g = global_state()
    nodes = [101, 102, 103]
    s = strategy(nodes)
    msgs = list(s.configure_evaluate(1, from_numpy(g), ConfigRecord({}), FakeGrid(nodes)))
    by = {NODES[m.metadata.dst_node_id]: m for m in msgs}
    replies = [
        Message(content=RecordDict({K.METRICS: MetricRecord(
            {K.NUM_EXAMPLES: 10, K.N_EVAL: 10, K.LOSS: 0.4, K.AUC: 0.8, K.ACCURACY: 0.7})}),
            reply_to=by["a"]),
        Message(content=RecordDict({K.METRICS: MetricRecord(
            {K.NUM_EXAMPLES: 30, K.N_EVAL: 30, K.LOSS: 0.6, K.AUC: 0.6, K.ACCURACY: 0.5})}),
            reply_to=by["b"]),
        failed(by["c"]),
    ]
    pooled = s.aggregate_evaluate(1, replies)
    rec = s.journal[1]
    assert rec.hospitals["a"].eval == {K.N_EVAL: 10.0, K.LOSS: 0.4, K.AUC: 0.8,
                                       K.ACCURACY: 0.7}
    assert rec.hospitals["c"].eval == {}
    assert pooled is not None
    assert pooled[K.AUC] == pytest.approx((0.8 * 10 + 0.6 * 30) / 40)
    assert pooled[K.N_EVAL] == 40


def test_array_record_round_trip_keeps_dtypes() -> None:
    g = global_state()
    back = to_numpy(ArrayRecord({k: Array(v) for k, v in g.items()}))
    assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in g.items()}


def test_default_model_survives_the_flower_array_round_trip():
    """Every array of the default model keeps its shape through Flower's records, both ways the
    model travels (the runner's torch state -> ArrayRecord; numpy -> from_numpy -> to_numpy).
    Flower stores a 0-d array as shape (1,), which made every hospital's update mismatch."""
    from multimodal.model import build_model

    state = build_model(seed=0).state_dict()
    via_torch = to_numpy(ArrayRecord(state))
    via_numpy = to_numpy(from_numpy({k: v.numpy() for k, v in state.items()}))
    for name, t in state.items():
        assert via_torch[name].shape == tuple(t.shape), name
        assert via_numpy[name].shape == tuple(t.shape), name
        np.testing.assert_array_equal(via_numpy[name], t.numpy())
