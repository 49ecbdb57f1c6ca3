"""`fedsight node privacy` and `node start`'s ledger check, through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main
from hospital_node.privacy import Ledger, PrivacySettings
from multimodal.dp import DPSpend, epsilon

SPEND = DPSpend(1.2, 0.2, 40)


def ledger_with(path: Path, rounds: int) -> None:
    led = Ledger(PrivacySettings(path))
    for r in range(rounds):
        led.record(run=99, server_round=r + 1, spend=SPEND)


def test_prints_every_round_and_the_budget_left(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state" / "ledger.jsonl"
    ledger_with(path, 3)
    args = ["node", "privacy", "--data", str(tmp_path / "site"), "--privacy-ledger", str(path),
            "--privacy-budget", "20"]
    assert main(args) == 0
    out = capsys.readouterr().out
    spent = epsilon([SPEND] * 3, 1e-5)
    assert "(3 DP rounds, delta 1e-05)" in out
    assert f"cumulative epsilon {spent:.3f} at delta 1e-05; budget 20, left {20 - spent:.3f}" \
        in out
    assert len([ln for ln in out.splitlines() if " 99 " in ln]) == 3
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["left"] == pytest.approx(20 - spent)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]


def test_a_tampered_ledger_is_shown_with_its_broken_line_and_stops_node_start(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger_with(path, 2)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1].replace('"steps":40', '"steps":4'))
    assert main(["node", "privacy", "--data", str(tmp_path), "--privacy-ledger",
                 str(path)]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "line 2: edited" in out
    site = tmp_path / "site"
    site.mkdir()
    # node start checks the ledger before anything else that could take time or the network
    assert main(["node", "start", "--data", str(site), "--coordinator", "127.0.0.1:9",
                 "--privacy-ledger", str(path)]) == 2
    err = capsys.readouterr().err
    assert "privacy ledger is unreadable or does not verify" in err
