"""site.json: shipped id or schema file; hostile files give DataProblems, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hospital_node.site_config import MAX_SITE_JSON_BYTES, read_site_config
from vocab.ehr_schema import CHEST_V1, SCHEMA_DIR, UCI_HEART


def _site(tmp_path: Path) -> Path:
    root = tmp_path / "h-site"
    root.mkdir()
    return root


def _codes(cfg) -> set[str]:
    return {p.code for p in cfg.problems}


def test_defaults_and_shipped_id(tmp_path: Path) -> None:
    root = _site(tmp_path)
    cfg = read_site_config(root)
    assert (cfg.site_id, cfg.ehr_schema, cfg.schema, cfg.problems) == ("h-site", "chest-v1",
                                                                         CHEST_V1, ())
    (root / "site.json").write_text('{"site_id": "north", "ehr_schema": "uci-heart"}')
    cfg = read_site_config(root)
    assert (cfg.site_id, cfg.schema, cfg.schema_hash) == ("north", UCI_HEART,
                                                         UCI_HEART.content_hash)


def test_schema_file_inside_root_and_absolute(tmp_path: Path) -> None:
    root = _site(tmp_path)
    (root / "schemas").mkdir()
    (root / "schemas" / "local.toml").write_bytes((SCHEMA_DIR / "uci-heart.toml").read_bytes())
    (root / "site.json").write_text('{"ehr_schema": "schemas/local.toml"}')
    cfg = read_site_config(root)
    assert cfg.schema_hash == UCI_HEART.content_hash and cfg.ehr_schema == "uci-heart"
    outside = tmp_path / "fed-schema.toml"
    outside.write_bytes((SCHEMA_DIR / "chest-v1.toml").read_bytes())
    (root / "site.json").write_text(f'{{"ehr_schema": "{outside}"}}')
    assert read_site_config(root).schema == CHEST_V1


@pytest.mark.parametrize(("ehr_schema", "code"), [
    ('"../fed-schema.toml"', "site.schema.outside_root"),
    ('"schemas/absent.toml"', "site.schema.unreadable"),
    ('"bad.toml"', "site.bad_schema"),
    ('"chest-v9"', "site.unknown_schema"),
    ("[1, 2]", "site.bad_schema"), ("42", "site.bad_schema"), ("null", "site.bad_schema"),
    ('""', "site.bad_schema"),
])
def test_bad_ehr_schema_excludes_ehr(tmp_path: Path, ehr_schema: str, code: str) -> None:
    root = _site(tmp_path)
    (tmp_path / "fed-schema.toml").write_bytes((SCHEMA_DIR / "chest-v1.toml").read_bytes())
    (root / "bad.toml").write_text("[schema]\nid = 3\n")
    (root / "site.json").write_text(f'{{"site_id": "north", "ehr_schema": {ehr_schema}}}')
    cfg = read_site_config(root)
    assert code in _codes(cfg) and cfg.schema is None and cfg.ehr_schema == ""
    assert cfg.site_id == "north" and all(p.file == "site.json" for p in cfg.problems)


def test_schema_symlink_out_of_root_refused(tmp_path: Path) -> None:
    root = _site(tmp_path)
    (tmp_path / "fed.toml").write_bytes((SCHEMA_DIR / "chest-v1.toml").read_bytes())
    (root / "s.toml").symlink_to(tmp_path / "fed.toml")
    (root / "site.json").write_text('{"ehr_schema": "s.toml"}')
    assert "site.schema.outside_root" in _codes(read_site_config(root))


@pytest.mark.parametrize(("content", "code"), [
    (b"[1, 2]", "site.bad_config"),
    (b'"chest-v1"', "site.bad_config"),
    (b"[" * 100_000 + b"]" * 100_000, "site.config.too_large"),
    (b"[" * 30_000 + b"]" * 30_000, "site.bad_config"),  # RecursionError in json.loads
    (b'{"site_id": "n\xe9"}', "site.bad_config"),  # Latin-1, not UTF-8
    (b'{"site_id": ', "site.bad_config"),
    (b'{"a": "' + b"x" * MAX_SITE_JSON_BYTES + b'"}', "site.config.too_large"),
])
def test_hostile_site_json(tmp_path: Path, content: bytes, code: str) -> None:
    root = _site(tmp_path)
    (root / "site.json").write_bytes(content)
    cfg = read_site_config(root)
    assert code in _codes(cfg) and cfg.schema is None and cfg.site_id == "h-site"


@pytest.mark.parametrize(("value", "code"), [("[1]", "site.bad_site_id"),
                                             ("7", "site.bad_site_id"),
                                             ("null", "site.bad_site_id")])
def test_bad_site_id_falls_back_to_folder(tmp_path: Path, value: str, code: str) -> None:
    root = _site(tmp_path)
    (root / "site.json").write_text(f'{{"site_id": {value}, "colour": 1}}')
    cfg = read_site_config(root)
    assert {code, "site.bad_config"} <= _codes(cfg)
    assert cfg.site_id == "h-site" and cfg.schema == CHEST_V1  # schema unaffected


def test_site_json_not_a_regular_file(tmp_path: Path) -> None:
    root = _site(tmp_path)
    (root / "site.json").mkdir()
    assert "site.config.not_regular" in _codes(read_site_config(root))
    os.rmdir(root / "site.json")
    os.mkfifo(root / "site.json")  # would block a plain open() forever
    assert "site.config.not_regular" in _codes(read_site_config(root))
    os.unlink(root / "site.json")
    (tmp_path / "other.json").write_text('{"site_id": "elsewhere"}')
    (root / "site.json").symlink_to(tmp_path / "other.json")
    cfg = read_site_config(root)
    assert "site.config.outside_root" in _codes(cfg) and cfg.site_id == "h-site"
