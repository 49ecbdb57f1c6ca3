"""Flower ClientApp of a hospital node: Message in -> hospital_node.task -> Message out.

The task runs in the node's long-lived worker when `fedsight node start` started one
(hospital_node.worker: Flower starts a fresh process per message, the worker keeps torch and the
model code imported), else in this process.

Replies carry only the model arrays and whitelisted aggregate metrics (vocab.records); in a
secure-aggregation round (run config `secure-aggregation`) the train reply is Flower's masked
SecAgg+ vector instead (hospital_node.secure_agg, docs/secure_aggregation.md). A
failure is logged here in full (inside the hospital) and re-raised with its exception type only,
because Flower sends str(exception) to the coordinator and messages may name local files.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from vocab.offline import enforce_offline

enforce_offline()  # before flwr reads its telemetry / update-check variables

import numpy as np  # noqa: E402
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.clientapp.typing import ClientAppCallable  # noqa: E402

from hospital_node import task  # noqa: E402
from hospital_node.secure_agg import secure_train_mod  # noqa: E402
from vocab import records as K  # noqa: E402
from vocab.errors import public_reason  # noqa: E402

log = logging.getLogger("flwr.fedsight.node")
STATE_KEY = "fedsight-node"  # context.state ConfigRecord: node-local, never sent
app = ClientApp()


class NodeTaskError(RuntimeError):
    """A task failed at this hospital; the message is safe to send to the coordinator."""


@contextlib.contextmanager
def _sanitised(what: str) -> Iterator[None]:
    try:
        yield
    except NodeTaskError:
        raise  # already safe to send (the worker's failure, by exception type)
    except Exception as e:
        log.exception("%s failed at this hospital", what)
        # type only, or "Type: message" for errors public by construction (schema mismatch)
        raise NodeTaskError(f"fedsight-node: {what} failed ({public_reason(e)})") from None


def _run(kind: str, msg: Message, context: Context, start_step: int = 0) -> task.TaskResult:
    """The task of one message: by the node's worker when one runs (hospital_node.worker),
    else here. Arrays cross as numpy, so this process never imports torch with a worker."""
    arrays = msg.content[K.ARRAYS] if K.ARRAYS in msg.content.array_records else None
    req = task.TaskRequest(
        kind, dict(context.node_config), dict(context.run_config), dict(msg.content[K.CONFIG]),
        {k: a.numpy() for k, a in arrays.items()} if arrays is not None else None, start_step,
        int(context.run_id))
    socket = context.node_config.get(task.WORKER_SOCKET)
    if socket:
        from hospital_node import worker

        try:
            return worker.call(Path(str(socket)), req)
        except worker.WorkerTaskFailed as e:
            raise NodeTaskError(f"fedsight-node: {kind} failed ({e})") from None
        except worker.WorkerUnavailable as e:
            log.warning("%s; running the %s task in this process", e, kind)
    return task.run_task(req)


def _arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _secure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Secure aggregation (hospital_node.secure_agg): SecAgg+ stages through Flower's
    secaggplus_mod, plain train messages straight to `train`. Its failures are sanitised like
    the task's (Flower sends str(exception) to the coordinator)."""
    with _sanitised("train"):
        return secure_train_mod(msg, context, call_next)


@app.train(mods=[_secure_mod])
def train(msg: Message, context: Context) -> Message:
    with _sanitised("train"):
        state = context.state.config_records.get(STATE_KEY, ConfigRecord())
        out = _run("train", msg, context, start_step=int(state.get("global-step", 0)))
        context.state[STATE_KEY] = ConfigRecord({"global-step": out.global_step})
        content = RecordDict({K.ARRAYS: _arrays(out.arrays or {}),
                              K.METRICS: MetricRecord(out.metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    with _sanitised("evaluate"):
        out = _run("evaluate", msg, context)
    return Message(content=RecordDict({K.METRICS: MetricRecord(out.metrics)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    with _sanitised("query"):
        out = _run("query", msg, context)
        content = RecordDict({K.SITE: ConfigRecord({K.SITE_ID: out.site_id}),
                              K.METRICS: MetricRecord(out.metrics)})
    return Message(content=content, reply_to=msg)
