"""Turn uploaded files (a DICOM series as files or one zip, a pathology image, EHR form values)
into a `PreparedCase`, through the hospital node's own readers. Never raises anything but
`UploadError` for bad input; every uploaded file and extracted copy is deleted afterwards.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np

from hospital_node.dicom_series import CtSeries, read_ct_series
from hospital_node.pathology import read_tile
from hospital_node.preprocess import ct_to_grid, path_to_tensor
from multimodal.data import PreparedCase
from multimodal.grid import InputConfig
from vocab.ehr_schema import EhrSchema
from vocab.errors import DataError, DataProblem

MAX_ZIP_MEMBERS: Final = 2000
MAX_ZIP_BYTES: Final = 1 << 30  # uncompressed; a 512x512x600 int16 series is ~300 MB


class UploadError(DataError):
    """An upload cannot be used; the message says why in words a clinician can act on."""


def _problems_text(problems: Sequence[DataProblem]) -> str:
    ordered = [p for p in problems if p.fatal] + [p for p in problems if not p.fatal]
    return "; ".join(p.message for p in ordered[:3])


def _extract_zip(zpath: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(zpath) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_MEMBERS:
                raise UploadError(f"zip holds {len(members)} files; at most {MAX_ZIP_MEMBERS}")
            if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                raise UploadError(f"zip unpacks to more than {MAX_ZIP_BYTES >> 20} MB")
            for i, m in enumerate(members):
                name = Path(m.filename).name  # flat: no paths from the archive are trusted
                if not name or name.startswith(".") or name.startswith("__MACOSX"):
                    continue
                with zf.open(m) as src, (dest / f"{i:05d}_{name}").open("wb") as out:
                    shutil.copyfileobj(src, out)
    except zipfile.BadZipFile as e:
        raise UploadError(f"the zip file is broken ({e})") from None


def read_dicom_upload(files: Sequence[Path], inputs: InputConfig
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Uploaded DICOM files (or one zip of them) -> (CT grid (D, H, W), grid affine)."""
    grid, affine, _ = read_dicom_upload_region(files, inputs)
    return grid, affine


def read_dicom_upload_region(files: Sequence[Path], inputs: InputConfig,
                             read_ct: Callable[[Path], CtSeries] = read_ct_series
                             ) -> tuple[np.ndarray, np.ndarray, str]:
    """As read_dicom_upload, plus the body region the headers name (a fixed word or "").
    `read_ct`: the series reader (the viewer's keeps the native volume before the files go)."""
    if not files:
        raise UploadError("no CT files were uploaded")
    work = Path(tempfile.mkdtemp(prefix="fedsight-upload-"))
    try:
        for i, f in enumerate(files):
            f = Path(f)
            if f.suffix.lower() == ".zip" or zipfile.is_zipfile(f):
                _extract_zip(f, work)
            else:
                shutil.copyfile(f, work / f"{i:05d}_{f.name}")
        series = read_ct(work)
        if not series.usable:
            raise UploadError(f"the CT series cannot be used: {_problems_text(series.problems)}")
        try:
            return (*ct_to_grid(series, inputs), series.body_region)
        except (DataError, ValueError, RuntimeError) as e:
            raise UploadError(f"the CT series could not be resampled: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_pathology_upload(file: Path, inputs: InputConfig) -> np.ndarray:
    """An uploaded pathology image -> (3, S, S) model tile."""
    tile = read_tile(Path(file), "the pathology image")
    if not tile.usable or tile.rgb is None:
        raise UploadError(f"the pathology image cannot be used: {_problems_text(tile.problems)}")
    return path_to_tensor(tile.rgb, inputs)


def parse_ehr_form(values: Mapping[str, float | int | str | None], schema: EhrSchema
                   ) -> np.ndarray | None:
    """Form values (None/'' = not recorded) -> (F,) raw values with NaN, or None if all empty.
    A value outside the field's possible range is an error naming the field and its unit."""
    unknown = sorted(set(values) - set(schema.names))
    if unknown:
        raise UploadError(f"unknown EHR field(s) {unknown}; schema {schema.name!r} has "
                          f"{list(schema.names)}")
    out = np.full(len(schema.fields), np.nan, np.float32)
    for i, spec in enumerate(schema.fields):
        raw = values.get(spec.name)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise UploadError(f"EHR {spec.name} = {raw!r} is not a number ({spec.unit})") from None
        if not math.isfinite(v):
            raise UploadError(f"EHR {spec.name} = {raw!r} is not a finite number")
        if spec.levels and v not in spec.levels:
            raise UploadError(f"EHR {spec.name} = {v:g}, allowed {list(spec.levels)} "
                              f"({spec.unit})")
        if not spec.lo <= v <= spec.hi:
            raise UploadError(f"EHR {spec.name} = {v:g} is outside {spec.lo:g}-{spec.hi:g} "
                              f"{spec.unit}")
        out[i] = v
    return None if np.isnan(out).all() else out


def case_from_upload(case_id: str, dicom_files: Sequence[Path], pathology: Path | None,
                     ehr_values: Mapping[str, float | int | str | None], inputs: InputConfig,
                     schema: EhrSchema, read_ct: Callable[[Path], CtSeries] = read_ct_series
                     ) -> PreparedCase:
    """Build the case, then delete every uploaded file (also when the upload is refused)."""
    try:
        # Gradio stores identical bytes uploaded at the same moment as one file: the first
        # request to finish deletes it for both (the deletion is the privacy rule, kept).
        gone = [f for f in [*dicom_files, *([pathology] if pathology else [])]
                if not Path(f).is_file()]
        if gone:
            raise FileNotFoundError(len(gone))
        case = PreparedCase(case_id)
        if dicom_files:
            case.ct, case.ct_affine, case.ct_region = read_dicom_upload_region(
                dicom_files, inputs, read_ct)
        if pathology is not None:
            case.path = read_pathology_upload(pathology, inputs)
        case.ehr = parse_ehr_form(ehr_values, schema)
        if not case.modalities():
            raise UploadError("nothing to diagnose: upload a CT series, a pathology image or "
                              "fill in at least one EHR field")
        return case
    except FileNotFoundError:  # before or while reading: the other request deleted it
        raise UploadError("an uploaded file is no longer on the server (the same file was "
                          "uploaded twice at once, or the upload expired); upload it again"
                          ) from None
    finally:
        for f in [*dicom_files, *([pathology] if pathology is not None else [])]:
            Path(f).unlink(missing_ok=True)
