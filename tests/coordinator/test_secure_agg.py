"""Secure aggregation (SecAgg+) through Flower's own SecAggPlusWorkflow and secaggplus_mod, on a
loopback Grid: every message is serialised to protobuf and back (as over the wire) and handed to
a real ClientApp (its train handler a Message-API function under hospital_node.secure_agg's mod),
each node with its own persistent Context. Tiny models only.

Shown: the unmasked per-expert aggregate equals coordinator.aggregation.aggregate on the same
updates within the quantisation tolerance; a hospital leaving mid-protocol (while training, or
before unmasking) still yields the right aggregate; too many leaving halts the protocol, the
round is recorded as failed and the next round starts from the kept model; Flower 1.42 cannot
recover a hospital that leaves before the key-sharing stage completed (a documented limit)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid

from coordinator.aggregation import Update, aggregate
from coordinator.journal import ACCEPTED, DROPPED
from coordinator.privacy_record import privacy_block
from coordinator.run_state import RunState
from coordinator.secure_agg import (
    FAILED,
    SecAggSettings,
    SecureFedAdam,
    SecureFedProx,
    SecurePerExpertFedAvg,
    decode,
    make_layout,
    secure_round,
)
from coordinator.settings import RunSettings
from coordinator.strategy import build_strategy, from_numpy
from hospital_node.secure_agg import SecureAggError, secure_train_mod, weighted_vector
from tests.coordinator.test_strategy import identity  # noqa: F401 (autouse: Flower's task ids)
from vocab import records as K
from vocab.errors import ConfigError

E = "blocks.0.moe.experts"
SA = SecAggSettings(clip=1.0, quantization_range=2 ** 24, example_scale=1000.0,
                    token_scale=1000.0)
# node id -> (seed, num-examples, tokens of expert 0.0, 0.1, 0.2); expert 0.2 is never used
HOSPITALS = {11: (1, 120, 300.0, 0.0, 0.0), 12: (2, 80, 50.0, 200.0, 0.0),
             13: (3, 200, 0.0, 400.0, 0.0), 14: (4, 60, 120.0, 30.0, 0.0)}
NAMES = {nid: f"h{nid}" for nid in HOSPITALS}


def global_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "blocks.0.attn.qkv.weight": rng.normal(size=(3, 4)).astype(np.float32),
        f"{E}.0.fc1.weight": rng.normal(size=(4,)).astype(np.float32),
        f"{E}.1.fc1.weight": rng.normal(size=(2, 2)).astype(np.float32),
        f"{E}.2.fc1.weight": rng.normal(size=(4,)).astype(np.float32),
        "blocks.0.moe.router.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "norm.steps": np.array(10, np.int64),
    }


def trained(g: dict[str, np.ndarray], nid: int) -> dict[str, np.ndarray]:
    """A hospital's local training: a seeded step away from the global model it received."""
    rng = np.random.default_rng(HOSPITALS[nid][0])
    return {k: (v + 0.05 * rng.normal(size=v.shape)).astype(v.dtype)
            if np.issubdtype(v.dtype, np.floating) else v + 3 for k, v in g.items()}


def train_metrics(nid: int) -> dict[str, float]:
    seed, n, *tokens = HOSPITALS[nid]
    return {K.NUM_EXAMPLES: n, K.TRAIN_LOSS: 0.3 + 0.1 * seed, K.TRAIN_SECONDS: 1.0,
            **{f"{K.EXPERT_TOKENS_PREFIX}.0.{e}": t for e, t in enumerate(tokens)}}


def plain(g: dict[str, np.ndarray], nodes: Iterable[int]) -> dict[str, np.ndarray]:
    """What plain (unmasked) per-expert aggregation makes of the same updates."""
    ups = [Update(NAMES[n], trained(g, n), HOSPITALS[n][1],
                  {(0, e): t for e, t in enumerate(HOSPITALS[n][2:])}) for n in nodes]
    return aggregate(ups, g, per_expert=True)


def client_app(fail_training: set[int] = frozenset(), dp: bool = False) -> ClientApp:
    app = ClientApp()

    @app.train(mods=[secure_train_mod])
    def train(msg: Message, context: Context) -> Message:
        if context.node_id in fail_training:
            raise RuntimeError("fedsight-node: train failed (RuntimeError)")
        g = {k: a.numpy() for k, a in msg.content[K.ARRAYS].items()}
        out = trained(g, context.node_id)
        metrics = train_metrics(context.node_id)
        if dp:  # a hospital training with DP-SGD reports its cumulative epsilon (task.train)
            metrics.update({K.DP_EPSILON: 0.5 + context.node_id / 100, K.DP_DELTA: 1e-5})
        return Message(RecordDict({
            K.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()}),
            K.METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({K.METRICS: MetricRecord(
            {K.LOSS: 0.5, K.N_EVAL: 10, K.NUM_EXAMPLES: 10})}), reply_to=msg)

    return app


