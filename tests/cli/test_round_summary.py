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
    assert out[1] == "[c]   calibration: none (too few held-out cases reported sums): " \
        "uncalibrated"
    assert "site_a" in out[2] and out[2].endswith("(update merged)")
    assert "site_b" in out[3] and out[3].endswith("(update rejected: update points away)")
    assert "site_c" in out[4] and "(no evaluation)" in out[4] and \
        out[4].endswith("(dropped: reply failed: lost)")
    assert out[5] == "[c] round 3: too-few-hospitals, no version stored (global model kept)"
    assert out[7].endswith("(dropped: no reply before the round timeout)")
    assert len(out) == 8  # round 1 was before after_round


def test_a_calibrated_round_prints_t_and_the_pooled_ece(
        capsys: pytest.CaptureFixture[str]) -> None:
    meta = {"id": "0003-c", "round": 3, "metrics": {"pooled": {}},
            "calibration": {"temperature": 1.4142, "n": 148,
                            "pooled": {"ece_before": 0.0812, "ece_after": 0.0341}}}
    print_run_rounds({"rounds": [{"round": 3, "version": "0003-c"}]}, {"0003-c": meta}, "[c]")
    assert capsys.readouterr().out.splitlines()[1] == \
        "[c]   calibration: T=1.41, pooled ECE 0.081 -> 0.034 (cross-fitted, n=148)"
