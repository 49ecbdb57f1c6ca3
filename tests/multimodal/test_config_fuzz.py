"""Configs that arrive as JSON (run config model-json / train-json / pretrain-json, adapt
settings): any JSON object either builds a config that round-trips, or is refused with a
ConfigError naming the class - never another exception deep inside a hospital's round."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multimodal.adapt import AdaptConfig
from multimodal.config import ModelConfig, TrainConfig
from multimodal.pretrain import PretrainConfig
from vocab.errors import ConfigError

CONFIGS = (ModelConfig, TrainConfig, AdaptConfig, PretrainConfig)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
_json = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)


def _value_for(default: object) -> st.SearchStrategy:
    """Mostly plausible values of the default's type (so that some documents are accepted),
    sometimes anything JSON can carry."""
    if dataclasses.is_dataclass(default):  # ModelConfig.inputs: a nested object
        plausible = st.fixed_dictionaries({}, optional={
            "ct_shape": st.lists(st.integers(-2, 64), max_size=4),
            "path_size": st.integers(0, 256), "ehr_schema": st.text(max_size=10)})
    elif isinstance(default, bool):
        plausible = st.booleans()
    elif isinstance(default, int):
        plausible = st.integers(-3, 3 * max(abs(default), 1))
    elif isinstance(default, float):
        plausible = st.floats(-1.0, 3 * max(abs(default), 1.0))
    elif isinstance(default, tuple):
        plausible = st.just(list(default))
    elif isinstance(default, str):
        plausible = st.sampled_from([default, "", "x"])
    else:
        plausible = st.just(default)
    return st.one_of(plausible, plausible, _json)


@st.composite
def documents(draw: st.DrawFn, cls: type) -> dict:
    fields = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
    names = draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True))
    doc = {n: draw(_value_for(fields[n])) for n in names}
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(min_size=1, max_size=6))] = 1  # an unknown key, sometimes
    return json.loads(json.dumps(doc))  # what the wire carries (NaN stays NaN in Python json)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@settings(max_examples=1200, deadline=None)
@given(data=st.data())
def test_any_json_builds_a_config_or_a_config_error(cls: type, data: st.DataObject) -> None:
    doc = data.draw(documents(cls))
    try:
        cfg = cls.from_dict(doc)
    except ConfigError as e:
        assert str(e)  # names the class or the field
        return
    assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for f in dataclasses.fields(cls):  # every accepted value has its declared kind
        v, d = getattr(cfg, f.name), getattr(cls(), f.name)
        assert type(v) is type(d) or (isinstance(d, float) and isinstance(v, float))


def test_refusals_name_the_field_and_the_value() -> None:
    with pytest.raises(ConfigError, match=r"PretrainConfig.lr must be a finite number, got nan"):
        PretrainConfig.from_dict({"lr": float("nan")})
    with pytest.raises(ConfigError, match=r"PretrainConfig.epochs must be an integer, got '5'"):
        PretrainConfig.from_dict({"epochs": "5"})
    with pytest.raises(ConfigError, match=r"TrainConfig.epochs must be an integer, got True"):
        TrainConfig.from_dict({"epochs": True})
    with pytest.raises(ConfigError, match=r"InputConfig.ct_shape must have 3 items"):
        ModelConfig.from_dict({"inputs": {"ct_shape": [16, 32]}})
    with pytest.raises(ConfigError, match=r"ModelConfig.fusion must be one of \['moe', 'late'\]"):
        ModelConfig.from_dict({"fusion": "early"})
    with pytest.raises(ConfigError, match="proj_dim >= 2 and <= 8192"):
        PretrainConfig.from_dict({"proj_dim": 10**9})  # a hospital would allocate it
    with pytest.raises(ConfigError, match="not all 0"):
        PretrainConfig.from_dict({"sim_coef": 0, "std_coef": 0, "cov_coef": 0})
    assert PretrainConfig.from_dict({"lr": 1}).lr == 1.0  # JSON's 1 for 1.0
