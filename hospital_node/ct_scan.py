"""Discover the DICOM series in one CT case folder, as PACS exports deliver them.

A case folder may hold a DICOMDIR tree, nested patient/study/series folders, files with or
without `.dcm`, vendor records that are not DICOM, and several series (scout, thin and thick
reconstructions, secondary captures). This stage walks the folder (hospital_node.site_files: no
links out of the site root, regular files only), reads each file's header (bounded, no pixels)
and groups the instances by SeriesInstanceUID. Choosing among the series is the next stage
(hospital_node.series_choice).

What is not a DICOM image is skipped with a warning naming the file: a non-DICOM file cannot be
attributed to a series, and a slice lost from the chosen series shows up as a gap there. A file
that is DICOM but whose header cannot be read is reported on its own as a warning: it cannot be
attributed to a series either. A file whose header reads but whose pixels do not disqualifies its
series at the read stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hospital_node.dicom_header import (
    MEDIA_DIRECTORY,
    READ_ERRORS,
    HeaderError,
    Instance,
    is_dicom_file,
    parse_instance,
    read_header,
)
from hospital_node.site_files import SiteFile, rel_name, walk_files
from vocab.errors import DataProblem

IDENTIFYING_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
    "PatientBirthName", "IssuerOfPatientID", "MedicalRecordLocator", "AccessionNumber",
)


@dataclass
class SeriesFiles:
    """The instances of one SeriesInstanceUID found in a case folder."""

    uid: str
    instances: list[Instance] = field(default_factory=list)
    problems: list[DataProblem] = field(default_factory=list)  # fatal ones disqualify it

    @property
    def n_frames(self) -> int:
        return sum(len(i.frames) for i in self.instances)

    @property
    def label(self) -> str:
        """How reports name the series: its number and a folder, never its UID (a UID can be
        traced to the patient outside the hospital, and the report stays local anyway)."""
        first = self.instances[0] if self.instances else None
        num = f"series {first.series_number}" if first and first.series_number is not None \
            else "series (no number)"
        where = str(Path(first.file.rel).parent) if first else "?"
        return f"{num} in {where}"


@dataclass
class CaseScan:
    """All series of a case folder plus the problems not attributable to one series."""

    folder_rel: str
    series: list[SeriesFiles] = field(default_factory=list)
    problems: list[DataProblem] = field(default_factory=list)
    identifying: set[str] = field(default_factory=set)
    files: list[SiteFile] = field(default_factory=list)  # every readable file (cache key)


def _identifying(ds: object) -> set[str]:
    found = set()
    for kw in IDENTIFYING_TAGS:
        try:
            if kw in ds and str(ds.get(kw, "") or "").strip():  # type: ignore[operator,attr-defined]
                found.add(kw)
        except READ_ERRORS:
            found.add(kw)  # present but unparseable still counts as present
    return found


def scan_case(folder: Path, root: Path) -> CaseScan:
    """Every DICOM instance under `folder`, grouped by series; never raises for bad input."""
    scan = CaseScan(rel_name(folder, root))
    by_uid: dict[str, SeriesFiles] = {}
    not_dicom: list[str] = []
    for item in walk_files(folder, root, code_prefix="ct"):
        if isinstance(item, DataProblem):
            scan.problems.append(item)
            continue
        scan.files.append(item)
        if item.path.name.upper() == "DICOMDIR":
            continue  # the export's index; the walk finds the files it lists
        if not is_dicom_file(item):
            not_dicom.append(item.rel)
            continue
        try:
            ds, has_pixels = read_header(item)
        except HeaderError as e:
            scan.problems.append(DataProblem(e.code, f"{item.rel}: {e}; skipped", item.rel,
                                             e.keyword, fatal=False))
            continue
        except READ_ERRORS as e:
            scan.problems.append(DataProblem("dicom.unreadable", f"{item.rel}: DICOM header "
                                             f"unreadable ({type(e).__name__}); skipped (cannot "
                                             "tell its series)", item.rel, fatal=False))
            continue
        try:
            media_class = str(getattr(ds.file_meta, "MediaStorageSOPClassUID", ""))
        except READ_ERRORS:
            media_class = ""
        if media_class == MEDIA_DIRECTORY:
            continue  # a DICOMDIR under another name
        inst = parse_instance(item, ds)
        if not has_pixels:
            inst.problems.insert(0, DataProblem("dicom.unreadable", f"{item.rel}: file ends "
                                                "before its pixel data (truncated)", item.rel,
                                                "PixelData"))
        scan.identifying |= _identifying(ds)
        key = inst.series_uid or f"(no SeriesInstanceUID: {item.rel})"
        by_uid.setdefault(key, SeriesFiles(key)).instances.append(inst)
    if not_dicom:
        more = f" (and {len(not_dicom) - 1} more file(s))" if len(not_dicom) > 1 else ""
        scan.problems.append(DataProblem("dicom.not_dicom", f"{not_dicom[0]}: not a DICOM file "
                                         f"(no DICM header), skipped{more}", not_dicom[0],
                                         fatal=False))
    for s in by_uid.values():
        s.instances.sort(key=lambda i: i.file.rel)
        s.problems = _collapse([p for i in s.instances for p in i.problems])
    scan.series = sorted(by_uid.values(), key=lambda s: (-s.n_frames, s.uid))
    if scan.identifying:
        scan.problems.append(DataProblem(
            "dicom.identifying_tags", f"{scan.folder_rel}: identifying tags present: "
            f"{', '.join(sorted(scan.identifying))} (de-identify before use; values are not "
            "read or reported)", scan.folder_rel, ",".join(sorted(scan.identifying)),
            fatal=False))
    return scan


def _collapse(problems: list[DataProblem]) -> list[DataProblem]:
    """One problem per code for a series: '(and N more files)' instead of one line per slice."""
    out: dict[str, DataProblem] = {}
    extra: dict[str, int] = {}
    for p in problems:
        if p.code in out:
            extra[p.code] = extra.get(p.code, 0) + 1
        else:
            out[p.code] = p
    return [DataProblem(p.code, p.message + (f" (and {extra[p.code]} more file(s))"
                                             if p.code in extra else ""),
                        p.file, p.field, p.fatal) for p in out.values()]
