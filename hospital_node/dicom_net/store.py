"""Durable staging, atomic filing, de-duplication and study completion.

Layout (staging is outside `ct/`, on the data root's filesystem):

    <staging>/tmp/<random>.part               an instance being written (cleared on start)
    <staging>/studies/<case_id>/instances/    fsync'd instances of a study not yet visible
    <staging>/studies/<case_id>/released      marker: its last sending association released
    <staging>/merge/<case_id>/                a published case being extended (then swapped)

An instance is acknowledged only after its file is fsync'd and renamed into `instances/` and
that folder is fsync'd. File names are the remapped SOP Instance UID, so a duplicate (staged or
already published) is recognised by name and stored once.

Completion rule (DICOM storage has no "study complete" message): a study is published when
(1) no association that sent to it is still open, (2) the last one ended with a normal
A-RELEASE, and (3) no instance arrived for `quiet_s` seconds since. A study whose sender
aborted (or whose receiver was killed: everything found in staging at start-up without the
`released` marker) is held until a later association re-sends to it and releases normally;
duplicates in the re-send are skipped, so a full re-send completes it. Publishing is one
rename of `instances/` to `ct/<case_id>/`; adding instances to a published case builds the new
folder beside it (hard links) and swaps the two atomically (renameat2 RENAME_EXCHANGE; where
the filesystem lacks it, two renames, during which the case is briefly absent, never partial).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from vocab.errors import ConfigError
from vocab.site_layout import CT_DIR

log = logging.getLogger(__name__)
RELEASED: Final = "released"
INSTANCES: Final = "instances"


@dataclass
class _Study:
    open: set[int] = field(default_factory=set)
    last: float = 0.0                # monotonic time of the last instance (or of recovery)
    held_since: float | None = None  # an association that sent to it ended without release
    marked: bool = False             # `released` marker on disk


@dataclass
class _Assoc:
    started: float
    cases: set[str] = field(default_factory=set)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically (Linux renameat2); fall back to two renames."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is not None:
        at_fdcwd, rename_exchange = -100, 2
        if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err))
    aside = a.with_name(a.name + ".old")
    os.replace(b, aside)
    os.replace(a, b)
    os.replace(aside, a)


class StudyStore:
    """Thread-safe: every state change happens under one lock; file writes happen outside it."""

    def __init__(self, root: Path, staging: Path, quiet_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ct = Path(root) / CT_DIR
        self.staging = Path(staging)
        self.quiet_s = quiet_s
        self._clock = clock
        self._lock = threading.RLock()
        self._studies: dict[str, _Study] = {}
        self._assocs: dict[int, _Assoc] = {}
        try:
            self.ct.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir(parents=True, exist_ok=True, mode=0o700)
            if os.stat(self.staging).st_dev != os.stat(self.ct).st_dev:
                raise ConfigError(f"--staging {self.staging}: not on the filesystem of "
                                  f"{self.ct}; publishing must be a rename")
            for sub in ("tmp", "merge"):  # leftovers of an interrupted write or merge
                shutil.rmtree(self.staging / sub, ignore_errors=True)
                (self.staging / sub).mkdir()
            (self.staging / "studies").mkdir(exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--data/--staging: cannot prepare {self.ct} and {self.staging} "
                              f"({e.strerror or type(e).__name__})") from None
        self._recover()

    # ---- start-up -----------------------------------------------------------------------
    def _recover(self) -> None:
        now = self._clock()
        held = ready = 0
        for d in sorted((self.staging / "studies").iterdir()):
            inst = d / INSTANCES
            if not inst.is_dir() or not any(inst.iterdir()):
                shutil.rmtree(d, ignore_errors=True)  # published just before a stop
                continue
            marked = (d / RELEASED).exists()
            self._studies[d.name] = _Study(last=now, held_since=None if marked else now,
                                           marked=marked)
            ready += marked
            held += not marked
        if held or ready:
            log.info("staging: %d study(ies) complete pending quiet period, %d held "
                     "(interrupted; complete them by re-sending)", ready, held)

    # ---- associations -------------------------------------------------------------------
    def end(self, assoc: int, released: bool) -> None:
        """An association ended: normally (A-RELEASE) or not (abort, lost connection)."""
        with self._lock:
            a = self._assocs.pop(assoc, None)
            if a is None:
                return
            now = self._clock()
            for case_id in sorted(a.cases):
                s = self._studies.get(case_id)
                if s is None:
                    continue
                s.open.discard(assoc)
                if not released:
                    if s.held_since is None:
                        log.warning("case %s held: a sending association ended without "
                                    "release; re-send the study to complete it", case_id)
                    s.held_since = now
                elif s.held_since is not None and a.started > s.held_since:
                    s.held_since = None  # a full re-send began after the interruption
                if not s.open and s.held_since is None and not s.marked:
                    self._mark(case_id, s)

    def _assoc(self, assoc: int) -> _Assoc:
        a = self._assocs.get(assoc)
        if a is None:
            a = self._assocs[assoc] = _Assoc(started=self._clock())
        return a

    def begin(self, assoc: int) -> None:
        """Note an association's start (its start time decides whether it re-sends a held
        study); optional: the first instance does it too."""
        with self._lock:
            self._assoc(assoc)

    def _mark(self, case_id: str, s: _Study) -> None:
        d = self.staging / "studies" / case_id
        if (d / INSTANCES).is_dir():
            (d / RELEASED).touch()
            fsync_dir(d)
        s.marked = True

    # ---- instances ----------------------------------------------------------------------
    def _touch(self, case_id: str, assoc: int) -> _Study:
        a = self._assoc(assoc)
        a.cases.add(case_id)
        s = self._studies.setdefault(case_id, _Study())
        s.open.add(assoc)
        s.last = self._clock()
        if s.marked:
            # Durably "not released" before acknowledging: a restart must not publish a study
            # whose new sender may still be sending.
            d = self.staging / "studies" / case_id
            (d / RELEASED).unlink(missing_ok=True)
            if d.is_dir():
                fsync_dir(d)
            s.marked = False
        return s

    def has(self, case_id: str, name: str) -> bool:
        return ((self.ct / case_id / name).exists()
                or (self.staging / "studies" / case_id / INSTANCES / name).exists())

    def put(self, case_id: str, name: str, data: bytes, assoc: int) -> bool:
        """Store one instance durably; False when it was already there (stored once)."""
        if self.has(case_id, name):  # cheap early exit for re-sends, re-checked below
            with self._lock:
                self._touch(case_id, assoc)
            return False
        tmp = self.staging / "tmp" / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with self._lock:
                self._touch(case_id, assoc)
                if self.has(case_id, name):
                    return False
                study = self.staging / "studies" / case_id
                inst = study / INSTANCES
                if not inst.is_dir():
                    inst.mkdir(parents=True, exist_ok=True)
                    fsync_dir(study)
                    fsync_dir(study.parent)
                os.replace(tmp, inst / name)
                fsync_dir(inst)
                return True
        finally:
            tmp.unlink(missing_ok=True)

    # ---- completion -----------------------------------------------------------------------
    def due(self, ignore_quiet: bool = False) -> list[str]:
        """Case ids whose study is complete by the rule in the module docstring."""
        now = self._clock()
        with self._lock:
            return [c for c, s in self._studies.items()
                    if not s.open and s.held_since is None
                    and (ignore_quiet or now - s.last >= self.quiet_s)]

    def held(self) -> list[str]:
        with self._lock:
            return [c for c, s in self._studies.items() if s.held_since is not None]

    def publish_due(self, ignore_quiet: bool = False) -> list[str]:
        """Publish every complete study; the case ids that gained instances."""
        return [c for c in self.due(ignore_quiet) if self.publish(c)]

    def publish(self, case_id: str) -> bool:
        """Make a complete study visible as `ct/<case_id>/` (atomically); True if it changed."""
        with self._lock:
            s = self._studies.get(case_id)
            if s is None or s.open or s.held_since is not None:
                return False
            study = self.staging / "studies" / case_id
            inst = study / INSTANCES
            staged = sorted(p for p in inst.iterdir()) if inst.is_dir() else []
            target = self.ct / case_id
            added = 0
            if staged and not target.exists():
                os.replace(inst, target)
                fsync_dir(self.ct)
                added = len(staged)
            elif staged:
                new = [p for p in staged if not (target / p.name).exists()]
                if new:
                    merge = self.staging / "merge" / case_id
                    shutil.rmtree(merge, ignore_errors=True)
                    merge.mkdir()
                    for p in target.iterdir():
                        if p.is_file():
                            os.link(p, merge / p.name)
                    for p in new:
                        os.link(p, merge / p.name)
                    fsync_dir(merge)
                    _exchange(merge, target)
                    fsync_dir(self.ct)
                    shutil.rmtree(merge, ignore_errors=True)
                    added = len(new)
            shutil.rmtree(study, ignore_errors=True)
            del self._studies[case_id]
        if added:
            total = sum(1 for _ in target.iterdir())
            log.info("case %s published: %d new instance(s), %d in the case", case_id, added,
                     total)
        return added > 0
