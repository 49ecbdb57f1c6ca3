"""The audit log's hash chain: appends, what verify detects and where, keys, concurrency."""

from __future__ import annotations

import json
import multiprocessing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vocab import audit
from vocab.audit import AuditError, AuditLog, verify
from vocab.errors import ConfigError

KEY = b"k" * 32


def _log(path: Path, n: int, key: bytes | None = None) -> AuditLog:
    log = AuditLog(path, key)
    for i in range(n):
        log.append(audit.ROUND_COMPLETED, "coordinator", {"round": i + 1, "auc": 0.5 + i / 100,
                                                         "hospitals": ["a", "b"]})
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_a_chain_of_entries_verifies(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _log(p, 5)
    res = verify(p)
    assert res.ok and res.entries == 5, res
    first, second = (json.loads(x) for x in _lines(p)[:2])
    assert first["seq"] == 1 and first["prev"] == audit.GENESIS
    assert second["prev"] == audit.line_digest(_lines(p)[0].rstrip(b"\n"))
    assert datetime.fromisoformat(first["time"]).tzinfo == UTC
    assert [e.seq for e in audit.read_events(p)] == [1, 2, 3, 4, 5]
    assert oct(p.stat().st_mode & 0o777) == "0o600"


def test_an_edited_value_is_found_at_its_line(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _log(p, 5)
    lines = _lines(p)
    lines[2] = lines[2].replace(b'"round":3', b'"round":9')
    p.write_bytes(b"".join(lines))
    res = verify(p)
    assert (res.ok, res.line, res.problem, res.entries) == (False, 3, "edited", 2)
    assert "hash mismatch" in res.reason and "line 3: edited" in str(res)


def test_an_edited_and_rehashed_entry_breaks_the_next_link(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _log(p, 4)
    lines = _lines(p)
    e = json.loads(lines[1])
    e["data"]["auc"] = 0.99
    e["hash"] = audit.entry_hash(e, None)  # an editor without a key can rehash the line ...
    lines[1] = audit.canonical(e) + b"\n"
    p.write_bytes(b"".join(lines))
    res = verify(p)
    assert (res.line, res.problem) == (3, "deleted") and "prev mismatch" in res.reason
    assert not verify(p, KEY).ok  # ... but not make it verify under a key


def test_a_deleted_line_is_a_seq_gap(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _log(p, 5)
    lines = _lines(p)
    del lines[1]
    p.write_bytes(b"".join(lines))
    res = verify(p)
    assert (res.line, res.problem) == (2, "deleted") and "seq gap" in res.reason


def test_two_swapped_lines_are_reordered(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _log(p, 5)
    lines = _lines(p)
    lines[2], lines[3] = lines[3], lines[2]
    p.write_bytes(b"".join(lines))
    res = verify(p)
    assert (res.line, res.problem) == (3, "reordered") and "out of order" in res.reason


def test_a_truncated_last_line_is_torn_and_blocks_appends(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    log = _log(p, 3)
    p.write_bytes(p.read_bytes()[:-20])
    res = verify(p)
    assert (res.line, res.problem, res.entries) == (3, "torn", 2)
    with pytest.raises(AuditError, match=r"audit.jsonl: line 3: the last line is torn.*refusing"):
        log.append(audit.RUN_FINISHED, "coordinator")
    assert verify(p).line == 3  # nothing was appended or re-chained


def test_append_refuses_a_broken_tail(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    log = _log(p, 3)
    lines = _lines(p)
    lines[2], lines[1] = lines[1], lines[2]
    p.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match="line 3: it does not follow the line before it"):
        log.append(audit.RUN_FINISHED)
    with pytest.raises(AuditError, match="line 3"):
        log.check()


def test_hmac_key_wrong_key_and_key_file_rules(tmp_path: Path) -> None:
    logs, keys = tmp_path / "logs", tmp_path / "keys"
    keys.mkdir()
    p = logs / "audit.jsonl"
    key_file = keys / "audit.key"
    key_file.write_bytes(KEY + b"\n")
    key_file.chmod(0o600)
    log = AuditLog.open(p, key_file)
    assert log.key == KEY
    log.append(audit.UI_LOGIN, "dr_a")
    log.append(audit.UI_LOGIN_FAILED, "dr_b")
    assert verify(p, KEY).ok
    wrong = verify(p, b"x" * 32)
    assert (wrong.line, wrong.problem) == (1, "edited") and "another key" in wrong.reason
    assert not verify(p).ok
    with pytest.raises(AuditError, match="line 2: hash mismatch"):
        AuditLog(p, b"x" * 32).append(audit.UI_LOGIN, "dr_a")  # never chains with another key
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        AuditLog.open(p, key_file)
    inside = logs / "audit.key"
    inside.write_bytes(KEY)
    inside.chmod(0o600)
    with pytest.raises(ConfigError, match="in the audit log's folder"):
        AuditLog.open(p, inside)
    short = keys / "short.key"
    short.write_bytes(b"abc")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 16"):
        audit.read_key(short)


def test_data_must_be_json_values_and_kinds_known(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(AuditError, match=r"data\.m\.auc: nan"):
        log.append(audit.ROUND_COMPLETED, data={"m": {"auc": float("nan")}})
    with pytest.raises(AuditError, match=r"data\.x: a set"):
        log.append(audit.ROUND_COMPLETED, data={"x": {1}})
    with pytest.raises(AuditError, match="unknown audit kind"):
        log.append("run.exploded")
    assert not (tmp_path / "audit.jsonl").exists()


def _append_many(path: str, who: str, n: int) -> None:
    log = AuditLog(Path(path))
    for i in range(n):
        log.append(audit.UI_DIAGNOSIS, who, {"i": i})


def test_concurrent_appends_from_two_processes_keep_one_chain(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(p), who, 40)) for who in ("a", "b")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    res = verify(p)
    assert res.ok and res.entries == 80, res
    events = list(audit.read_events(p))
    assert sorted((e.actor, e.data["i"]) for e in events) == sorted(
        (w, i) for w in "ab" for i in range(40))
