"""Keyed pseudonyms: case ids, remapped UIDs and per-patient date offsets from one site secret.

HMAC-SHA256 with a secret that never leaves the hospital (and is kept outside the data root):
the same input always gives the same output at this site, nobody without the secret can
recompute or reverse it, and two sites' pseudonyms cannot be linked.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from vocab.errors import ConfigError

SECRET_BYTES: Final = 32
CASE_PREFIX: Final = "r-"  # "received": distinguishes network-entry cases from hand-filed ones
CASE_HEX: Final = 16       # 64 bits: collision-free for any realistic number of studies
MIN_SHIFT_DAYS, SHIFT_SPAN_DAYS = 365, 3650  # dates move 1-11 years into the past


def load_or_create_secret(path: Path) -> bytes:
    """The site secret in `path` (hex), created with mode 0600 on first use.

    Refuses a file that others can read (it is the re-identification key for every pseudonym).
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it meanwhile: read theirs
            return load_or_create_secret(path)
        except OSError as e:
            raise ConfigError(f"--secret-file {path}: cannot create "
                              f"({e.strerror or type(e).__name__})") from None
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(SECRET_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--secret-file {path}: unreadable ({type(e).__name__})") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"--secret-file {path}: not a regular file")
    if mode & 0o077:
        raise ConfigError(f"--secret-file {path}: readable by group/others (mode "
                          f"{stat.S_IMODE(mode):o}); chmod 600 it")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"--secret-file {path}: not a hex secret") from None
    if len(key) < 16:
        raise ConfigError(f"--secret-file {path}: secret shorter than 16 bytes")
    return key


class Pseudonyms:
    """Deterministic keyed mappings of one site (thread-safe: no mutable state)."""

    def __init__(self, secret: bytes) -> None:
        self._key = bytes(secret)

    def _mac(self, domain: str, *parts: str) -> bytes:
        # Domain separation and a NUL between parts: ("ab","c") and ("a","bc") differ.
        msg = "\0".join((domain, *parts)).encode("utf-8")
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def case_id(self, patient_id: str, study_uid: str) -> str:
        """`r-<16 hex>` for one study of one patient."""
        return CASE_PREFIX + self._mac("case", patient_id, study_uid).hex()[:CASE_HEX]

    def uid(self, uid: str) -> str:
        """A `2.25.<decimal>` UID (at most 44 characters) standing for `uid` at this site."""
        return "2.25." + str(int.from_bytes(self._mac("uid", uid)[:16], "big"))

    def day_shift(self, patient_id: str) -> int:
        """Days (negative) added to every date of one patient: intervals between a patient's
        studies survive, calendar dates do not."""
        n = int.from_bytes(self._mac("date", patient_id)[:8], "big")
        return -(MIN_SHIFT_DAYS + n % SHIFT_SPAN_DAYS)
