"""Tasks as data: what a diagnosis head predicts, which inputs it reads, how it thresholds.

A task is a TOML file (shipped ones in `vocab/tasks/<id>.toml`; a site or a coordinator may pass
its own file). A site's labels for a task live in `<site>/labels/<task>.csv`; the federation's
first task ("nodule") keeps `<site>/labels.csv`. Loading is strict: unknown keys, wrong types and
out-of-range values are ConfigErrors naming the file, the key and the value.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from vocab.errors import ConfigError
from vocab.modalities import MODALITIES
from vocab.site_layout import LABELS_FILE

TASK_DIR: Final = Path(__file__).resolve().parent / "tasks"
LABELS_DIR: Final = "labels"
DEFAULT_TASK: Final = "nodule"
# Task ids travel on the wire and become file names: a short plain token only.
TASK_ID_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
POLICIES: Final = ("fixed", "youden", "sensitivity", "specificity")
_TOP: Final = frozenset({"task", "threshold"})
_TASK_KEYS: Final = frozenset({"id", "description", "positive", "negative", "condition",
                               "ehr_schema", "modalities"})
_THRESHOLD_KEYS: Final = frozenset({"policy", "value"})
MAX_TASK_BYTES: Final = 64_000


@dataclass(frozen=True)
class ThresholdPolicy:
    """How the decision threshold is chosen: "fixed" (value = the probability threshold),
    "youden" (max sensitivity + specificity on validation cases), "sensitivity"/"specificity"
    (the threshold that reaches `value` of it on validation cases)."""

    policy: str = "fixed"
    value: float = 0.5


@dataclass(frozen=True)
class Task:
    """One diagnosis task. positive / negative: the decision's words for label 1 / 0 (shown to
    clinicians); condition: what the model's probability is a probability of."""

    id: str
    description: str
    positive: str
    negative: str
    condition: str
    ehr_schema: str
    modalities: tuple[str, ...]
    threshold: ThresholdPolicy
    source: str = ""

    @property
    def labels_file(self) -> str:
        """Path of this task's labels relative to a site root."""
        return labels_file(self.id)


def labels_file(task_id: str) -> str:
    """`labels.csv` for the default task, `labels/<task>.csv` otherwise."""
    check_task_id(task_id)
    return LABELS_FILE if task_id == DEFAULT_TASK else f"{LABELS_DIR}/{task_id}.csv"


def check_task_id(task_id: Any) -> str:
    if not isinstance(task_id, str) or not TASK_ID_PATTERN.fullmatch(task_id):
        raise ConfigError(f"task id must match {TASK_ID_PATTERN.pattern} (lower-case letters, "
                          f"digits, underscore), got {task_id!r}")
    return task_id


def _err(source: str, where: str, what: str) -> ConfigError:
    return ConfigError(f"task file {source}: {where}: {what}")


def _text(source: str, table: dict[str, Any], key: str, where: str) -> str:
    v = table.get(key)
    if not isinstance(v, str) or not v.strip() or len(v) > 200:
        raise _err(source, f"{where}.{key}", f"expected non-empty text (<= 200 characters), "
                   f"got {v!r}")
    return v.strip()


def parse_task(doc: dict[str, Any], source: str) -> Task:
    """A Task from a parsed TOML document; ConfigError naming source/key/value otherwise."""
    unknown = sorted(set(doc) - _TOP)
    if unknown or not isinstance(doc.get("task"), dict):
        raise _err(source, "top level", f"expected a [task] table (and optional [threshold]), "
                   f"unknown keys {unknown}")
    t = doc["task"]
    bad = sorted(set(t) - _TASK_KEYS)
    if bad:
        raise _err(source, "[task]", f"unknown keys {bad}; known: {sorted(_TASK_KEYS)}")
    try:
        tid = check_task_id(t.get("id"))
    except ConfigError as e:
        raise _err(source, "task.id", str(e)) from None
    mods = t.get("modalities", list(MODALITIES))
    if (not isinstance(mods, list) or not mods or len(set(mods)) != len(mods)
            or any(m not in MODALITIES for m in mods)):
        raise _err(source, "task.modalities", f"expected a non-empty list of distinct "
                   f"{list(MODALITIES)}, got {mods!r}")
    th = doc.get("threshold", {"policy": "fixed", "value": 0.5})
    if not isinstance(th, dict) or set(th) - _THRESHOLD_KEYS:
        raise _err(source, "[threshold]", f"expected keys {sorted(_THRESHOLD_KEYS)}, got {th!r}")
    policy, value = th.get("policy", "fixed"), th.get("value", 0.5)
    if policy not in POLICIES:
        raise _err(source, "threshold.policy", f"expected one of {list(POLICIES)}, got "
                   f"{policy!r}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise _err(source, "threshold.value", f"expected a number in (0, 1), got {value!r}")
    schema = _text(source, t, "ehr_schema", "task")
    return Task(tid, _text(source, t, "description", "task"), _text(source, t, "positive", "task"),
                _text(source, t, "negative", "task"), _text(source, t, "condition", "task"),
                schema,
                tuple(m for m in MODALITIES if m in mods), ThresholdPolicy(policy, float(value)),
                source)


def load_task_file(path: Path | str) -> Task:
    """Read and validate one task file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_TASK_BYTES:
            raise ConfigError(f"task file {path}: larger than {MAX_TASK_BYTES} bytes")
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"task file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"task file {path} is unreadable: {e}") from None
    return parse_task(doc, str(path))


def known_tasks() -> tuple[str, ...]:
    """Ids of the shipped task files."""
    return tuple(sorted(p.stem for p in TASK_DIR.glob("*.toml")))


def get_task(task: str | Path) -> Task:
    """A shipped task by id, or a task file by path (anything with a '/' or ending '.toml')."""
    s = str(task)
    if "/" in s or s.endswith(".toml"):
        return load_task_file(s)
    check_task_id(s)
    path = TASK_DIR / f"{s}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown task {s!r}; shipped tasks: {list(known_tasks())} (or pass a "
                          f"task file path)")
    t = load_task_file(path)
    if t.id != s:
        raise ConfigError(f"task file {path}: id {t.id!r} differs from its file name")
    return t
