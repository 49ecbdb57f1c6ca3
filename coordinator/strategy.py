"""Flower strategies with update screening and per-expert aggregation (hooks only, no start()).

`PerExpertFedAvg` subclasses Flower's FedAvg and overrides configure_train / aggregate_train /
configure_evaluate / aggregate_evaluate. FedProx and FedAdam reuse Flower's own classes through
the MRO: in `FedsightFedAdam(FedAdam, PerExpertFedAvg)` FedAdam's `super().aggregate_train` lands
in ours, so the server-side Adam step runs on the screened, per-expert aggregate.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from coordinator.aggregation import (
    Update,
    aggregate,
    cast_like,
    parse_expert_tokens,
    unused_expert_keys,
)
from coordinator.identify import identify_hospitals, sent_to
from coordinator.journal import ACCEPTED, DROPPED, REJECTED, RoundRecord, pooled_means
from coordinator.robust import combiner
from coordinator.run_state import RunState
from coordinator.screening import screen_updates
from coordinator.settings import RunSettings
from multimodal.calibration import GridStats, fit_federated
from vocab import records as K
from vocab.transport import check_transport, pack_global, unpack_update

# A child of Flower's logger: shows up wherever Flower logs (SuperLink, simulation console).
log = logging.getLogger("flwr.fedsight")
# identify(grid, node_ids, taken site ids) -> {node_id: site_id}
Identify = Callable[[Grid, list[int], set[str]], dict[int, str]]
# hospital_node.client_app.NodeTaskError's text, wherever Flower wraps it ("<class ...>:<'...'>");
# the one public message: an EHR schema mismatch (vocab.errors.EhrSchemaMismatch, labels id@hash8)
_SCHEMA_LABEL = r"(?:[a-z0-9][a-z0-9._-]{0,63}@[0-9a-f]{8}|none)"
_NODE_REASON = re.compile(
    r"fedsight-node: [a-z]+ failed \((?:EhrSchemaMismatch: this hospital's EHR schema "
    + _SCHEMA_LABEL + r" differs from the federation's " + _SCHEMA_LABEL
    + r"|[A-Za-z_][A-Za-z0-9_.]*)\)")


def record_bytes(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())


def to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in arrays.items()}


def from_numpy(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _public_reason(msg: Message) -> str:
    """The error of a failed reply, as far as it may be logged here. Our ClientApp only ever
    sends sanitised reasons (see hospital_node.client_app); anything else is reduced to its code."""
    m = _NODE_REASON.search(msg.error.reason or "")
    return m.group(0) if m else f"error code {msg.error.code}"


class PerExpertFedAvg(FedAvg):
    """FedAvg + screening + per-expert aggregation; fills `journal` with one record per round."""

    def setup(self, settings: RunSettings, run: RunState, identify: Identify | None = None
              ) -> None:
        """Configure after construction (FedOpt/FedProx constructors do not forward extras).

        `run` is the run's state (its rounds completed so far become the round offset of a
        resumed run; identified hospitals' statistics go into it). identify(grid, node_ids,
        taken) -> {node_id: site_id} is asked about nodes not seen before (default: the
        data-statistics query of coordinator.identify); unnamed nodes are logged as node-<id>.
        """
        self.settings = settings
        self.run = run
        self.identify: Identify = identify or (
            lambda grid, ids, taken: identify_hospitals(grid, ids, settings, run.hospitals, taken))
        self.hospitals: dict[int, str] = {}  # node id -> site id
        self.round_offset = run.rounds_completed  # rounds done before this (resumed) run
        self.journal: dict[int, RoundRecord] = {}
        self._sent: list[Message] = []  # this phase's messages (ids set when the grid pushed)
        self._global: dict[str, np.ndarray] = {}
        self._kept_global: frozenset[str] = frozenset()  # experts left as they were this round
        self.min_train_nodes = min(self.min_train_nodes, settings.min_hospitals)
        self.min_evaluate_nodes = min(self.min_evaluate_nodes, settings.min_hospitals)

    def name_of(self, node_id: int) -> str:
        return self.hospitals.get(node_id, f"node-{node_id}")

    def _identify_new(self, grid: Grid, messages: list[Message]) -> None:
        current = [m.metadata.dst_node_id for m in messages]
        unknown = [n for n in current if n not in self.hospitals]
        if unknown:
            taken = {self.hospitals[n] for n in current if n in self.hospitals}
            self.hospitals.update(self.identify(grid, unknown, taken))

    def _senders(self) -> Callable[[Message], int]:
        """reply -> the node it answers for. A failed reply (node lost, timed out) comes from
        the SuperLink, so it is matched to the message it answers, never named by its source."""
        sent = sent_to(self._sent)
        return lambda reply: sent.get(reply.metadata.reply_to_message_id,
                                      reply.metadata.src_node_id)

    def _round(self, server_round: int) -> RoundRecord:
        r = self.round_offset + server_round
        return self.journal.setdefault(r, RoundRecord(round=r, started=time.time()))

    def _stamp(self, rec: RoundRecord, grid: Grid, messages: list[Message],
               arrays: ArrayRecord, train: bool) -> list[Message]:
        """Name the receiving hospitals, stamp the global round, count the bytes sent, and keep
        the messages: the grid gives them their ids when it pushes them (see _senders)."""
        self._identify_new(grid, messages)
        size = record_bytes(arrays)
        for m in messages:
            m.content[K.CONFIG][K.SERVER_ROUND] = rec.round
            h = rec.hospital(self.name_of(m.metadata.dst_node_id))
            h.bytes_down += size
            h.selected = h.selected or train
        self._sent = messages
        return messages

    # ---- training ----
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rec = self._round(server_round)
        self._global = to_numpy(arrays)
        stage = 1 if self.round_offset + server_round <= self.settings.stage1_rounds else 2
        config[K.STAGE] = stage
        config[K.TRANSPORT] = self.settings.transport
        config[K.SPARSE_EXPERTS] = self.settings.sparse_experts
        sent = self._down(arrays)
        messages = list(super().configure_train(server_round, sent, config, grid))
        return self._stamp(rec, grid, messages, sent, train=True)

    def _down(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global model as it travels this run (vocab.transport)."""
        if self.settings.transport == "fp32":
            return arrays
        return from_numpy(pack_global(to_numpy(arrays), check_transport(self.settings.transport)))

    def _local_state(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """A hospital's reply as full local weights in the global dtypes (float16 updates added
        to the global; experts it left out, under sparse-experts, are the global copy)."""
        experts = [k for k in self._global if K.expert_of(k) is not None] \
            if self.settings.sparse_experts else []
        return unpack_update(to_numpy(arrays), self._global,
                             check_transport(self.settings.transport), experts)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rec = self._round(server_round)
        sender = self._senders()
        valid, failed = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        for msg in failed:
            name = self.name_of(sender(msg))
            self._set_outcome(rec, name, DROPPED, f"reply failed: {_public_reason(msg)}")
        updates: list[Update] = []
        for msg in valid:
            name = self.name_of(sender(msg))
            h = rec.hospital(name)
            problem = self._reply_problem(msg)
            if problem:
                self._set_outcome(rec, name, REJECTED, problem)
                continue
            arrays = msg.content[K.ARRAYS]
            metrics = msg.content[K.METRICS]
            h.bytes_up = record_bytes(arrays) + 8 * len(metrics)
            h.num_examples = int(metrics[K.NUM_EXAMPLES])
            h.train = {k: float(v) for k, v in metrics.items()
                       if k in K.TRAIN_METRIC_KEYS and k != K.NUM_EXAMPLES}
            updates.append(Update(name, self._local_state(arrays), h.num_examples,
                                  parse_expert_tokens(metrics)))
        verdicts = screen_updates(updates, self._global, self.settings.screen_rule)
        for v in verdicts:
            h = rec.hospital(v.hospital)
            h.update_norm, h.cosine = v.norm, v.cosine
            self._set_outcome(rec, v.hospital, ACCEPTED if v.accepted else REJECTED, v.reason)
        for name, h in rec.hospitals.items():
            if h.selected and not h.outcome:
                self._set_outcome(rec, name, DROPPED, "no reply before the round timeout")
        accepted = [u for u, v in zip(updates, verdicts, strict=True) if v.accepted]
        if len(accepted) < self.settings.min_hospitals:
            rec.status = "too-few-hospitals"
            log.warning("round %d: %d usable updates < min-hospitals %d; global model kept",
                        rec.round, len(accepted), self.settings.min_hospitals)
            return None, None
        per_expert = self.settings.aggregation == "per-expert"
        new = aggregate(accepted, self._global, per_expert=per_expert,
                        combine=combiner(self.settings.robust_rule))
        self._kept_global = unused_expert_keys(accepted, self._global) if per_expert \
            else frozenset()
        rec.status = "aggregated"
        n = sum(u.num_examples for u in accepted)
        metrics = MetricRecord({"hospitals": len(accepted), K.NUM_EXAMPLES: n})
        losses = [(rec.hospitals[u.hospital].train.get(K.TRAIN_LOSS, math.nan), u.num_examples)
                  for u in accepted]
        finite = [(v, w) for v, w in losses if math.isfinite(v)]
        if finite:
            metrics[K.TRAIN_LOSS] = sum(v * w for v, w in finite) / sum(w for _, w in finite)
        return from_numpy(new), metrics

    @staticmethod
    def _set_outcome(rec: RoundRecord, name: str, outcome: str, reason: str) -> None:
        h = rec.hospital(name)
        h.outcome, h.reason = outcome, reason
        if outcome != ACCEPTED:
            log.warning("round %d: hospital %s %s: %s", rec.round, name, outcome, reason)

    def _reply_problem(self, msg: Message) -> str:
        content = msg.content
        if K.ARRAYS not in content.array_records or K.METRICS not in content.metric_records:
            return "reply lacks the 'arrays' ArrayRecord or the 'metrics' MetricRecord"
        metrics = content[K.METRICS]
        if K.NUM_EXAMPLES not in metrics:
            return "reply metrics lack num-examples"
        bad = [k for k, v in metrics.items()
               if isinstance(v, list) or not math.isfinite(float(v))]
        if bad:
            return f"non-finite or non-scalar metric(s) {sorted(bad)[:3]}"
        return ""

    # ---- evaluation ----
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        rec = self._round(server_round)
        sent = self._down(arrays)
        messages = list(super().configure_evaluate(server_round, sent, config, grid))
        return self._stamp(rec, grid, messages, sent, train=False)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        rec = self._round(server_round)
        sender = self._senders()
        valid, failed = self._check_and_log_replies(list(replies), is_train=False,
                                                    validate=False)
        for msg in failed:
            log.warning("round %d: hospital %s evaluation failed: %s", rec.round,
                        self.name_of(sender(msg)), _public_reason(msg))
        per_hospital: dict[str, dict[str, float]] = {}
        calib: dict[str, GridStats] = {}
        for msg in valid:
            if K.METRICS not in msg.content.metric_records:
                continue
            metrics = msg.content[K.METRICS]
            m = {k: float(v) for k, v in metrics.items()
                 if k in K.EVAL_METRIC_KEYS and not isinstance(v, list)}
            m.pop(K.NUM_EXAMPLES, None)
            name = self.name_of(sender(msg))
            rec.hospital(name).eval = m
            per_hospital[name] = m
            if K.CALIB_KEYS <= set(metrics.keys()):
                try:
                    calib[name] = GridStats.from_lists(
                        metrics[K.CALIB_NLL], metrics[K.CALIB_N], metrics[K.CALIB_BINS])
                except (TypeError, ValueError) as e:  # this hospital's sums only, not the round
                    log.warning("round %d: hospital %s calibration sums refused: %s",
                                rec.round, name, e)
        rec.pooled = pooled_means(per_hospital, weight_key=K.N_EVAL)
        fit = fit_federated(calib)
        rec.calibration = fit.to_meta() if fit is not None else {}
        rec.finished = time.time()
        if not per_hospital:
            return None
        return MetricRecord({k: v for k, v in rec.pooled.items() if math.isfinite(v)})


class FedsightFedProx(FedProx, PerExpertFedAvg):
    """FedProx (clients get `proximal-mu`) on top of screening + per-expert aggregation."""


class FedsightFedAdam(FedAdam, PerExpertFedAvg):
    """Server-side Adam on the screened, per-expert aggregate.

    Two corrections after Flower's Adam step: an expert no hospital used this round keeps the
    global copy (its decaying momentum from earlier rounds would otherwise still move it), and
    every array returns to the global model's dtype (Adam's float64 arithmetic would double the
    bytes sent and turn integer buffers into floats).
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        stepped = to_numpy(arrays)
        out = {k: g.copy() if k in self._kept_global else cast_like(stepped[k], g)
               for k, g in self._global.items()}
        return from_numpy(out), metrics


def build_strategy(settings: RunSettings, run: RunState, identify: Identify | None = None
                   ) -> PerExpertFedAvg:
    """The strategy named by `settings.strategy`, configured (unknown names are ConfigErrors
    raised by RunSettings already); with `secure-aggregation` its SecAgg+ variant
    (coordinator.secure_agg)."""
    common = dict(fraction_train=settings.fraction_train,
                  fraction_evaluate=settings.fraction_evaluate,
                  min_train_nodes=settings.min_hospitals,
                  min_evaluate_nodes=settings.min_hospitals,
                  min_available_nodes=settings.min_hospitals)
    plain: type[PerExpertFedAvg] = PerExpertFedAvg
    prox: type[PerExpertFedAvg] = FedsightFedProx
    adam: type[PerExpertFedAvg] = FedsightFedAdam
    if settings.secure_aggregation:
        # coordinator.secure_agg builds on this module: imported here, not at the top
        from coordinator.secure_agg import SecureFedAdam, SecureFedProx, SecurePerExpertFedAvg

        plain, prox, adam = SecurePerExpertFedAvg, SecureFedProx, SecureFedAdam
    strategy: PerExpertFedAvg
    if settings.strategy == "fedprox":
        strategy = prox(proximal_mu=settings.proximal_mu, **common)
    elif settings.strategy == "fedadam":
        strategy = adam(eta=settings.server_lr, tau=settings.server_tau, **common)
    else:
        strategy = plain(**common)
    strategy.setup(settings, run, identify)
    if settings.secure_aggregation:
        from coordinator.secure_agg import SecAggSettings

        strategy.setup_secure(SecAggSettings.from_run_settings(settings))  # type: ignore[attr-defined]
    return strategy
