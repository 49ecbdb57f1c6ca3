"""Clinician feedback at a hospital: one SQLite file, `<site root>/feedback.db` (stdlib only).

The clinician app writes it (agree / disagree / corrected diagnosis + comment); the hospital node
reads it next round as training labels (`FeedbackStore.labels()`). It never leaves the hospital.
A connection is opened per call, so the store is safe to share between server threads.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from vocab.errors import DataError
from vocab.site_layout import FEEDBACK_DB

Verdict = Literal["agree", "disagree"]
VERDICTS: Final = ("agree", "disagree")
# 2: a task column (vocab.tasks); rows of a version-1 store read as the first task "nodule"
SCHEMA_VERSION: Final = 2
FIRST_TASK: Final = "nodule"  # vocab.tasks.DEFAULT_TASK (not imported: this module is stdlib-only)

_DDL = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_utc TEXT NOT NULL,
    case_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    probability REAL NOT NULL,
    decision INTEGER NOT NULL CHECK (decision IN (0, 1)),
    verdict TEXT NOT NULL CHECK (verdict IN ('agree', 'disagree')),
    corrected_label INTEGER CHECK (corrected_label IN (0, 1)),
    comment TEXT NOT NULL DEFAULT '',
    user TEXT NOT NULL DEFAULT '',
    task TEXT NOT NULL DEFAULT 'nodule'
);
CREATE INDEX IF NOT EXISTS feedback_case ON feedback (case_id);
"""


@dataclass(frozen=True)
class Feedback:
    """One clinician judgement of one diagnosis.

    decision: the model's decision shown (1 = malignant); corrected_label: the clinician's
    diagnosis when it differs (required with "disagree"), None with "agree".
    """

    case_id: str
    model_version: str
    probability: float
    decision: int
    verdict: Verdict
    corrected_label: int | None = None
    comment: str = ""
    user: str = ""
    created_utc: str = ""
    id: int | None = None
    task: str = FIRST_TASK  # which task's diagnosis this judges (its label is that task's)

    def __post_init__(self) -> None:
        if not (isinstance(self.task, str) and self.task.replace("_", "").isalnum()
                and self.task.islower() and len(self.task) <= 32):
            raise DataError(f"feedback task must be a task id, got {self.task!r}")
        if self.verdict not in VERDICTS:
            raise DataError(f"feedback verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if self.decision not in (0, 1):
            raise DataError(f"feedback decision must be 0 or 1, got {self.decision!r}")
        if self.corrected_label not in (None, 0, 1):
            raise DataError(f"corrected label must be 0, 1 or empty, got "
                            f"{self.corrected_label!r}")
        if self.verdict == "disagree" and self.corrected_label is None:
            raise DataError("a 'disagree' needs the corrected diagnosis (0 benign / 1 malignant)")
        if self.verdict == "agree" and self.corrected_label not in (None, self.decision):
            raise DataError(f"'agree' with decision {self.decision} but corrected label "
                            f"{self.corrected_label}: choose 'disagree' instead")
        if not 0.0 <= self.probability <= 1.0:
            raise DataError(f"feedback probability must be in [0, 1], got {self.probability!r}")

    @property
    def label(self) -> int:
        """The diagnosis this feedback asserts (the training label it implies)."""
        return self.decision if self.corrected_label is None else self.corrected_label


class FeedbackStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def at_site(cls, root: Path) -> FeedbackStore:
        return cls(Path(root) / FEEDBACK_DB)

    def _connect(self, create: bool) -> sqlite3.Connection:
        if not create:
            if not self.path.is_file():
                raise FileNotFoundError(self.path)
            # Readers (the hospital node) open read-only: they must never modify the store.
            return sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True,
                                   timeout=10)
        con = sqlite3.connect(self.path, timeout=10)
        if create:
            con.executescript(_DDL)
            if not _has_task(con):  # a version-1 store: its rows are first-task feedback
                with con:
                    con.execute(f"ALTER TABLE feedback ADD COLUMN task TEXT NOT NULL DEFAULT "
                                f"'{FIRST_TASK}'")
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return con

    def add(self, fb: Feedback) -> int:
        created = fb.created_utc or datetime.now(UTC).isoformat(timespec="seconds")
        con = self._connect(create=True)
        try:
            with con:
                cur = con.execute(
                    "INSERT INTO feedback (created_utc, case_id, model_version, probability, "
                    "decision, verdict, corrected_label, comment, user, task) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (created, fb.case_id, fb.model_version, fb.probability, fb.decision,
                     fb.verdict, fb.corrected_label, fb.comment, fb.user, fb.task))
            return int(cur.lastrowid or 0)
        finally:
            con.close()

    def all(self) -> list[Feedback]:
        """Every feedback row, oldest first ([] when the store does not exist yet)."""
        try:
            con = self._connect(create=False)
        except FileNotFoundError:
            return []
        try:
            # read-only: a version-1 store (no task column) is read as first-task feedback
            task = "task" if _has_task(con) else f"'{FIRST_TASK}'"
            rows = con.execute(
                "SELECT case_id, model_version, probability, decision, verdict, "
                f"corrected_label, comment, user, created_utc, id, {task} FROM feedback "
                "ORDER BY id").fetchall()
        except sqlite3.DatabaseError as e:
            raise DataError(f"feedback store {self.path} is unreadable: {e}") from e
        finally:
            con.close()
        return [Feedback(*r) for r in rows]

    def labels(self, task: str = FIRST_TASK) -> dict[str, int]:
        """case_id -> label of `task` asserted by the latest feedback on that case (training
        labels); feedback on another task's diagnosis is not a label of this one."""
        return {fb.case_id: fb.label for fb in self.all() if fb.task == task}


def _has_task(con: sqlite3.Connection) -> bool:
    return any(row[1] == "task" for row in con.execute("PRAGMA table_info(feedback)"))
