"""Find the cases in a site data root: the union of CT folders, pathology tiles, EHR rows and
label rows (vocab.site_layout). Only lists files; reading and checking happen elsewhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hospital_node.ehr import CsvTable, read_ehr, read_labels
from hospital_node.site_files import check_dir
from vocab.ehr_schema import EhrSchema
from vocab.errors import DataProblem
from vocab.site_layout import CT_DIR, EHR_FILE, LABELS_FILE, PATHOLOGY_DIR, PATHOLOGY_SUFFIXES
from vocab.tasks import LABELS_DIR, known_tasks


@dataclass
class CaseFiles:
    """What one case has on disk. A modality listed twice is set to None with 'case.duplicate'."""

    case_id: str
    ct_dir: Path | None = None
    pathology: Path | None = None
    problems: list[DataProblem] = field(default_factory=list)


@dataclass
class Discovery:
    cases: dict[str, CaseFiles]
    ehr: CsvTable
    labels: CsvTable
    problems: list[DataProblem]  # site-level
    labels_rel: str = LABELS_FILE  # the task's labels file, relative to the root


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def case_id_problem(name: str, rel: str) -> DataProblem | None:
    """Case ids come from folder/file names; one that cannot be printed or sent through JSON
    (non-UTF-8 bytes, control characters) or is absurdly long is refused, not mangled."""
    try:
        name.encode("utf-8")
        ok = name.isprintable() and 0 < len(name) <= 128
    except UnicodeEncodeError:
        ok = False
    if ok:
        return None
    shown = rel.encode("utf-8", "backslashreplace").decode("utf-8")
    return DataProblem("site.bad_case_name", f"{shown!r}: not a usable case id (non-UTF-8, "
                       "control characters or over 128 characters); ignored", shown, fatal=False)


def _listing(folder: Path, root: Path, problems: list[DataProblem]) -> list[Path]:
    """Visible entries of a top-level folder (ct/, pathology/) that may be read."""
    checked = check_dir(folder, root, code_prefix="site")
    if isinstance(checked, DataProblem):
        problems.append(checked)
        return []
    try:
        entries = sorted(filter(_visible, folder.iterdir()))
    except OSError as e:
        problems.append(DataProblem("site.unreadable", f"{folder.name}/: cannot list "
                                    f"({type(e).__name__})", folder.name))
        return []
    out = []
    for p in entries:
        bad = case_id_problem(p.name, f"{folder.name}/{p.name}")
        if bad:
            problems.append(bad)
        else:
            out.append(p)
    return out


def discover(root: Path, schema: EhrSchema, labels_rel: str = LABELS_FILE) -> Discovery:
    """List every case id found anywhere in the site root (sorted). labels_rel: the task's
    labels file (vocab.tasks.labels_file)."""
    cases: dict[str, CaseFiles] = {}
    problems: list[DataProblem] = []

    def case(cid: str) -> CaseFiles:
        return cases.setdefault(cid, CaseFiles(cid))

    ct_root = root / CT_DIR
    if ct_root.exists() or ct_root.is_symlink():
        for p in _listing(ct_root, root, problems):
            if p.is_dir():
                case(p.name).ct_dir = p
            else:
                problems.append(DataProblem("site.unexpected_file", f"{CT_DIR}/{p.name}: a file "
                                            f"directly in {CT_DIR}/ (expected one folder per "
                                            "case); ignored", f"{CT_DIR}/{p.name}", fatal=False))
    path_root = root / PATHOLOGY_DIR
    if path_root.exists() or path_root.is_symlink():
        tiles: dict[str, list[Path]] = {}
        for p in _listing(path_root, root, problems):
            rel = f"{PATHOLOGY_DIR}/{p.name}"
            # Anything not a folder is a tile candidate; the loader refuses FIFOs, devices and
            # links out of the root with a reason (hospital_node.site_files).
            if not p.is_dir() and p.suffix.lower() in PATHOLOGY_SUFFIXES:
                tiles.setdefault(p.stem, []).append(p)
            elif not p.is_dir():
                case(p.stem).problems.append(DataProblem(
                    "path.unsupported_format", f"{rel}: suffix {p.suffix!r} not one of "
                    f"{list(PATHOLOGY_SUFFIXES)}; ignored", rel))
            else:
                problems.append(DataProblem("site.unexpected_file", f"{rel}: unexpected folder "
                                            "in pathology/; ignored", rel, fatal=False))
        for cid, paths in tiles.items():
            if len(paths) == 1:
                case(cid).pathology = paths[0]
            else:
                names = ", ".join(f"{PATHOLOGY_DIR}/{p.name}" for p in paths)
                case(cid).problems.append(DataProblem(
                    "case.duplicate", f"{names}: {len(paths)} pathology tiles for one case; "
                    "pathology excluded (cannot tell which is right)",
                    f"{PATHOLOGY_DIR}/{paths[0].name}"))

    # absent = empty table; a folder/FIFO/link out of the root is reported by the reader
    ehr = read_ehr(root / EHR_FILE, schema, EHR_FILE, root=root)
    labels = read_labels(root / labels_rel, labels_rel, root=root)
    problems += _unknown_task_labels(root)
    for table in (ehr, labels):
        for cid in list(table.values) + list(table.case_problems):
            case(cid)
    return Discovery(dict(sorted(cases.items())), ehr, labels, problems, labels_rel)


def _unknown_task_labels(root: Path) -> list[DataProblem]:
    """labels/<task>.csv files whose task no shipped task file names (a typo, or a task this
    version does not know): reported, never read."""
    folder = root / LABELS_DIR
    if not folder.is_dir() or folder.is_symlink():
        return []
    known = set(known_tasks())
    out = []
    for p in sorted(filter(_visible, folder.iterdir())):
        if p.suffix != ".csv" or p.stem not in known:
            rel = f"{LABELS_DIR}/{p.name}"
            out.append(DataProblem("site.unknown_task_labels", f"{rel}: no task named "
                                   f"{p.stem!r} is known (tasks: {sorted(known)}); ignored",
                                   rel, fatal=False))
    return out
