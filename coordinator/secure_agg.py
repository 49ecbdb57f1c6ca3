"""Coordinator side of secure aggregation: one training round through Flower's
SecAggPlusWorkflow on our Grid, decoded into the per-expert weighted mean
(docs/secure_aggregation.md).

Flower 1.42's SecAggPlusWorkflow is written for the legacy Strategy API (it needs a
LegacyContext with a legacy `Strategy` and a ClientManager, and hands `aggregate_fit` the
unmasked mean). `_Shim` is that legacy strategy, reduced to: "these nodes, this FitIns" and
"keep what the workflow unmasked". The protocol, its crypto and its dropout recovery are Flower's.

`SecurePerExpertFedAvg` composes this with our Message-API strategy through its hooks:
`configure_train` runs the whole protocol on the grid it is given and returns no messages (so
Strategy.start's own send_and_receive sends nothing), and `aggregate_train` turns the secure sum
into the new model, or, when the protocol halted (too many hospitals left), records the round as
failed and keeps the global model (the next round starts from it).

Screening under SecAgg (coordinator.screening needs each hospital's update; the sum has none):
lost: per-hospital norm outliers, free-riders, direction (cosine), robust merges (median,
trimmed mean, Krum). Kept: structure and finiteness checks at the hospital before masking (it
refuses and drops out), Flower's clip range as a per-value bound on each (honest) hospital's
weighted update, the summed fraction of clipped values, checks on the aggregate (finite, norm of
the aggregate step against the previous rounds).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx

from coordinator.aggregation import State, cast_like, expert_of, expert_token_key
from coordinator.journal import ACCEPTED, DROPPED, RoundRecord
from coordinator.settings import RunSettings
from coordinator.strategy import FedsightFedAdam, PerExpertFedAvg, from_numpy
from vocab import records as K
from vocab import secagg as S

log = logging.getLogger("flwr.fedsight")
FAILED = "secagg-failed"  # RoundRecord.status of a round whose protocol halted


@dataclass(frozen=True)
class SecAggSettings:
    """Protocol parameters. Threshold: more than half of the sampled hospitals (so the
    coordinator can never collect both secrets of one hospital), i.e. floor(n/2)+1."""

    clip: float = 1.0  # range of each weighted update value (Flower's clipping_range)
    quantization_range: int = 2 ** 24  # integer levels over [-clip, clip]
    modulus_range: int = 2 ** 32  # Flower: a power of 2, at most 2**32
    timeout: float | None = None  # seconds per protocol stage; None waits for every reply
    example_scale: float = 10_000.0  # public cap on num-examples (weights = n / scale)
    token_scale: float = 1e7  # public cap on one expert's token count at one hospital

    @classmethod
    def from_run_settings(cls, settings: RunSettings) -> SecAggSettings:
        return cls(clip=settings.secagg_clipping_range,
                   quantization_range=settings.secagg_quantization_range,
                   timeout=settings.secagg_timeout,
                   example_scale=settings.secagg_example_scale,
                   token_scale=settings.secagg_token_scale)

    def check(self, hospitals: int) -> None:
        if hospitals < 3:
            raise ValueError("SecAgg+ needs at least 3 hospitals (with 2, each learns the other)")
        # the modular sum of hospitals' quantised values (and of Flower's weight factors,
        # quantization_range each) must not wrap around
        if hospitals * self.quantization_range >= self.modulus_range:
            raise ValueError(f"{hospitals} hospitals x quantization_range "
                             f"{self.quantization_range} overflow modulus {self.modulus_range}")

    @property
    def step(self) -> float:
        """Quantisation step of one value at one hospital."""
        return 2 * self.clip / self.quantization_range


def make_layout(global_state: State, sa: SecAggSettings, per_expert: bool = True) -> S.Layout:
    keys = tuple(global_state)
    groups = tuple(expert_token_key(*e) if per_expert and (e := expert_of(k)) is not None
                   else S.EXAMPLES for k in keys)
    token_keys = tuple(sorted({g for g in groups if g != S.EXAMPLES}))
    return S.Layout(keys, groups, token_keys, sa.example_scale, sa.token_scale, sa.clip)


@dataclass
class SecureRound:
    """What one SecAgg+ round revealed: the sum, who is in it, who left."""

    ok: bool
    contributors: list[int] = field(default_factory=list)  # node ids whose vectors were summed
    dropped: list[int] = field(default_factory=list)  # sampled, not in the sum
    sums: list[np.ndarray] = field(default_factory=list)  # vocab.secagg order, float64
    # per contributor, the metrics its (plaintext) FitRes carried: vocab.secagg.CLEAR_METRICS
    clear_metrics: dict[int, dict[str, float]] = field(default_factory=dict)


class _Shim(LegacyStrategy):
    """The legacy Strategy SecAggPlusWorkflow calls: fixed FitIns per node; keeps the result."""

    def __init__(self, fitins: Mapping[int, FitIns], grid: Grid, run_id: int) -> None:
        self.fitins, self.grid, self.run_id = fitins, grid, run_id
        self.results: list[tuple[GridClientProxy, FitRes]] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(nid, self.grid, self.run_id), ins)
                for nid, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)  # every FitRes carries the same unmasked mean
        return None, {}  # the workflow stores nothing; secure_round decodes the mean

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_round(grid: Grid, node_ids: list[int], global_state: State, config: ConfigRecord,
                 layout: S.Layout, sa: SecAggSettings, server_round: int) -> SecureRound:
    """Run Flower's SecAgg+ protocol once over `node_ids`; the unmasked SUM of their vectors."""
    sa.check(len(node_ids))
    fit_config = {**dict(config), S.LAYOUT: layout.to_json()}
    params = ndarrays_to_parameters([np.asarray(global_state[k]) for k in layout.keys])
    fitins = {nid: FitIns(params, dict(fit_config)) for nid in node_ids}
    run_id = _run_id(grid)
    shim = _Shim(fitins, grid, run_id)
    base = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    ctx = LegacyContext(base, strategy=shim, client_manager=SimpleClientManager())
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    n = len(node_ids)
    workflow = SecAggPlusWorkflow(
        num_shares=n, reconstruction_threshold=n // 2 + 1, max_weight=float(S.FLOWER_WEIGHT),
        clipping_range=sa.clip, quantization_range=sa.quantization_range,
        modulus_range=sa.modulus_range, timeout=sa.timeout)
    workflow(grid, ctx)  # halts (returns) without calling aggregate_fit when it cannot unmask
    if not shim.results:
        return SecureRound(False, dropped=list(node_ids))
    contributors = sorted(proxy.node_id for proxy, _ in shim.results)
    mean = parameters_to_ndarrays(shim.results[0][1].parameters)
    # Flower's weighted mean with equal weights FLOWER_WEIGHT: mean = sum / len(contributors)
    sums = [np.asarray(v, dtype=np.float64) * len(contributors) for v in mean]
    clear = {proxy.node_id: clear_metrics(res.metrics) for proxy, res in shim.results}
    return SecureRound(True, contributors, sorted(set(node_ids) - set(contributors)), sums,
                       clear)


