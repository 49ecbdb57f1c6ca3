"""Reading a small key or certificate file named on the command line, with errors that name the
option/path and what is wrong but never the file's contents (stdlib only)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from vocab.errors import ConfigError

MAX_KEY_BYTES: Final = 16 * 1024  # an OpenSSH ECDSA key is well under 1 KiB


def read_key_file(path: Path, what: str) -> bytes:
    """The bytes of `path`; ConfigError "<what> does not exist / is unreadable / is larger than
    ..." otherwise. `what` names the file for the message, e.g. "--auth-key '/etc/node'"."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} does not exist or is not a file")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{what} is unreadable ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_KEY_BYTES:
        raise ConfigError(f"{what} is larger than {MAX_KEY_BYTES} bytes: not a key file")
    return data
