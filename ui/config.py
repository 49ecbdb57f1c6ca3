"""App settings and the users who may log in (parsed once, at the edge; frozen).

Users come from a file (one `name:secret` per line, `#` comments) or the environment variable
FEDSIGHT_UI_USERS (`name:secret,name2:secret2`). A secret is either `pbkdf2_sha256$<iterations>$
<salt hex>$<hash hex>` (see `hash_password`) or, for demos only, a plain password.

The hospital-local audit log (logins, diagnoses, feedback; vocab.audit) goes to `audit_log`,
by default `$XDG_STATE_HOME/fedsight/<site hash>/audit.jsonl`: never inside the site data root,
which is read-only to fedsight.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ui.login_limit import LoginLimits
from vocab.audit import AuditLog
from vocab.errors import ConfigError

USERS_ENV: Final = "FEDSIGHT_UI_USERS"
_PBKDF2: Final = "pbkdf2_sha256"


def hash_password(password: str, iterations: int = 200_000) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{_PBKDF2}${iterations}${salt.hex()}${digest.hex()}"


def check_password(secret: str, password: str) -> bool:
    if secret.startswith(_PBKDF2 + "$"):
        _, it, salt, digest = secret.split("$")
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(it))
        return hmac.compare_digest(got.hex(), digest)
    return hmac.compare_digest(secret.encode(), password.encode())


def parse_users(text: str, source: str) -> dict[str, str]:
    users: dict[str, str] = {}
    for n, line in enumerate(text.replace(",", "\n").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        if not sep or not name.strip() or not secret:
            raise ConfigError(f"{source}: entry {n} is not 'name:secret'")
        users[name.strip()] = secret
    return users


@dataclass(frozen=True)
class UiConfig:
    """host/port: where the server listens (127.0.0.1 unless hospital IT opens it up).
    users: name -> secret; empty = no login (only allowed on 127.0.0.1, for tests and demos).
    max_file_size: per uploaded file (Gradio enforces it before our code runs).
    audit_log: the hospital-local audit log (None: none is kept); audit_key_file: its HMAC key
    (default $FEDSIGHT_AUDIT_KEY_FILE; unkeyed when neither is set).
    login_limits: failed-login back-off per user name and client address (ui.login_limit).
    concurrency: requests Gradio runs at once per event (more than the micro-batch size, so
    concurrent clicks can share a batch; model work is serialised by ui.batching.ModelLock).
    """

    host: str = "127.0.0.1"
    port: int = 7860
    users: tuple[tuple[str, str], ...] = ()
    max_file_size: str = "200mb"
    title: str = "fedsight — diagnosis"
    audit_log: Path | None = None
    audit_key_file: Path | None = None
    login_limits: LoginLimits = field(default_factory=LoginLimits)
    concurrency: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be 0..65535, got {self.port!r}")
        if not 1 <= self.concurrency <= 256:
            raise ConfigError(f"concurrency must be 1..256, got {self.concurrency!r}")
        if not self.users and self.host not in ("127.0.0.1", "localhost"):
            raise ConfigError(f"refusing to serve on {self.host!r} without users: pass --users "
                              f"or set {USERS_ENV}")

    def open_audit(self) -> AuditLog | None:
        return AuditLog.open(self.audit_log, self.audit_key_file) if self.audit_log else None

    def authenticate(self, name: str, password: str) -> bool:
        secret = dict(self.users).get(name)
        return secret is not None and check_password(secret, password)

    @staticmethod
    def load_users(path: Path | None) -> tuple[tuple[str, str], ...]:
        if path is not None:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"users file {str(path)!r} is unreadable: {e}") from e
            return tuple(sorted(parse_users(text, str(path)).items()))
        env = os.environ.get(USERS_ENV, "")
        return tuple(sorted(parse_users(env, USERS_ENV).items())) if env else ()


def audit_log_path(site_root: Path, path: Path | None = None) -> Path:
    """`path`, or the default per-site audit log; ConfigError if it is inside the site root."""
    root = Path(site_root).expanduser().resolve()
    if path is None:
        state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        site_hash = hashlib.sha256(str(root).encode()).hexdigest()[:16]
        path = state / "fedsight" / site_hash / "audit.jsonl"
    path = Path(path).expanduser().resolve()
    if path.is_relative_to(root):
        raise ConfigError(f"--audit-log {path} is inside the site data root {root}, which is "
                          "read-only to fedsight; choose another")
    return path


@dataclass(frozen=True)
class TriageConfig:
    """The precomputed worklist and the micro-batcher (docs/ui.md, "Triage and batching").

    cache_dir: triage cache folder (None: `triage_cache_path` default); cache: False = no triage
    cache at all (every diagnosis computed; benchmarks); background: compute the worklist in
    the background; rescan_s: how often the site is rescanned for new or changed
    cases; memory_entries: full explanations kept in memory (~0.6 MB each at the default grid);
    max_batch / max_wait_ms: an interactive micro-batch closes at max_batch cases or max_wait_ms
    after its first request, whichever comes first.
    """

    cache_dir: Path | None = None
    cache: bool = True
    background: bool = True
    rescan_s: float = 60.0
    memory_entries: int = 128
    max_batch: int = 8
    max_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 256:
            raise ConfigError(f"max_batch must be 1..256, got {self.max_batch!r}")
        if not 0.0 <= self.max_wait_ms <= 1000.0:
            raise ConfigError(f"max_wait_ms must be 0..1000, got {self.max_wait_ms!r}")
        if not self.rescan_s > 0:
            raise ConfigError(f"rescan_s must be > 0, got {self.rescan_s!r}")
        if self.memory_entries < 0:
            raise ConfigError(f"memory_entries must be >= 0, got {self.memory_entries!r}")


def triage_cache_path(site_root: Path, path: Path | None = None) -> Path:
    """`path`, or `$XDG_STATE_HOME/fedsight/<site hash>/triage` (next to the audit log);
    ConfigError if it is inside the site root."""
    root = Path(site_root).expanduser().resolve()
    if path is None:
        path = audit_log_path(root).parent / "triage"
    path = Path(path).expanduser().resolve()
    if path.is_relative_to(root):
        raise ConfigError(f"--triage-cache {path} is inside the site data root {root}, which "
                          "is read-only to fedsight; choose another")
    return path
