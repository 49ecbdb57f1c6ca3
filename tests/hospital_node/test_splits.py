"""split_of: deterministic, seed-dependent, roughly the requested fraction."""

from __future__ import annotations

from hospital_node.splits import split_of


def test_split_deterministic_and_fraction() -> None:
    ids = [f"case{i:04d}" for i in range(2000)]
    a = [split_of(c, 7) for c in ids]
    assert a == [split_of(c, 7) for c in ids]
    assert 0.22 < a.count("test") / len(ids) < 0.28
    assert a != [split_of(c, 8) for c in ids]
    assert all(split_of(c, 1, 0.0) == "train" for c in ids[:50])
