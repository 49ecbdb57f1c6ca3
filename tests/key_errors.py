"""Shared check for key-file errors: the message names the file, says what is wrong, and quotes
nothing of the file's contents (key material or whatever else the file held)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from vocab.errors import ConfigError


def assert_key_errors(check: Callable[[Path], object], cases: Sequence[tuple[Path, str]],
                      prefix: str) -> int:
    """Each (path, expected) must raise ConfigError starting with `prefix 'path'` and containing
    `expected`. Returns how many cases had contents checked (small regular files)."""
    checked = 0
    for path, expected in cases:
        with pytest.raises(ConfigError) as err:
            check(path)
        msg = str(err.value)
        assert msg.startswith(f"{prefix} {str(path)!r}") and expected in msg, msg
        if path.is_file() and path.stat().st_size < 10000:
            words = [w for line in path.read_text().splitlines() if "-----" not in line
                     for w in line.split() if len(w) > 8]
            assert words and not [w for w in words if w in msg], msg
            checked += 1
    return checked
