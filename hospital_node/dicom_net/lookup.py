"""The re-identification table: case_id -> original PatientID, StudyInstanceUID, first received.

SQLite outside the data root (config.py refuses a path inside it), created 0600. It is the only
place the original identifiers are written; nothing here logs them.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

from vocab.errors import ConfigError

_SCHEMA = """CREATE TABLE IF NOT EXISTS cases (
    case_id TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    received_utc TEXT NOT NULL
)"""


class ReidLookup:
    """Append-only table; `record` is durable (committed, synchronous=FULL) when it returns."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._known: set[str] = set()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(self.path, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
            self._known = {r[0] for r in self._db.execute("SELECT case_id FROM cases")}
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"--lookup {self.path}: cannot open the re-identification table "
                              f"({type(e).__name__})") from None

    def record(self, case_id: str, patient_id: str, study_uid: str) -> None:
        """Remember the originals behind `case_id` (first arrival wins; later ones are no-ops)."""
        if case_id in self._known:
            return
        with self._lock:
            if case_id in self._known:
                return
            now = datetime.now(UTC).isoformat(timespec="seconds")
            self._db.execute("INSERT OR IGNORE INTO cases VALUES (?, ?, ?, ?)",
                             (case_id, patient_id, study_uid, now))
            self._known.add(case_id)

    def get(self, case_id: str) -> tuple[str, str, str] | None:
        """(patient_id, study_uid, received_utc) of a case, for authorised re-identification."""
        with self._lock:
            row = self._db.execute("SELECT patient_id, study_uid, received_utc FROM cases "
                                   "WHERE case_id = ?", (case_id,)).fetchone()
        return tuple(row) if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()
