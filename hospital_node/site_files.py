"""Safe access to files in a hospital's site data root: the one place that decides what may be
opened.

Rules (DESIGN.md "what real means at the door"): a path is resolved (symlinks followed) and must
stay inside the site root, so a link to /etc/passwd or to another hospital's share is refused; only
regular files are read (a FIFO would block forever, a device could stream without end, a folder
named like a file reads as nothing); every read has a byte budget checked before reading. Nothing
here writes: the site root is read-only to fedsight.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vocab.errors import DataProblem

MAX_WALK_DEPTH = 8         # a PACS export nests patient/study/series/...; deeper is a loop or junk
MAX_WALK_FILES = 100_000   # files under one case folder; a 3000-slice series fits many times over


@dataclass(frozen=True)
class SiteFile:
    """A checked regular file: `path` resolved, `rel` relative to the site root (for messages)."""

    path: Path
    rel: str
    size: int


def rel_name(path: Path, root: Path) -> str:
    """`path` relative to `root` for messages; printable even for non-UTF-8 names."""
    try:
        rel = str(path.relative_to(root))
    except ValueError:
        rel = path.name
    # surrogateescape'd bytes (non-UTF-8 file names) cannot be encoded for logs/JSON.
    return rel.encode("utf-8", "backslashreplace").decode("utf-8")


def _inside(resolved: Path, root_resolved: Path) -> bool:
    return resolved == root_resolved or root_resolved in resolved.parents


def check_file(path: Path, root: Path, *, code_prefix: str = "file",
               max_bytes: int | None = None) -> SiteFile | DataProblem:
    """A SiteFile for `path`, or the DataProblem that says why it may not be read.

    Codes: <prefix>.outside_root (symlink leaving the root), <prefix>.not_regular (folder, FIFO,
    device, socket), <prefix>.unreadable (stat failed), <prefix>.too_large (over max_bytes).
    """
    rel = rel_name(path, root)
    try:
        resolved = path.resolve(strict=True)
        root_resolved = root.resolve(strict=True)
        st = resolved.stat()
    except (OSError, RuntimeError) as e:  # RuntimeError: symlink loop on older Pythons
        return DataProblem(f"{code_prefix}.unreadable", f"{rel}: cannot open "
                           f"({type(e).__name__})", rel)
    if not _inside(resolved, root_resolved):
        return DataProblem(f"{code_prefix}.outside_root", f"{rel}: a symbolic link leading "
                           "outside the site data root; refused", rel)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        return DataProblem(f"{code_prefix}.not_regular", f"{rel}: is {kind}, expected a regular "
                           "file; refused", rel)
    if max_bytes is not None and st.st_size > max_bytes:
        return DataProblem(f"{code_prefix}.too_large", f"{rel}: {st.st_size} bytes, over the "
                           f"limit of {max_bytes} bytes; refused", rel)
    return SiteFile(resolved, rel, st.st_size)


def read_bytes(f: SiteFile, max_bytes: int) -> bytes:
    """At most max_bytes + 1 bytes (the caller compares the length: the file may grow).

    Read in chunks: `read(n)` allocates n bytes up front, so a 256 MB limit would cost 256 MB
    for a 1 KB file."""
    chunks, total = [], 0
    with f.path.open("rb") as fh:
        while total <= max_bytes and (chunk := fh.read(min(1 << 20, max_bytes + 1 - total))):
            chunks.append(chunk)
            total += len(chunk)
    return b"".join(chunks)


def check_dir(path: Path, root: Path, *, code_prefix: str = "file") -> Path | DataProblem:
    """The resolved folder, or why it may not be listed (outside the root, not a folder)."""
    rel = rel_name(path, root)
    try:
        resolved = path.resolve(strict=True)
        root_resolved = root.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        return DataProblem(f"{code_prefix}.unreadable", f"{rel}: cannot open "
                           f"({type(e).__name__})", rel)
    if not _inside(resolved, root_resolved):
        return DataProblem(f"{code_prefix}.outside_root", f"{rel}: a symbolic link leading "
                           "outside the site data root; refused", rel)
    if not resolved.is_dir():
        return DataProblem(f"{code_prefix}.not_regular", f"{rel}: not a folder", rel)
    return resolved


def _entry_file(entry: os.DirEntry, p: Path, real_dir: Path, root: Path,
                code_prefix: str) -> SiteFile | DataProblem:
    """check_file without re-resolving: a plain file (not a link) in a folder already resolved
    inside the root is inside the root, and scandir has its stat (the warm path lists every
    slice of every case on each load, so this saves a realpath per file)."""
    try:
        if not entry.is_symlink():
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                return SiteFile(real_dir / entry.name, rel_name(p, root), st.st_size)
    except OSError:
        pass  # let check_file say what is wrong
    return check_file(p, root, code_prefix=code_prefix)


def walk_files(folder: Path, root: Path, *, code_prefix: str = "ct"
               ) -> Iterator[SiteFile | DataProblem]:
    """Every visible regular file under `folder`, depth-first in name order, as SiteFile; what
    cannot be read (links out of the root, FIFOs, too deep, too many) as DataProblem.

    Linked folders are followed only when they stay inside the root, and each real folder is
    visited once (a link loop ends there).
    """
    seen: set[tuple[int, int]] = set()
    count = 0

    def visit(d: Path, depth: int) -> Iterator[SiteFile | DataProblem]:
        nonlocal count
        checked = check_dir(d, root, code_prefix=code_prefix)
        if isinstance(checked, DataProblem):
            yield checked
            return
        try:
            st = checked.stat()
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            rel = rel_name(d, root)
            yield DataProblem(f"{code_prefix}.unreadable", f"{rel}: cannot list "
                              f"({type(e).__name__})", rel)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            p = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                if depth >= MAX_WALK_DEPTH:
                    rel = rel_name(p, root)
                    yield DataProblem(f"{code_prefix}.too_deep", f"{rel}: folders nested deeper "
                                      f"than {MAX_WALK_DEPTH} levels; not read", rel, fatal=False)
                    continue
                yield from visit(p, depth + 1)
                continue
            count += 1
            if count > MAX_WALK_FILES:
                rel = rel_name(folder, root)
                yield DataProblem(f"{code_prefix}.too_many_files", f"{rel}: more than "
                                  f"{MAX_WALK_FILES} files; the rest not read", rel)
                return
            yield _entry_file(entry, p, checked, root, code_prefix)

    yield from visit(folder, 0)