def stage_of(msg: Message) -> str:
    if msg.metadata.message_type == MessageType.TRAIN and \
            RECORD_KEY_CONFIGS in msg.content.config_records:
        return str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
    return msg.metadata.message_type


class LoopbackGrid(Grid):
    """Messages go through protobuf to a ClientApp per node and back, in this process.

    leave[(group_id, node)] = stage: from that SecAgg+ stage of that round on, the node is gone
    (silent: no reply, as after a round timeout; or error: the SuperLink's node-unavailable)."""

    def __init__(self, app: ClientApp, nodes: Iterable[int],
                 leave: dict[tuple[str, int], str] | None = None, silent: bool = True) -> None:
        self.app, self.nodes = app, list(nodes)
        self.contexts = {n: Context(run_id=9, node_id=n, node_config={}, state=RecordDict(),
                                    run_config={}) for n in self.nodes}
        self.leave, self.silent = leave or {}, silent
        self.gone: set[tuple[str, int]] = set()
        self.seen: list[tuple[str, int, str]] = []  # (round, node, stage) delivered

    def set_run(self, run):
        pass

    @property
    def run(self):
        raise RuntimeError("no run")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            nid, rnd, stage = msg.metadata.dst_node_id, msg.metadata.group_id, stage_of(msg)
            if self.leave.get((rnd, nid)) == stage:
                self.gone.add((rnd, nid))
            if (rnd, nid) in self.gone:
                if not self.silent:
                    replies.append(Message(Error(ErrorCode.NODE_UNAVAILABLE, "node lost"),
                                           reply_to=msg))
                continue
            self.seen.append((rnd, nid, stage))
            wire = message_from_proto(message_to_proto(msg))
            try:
                reply = self.app(wire, self.contexts[nid])
            except Exception as e:  # noqa: BLE001 - what a SuperNode reports for a raising app
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, repr(e)),
                                reply_to=wire)
            replies.append(message_from_proto(message_to_proto(reply)))
        return replies


def run_secure(grid: LoopbackGrid, g: dict[str, np.ndarray], server_round: int = 1):
    layout = make_layout(g, SA)
    sr = secure_round(grid, list(grid.nodes), g, {K.LR: 0.01}, layout, SA, server_round)
    return layout, sr


def tolerance(g: dict[str, np.ndarray], nodes: list[int]) -> float:
    """Stochastic rounding: each value at each hospital off by < one step; the summed error over
    the smallest group weight (a group = examples or one used expert's tokens)."""
    weights = [sum(HOSPITALS[n][1] for n in nodes) / SA.example_scale]
    for e in range(3):
        w = sum(HOSPITALS[n][2 + e] for n in nodes) / SA.token_scale
        if w > 0:
            weights.append(w)
    return 2 * len(nodes) * SA.step / min(weights) + 1e-6  # + float32 rounding of the result


def assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_allclose(a[k].astype(np.float64), b[k].astype(np.float64),
                                   rtol=0, atol=atol, err_msg=k)


def test_secure_sum_equals_plain_per_expert_aggregate() -> None:
    g = global_state()
    grid = LoopbackGrid(client_app(), HOSPITALS)
    layout, sr = run_secure(grid, g)
    assert sr.ok and sr.contributors == sorted(HOSPITALS) and sr.dropped == []
    d = decode(layout, sr.sums, g, len(sr.contributors), SA.step)
    assert_close(d.state, plain(g, HOSPITALS), tolerance(g, list(HOSPITALS)))
    assert d.kept_experts == {f"{E}.2.fc1.weight"}  # nobody routed a token to expert 2
    np.testing.assert_array_equal(d.state[f"{E}.2.fc1.weight"], g[f"{E}.2.fc1.weight"])
    assert d.num_examples == pytest.approx(460, abs=1e-3)
    want_loss = sum(HOSPITALS[n][1] * (0.3 + 0.1 * HOSPITALS[n][0]) for n in HOSPITALS) / 460
    assert d.train_loss == pytest.approx(want_loss, abs=1e-4)
    assert d.clipped_fraction == pytest.approx(0.0, abs=1e-5)
    # every hospital went through all four SecAgg+ stages, and nothing else
    stages = {(n, s) for _, n, s in grid.seen}
    assert stages == {(n, s) for n in HOSPITALS for s in Stage.all()}


