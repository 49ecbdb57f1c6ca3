"""Preprocessed-array cache, keyed by the content of the source files.

An entry is one modality of one case: sha256 over (preprocessing version, input grid, each source
file's path relative to the site root and its bytes). Entries live outside the hospital's data root
(default ~/.cache/fedsight/<hash of the root path>), are named by that hash (no case ids in file
names), are written atomically (temp file + rename) and are recomputed when unreadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from multimodal.grid import InputConfig
from vocab.errors import ConfigError, DataProblem

_CHUNK = 1 << 20


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

    @staticmethod
    def key(kind: str, files: list[Path], base: Path, inputs: InputConfig, version: str) -> str:
        h = hashlib.sha256()
        grid = (inputs.ct_shape, inputs.ct_spacing, inputs.path_size)
        h.update(f"{kind}\x00{version}\x00{grid!r}\x00".encode())
        for f in sorted(files):
            h.update(str(f.relative_to(base)).encode() + b"\x00")
            with f.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
            h.update(b"\x00")
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
