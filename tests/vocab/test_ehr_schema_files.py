"""EHR schemas as TOML files: the shipped ones, the content hash, strict validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vocab.ehr_schema import (
    CHEST_V1,
    MAX_SCHEMA_BYTES,
    SCHEMA_DIR,
    SCHEMAS,
    UCI_HEART,
    get_schema,
    load_schema_file,
    parse_schema_bytes,
)
from vocab.errors import ConfigError

# The values of the former Python constants (name, unit, kind, lo, hi, center, scale, levels).
CHEST = [("age", "years", "numeric", 18, 100, 60, 12, ()),
         ("sex", "0=female 1=male", "binary", 0, 1, 0.5, 0.5, (0, 1)),
         ("pack_years", "pack-years", "numeric", 0, 200, 20, 20, ()),
         ("family_history", "0=no 1=yes", "binary", 0, 1, 0.5, 0.5, (0, 1)),
         ("cea", "ng/mL", "numeric", 0, 1000, 4, 4, ()),
         ("bmi", "kg/m2", "numeric", 10, 80, 26, 5, ()),
         ("systolic_bp", "mmHg", "numeric", 60, 260, 130, 18, ()),
         ("creatinine", "mg/dL", "numeric", 0.1, 20, 1.0, 0.3, ())]
HEART = [("age", "years", "numeric", 18, 100, 54, 9, ()),
         ("sex", "0=female 1=male", "binary", 0, 1, 0.5, 0.5, (0, 1)),
         ("cp", "code 1-4", "categorical", 1, 4, 2.5, 1, (1, 2, 3, 4)),
         ("trestbps", "mmHg", "numeric", 60, 250, 132, 18, ()),
         ("chol", "mg/dL", "numeric", 0, 700, 200, 100, ()),
         ("fbs", "0/1", "binary", 0, 1, 0.5, 0.5, (0, 1)),
         ("restecg", "code 0-2", "categorical", 0, 2, 0.6, 0.8, (0, 1, 2)),
         ("thalach", "bpm", "numeric", 50, 230, 138, 26, ()),
         ("exang", "0/1", "binary", 0, 1, 0.5, 0.5, (0, 1)),
         ("oldpeak", "mm", "numeric", -5, 10, 0.9, 1.1, ())]

MINIMAL = """
[schema]
id = "tiny"
version = "1"

[[field]]
name = "age"
unit = "years"
kind = "numeric"
lo = 18
hi = 100
center = 60
scale = 12
"""


def test_shipped_schemas_equal_the_former_constants() -> None:
    assert set(SCHEMAS) == {"chest-v1", "uci-heart"}
    for schema, table in ((CHEST_V1, CHEST), (UCI_HEART, HEART)):
        got = [(f.name, f.unit, f.kind, f.lo, f.hi, f.center, f.scale, f.levels)
               for f in schema.fields]
        assert got == table
        assert schema.version == "1" and len(schema.content_hash) == 64
    assert get_schema("chest-v1") is CHEST_V1
    assert CHEST_V1.field("creatinine").loinc == "2160-0"
    conv = CHEST_V1.field("creatinine").convert[0]
    assert conv.unit == "umol/L" and math.isclose(97 * conv.factor, 1.097, rel_tol=1e-3)


def test_get_schema_by_path_and_unknown_id(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(MINIMAL)
    assert get_schema(str(path)).names == ("age",)
    assert get_schema(path).name == "tiny"
    with pytest.raises(KeyError, match="unknown EHR schema"):
        get_schema("chest-v9")


def test_hash_ignores_layout_comments_and_descriptions_but_not_ranges(tmp_path: Path) -> None:
    text = (SCHEMA_DIR / "chest-v1.toml").read_text()
    reformatted = "# a comment\n" + text.replace("lo = 18\n", "lo   =   18.0   # years\n") \
        .replace('description = "age at imaging"', 'description = "age when scanned"')
    assert parse_schema_bytes(reformatted.encode(), "x").content_hash == CHEST_V1.content_hash
    changed = text.replace("lo = 18\n", "lo = 16\n")
    assert parse_schema_bytes(changed.encode(), "x").content_hash != CHEST_V1.content_hash
    bumped = text.replace('version = "1"', 'version = "2"')
    assert parse_schema_bytes(bumped.encode(), "x").content_hash != CHEST_V1.content_hash


@pytest.mark.parametrize(("edit", "needle"), [
    (("scale = 12", "scale = 12\ncolour = 1"), "colour"),               # unknown key
    (("scale = 12", 'scale = "12"'), "scale must be a number"),          # wrong type
    (("hi = 100", "hi = 18"), "lo = 18 must be below hi = 18"),          # lo >= hi
    (("scale = 12", "scale = 0"), "scale = 0 must be > 0"),              # scale <= 0
    (("hi = 100", "hi = inf"), "hi = inf is not a finite number"),       # non-finite
    (("lo = 18", "lo = nan"), "lo = nan is not a finite number"),
    (("lo = 18", "lo = true"), "lo must be a number"),                   # bool is not a number
    (('kind = "numeric"', 'kind = "categorical"\nlevels = [20, 200]'),
     "field 'age': level 200 outside"),
    (('kind = "numeric"', 'kind = "ordinal"'), "kind = 'ordinal'"),
    (('name = "age"', 'name = "case_id"'), "case_id"),
    (('name = "age"', 'name = "a b"'), "does not match"),
    (('id = "tiny"', 'id = "Tiny Schema!"'), "does not match"),
    (("scale = 12", 'scale = 12\nloinc = "abc"'), "loinc"),
    (("scale = 12", 'scale = 12\n[[field.convert]]\nunit = "months"\nfactor = -1'),
     "factor = -1.0 must"),
])
def test_malformed_schema_names_file_field_and_value(edit: tuple[str, str], needle: str) -> None:
    text = MINIMAL.replace(*edit)
    assert text != MINIMAL
    with pytest.raises(ConfigError) as err:
        parse_schema_bytes(text.encode(), "bad.toml")
    msg = str(err.value)
    assert "bad.toml" in msg and needle in msg, msg
    if not edit[0].startswith(("id =", "name =")):
        assert "field 'age'" in msg, msg  # the field is named


def test_duplicate_field_missing_parts_and_file_limits(tmp_path: Path) -> None:
    dup = MINIMAL + MINIMAL.split("[schema]")[1].split('version = "1"')[1]
    with pytest.raises(ConfigError, match="field 'age': defined twice"):
        parse_schema_bytes(dup.encode(), "dup.toml")
    with pytest.raises(ConfigError, match=r"\[\[field\]\]"):
        parse_schema_bytes(b'[schema]\nid = "x"\nversion = "1"\n', "nofields.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        parse_schema_bytes(b"[schema\n", "broken.toml")
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_schema_bytes(b"\xff\xfe[schema]", "latin.toml")
    big = tmp_path / "big.toml"
    big.write_bytes(MINIMAL.encode() + b"#" * MAX_SCHEMA_BYTES)
    with pytest.raises(ConfigError, match=f"big.toml: .*over the limit of {MAX_SCHEMA_BYTES}"):
        load_schema_file(big)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_schema_file(tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_schema_file(tmp_path / "absent.toml")
