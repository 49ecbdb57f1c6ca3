"""Tamper-evident audit log: append-only JSON lines chained by SHA-256 (stdlib only).

Each line is the canonical JSON (sorted keys, no spaces, UTF-8) of one entry:

    {"seq": n, "time": ISO-8601 UTC, "kind": "...", "actor": "...", "data": {...},
     "prev": sha256 hex of the previous line (64 zeros for the first),
     "hash": sha256 (HMAC-SHA256 with a key) of the canonical JSON of the entry without "hash"}

`seq` counts from 1 and equals the line number. Editing a line breaks its hash; deleting or
reordering lines breaks the seq run and the prev links; `verify` names the first line that breaks.
Without a key anyone can rebuild a consistent chain, so deployments that need more keep a key file
outside the log's folder (HMAC) or copy the last hash elsewhere. Appends hold an exclusive flock
while reading the tail and writing, fsync, and never rewrite earlier lines; a log whose tail is
torn or broken is refused rather than re-chained over.
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import hashlib
import hmac
import json
import math
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from vocab.errors import ConfigError, FedsightError
from vocab.key_files import read_key_file

RUN_STARTED: Final = "run.started"
RUN_FINISHED: Final = "run.finished"
RUN_FAILED: Final = "run.failed"
ROUND_COMPLETED: Final = "round.completed"
MODEL_PROMOTED: Final = "model.promoted"
MODEL_ROLLED_BACK: Final = "model.rolled_back"
UI_LOGIN: Final = "ui.login"
UI_LOGIN_FAILED: Final = "ui.login_failed"
UI_LOGIN_THROTTLED: Final = "ui.login_throttled"  # refused unchecked: too many failures (back-off)
UI_DIAGNOSIS: Final = "ui.diagnosis"
UI_FEEDBACK: Final = "ui.feedback"
UI_NOT_DIAGNOSED: Final = "ui.not_diagnosed"  # refused as out of scope (explain.scope)
PRIVACY_ROUND: Final = "privacy.round"  # a hospital's privacy ledger (hospital_node.privacy)
KINDS: Final = (RUN_STARTED, RUN_FINISHED, RUN_FAILED, ROUND_COMPLETED, MODEL_PROMOTED,
                MODEL_ROLLED_BACK, UI_LOGIN, UI_LOGIN_FAILED, UI_DIAGNOSIS, UI_FEEDBACK,
                PRIVACY_ROUND, UI_NOT_DIAGNOSED, UI_LOGIN_THROTTLED)

GENESIS: Final = "0" * 64
FIELDS: Final = ("seq", "time", "kind", "actor", "data", "prev", "hash")
KEY_FILE_ENV: Final = "FEDSIGHT_AUDIT_KEY_FILE"  # default key file for writers and `audit verify`
MAX_LINE_BYTES: Final = 1 << 20  # one entry; every read is bounded by it
MIN_KEY_BYTES: Final = 16
_TAIL_CHUNK: Final = 64 * 1024


class AuditError(FedsightError):
    """The audit log cannot be read or appended to; the message names the file and line."""


@dataclass(frozen=True)
class AuditEvent:
    """One verified-shape entry of the log (`data` holds JSON values only)."""

    seq: int
    time: str
    kind: str
    actor: str
    data: Mapping[str, Any]
    prev: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "kind": self.kind, "actor": self.actor,
                "data": dict(self.data), "prev": self.prev, "hash": self.hash}

    @property
    def when(self) -> datetime:
        return parse_time(self.time)


@dataclass(frozen=True)
class VerifyResult:
    """ok, or the first broken line (1-based), what broke (edited / deleted / reordered / torn /
    malformed) and why. `entries`: entries that verified before the break (all when ok)."""

    path: Path
    ok: bool
    entries: int
    line: int | None = None
    problem: str = ""
    reason: str = ""
    last_hash: str = field(default=GENESIS)  # sha256 of the last intact line: an anchor to keep

    def __str__(self) -> str:
        if self.ok:
            return f"{self.path}: intact, {self.entries} entries, last line sha256 {self.last_hash}"
        return f"{self.path}: line {self.line}: {self.problem}: {self.reason}"


# ---- encoding ----
def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def line_digest(line: bytes) -> str:
    """What the next entry's `prev` holds: sha256 of the line (without its newline)."""
    return hashlib.sha256(line).hexdigest()


def entry_hash(entry: Mapping[str, Any], key: bytes | None) -> str:
    body = canonical({k: v for k, v in entry.items() if k != "hash"})
    if key is not None:
        return hmac.new(key, body, hashlib.sha256).hexdigest()
    return hashlib.sha256(body).hexdigest()


