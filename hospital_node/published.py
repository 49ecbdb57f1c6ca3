"""Published model versions a hospital holds locally (the versions it serves, copied from the
coordinator's store), found by content: a federated adaptation round names its base by the
sha256 of model.pt, and only the adapter and head arrays travel (docs/adaptation.md)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from vocab.errors import DataError

MODEL_FILE = "model.pt"
MAX_FILES = 10_000  # a models folder is a few hundred versions; refuse to crawl a whole disk


class BaseModelMissing(DataError):
    """The round's base version is not among this hospital's published versions."""


@functools.lru_cache(maxsize=256)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_published(models_dir: Path | None, sha256: str) -> Path:
    """The model.pt under models_dir whose content hash is sha256 (BaseModelMissing if none)."""
    if models_dir is None or not Path(models_dir).is_dir():
        raise BaseModelMissing(f"no models-dir with published versions at this hospital "
                               f"({models_dir}); base {sha256[:12]} cannot be found")
    for i, path in enumerate(sorted(Path(models_dir).rglob(MODEL_FILE))):
        if i >= MAX_FILES:
            break
        st = path.stat()
        if path.is_file() and _sha256(path.resolve(), st.st_size, st.st_mtime_ns) == sha256:
            return path
    raise BaseModelMissing(f"base version {sha256[:12]} is not among the published versions "
                           f"in {models_dir}")


def base_state(models_dir: Path | None, sha256: str) -> dict[str, Any]:
    """The base version's weights (torch tensors) by content hash."""
    from multimodal.checkpoint import read_checkpoint

    return dict(read_checkpoint(find_published(models_dir, sha256))["state_dict"])
