"""vocab.transport: float16 updates and left-out experts reconstruct the hospital's weights."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vocab.errors import ConfigError
from vocab.transport import (
    check_transport,
    pack_global,
    pack_update,
    unpack_global,
    unpack_update,
)

E = "blocks.0.moe.experts.3.fc1.weight"


@settings(max_examples=300, deadline=None)
@example(seed=0, scale=1e-4, size=3.0)  # large weights, tiny change: float32 rounding shows
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-4, 1e-1), size=st.floats(0.01, 3.0))
def test_fp16_updates_keep_three_digits_of_the_change(seed: int, scale: float,
                                                      size: float) -> None:
    """The hospital trains from the float16 global it received; the coordinator adds the float16
    update to its float32 global. The merged change is the hospital's change to within float16's
    relative precision of the *change* (not of the weight)."""
    rng = np.random.default_rng(seed)
    glob = {"w": (rng.normal(0, size, 500)).astype(np.float32),
            "n": np.array(7, np.int64)}
    received = unpack_global(pack_global(glob, "fp16"), {k: v.dtype for k, v in glob.items()})
    assert received["w"].dtype == np.float32 and received["n"] == 7
    change = rng.normal(0, scale, 500).astype(np.float32)
    local = {"w": received["w"] + change, "n": np.array(9, np.int64)}
    wire = pack_update(local, received, "fp16")
    assert wire["w"].dtype == np.float16 and wire["n"].dtype == np.int64
    merged = unpack_update(wire, glob, "fp16")
    got = merged["w"].astype(np.float64) - glob["w"]  # the change the coordinator takes
    assert merged["w"].dtype == np.float32 and merged["n"] == 9
    # the hospital's real change is local - received in float32, and the coordinator stores
    # float32 weights: both carry one float32 rounding of the weight (spacing), on top of
    # float16's relative precision of the change itself
    sent = local["w"].astype(np.float64) - received["w"]
    ulp = float(np.spacing(np.abs(glob["w"]).max() + np.abs(sent).max()))
    np.testing.assert_allclose(got, sent, rtol=2e-3,
                               atol=float(np.abs(sent).max()) * 1e-3 + 2 * ulp)
    # sending float16 *weights* instead would err by the weights' rounding: much more for
    # weights larger than the change
    naive = local["w"].astype(np.float16).astype(np.float32) - glob["w"]
    if size > 100 * scale:
        assert np.abs(naive - change).max() > np.abs(got - change).max()


def test_left_out_experts_are_the_global_copy_and_nothing_else_is_filled_in() -> None:
    glob = {E: np.ones(3, np.float32), "head.weight": np.zeros(2, np.float32)}
    local = {E: np.ones(3, np.float32), "head.weight": np.full(2, 0.5, np.float32)}
    wire = pack_update(local, glob, "fp32", leave_out=[E])
    assert set(wire) == {"head.weight"}
    back = unpack_update(wire, glob, "fp32", may_leave_out=[E])
    assert set(back) == {E, "head.weight"}
    np.testing.assert_array_equal(back[E], glob[E])
    # a missing non-expert key stays missing: screening refuses the malformed update
    assert set(unpack_update({E: local[E]}, glob, "fp32", may_leave_out=[E])) == {E}
    with pytest.raises(ConfigError, match="transport must be one of fp32|fp16, got 'int8'"):
        check_transport("int8")