def check_data(value: Any, where: str = "data") -> Any:
    """A deep copy of `value` if it holds only JSON values (str-keyed dicts, lists, str, finite
    numbers, bool, None); AuditError naming the first offending key path otherwise."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditError(f"audit {where}: {value!r} is not a finite number")
        return value
    if isinstance(value, list):
        return [check_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise AuditError(f"audit {where}: key {k!r} is not a string")
            out[k] = check_data(v, f"{where}.{k}")
        return out
    raise AuditError(f"audit {where}: a {type(value).__name__} is not a JSON value")


def parse_time(text: str) -> datetime:
    """ISO-8601; a time without zone is taken as UTC."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise AuditError(f"{text!r} is not an ISO-8601 time") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def local_actor() -> str:
    """The operating-system user running this process (for CLI actions)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid-{os.getuid()}"


# ---- key ----
def read_key(key_file: Path, log_path: Path | None = None) -> bytes:
    """The HMAC key in `key_file`: bounded read, owner-only permissions (0600), at least
    MIN_KEY_BYTES after trimming whitespace, and not in the log's folder (whoever can rewrite
    the log must not also find the key there)."""
    key_file = Path(key_file).expanduser()
    what = f"audit key file {str(key_file)!r}"
    if log_path is not None and key_file.resolve().is_relative_to(
            Path(log_path).expanduser().resolve().parent):
        raise ConfigError(f"{what} is in the audit log's folder; keep it outside")
    data = read_key_file(key_file, what)
    mode = key_file.stat().st_mode
    if mode & 0o077:
        raise ConfigError(f"{what} is readable by others (mode {stat.filemode(mode)}); "
                          f"chmod 600 it")
    key = data.strip()
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{what} holds {len(key)} bytes; an audit key needs at least "
                          f"{MIN_KEY_BYTES}")
    return key


def key_from_env(log_path: Path | None = None) -> bytes | None:
    """The key named by $FEDSIGHT_AUDIT_KEY_FILE, or None when it is unset."""
    name = os.environ.get(KEY_FILE_ENV, "")
    return read_key(Path(name), log_path) if name else None


# ---- parsing one line ----
def _parse(raw: bytes, where: str) -> dict[str, Any]:
    """The entry on one line (shape only, no hash check); AuditError saying what is wrong."""
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AuditError(f"{where}: not a JSON line ({e})") from None
    if not isinstance(entry, dict) or set(entry) != set(FIELDS):
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise AuditError(f"{where}: not an audit entry (fields {got}, expected {list(FIELDS)})")
    types = {"seq": int, "time": str, "kind": str, "actor": str, "data": dict, "prev": str,
             "hash": str}
    bad = [k for k, t in types.items() if not isinstance(entry[k], t) or isinstance(entry[k], bool)]
    if bad:
        raise AuditError(f"{where}: field(s) {bad} have the wrong type")
    if canonical(entry) != raw:
        raise AuditError(f"{where}: the line is not in canonical form (it was rewritten)")
    return entry


def _event(entry: Mapping[str, Any]) -> AuditEvent:
    return AuditEvent(**{k: entry[k] for k in FIELDS})


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes without newline, ended by a newline) for each line, bounded."""
    with path.open("rb") as f:
        n = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            n += 1
            if len(raw) > MAX_LINE_BYTES:
                raise AuditError(f"{path}: line {n}: longer than {MAX_LINE_BYTES} bytes")
            complete = raw.endswith(b"\n")
            yield n, raw[:-1] if complete else raw, complete


def read_events(path: Path) -> Iterator[AuditEvent]:
    """Every entry in file order (shape checked, chain not: that is `verify`)."""
    path = Path(path)
    try:
        for n, raw, complete in _lines(path):
            if not complete:
                raise AuditError(f"{path}: line {n}: torn (no newline at its end)")
            yield _event(_parse(raw, f"{path}: line {n}"))
    except OSError as e:
        raise AuditError(f"{path}: unreadable ({e.strerror or type(e).__name__})") from None


