"""`fedsight audit verify|show`: exit codes, the broken line in the message, filters."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cli.main import main
from vocab import audit
from vocab.audit import AuditLog


def _log(path: Path, key: bytes | None = None) -> None:
    log = AuditLog(path, key)
    log.append(audit.RUN_STARTED, "coordinator", {"run_id": "r1"},
               now=datetime(2026, 11, 30, 23, 0, tzinfo=UTC))
    log.append(audit.ROUND_COMPLETED, "coordinator", {"round": 1},
               now=datetime(2026, 12, 1, 1, 0, tzinfo=UTC))
    log.append(audit.MODEL_PROMOTED, "ops", {"version": "0001-abc"},
               now=datetime(2026, 12, 1, 2, 0, tzinfo=UTC))


def test_verify_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "audit.jsonl"
    _log(p)
    assert main(["audit", "verify", str(p)]) == 0
    assert "intact, 3 entries" in capsys.readouterr().out
    lines = p.read_bytes().splitlines(keepends=True)
    p.write_bytes(lines[0] + lines[2])
    assert main(["audit", "verify", str(p)]) == 1
    assert "audit.jsonl: line 2: deleted: seq gap" in capsys.readouterr().err
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 2
    assert "unreadable" in capsys.readouterr().err


def test_verify_with_a_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "logs" / "audit.jsonl"
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(b"s" * 32)
    key_file.chmod(0o600)
    _log(p, b"s" * 32)
    assert main(["audit", "verify", str(p), "--key-file", str(key_file)]) == 0
    assert main(["audit", "verify", str(p)]) == 1
    key_file.chmod(0o644)
    assert main(["audit", "verify", str(p), "--key-file", str(key_file)]) == 2
    assert "readable by others" in capsys.readouterr().err


def test_show_filters_by_kind_and_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    p = tmp_path / "audit.jsonl"
    _log(p)
    capsys.readouterr()
    assert main(["audit", "show", str(p), "--kind", "model.promoted", "--kind", "run.started",
                 "--json"]) == 0
    shown = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [e["kind"] for e in shown] == ["run.started", "model.promoted"]
    assert main(["audit", "show", str(p), "--since", "2026-12-01", "--until",
                 "2026-12-01T02:00:00Z"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "round.completed" in out[0] and '{"round":1}' in out[0]
    p.write_bytes(p.read_bytes()[:-5])
    assert main(["audit", "show", str(p)]) == 2
    assert "line 3: torn" in capsys.readouterr().err
