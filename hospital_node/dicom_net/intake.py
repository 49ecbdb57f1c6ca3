"""One received instance, from encoded bytes to a durable de-identified file in staging.

Shared by the Storage SCP (`scp.py`) and the C-GET SCU (`scu.py`). The returned status is sent
to the peer as the C-STORE response; SUCCESS only after the file is fsync'd (store.py).
Logs name pseudonymous case ids, status codes and counts only.
"""

from __future__ import annotations

import errno
import logging
import threading
import warnings
from collections import Counter
from io import BytesIO
from typing import Final

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from hospital_node.dicom_net import admit
from hospital_node.dicom_net.config import IntakeConfig
from hospital_node.dicom_net.deid import deidentify
from hospital_node.dicom_net.lookup import ReidLookup
from hospital_node.dicom_net.pseudonym import Pseudonyms, load_or_create_secret
from hospital_node.dicom_net.store import StudyStore

log = logging.getLogger(__name__)
HEADER_SLACK: Final = 16 << 20  # encoded header + sequences allowed beyond the pixel budget


def quiet_third_party_logs() -> None:
    """pydicom's validation warnings quote element values (UIDs, dates): silence them in the
    network entry's process, and keep pynetdicom (whose debug output dumps data sets) at
    WARNING. Process-wide on purpose: called by `serve` and `pull` only."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class Intake:
    """Admit -> pseudonymise -> de-identify -> stage durably; counts outcomes by code."""

    def __init__(self, config: IntakeConfig) -> None:
        self.config = config
        self.pseudo = Pseudonyms(load_or_create_secret(config.secret_file))
        self.lookup = ReidLookup(config.lookup)
        self.store = StudyStore(config.data_root, config.staging, config.quiet_s)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, status: admit.Status) -> admit.Status:
        with self._lock:
            self.counts[status.code] += 1
        return status

    def receive(self, raw: bytes, transfer_syntax: str, context_sop_class: str,
                assoc: int) -> admit.Status:
        """Handle one C-STORE data set; never raises (an unexpected error is a refusal)."""
        try:
            return self._count(self._receive(raw, UID(transfer_syntax), context_sop_class,
                                             assoc))
        except OSError as e:
            log.error("instance refused: storage error (%s)",
                      errno.errorcode.get(e.errno or 0, type(e).__name__))
            return self._count(admit.OUT_OF_RESOURCES)
        except Exception as e:  # noqa: BLE001 - a peer's bytes must never kill the server,
            # and pydicom's messages may quote values: log the type only.
            log.error("instance refused: cannot process (%s)", type(e).__name__)
            return self._count(admit.CANNOT_UNDERSTAND)

    def _receive(self, raw: bytes, ts: UID, context_sop: str, assoc: int) -> admit.Status:
        limit = self.config.max_pixel_bytes + HEADER_SLACK
        if len(raw) > limit:
            return admit.TOO_LARGE
        if ts == DeflatedExplicitVRLittleEndian:
            inflated = admit.inflate_bounded(raw, limit)
            if inflated is None:
                return admit.TOO_LARGE
            raw, implicit, little = inflated, False, True
        else:
            implicit, little = ts.is_implicit_VR, ts.is_little_endian
        ds = read_dataset(BytesIO(raw), implicit, little)
        refusal = admit.check(ds, context_sop, self.config.max_pixel_bytes)
        if refusal is not None:
            log.warning("instance refused: %s (0x%04X)", refusal.code, refusal.value)
            return refusal
        patient_id = str(ds.get("PatientID", "") or "")
        study_uid = str(ds.StudyInstanceUID)
        case_id = self.pseudo.case_id(patient_id, study_uid)
        self.lookup.record(case_id, patient_id, study_uid)
        deidentify(ds, self.pseudo, patient_id)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ts
        ds.file_meta = meta
        out = BytesIO()
        pydicom.dcmwrite(out, ds, enforce_file_format=True)
        stored = self.store.put(case_id, f"{ds.SOPInstanceUID}.dcm", out.getvalue(), assoc)
        return admit.SUCCESS if stored else admit.DUPLICATE

    def close(self) -> None:
        self.lookup.close()