# ---- verify ----
def verify(path: Path, key: bytes | None = None) -> VerifyResult:
    """Check the whole chain; the first break wins. OSError if the file cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "not a file", str(path))
    seqs = set()  # every seq in the file: tells a reordered line from a deleted one
    for _, raw, _ in _lines(path):
        try:
            seq = json.loads(raw).get("seq")
        except (ValueError, AttributeError):
            continue
        if isinstance(seq, int):
            seqs.add(seq)
    prev, count = GENESIS, 0

    def broken(n: int, problem: str, reason: str) -> VerifyResult:
        return VerifyResult(path, False, count, n, problem, reason, prev)

    for n, raw, complete in _lines(path):
        if not complete:
            return broken(n, "torn", "the last line has no newline (an interrupted write)")
        try:
            entry = _parse(raw, "entry")
        except AuditError as e:
            return broken(n, "malformed", str(e).removeprefix("entry: "))
        if entry_hash(entry, key) != entry["hash"]:
            return broken(n, "edited", "hash mismatch: the entry was changed"
                          + (" (or it was written with a key)" if key is None
                             else " (or it was written with another key)"))
        expected = count + 1
        if entry["seq"] > expected:
            if expected in seqs:
                return broken(n, "reordered", f"seq {entry['seq']} out of order (expected "
                              f"{expected}, which comes later)")
            return broken(n, "deleted", f"seq gap: expected {expected}, found {entry['seq']}")
        if entry["seq"] < expected:
            return broken(n, "reordered", f"seq {entry['seq']} out of order or repeated "
                          f"(expected {expected})")
        if entry["prev"] != prev:
            return broken(n, "deleted", "prev mismatch: the entry does not follow the line "
                          "before it (lines deleted, replaced or reordered)")
        prev, count = line_digest(raw), count + 1
    return VerifyResult(path, True, count, last_hash=prev)


# ---- append ----
class AuditLog:
    """Appends to one log file. Stateless between calls, so any number of processes and
    threads may share the file: each append locks it, re-reads the tail and chains to it."""

    def __init__(self, path: Path, key: bytes | None = None) -> None:
        self.path = Path(path)
        self.key = key

    @classmethod
    def open(cls, path: Path, key_file: Path | None = None) -> AuditLog:
        """A log at `path` keyed by `key_file`, else by $FEDSIGHT_AUDIT_KEY_FILE, else unkeyed."""
        key = read_key(key_file, path) if key_file is not None else key_from_env(path)
        return cls(path, key)

    def append(self, kind: str, actor: str = "", data: Mapping[str, Any] | None = None,
               *, now: datetime | None = None) -> AuditEvent:
        if kind not in KINDS:
            raise AuditError(f"unknown audit kind {kind!r}; known: {', '.join(KINDS)}")
        body = check_data(dict(data or {}))
        when = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as e:
            raise AuditError(f"{self.path}: cannot open the audit log "
                             f"({e.strerror or type(e).__name__})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            seq, prev = self._tail(fd)
            entry: dict[str, Any] = {"seq": seq, "time": when, "kind": kind, "actor": actor,
                                     "data": body, "prev": prev}
            entry["hash"] = entry_hash(entry, self.key)
            line = canonical(entry)
            if len(line) >= MAX_LINE_BYTES:
                raise AuditError(f"{self.path}: a {kind} entry of {len(line)} bytes is over the "
                                 f"{MAX_LINE_BYTES}-byte line limit")
            _write_all(fd, line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        if created:
            _fsync_dir(self.path.parent)
        return _event(entry)

    def check(self) -> None:
        """AuditError unless an append would succeed now (tail intact, file writable)."""
        if not self.path.exists():
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        except OSError as e:
            raise AuditError(f"{self.path}: cannot open the audit log "
                             f"({e.strerror or type(e).__name__})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._tail(fd)
        finally:
            os.close(fd)

    def _tail(self, fd: int) -> tuple[int, str]:
        """(next seq, next prev) after checking the last entry and its link to the one before;
        AuditError naming the line otherwise."""
        size = os.fstat(fd).st_size
        if size == 0:
            return 1, GENESIS
        pos, buf = size, b""
        while pos > 0 and buf[:-1].count(b"\n") < 2:
            if len(buf) > 2 * MAX_LINE_BYTES + 2:
                raise AuditError(f"{self.path}: the last lines are longer than "
                                 f"{MAX_LINE_BYTES} bytes: not an audit log")
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            buf = os.pread(fd, step, pos) + buf
        if not buf.endswith(b"\n"):
            raise self._refuse(fd, "the last line is torn (no newline at its end: an "
                               "interrupted write)")
        lines = buf[:-1].split(b"\n")
        last = lines[-1]
        # With pos > 0 the buffer holds two complete lines after a partial one.
        before = lines[-2] if len(lines) >= 2 else None
        try:
            entry = _parse(last, "entry")
        except AuditError as e:
            raise self._refuse(fd, str(e).removeprefix("entry: ")) from None
        if entry_hash(entry, self.key) != entry["hash"]:
            raise self._refuse(fd, "hash mismatch (the entry was changed, or the log was "
                               "written with another key or none)")
        if before is None:
            ok = entry["seq"] == 1 and entry["prev"] == GENESIS
        else:
            try:
                prior = _parse(before, "entry")
            except AuditError as e:
                raise self._refuse(fd, f"the line before it: {str(e).removeprefix('entry: ')}",
                                   back=1) from None
            ok = entry["seq"] == prior["seq"] + 1 and entry["prev"] == line_digest(before)
        if not ok:
            raise self._refuse(fd, "it does not follow the line before it (seq or prev)")
        return entry["seq"] + 1, line_digest(last)

    def _refuse(self, fd: int, why: str, back: int = 0) -> AuditError:
        n = _count_lines(fd) - back
        return AuditError(f"{self.path}: line {n}: {why}; refusing to append (run `fedsight "
                          f"audit verify {self.path}`; the log is never re-chained "
                          "automatically)")


def _count_lines(fd: int) -> int:
    """Lines in the file, a last line without newline included (error messages only)."""
    n, pos, last = 0, 0, b"\n"
    while chunk := os.pread(fd, 1 << 20, pos):
        n += chunk.count(b"\n")
        pos += len(chunk)
        last = chunk[-1:]
    return n + (last != b"\n")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(folder: Path) -> None:
    """Make a new file's directory entry durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
