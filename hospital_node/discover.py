"""Find the cases in a site data root: the union of CT folders, pathology tiles, EHR rows and
label rows (vocab.site_layout). Only lists files; reading and checking happen elsewhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hospital_node.ehr import CsvTable, read_ehr, read_labels
from vocab.ehr_schema import EhrSchema
from vocab.errors import DataProblem
from vocab.site_layout import CT_DIR, EHR_FILE, LABELS_FILE, PATHOLOGY_DIR, PATHOLOGY_SUFFIXES


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


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def discover(root: Path, schema: EhrSchema) -> Discovery:
    """List every case id found anywhere in the site root (sorted)."""
    cases: dict[str, CaseFiles] = {}
    problems: list[DataProblem] = []

    def case(cid: str) -> CaseFiles:
        return cases.setdefault(cid, CaseFiles(cid))

    ct_root = root / CT_DIR
    if ct_root.is_dir():
        for p in sorted(filter(_visible, ct_root.iterdir())):
            if p.is_dir():
                case(p.name).ct_dir = p
            else:
                problems.append(DataProblem("site.unexpected_file", f"{CT_DIR}/{p.name}: a file "
                                            f"directly in {CT_DIR}/ (expected one folder per "
                                            "case); ignored", f"{CT_DIR}/{p.name}", fatal=False))
    path_root = root / PATHOLOGY_DIR
    if path_root.is_dir():
        tiles: dict[str, list[Path]] = {}
        for p in sorted(filter(_visible, path_root.iterdir())):
            rel = f"{PATHOLOGY_DIR}/{p.name}"
            if p.is_file() and p.suffix.lower() in PATHOLOGY_SUFFIXES:
                tiles.setdefault(p.stem, []).append(p)
            elif p.is_file():
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

    ehr_path, labels_path = root / EHR_FILE, root / LABELS_FILE
    ehr = read_ehr(ehr_path, schema, EHR_FILE) if ehr_path.is_file() else CsvTable()
    labels = read_labels(labels_path, LABELS_FILE) if labels_path.is_file() else CsvTable()
    for table in (ehr, labels):
        for cid in list(table.values) + list(table.case_problems):
            case(cid)
    return Discovery(dict(sorted(cases.items())), ehr, labels, problems)