@pytest.mark.parametrize("silent", [True, False])
def test_hospital_leaving_while_training_is_left_out_of_the_sum(silent: bool) -> None:
    g = global_state()
    grid = LoopbackGrid(client_app(), HOSPITALS,
                        leave={("1", 13): Stage.COLLECT_MASKED_VECTORS}, silent=silent)
    layout, sr = run_secure(grid, g)
    assert sr.ok and sr.contributors == [11, 12, 14] and sr.dropped == [13]
    d = decode(layout, sr.sums, g, 3, SA.step)
    assert_close(d.state, plain(g, [11, 12, 14]), tolerance(g, [11, 12, 14]))


def test_hospital_whose_training_fails_is_left_out_of_the_sum() -> None:
    g = global_state()
    layout, sr = run_secure(LoopbackGrid(client_app(fail_training={12}), HOSPITALS), g)
    assert sr.ok and sr.contributors == [11, 13, 14] and sr.dropped == [12]
    d = decode(layout, sr.sums, g, 3, SA.step)
    assert_close(d.state, plain(g, [11, 13, 14]), tolerance(g, [11, 13, 14]))


def test_hospital_leaving_before_unmasking_stays_in_the_sum() -> None:
    """Its masked vector arrived; its private mask is rebuilt from the others' shares."""
    g = global_state()
    grid = LoopbackGrid(client_app(), HOSPITALS, leave={("1", 11): Stage.UNMASK})
    layout, sr = run_secure(grid, g)
    assert sr.ok and sr.contributors == sorted(HOSPITALS)
    d = decode(layout, sr.sums, g, 4, SA.step)
    assert_close(d.state, plain(g, HOSPITALS), tolerance(g, list(HOSPITALS)))


def test_too_many_leaving_halts_cleanly() -> None:
    """4 hospitals: threshold 3. Two leaving while training leave 2 < 3: no sum at all."""
    g = global_state()
    grid = LoopbackGrid(client_app(), HOSPITALS, leave={
        ("1", 11): Stage.COLLECT_MASKED_VECTORS, ("1", 12): Stage.COLLECT_MASKED_VECTORS})
    _, sr = run_secure(grid, g)
    assert not sr.ok and sr.sums == [] and sr.contributors == []
    # the protocol stopped before asking anyone for key shares
    assert not [s for _, _, s in grid.seen if s == Stage.UNMASK]


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS])
def test_flower_142_cannot_recover_a_hospital_leaving_before_keys_are_shared(stage: str) -> None:
    """Flower 1.42 limit (docs/secure_aggregation.md): a node lost in stage 0 or 1 is still in
    the workflow's sampled set, so the unmask stage asks the others for key shares they never
    received (KeyError in secaggplus_mod._unmask) and the round halts, even with enough left."""
    g = global_state()
    grid = LoopbackGrid(client_app(), HOSPITALS, leave={("1", 14): stage})
    _, sr = run_secure(grid, g)
    assert not sr.ok


def test_weighted_vector_refuses_what_would_corrupt_the_sum() -> None:
    g = global_state()
    layout = make_layout(g, SA)
    local = trained(g, 11)
    local["blocks.0.attn.qkv.weight"][0, 0] = np.nan
    with pytest.raises(SecureAggError, match="non-finite"):
        weighted_vector(layout, g, local, train_metrics(11))
    with pytest.raises(SecureAggError, match="num-examples"):
        weighted_vector(layout, g, trained(g, 11), {**train_metrics(11), K.NUM_EXAMPLES: 5000})
    with pytest.raises(SecureAggError, match="layout"):
        weighted_vector(layout, g, {"x": np.zeros(1)}, train_metrics(11))


def test_plain_train_messages_pass_the_mod_untouched() -> None:
    g = global_state()
    app = client_app()
    msg = Message(RecordDict({K.ARRAYS: from_numpy(g), K.CONFIG: ConfigRecord({K.LR: 0.01})}),
        dst_node_id=11, message_type=MessageType.TRAIN, group_id="1")
    msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    reply = app(msg, Context(run_id=9, node_id=11, node_config={}, state=RecordDict(),
                             run_config={}))
    assert set(reply.content.array_records) == {K.ARRAYS}
    assert reply.content[K.METRICS][K.NUM_EXAMPLES] == 120


def secure_strategy() -> SecurePerExpertFedAvg:
    settings = RunSettings.from_run_config({"min-hospitals": 3})
    s = SecurePerExpertFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=3,
                              min_evaluate_nodes=3, min_available_nodes=3)
    s.setup(settings, RunState("r", {}, 2), identify=lambda grid, ids, taken: {
        i: NAMES[i] for i in ids})
    s.setup_secure(SA)
    return s