def clear_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    """What a hospital may send in the clear beside its masked vector (vocab.secagg): finite
    scalars of the whitelist only; anything else is dropped, never stored."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if k in S.CLEAR_METRICS and isinstance(v, int | float) and not isinstance(v, bool) \
                and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _run_id(grid: Grid) -> int:
    try:
        return int(grid.run.run_id)
    except (AttributeError, RuntimeError):  # a grid without a run (tests)
        return 0


@dataclass(frozen=True)
class Decoded:
    state: dict[str, np.ndarray]
    num_examples: float  # summed, recovered from the weights (approximate: quantised)
    train_loss: float  # example-weighted mean training loss (nan when no examples)
    clipped_fraction: float  # mean over contributors of their clipped-value fraction
    kept_experts: frozenset[str]  # array keys left at the global copy (no tokens)


def decode(layout: S.Layout, sums: list[np.ndarray], global_state: State, contributors: int,
           step: float) -> Decoded:
    """The per-expert weighted mean from the secure sum: global + sum(w*d) / sum(w) per group.

    A group whose summed weight is below its quantisation noise (contributors x step) had no
    weight at all (an expert nobody routed a token to): it keeps the global copy."""
    m = len(layout.keys)
    if len(sums) != m + layout.extras:
        raise ValueError("secure sum does not match the layout")
    weight = {S.EXAMPLES: float(sums[m][0])}
    for i, t in enumerate(layout.token_keys):
        weight[t] = float(sums[m + 1 + i][0])
    noise = contributors * step
    if not weight[S.EXAMPLES] > noise:
        raise ValueError("secure sum carries no examples")
    out: dict[str, np.ndarray] = {}
    kept: set[str] = set()
    for i, (key, group) in enumerate(zip(layout.keys, layout.groups, strict=True)):
        g = np.asarray(global_state[key])
        if weight[group] <= noise:
            out[key] = g.copy()
            kept.add(key)
            continue
        new = g.astype(np.float64) + np.reshape(sums[i], g.shape) / weight[group]
        out[key] = cast_like(new, g)
    loss_sum = float(sums[m + 1 + len(layout.token_keys)][0]) * S.LOSS_CAP / layout.clip
    clipped = float(sums[m + 2 + len(layout.token_keys)][0]) / max(contributors, 1)
    return Decoded(out, weight[S.EXAMPLES] * layout.example_scale,
                   loss_sum / weight[S.EXAMPLES], clipped, frozenset(kept))


HALTED = ("secure aggregation halted: too few hospitals left to unmask the sum "
          "(threshold {threshold} of {sampled})")


class SecurePerExpertFedAvg(PerExpertFedAvg):
    """PerExpertFedAvg whose training rounds run through SecAgg+ (hooks only, see module doc).

    Call `setup(...)` as for PerExpertFedAvg, then `setup_secure(SecAggSettings(...))`.
    `secure_rounds[round]` keeps what each round revealed for the stored version's meta."""

    def setup_secure(self, sa: SecAggSettings) -> None:
        self.sa = sa
        self._secure: SecureRound | None = None
        self._layout: S.Layout | None = None
        self._halted = ""  # why this round's protocol did not run or halted
        self.secure_rounds: dict[int, dict[str, object]] = {}
        # SecAgg+ needs at least 3 hospitals: wait for them as Flower waits for min_train_nodes
        least = max(3, self.settings.min_hospitals)
        self.min_train_nodes = max(self.min_train_nodes, least)
        self.min_available_nodes = max(self.min_available_nodes, least)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # Flower's FedAvg chooses the nodes and builds the config exactly as in a plain round
        messages = list(super().configure_train(server_round, arrays, config, grid))
        rec = self._round(server_round)
        nodes = [m.metadata.dst_node_id for m in messages]
        # DP rounds report no expert token counts (hospital_node.task: data statistics outside
        # the DP mechanism): every expert is then weighted by examples, as in plain aggregation
        per_expert = self.settings.aggregation == "per-expert" \
            and self.settings.dp_noise_multiplier == 0
        self._layout = make_layout(self._global, self.sa, per_expert=per_expert)
        self._secure = None
        n = len(nodes)
        self._halted = HALTED.format(threshold=n // 2 + 1, sampled=n)
        if n < max(3, self.settings.min_hospitals):
            self._halted = (f"secure aggregation not started: {n} hospitals sampled, it needs "
                            f"at least {max(3, self.settings.min_hospitals)}")
            log.warning("round %d: %s", rec.round, self._halted)
            return []
        try:
            self.sa.check(n)
        except ValueError as e:
            self._halted = f"secure aggregation not started: {e}"
            log.warning("round %d: %s", rec.round, self._halted)
            return []
        cfg = messages[0].content[K.CONFIG]  # the same for every hospital (server-round stamped)
        log.info("round %d: secure aggregation over %d hospitals (threshold %d, stage timeout "
                 "%s s)", rec.round, n, n // 2 + 1, self.sa.timeout)
        self._secure = secure_round(grid, nodes, self._global, cfg, self._layout, self.sa,
                                    server_round)
        return []  # the protocol ran on the grid already: Strategy.start sends nothing

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rec = self._round(server_round)
        sr, layout = self._secure, self._layout
        if sr is None or layout is None or not sr.ok:
            return self._failed(rec, self._halted)
        for nid in sr.contributors:
            name = self.name_of(nid)
            self._set_outcome(rec, name, ACCEPTED, "in the secure sum (not screened "
                              "individually)")
            # only what the hospital sent in the clear (DP accounting), for the privacy block
            rec.hospital(name).train = dict(sr.clear_metrics.get(nid, {}))
        for nid in sr.dropped:
            self._set_outcome(rec, self.name_of(nid), DROPPED,
                              "left the secure aggregation protocol")
        if len(sr.contributors) < self.settings.min_hospitals:
            rec.status = "too-few-hospitals"
            log.warning("round %d: %d hospitals in the secure sum < min-hospitals %d; global "
                        "model kept", rec.round, len(sr.contributors),
                        self.settings.min_hospitals)
            return None, None
        try:
            d = decode(layout, sr.sums, self._global, len(sr.contributors), self.sa.step)
        except ValueError as e:
            return self._failed(rec, f"secure sum unusable: {e}")
        if not all(np.all(np.isfinite(v)) for v in d.state.values()):
            return self._failed(rec, "secure sum unusable: non-finite aggregate")
        self._kept_global = d.kept_experts
        rec.status = "aggregated"
        self.secure_rounds[rec.round] = {
            "contributors": len(sr.contributors), "dropped": len(sr.dropped),
            "clipping_range": self.sa.clip, "quantization_range": self.sa.quantization_range,
            "clipped_fraction": d.clipped_fraction,
            "num_examples": int(round(d.num_examples)),
            "train_loss": d.train_loss if math.isfinite(d.train_loss) else None}
        metrics = MetricRecord({"hospitals": len(sr.contributors),
                                K.NUM_EXAMPLES: int(round(d.num_examples)),
                                "clipped-fraction": d.clipped_fraction})
        if math.isfinite(d.train_loss):
            metrics[K.TRAIN_LOSS] = d.train_loss
        return from_numpy(d.state), metrics

    def _failed(self, rec: RoundRecord, reason: str
                ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's protocol halted or its sum is unusable: every selected hospital without
        an outcome is dropped with the reason, no model; Strategy.start keeps the global one."""
        rec.status = FAILED
        for name, h in rec.hospitals.items():
            if h.selected and not h.outcome:
                self._set_outcome(rec, name, DROPPED, reason)
        log.warning("round %d: %s; global model kept", rec.round, reason)
        return None, None


class SecureFedProx(FedProx, SecurePerExpertFedAvg):
    """FedProx (hospitals get `proximal-mu` in the round config) under SecAgg+."""


class SecureFedAdam(FedsightFedAdam, SecurePerExpertFedAvg):
    """Server-side Adam on the securely summed per-expert aggregate: FedOpt.configure_train
    keeps the current arrays and lands in SecurePerExpertFedAvg.configure_train; FedAdam's
    aggregate_train steps from what SecurePerExpertFedAvg.aggregate_train decoded."""
