"""Preprocessed-array cache, keyed by the content of the source files.

An entry is one modality of one case: sha256 over (preprocessing version, input grid, each source
file's path relative to the site root and its bytes). Entries live outside the hospital's data root
(default ~/.cache/fedsight/<hash of the root path>), are named by that hash (no case ids in file
names), are written atomically (temp file + rename) and are recomputed when unreadable.

Each source file's sha256 is remembered in `file-hashes.json` in the cache folder, keyed by its
path relative to the site root and its stat signature (size, mtime_ns, ctime_ns, inode); a file
whose signature is unchanged is not read again. Every node process starts fresh (Flower runs one
`flwr-clientapp` process per message), so this saves re-reading the whole site per message.
Trade-off: a file rewritten in place keeping size, mtime, ctime and inode would keep its old hash.
Ordinary writes always change ctime (tools such as `touch -d` or `cp -p` can restore mtime, not
ctime), so this needs a filesystem whose timestamps are coarser than the interval between two
same-size writes; delete `file-hashes.json` to force full re-hashing there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from multimodal.grid import InputConfig
from vocab.errors import ConfigError, DataProblem

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
HASHES_FILE = "file-hashes.json"
_HASHES_FORMAT = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _signature(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class FileHashes:
    """sha256 of a site's source files, re-read only when a file's stat signature changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, list] = {}
        self.hashed = 0  # files read this time
        self.reused = 0  # files whose remembered hash was used
        self._dirty = False
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:  # unreadable or corrupt: rebuilt from the files
            log.warning("file-hash memo %s unreadable (%s); re-hashing", path, type(e).__name__)
            return
        if isinstance(data, dict) and data.get("format") == _HASHES_FORMAT \
                and isinstance(data.get("files"), dict):
            self.entries = data["files"]

    def digest(self, file: Path, rel: str) -> str:
        before = _signature(file)
        entry = self.entries.get(rel)
        if isinstance(entry, list) and len(entry) == 5 and entry[:4] == before:
            self.reused += 1
            return str(entry[4])
        digest = sha256_file(file)
        self.hashed += 1
        if _signature(file) == before:  # unchanged while it was read: safe to remember
            self.entries[rel] = [*before, digest]
            self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty:
            return
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": _HASHES_FORMAT, "files": self.entries}, f)
            os.replace(tmp, self.path)
        except OSError as e:  # the memo is an optimisation; the next load re-hashes
            Path(tmp).unlink(missing_ok=True)
            log.warning("could not write file-hash memo %s (%s)", self.path, type(e).__name__)
        self._dirty = False


def default_cache_dir(root: Path) -> Path:
    site_hash = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "fedsight" / site_hash


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


class CaseCache:
    """get/put of {name: array} + problems; counts hits and misses."""

    def __init__(self, cache_dir: Path, root: Path) -> None:
        if _is_within(cache_dir, root):
            raise ConfigError(f"cache dir {cache_dir} is inside the site data root {root}, "
                              "which is read-only to fedsight; choose another")
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self.hashes = FileHashes(self.dir / HASHES_FILE)

    def key(self, kind: str, files: list[Path], base: Path, inputs: InputConfig,
            version: str) -> str:
        """sha256 over (kind, preprocessing version, grid, each file's relative path and the
        sha256 of its bytes)."""
        h = hashlib.sha256()
        grid = (inputs.ct_shape, inputs.ct_spacing, inputs.path_size)
        h.update(f"{kind}\x00{version}\x00{grid!r}\x00".encode())
        for f in sorted(files):
            rel = str(f.relative_to(base))
            h.update(rel.encode() + b"\x00" + self.hashes.digest(f, rel).encode() + b"\x00")
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.npz"

    def get(self, key: str) -> tuple[dict[str, np.ndarray], list[DataProblem]] | None:
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != "_problems"}
                problems = [DataProblem(**d) for d in json.loads(str(z["_problems"]))]
        except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile):
            # Corrupt or foreign entry: recompute (put() overwrites it).
            self.misses += 1
            return None
        self.hits += 1
        return arrays, problems

    def put(self, key: str, arrays: dict[str, np.ndarray], problems: list[DataProblem]) -> None:
        payload = dict(arrays)
        payload["_problems"] = np.array(json.dumps([asdict(p) for p in problems]))
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **payload)
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
