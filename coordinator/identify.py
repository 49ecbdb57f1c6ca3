"""Who is behind each Flower node: a data-statistics query answered with the hospital's site id
and counts only (hospital_node.client_app's query handler)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from coordinator.settings import RunSettings
from vocab import records as K

log = logging.getLogger("flwr.fedsight")


def identify_hospitals(grid: Grid, node_ids: list[int], settings: RunSettings,
                       stats: dict[str, dict[str, float]], taken: Collection[str] = ()
                       ) -> dict[int, str]:
    """Ask nodes for their site id and data statistics (counts only); fills `stats` by site.

    `taken`: site ids of other nodes in the same round. A second node claiming one of those
    (or one claimed in this reply batch) is named `<site>-node-<id>`; a node that reconnected
    under a new node id, its old one gone, keeps its own name. A node that cannot answer is
    left out (the caller names it node-<id>); its failure is attributed by the message id it
    answers, because a failed reply comes from the SuperLink, not from the node.
    """
    content = RecordDict({K.CONFIG: ConfigRecord({
        K.SEED: settings.seed, K.MAX_CASES: settings.max_cases, K.MODEL_JSON: settings.model_json,
    } | ({K.TASK: settings.task} if settings.task else {}))})
    msgs = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n)
            for n in node_ids]
    replies = list(grid.send_and_receive(msgs, timeout=settings.round_timeout))
    sent = sent_to(msgs)  # message ids exist once the grid has pushed them
    names: dict[int, str] = {}
    used = set(taken)
    for reply in replies:
        node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error() or K.SITE not in reply.content.config_records:
            log.warning("node %d did not identify itself; it is logged as node-%d", node, node)
            continue
        site = str(reply.content[K.SITE].get(K.SITE_ID, ""))
        if not K.SITE_ID_PATTERN.fullmatch(site) or site in used:
            site = f"{site[:32]}-node-{node}" if K.SITE_ID_PATTERN.fullmatch(site[:32]) \
                else f"node-{node}"
        names[node] = site
        used.add(site)
        if K.METRICS in reply.content.metric_records:
            stats[site] = {k: float(v) for k, v in reply.content[K.METRICS].items()
                           if K.is_allowed_metric(k, "query")}
            log.info("hospital %s: %s", site, stats[site])
    return names


def sent_to(messages: Iterable[Message]) -> dict[str, int]:
    """{message id: destination node} of pushed messages (the grid sets the ids when it pushes
    them; messages not pushed yet have none and are skipped)."""
    out: dict[str, int] = {}
    for m in messages:
        mid = m.metadata.message_id
        if mid:
            out[mid] = m.metadata.dst_node_id
    return out