def test_failed_secure_round_is_recorded_and_the_next_starts_from_the_kept_model() -> None:
    g = global_state()
    grid = LoopbackGrid(client_app(), HOSPITALS, leave={
        ("1", 11): Stage.COLLECT_MASKED_VECTORS, ("1", 12): Stage.COLLECT_MASKED_VECTORS})
    s = secure_strategy()
    result = s.start(grid, initial_arrays=from_numpy(g), num_rounds=2, timeout=5)
    r1, r2 = s.journal[1], s.journal[2]
    assert r1.status == FAILED
    assert {h.outcome for h in r1.hospitals.values()} == {DROPPED}
    assert r2.status == "aggregated"
    assert {n: h.outcome for n, h in r2.hospitals.items()} == {n: ACCEPTED for n in
                                                                 NAMES.values()}
    # round 2 trained on the initial model: round 1 changed nothing
    final = {k: a.numpy().reshape(g[k].shape) for k, a in result.arrays.items()}
    assert_close(final, plain(g, HOSPITALS), tolerance(g, list(HOSPITALS)))
    assert result.train_metrics_clientapp[2][K.NUM_EXAMPLES] == 460


def test_dp_accounting_reaches_the_journal_and_the_privacy_block() -> None:
    """Under SecAgg+ a hospital's dp-epsilon / dp-delta still arrive per hospital (in the clear,
    vocab.secagg.CLEAR_METRICS); nothing else of its train metrics does."""
    g = global_state()
    s = secure_strategy()
    s.start(LoopbackGrid(client_app(dp=True), HOSPITALS), initial_arrays=from_numpy(g),
            num_rounds=1, timeout=5)
    rec = s.journal[1]
    assert rec.status == "aggregated"
    for nid, name in NAMES.items():
        h = rec.hospitals[name]
        assert h.outcome == ACCEPTED
        assert h.train == {K.DP_EPSILON: pytest.approx(0.5 + nid / 100), K.DP_DELTA: 1e-5}
    block = privacy_block(None, rec, 1.0, 1.0)
    assert block["hospitals"]["h13"] == {"epsilon": pytest.approx(0.63), "delta": 1e-5}
    assert s.secure_rounds[1]["contributors"] == 4


def test_secure_aggregation_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="robust-aggregation.*only sees the sum"):
        RunSettings.from_run_config({"secure-aggregation": True,
                                     "robust-aggregation": "median"})
    with pytest.raises(ConfigError, match="secagg-timeout must be finite and > 0, got 0.0"):
        RunSettings.from_run_config({"secagg-timeout": 0})
    with pytest.raises(ConfigError, match="secagg-quantization-range.*4294967296"):
        RunSettings.from_run_config({"secagg-quantization-range": 2 ** 32})
    with pytest.raises(ConfigError, match="'secure-aggregation' must be bool"):
        RunSettings.from_run_config({"secure-aggregation": 1})
    s = RunSettings.from_run_config({"secure-aggregation": True, "secagg-clipping-range": 2})
    assert SecAggSettings.from_run_settings(s) == SecAggSettings(
        clip=2.0, quantization_range=2 ** 24, timeout=600.0, example_scale=10_000.0,
        token_scale=1e7)


@pytest.mark.parametrize(("name", "cls"), [("fedavg", SecurePerExpertFedAvg),
                                           ("fedprox", SecureFedProx),
                                           ("fedadam", SecureFedAdam)])
def test_build_strategy_picks_the_secure_variant(name: str, cls: type) -> None:
    settings = RunSettings.from_run_config({"secure-aggregation": True, "strategy": name})
    s = build_strategy(settings, RunState("r", {}, 1))
    assert type(s) is cls and s.sa.timeout == 600.0
    assert s.min_train_nodes == s.min_available_nodes == 3  # SecAgg+ needs >= 3 hospitals
    assert type(build_strategy(RunSettings(strategy=name), RunState("r", {}, 1))) is not cls


def test_secure_fedadam_steps_from_the_secure_sum() -> None:
    g = global_state()
    settings = RunSettings.from_run_config({"secure-aggregation": True, "strategy": "fedadam",
                                            "min-hospitals": 3})
    s = build_strategy(settings, RunState("r", {}, 1),
                       identify=lambda grid, ids, taken: {i: NAMES[i] for i in ids})
    s.sa = SA
    result = s.start(LoopbackGrid(client_app(), HOSPITALS), initial_arrays=from_numpy(g),
                     num_rounds=1, timeout=5)
    assert s.journal[1].status == "aggregated"
    final = {k: a.numpy().reshape(g[k].shape) for k, a in result.arrays.items()}
    for k, v in final.items():
        assert v.dtype == g[k].dtype, k
    # the unused expert keeps the global copy; the others moved (Adam's step ~ eta)
    np.testing.assert_array_equal(final[f"{E}.2.fc1.weight"], g[f"{E}.2.fc1.weight"])
    assert not np.allclose(final["blocks.0.attn.qkv.weight"], g["blocks.0.attn.qkv.weight"])
