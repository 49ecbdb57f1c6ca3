"""Flower ClientApp of a hospital node: Message in -> hospital_node.task -> Message out.

Replies carry only the model arrays and whitelisted aggregate metrics (vocab.records). A
failure is logged here in full (inside the hospital) and re-raised with its exception type only,
because Flower sends str(exception) to the coordinator and messages may name local files.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from vocab.offline import enforce_offline

enforce_offline()  # before flwr reads its telemetry / update-check variables

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402

from hospital_node import task  # noqa: E402
from vocab import records as K  # noqa: E402

log = logging.getLogger("flwr.fedsight.node")
STATE_KEY = "fedsight-node"  # context.state ConfigRecord: node-local, never sent
app = ClientApp()


class NodeTaskError(RuntimeError):
    """A task failed at this hospital; the message is safe to send to the coordinator."""


@contextlib.contextmanager
def _sanitised(what: str) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        log.exception("%s failed at this hospital", what)
        raise NodeTaskError(f"fedsight-node: {what} failed ({type(e).__name__})") from None


def _global_state(msg: Message) -> dict:
    import torch  # noqa: F401 - Flower's to_torch_state_dict needs torch already imported

    return msg.content[K.ARRAYS].to_torch_state_dict()


def _inputs(msg: Message, context: Context) -> tuple[task.NodeSettings, task.RoundConfig]:
    node = task.NodeSettings.from_configs(dict(context.node_config), dict(context.run_config))
    return node, task.RoundConfig.from_record(dict(msg.content[K.CONFIG]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    with _sanitised("train"):
        node, cfg = _inputs(msg, context)
        state = context.state.config_records.get(STATE_KEY, ConfigRecord())
        out = task.train(node, cfg, _global_state(msg),
                         start_step=int(state.get("global-step", 0)))
        context.state[STATE_KEY] = ConfigRecord({"global-step": out.global_step})
        content = RecordDict({K.ARRAYS: ArrayRecord(out.state),
                              K.METRICS: MetricRecord(out.metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    with _sanitised("evaluate"):
        node, cfg = _inputs(msg, context)
        metrics = task.evaluate(node, cfg, _global_state(msg))
    return Message(content=RecordDict({K.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    with _sanitised("query"):
        node, cfg = _inputs(msg, context)
        site_id, counts = task.statistics(node, cfg)
        content = RecordDict({K.SITE: ConfigRecord({K.SITE_ID: site_id}),
                              K.METRICS: MetricRecord(counts)})
    return Message(content=content, reply_to=msg)
