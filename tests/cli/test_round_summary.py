"""The CLI's round summary names every selected hospital with what became of its update, also
in a round that stored no version."""

from __future__ import annotations

import pytest

from cli.round_summary import print_run_rounds


def test_every_selected_hospital_is_listed_with_its_outcome(
        capsys: pytest.CaptureFixture[str]) -> None:
    meta = {"id": "0002-abc", "round": 2, "round_seconds": 12.0,
            "metrics": {"pooled": {"auc": 0.8}, "hospitals": {"site_a": {"auc": 0.9},
                                                              "site_b": {"auc": 0.7}}},
            "screening": {"site_a": {"outcome": "accepted", "reason": ""},
                          "site_b": {"outcome": "rejected", "reason": "update points away"},
                          "site_c": {"outcome": "dropped", "reason": "reply failed: lost"}}}
    run = {"rounds": [
        {"round": 1, "status": "aggregated", "version": "0001-old", "hospitals": {}},
        {"round": 2, "status": "aggregated", "version": "0002-abc", "hospitals": {}},
        {"round": 3, "status": "too-few-hospitals", "version": None, "hospitals": {
            "site_a": {"outcome": "accepted", "reason": ""},
            "site_c": {"outcome": "dropped", "reason": "no reply before the round timeout"}}}]}
    print_run_rounds(run, {"0002-abc": meta}, "[c]", after_round=1)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[c] round 2: version 0002-abc in 12 s, pooled auc=0.800"
    assert "site_a" in out[1] and out[1].endswith("(update merged)")
    assert "site_b" in out[2] and out[2].endswith("(update rejected: update points away)")
    assert "site_c" in out[3] and "(no evaluation)" in out[3] and \
        out[3].endswith("(dropped: reply failed: lost)")
    assert out[4] == "[c] round 3: too-few-hospitals, no version stored (global model kept)"
    assert out[6].endswith("(dropped: no reply before the round timeout)")
    assert len(out) == 7  # round 1 was before after_round
