"""`<root>/site.json`: the hospital's name and the EHR schema its `ehr.csv` follows.

    {"site_id": "h-north", "ehr_schema": "chest-v1"}                      a shipped schema id
    {"site_id": "h-north", "ehr_schema": "schemas/chest-local.toml"}      a file in the site root
    {"site_id": "h-north", "ehr_schema": "/etc/fedsight/chest-v2.toml"}   an absolute path

Both keys are optional (defaults: the folder name, `chest-v1`). A site.json that cannot be used
never raises: every problem is a DataProblem (codes below), the site id falls back to the folder
name, and when the schema the hospital meant cannot be known the EHR is excluded (`schema` None),
never parsed under a guessed schema.

Schema paths: a relative path must stay inside the site root (checked like every site file:
resolved, symlinks followed, regular file, size-bounded), because what lies in the root arrives
with data exports. An absolute path is allowed: site.json is written by hospital IT, with the same
authority as the node's own configuration, and a federation's schema file naturally lives in a
config folder beside, not inside, the data root. Either way the file is strictly validated and
the federation compares its content hash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hospital_node.series_choice import SeriesRule
from hospital_node.site_files import check_file, read_bytes
from vocab.ehr_schema import CHEST_V1, SCHEMAS, EhrSchema, load_schema_file, looks_like_path
from vocab.errors import ConfigError, DataProblem
from vocab.records import SITE_ID_PATTERN
from vocab.site_layout import SITE_FILE

SITE_KEYS = frozenset({"site_id", "ehr_schema", "ct_series"})
MAX_SITE_JSON_BYTES = 64 * 1024  # a two-key object; anything larger is not a site.json


@dataclass(frozen=True)
class SiteConfig:
    """site_id: the hospital's name; ehr_schema: the schema id ("" = none usable);
    schema: the resolved schema (None = EHR excluded); problems: what was wrong with site.json."""

    site_id: str
    ehr_schema: str
    problems: tuple[DataProblem, ...] = ()
    schema: EhrSchema | None = None
    series_rule: SeriesRule = SeriesRule()  # how a case's CT series is chosen (series_choice)

    @property
    def schema_hash(self) -> str:
        return self.schema.content_hash if self.schema is not None else ""


def _problem(code: str, message: str, key: str = "", fatal: bool = False) -> DataProblem:
    return DataProblem(code, f"{SITE_FILE}: {message}", SITE_FILE, key, fatal=fatal)


def _read_json(root: Path) -> tuple[object, DataProblem | None]:
    """The parsed site.json, None if absent, or the problem that stops it being read."""
    path = root / SITE_FILE
    if not path.exists() and not path.is_symlink():
        return None, None
    checked = check_file(path, root, code_prefix="site.config", max_bytes=MAX_SITE_JSON_BYTES)
    if isinstance(checked, DataProblem):
        return None, checked
    try:
        data = read_bytes(checked, MAX_SITE_JSON_BYTES)
    except OSError as e:
        return None, _problem("site.config.unreadable", f"cannot read ({type(e).__name__})")
    if len(data) > MAX_SITE_JSON_BYTES:
        return None, _problem("site.config.too_large", f"over {MAX_SITE_JSON_BYTES} bytes")
    try:
        return json.loads(data.decode("utf-8-sig")), None
    except UnicodeDecodeError as e:
        return None, _problem("site.bad_config", f"not UTF-8 (byte {e.start})")
    except json.JSONDecodeError as e:
        return None, _problem("site.bad_config", f"not valid JSON (line {e.lineno}, column "
                              f"{e.colno})")
    except RecursionError:  # "[[[[...]]]]" nested past Python's limit
        return None, _problem("site.bad_config", "JSON nested too deeply")


def _resolve_schema(root: Path, value: object) -> tuple[EhrSchema | None, DataProblem | None]:
    """The schema named by site.json's ehr_schema (shipped id, relative or absolute path)."""
    if not isinstance(value, str) or not value.strip():
        return None, _problem("site.bad_schema", f"ehr_schema must be a schema id or a schema "
                              f"file path, got {type(value).__name__} {str(value)[:60]!r}; EHR "
                              "excluded", "ehr_schema", fatal=True)
    name = value.strip()
    if not looks_like_path(name):
        if name in SCHEMAS:
            return SCHEMAS[name], None
        return None, _problem("site.unknown_schema", f"ehr_schema {name[:60]!r} not one of "
                              f"{sorted(SCHEMAS)} (nor a path to a .toml file); EHR excluded",
                              "ehr_schema", fatal=True)
    path = Path(name)
    if not path.is_absolute():
        checked = check_file(root / path, root, code_prefix="site.schema")
        if isinstance(checked, DataProblem):
            return None, DataProblem(checked.code, f"{SITE_FILE}: ehr_schema {checked.message}; "
                                     "EHR excluded", SITE_FILE, "ehr_schema")
        path = checked.path
    try:
        return load_schema_file(path), None
    except ConfigError as e:
        return None, _problem("site.bad_schema", f"ehr_schema: {e}; EHR excluded",
                              "ehr_schema", fatal=True)


def read_site_config(root: Path) -> SiteConfig:
    """site.json if present (unknown keys and bad values reported), else the defaults."""
    root = Path(root)
    site_id = root.resolve().name
    data, problem = _read_json(root)
    if problem is not None:
        # The hospital wrote a site.json we cannot read: its schema is unknown, so no EHR.
        return SiteConfig(site_id, "", (DataProblem(
            problem.code, f"{problem.message}; EHR excluded until it is fixed", SITE_FILE,
            problem.field),))
    if data is None:
        return SiteConfig(site_id, CHEST_V1.name, (), CHEST_V1)
    if not isinstance(data, dict):
        return SiteConfig(site_id, "", (_problem(
            "site.bad_config", f"expected a JSON object, got {type(data).__name__}; EHR "
            "excluded until it is fixed"),))
    problems: list[DataProblem] = []
    unknown = sorted(str(k)[:40] for k in set(data) - SITE_KEYS)
    if unknown:
        problems.append(_problem("site.bad_config", f"unknown key(s) {unknown}; known: "
                                 f"{sorted(SITE_KEYS)}"))
    if "site_id" in data:
        raw = data["site_id"]
        if isinstance(raw, str) and SITE_ID_PATTERN.fullmatch(raw.strip()):
            site_id = raw.strip()
        else:
            # The site id is sent to the coordinator: letters, digits, . _ - only.
            problems.append(_problem("site.bad_site_id", f"site_id must match "
                                     f"{SITE_ID_PATTERN.pattern}, got {type(raw).__name__}; "
                                     f"using the folder name {site_id!r}", "site_id"))
    rule = SeriesRule()
    if "ct_series" in data:
        raw = data["ct_series"]
        try:
            if not isinstance(raw, dict):
                raise ConfigError(f"expected an object, got {type(raw).__name__}")
            rule = SeriesRule.from_dict(raw)
        except (ConfigError, TypeError) as e:
            problems.append(_problem("site.bad_config", f"ct_series: {str(e)[:200]}; using the "
                                     "default series rule", "ct_series"))
    schema: EhrSchema | None = CHEST_V1
    if "ehr_schema" in data:
        schema, problem = _resolve_schema(root, data["ehr_schema"])
        if problem is not None:
            problems.append(problem)
    return SiteConfig(site_id, schema.name if schema else "", tuple(problems), schema, rule)
