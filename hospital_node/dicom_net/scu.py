"""`fedsight node pull`: retrieve studies from a PACS with C-GET, through the same intake.

One association to the PACS: C-GET at STUDY level (Study Root) per --study, at PATIENT level
(Patient Root) per --patient; the PACS sends the instances back as C-STORE sub-operations on
that association, which the intake admits, de-identifies and stages like the Storage SCP does.
CT contexts are proposed one per (SOP class, transfer syntax) with the SCP role, so the PACS
can send each instance as stored (no transcoding, pixels unchanged). A retrieve is complete
when the C-GET's final response arrives: after a normal release, complete studies are
published at once (no quiet period). If the association fails, or any C-GET ends with a
status other than success/warning (its study may be partial), everything this pull staged
stays held in staging until a later pull (or push) of it completes normally.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)

from hospital_node.dicom_net import admit
from hospital_node.dicom_net.config import PullConfig
from hospital_node.dicom_net.intake import Intake, quiet_third_party_logs
from vocab.errors import DataError

log = logging.getLogger(__name__)
FINAL_OK = (0x0000, 0xB000)  # success; warning (some sub-operations failed or warned)


@dataclass
class PullResult:
    """What a pull did, in codes and counts only (no patient values)."""

    queries: int = 0
    queries_ok: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    cases: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    held: int = 0

    @property
    def ok(self) -> bool:
        return self.queries == self.queries_ok and self.held == 0

    def to_json(self) -> dict:
        return {"queries": self.queries, "queries_ok": self.queries_ok,
                "sub_operations": {"completed": self.completed, "failed": self.failed,
                                   "warning": self.warning},
                "instances": self.outcomes, "cases_published": self.cases, "held": self.held}


def _queries(config: PullConfig) -> Iterator[tuple[Dataset, str]]:
    for uid in config.studies:
        ds = Dataset()
        ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", uid
        yield ds, StudyRootQueryRetrieveInformationModelGet
    for pid in config.patients:
        ds = Dataset()
        ds.QueryRetrieveLevel, ds.PatientID = "PATIENT", pid
        yield ds, PatientRootQueryRetrieveInformationModelGet


def pull(config: PullConfig) -> PullResult:
    """Retrieve, de-identify and file the requested studies; DataError if the PACS refuses."""
    quiet_third_party_logs()
    intake = Intake(config.intake)
    ae = AE(ae_title=config.ae_title)
    ae.acse_timeout = 30
    ae.network_timeout = ae.dimse_timeout = config.timeout_s
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
    roles = []
    for sop in admit.CT_SOP_CLASSES:
        for ts in admit.decodable_syntaxes():
            ae.add_requested_context(sop, ts)
        roles.append(build_role(sop, scp_role=True))

    def on_store(event: evt.Event) -> int:
        ctx = event.context
        return intake.receive(event.request.DataSet.getvalue(), ctx.transfer_syntax,
                              ctx.abstract_syntax, id(event.assoc)).value

    pacs = config.pacs
    result = PullResult()
    try:
        assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.ae_title, ext_neg=roles,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        if not assoc.is_established:
            raise DataError(f"--pacs {pacs.ae_title}@{pacs.host}:{pacs.port}: association "
                            "rejected, aborted or never answered (is our AE title declared "
                            "on the PACS?)")
        key = id(assoc)
        intake.store.begin(key)
        for query, model in _queries(config):
            result.queries += 1
            final = None
            for status, _ in assoc.send_c_get(query, model):
                if status is None or "Status" not in status:
                    final = None  # timeout, abort or an invalid response
                    break
                final = status
            if final is None:
                log.error("query %d: no final C-GET response", result.queries)
                continue
            code = int(final.Status)
            result.completed += int(final.get("NumberOfCompletedSuboperations", 0) or 0)
            result.failed += int(final.get("NumberOfFailedSuboperations", 0) or 0)
            result.warning += int(final.get("NumberOfWarningSuboperations", 0) or 0)
            if code in FINAL_OK:
                result.queries_ok += 1
            else:
                log.error("query %d: C-GET ended with status 0x%04X", result.queries, code)
        released = assoc.is_established
        if released:
            assoc.release()
        intake.store.end(key, released=released and result.queries_ok == result.queries)
        result.cases = intake.store.publish_due(ignore_quiet=True)
        result.held = len(intake.store.held())
        result.outcomes = dict(sorted(intake.counts.items()))
        log.info("pull: %s", result.to_json() | {"cases_published": len(result.cases)})
    finally:
        ae.shutdown()
        intake.close()
    return result
