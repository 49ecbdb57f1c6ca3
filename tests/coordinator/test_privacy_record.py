"""The privacy block of a stored version and the model card's line: true for every lineage."""

from __future__ import annotations

from coordinator.journal import ACCEPTED, DROPPED, RoundRecord
from coordinator.privacy_record import privacy_block, summary
from vocab import records as K


def rnd(n: int, **hospitals: dict[str, float] | None) -> RoundRecord:
    rec = RoundRecord(round=n, started=0.0)
    for name, train in hospitals.items():
        h = rec.hospital(name)
        h.selected, h.outcome = True, ACCEPTED if train is not None else DROPPED
        h.train = dict(train or {})
    return rec


def dp(eps: float) -> dict[str, float]:
    return {K.DP_EPSILON: eps, K.DP_DELTA: 1e-5, K.NUM_EXAMPLES: 50.0}


def test_each_hospital_keeps_its_latest_epsilon_across_versions() -> None:
    v1 = {"privacy": privacy_block(None, rnd(1, a=dp(1.0), b=dp(1.5)), 1.0, 1.0)}
    v2 = {"privacy": privacy_block(v1, rnd(2, a=dp(1.4), b=None), 1.0, 1.0)}
    hs = v2["privacy"]["hospitals"]
    assert hs == {"a": {"epsilon": 1.4, "delta": 1e-5}, "b": {"epsilon": 1.5, "delta": 1e-5}}
    line = summary(v2["privacy"], "a")
    assert "ε = 1.40 at δ = 1e-05 for this hospital" in line and "at most ε = 1.50" in line


def test_one_round_without_dp_makes_the_whole_lineage_not_private() -> None:
    v1 = {"privacy": privacy_block(None, rnd(1, a=dp(1.0), b={K.NUM_EXAMPLES: 50.0}), 0.0, 0.0)}
    assert v1["privacy"]["hospitals"]["b"] == {"epsilon": None, "delta": None}
    v2 = {"privacy": privacy_block(v1, rnd(2, a=dp(1.2), b=dp(0.5)), 1.0, 1.0)}
    assert v2["privacy"]["hospitals"]["b"]["epsilon"] is None  # never private again
    assert summary(v2["privacy"], "a").startswith("Privacy: not differentially private")


def test_a_parent_without_a_record_and_a_bare_checkpoint_claim_nothing() -> None:
    old_parent = {"round": 3}  # stored before privacy was recorded
    block = privacy_block(old_parent, rnd(4, a=dp(1.0)), 1.0, 1.0)
    assert block["complete"] is False
    assert summary(block, "a").startswith("Privacy: not differentially private")
    assert "no record" in summary(None, "a")


def test_a_dp_run_records_direction_scores_but_does_not_reject_on_them() -> None:
    """DP noise makes honest updates score near chance (the privacy benchmark saw every honest
    hospital rejected); size and structure checks stay."""
    import math

    from coordinator.settings import RunSettings

    plain = RunSettings().screen_rule
    dp = RunSettings(dp_noise_multiplier=1.0, dp_max_grad_norm=1.0).screen_rule
    assert plain.min_cosine == 0.1 and dp.min_cosine == -math.inf
    assert (dp.z_max, dp.ratio_max, dp.free_ratio) == (plain.z_max, plain.ratio_max,
                                                      plain.free_ratio)
