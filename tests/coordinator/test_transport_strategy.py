"""The strategy with float16 transport and sparse experts: what it sends, and that the merge of
float16 updates with left-out experts equals the fp32 merge of the full weights."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from coordinator.settings import RunSettings
from coordinator.strategy import from_numpy, to_numpy
from tests.coordinator.test_strategy import (  # noqa: F401
    E,
    FakeGrid,
    by_hand,
    global_state,
    identity,
    local,
    push,
    reply,
    strategy,
)
from vocab import records as K
from vocab.errors import ConfigError
from vocab.transport import pack_update


def test_fp16_sparse_round_sends_half_and_merges_like_fp32() -> None:
    g = global_state()
    nodes = [101, 102, 103]
    s = strategy(nodes, transport="fp16", **{"sparse-experts": True})
    msgs = list(s.configure_train(2, from_numpy(g), ConfigRecord({K.LR: 0.01}),
                                  FakeGrid(nodes)))
    push(msgs)
    sent = {m.metadata.dst_node_id: m for m in msgs}
    down = to_numpy(msgs[0].content[K.ARRAYS])
    assert down["blocks.0.attn.qkv.weight"].dtype == np.float16
    assert down["norm.steps"].dtype == np.int64
    cfg = msgs[0].content[K.CONFIG]
    assert cfg[K.TRANSPORT] == "fp16" and cfg[K.SPARSE_EXPERTS] is True
    # each hospital trains from what it received; expert 1 nobody used (left out by all),
    # expert 0 unused at hospital c (left out by c)
    received = {k: v.astype(g[k].dtype) for k, v in down.items()}
    states = []
    for i, node in enumerate(nodes):
        st = local(received, i + 1, scale=0.01)
        st[f"{E}.1.fc1.weight"] = received[f"{E}.1.fc1.weight"]
        if node == 103:
            st[f"{E}.0.fc1.weight"] = received[f"{E}.0.fc1.weight"]
        states.append(st)
    tokens = [(30.0, 0.0), (10.0, 0.0), (0.0, 0.0)]
    replies = []
    for node, st, tok in zip(nodes, states, tokens, strict=True):
        leave = [f"{E}.1.fc1.weight"] + ([f"{E}.0.fc1.weight"] if node == 103 else [])
        wire = pack_update(st, received, "fp16", leave)
        replies.append(reply(sent[node], wire, 10, tok))
    arrays, _ = s.aggregate_train(2, replies)
    assert arrays is not None
    merged = to_numpy(arrays)
    # reference: the same hospitals' full fp32 weights, rebased from the float16 global they
    # trained from onto the coordinator's float32 global (what the update transport means)
    rebased = [{k: (v - received[k] + g[k]) if np.issubdtype(v.dtype, np.floating) else v
                for k, v in st.items()} for st in states]
    want = by_hand(rebased, [10, 10, 10], tokens, g)
    for key, w in want.items():
        np.testing.assert_allclose(merged[key], w, rtol=1e-3, atol=5e-5, err_msg=key)
    rec = s.journal[2]
    assert {h: r.outcome for h, r in rec.hospitals.items()} == {"a": "accepted",
                                                                 "b": "accepted",
                                                                 "c": "accepted"}


def test_transport_settings_are_checked_and_exclude_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="transport must be one of fp32|fp16, got 'fp8'"):
        RunSettings(transport="fp8")
    with pytest.raises(ConfigError, match="fraction-evaluate must be in"):
        RunSettings(fraction_evaluate=0.0)
    with pytest.raises(ConfigError, match="needs transport = 'fp32' and sparse-experts"):
        RunSettings(secure_aggregation=True, transport="fp16")
