"""De-identification on arrival: DICOM PS3.15 Annex E, Basic Application Level Confidentiality
Profile, with the Retain Longitudinal Temporal Information with Modified Dates option.

`BASIC_PROFILE` is a subset of PS3.15 Table E.1-1 (as data: keyword -> action) covering the
patient, person, institution, device, request/procedure and free-text attributes that CT
objects commonly carry. On top of the table, VR rules catch what a table misses:

- every private element (odd group) is removed, and overlays/curves (60xx, 50xx) with them;
- every UI value that is not a registered DICOM UID (SOP classes, transfer syntaxes and coding
  schemes stay) is remapped with the site's keyed hash, consistently across instances;
- every DA/DT value is shifted by a per-patient number of whole days (TM values are kept:
  a whole-day shift keeps clock times meaningful);
- every PN value and every LT/ST/UT free-text value not kept on purpose is removed.

Kept unchanged: geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
SliceThickness, Rows/Columns, Rescale*, the Enhanced CT functional groups, which are walked
only to apply the rules above) and the pixel data bytes.

Not covered (a study needing them is out of scope for this entry): burned-in text in pixels
(instances with BurnedInAnnotation=YES are refused instead, see admit.py), the Clean
Descriptors / Clean Structured Content / Clean Graphics options (SR and GSPS are not CT and are
refused), non-listed standard LO/SH/CS attributes with free text (e.g. Manufacturer is kept on
purpose; a site-specific LO used for notes would survive), and retired attributes of Table E.1-1
beyond the ones listed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from typing import Final

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID

from hospital_node.dicom_net.pseudonym import Pseudonyms

X, Z, U = "X", "Z", "U"   # remove, make empty (Type 2 stays present), remap UID

# PS3.15 Table E.1-1 (Basic Profile column), subset present in CT. Z where the attribute is
# Type 2 in CT IODs (it must stay, empty), X otherwise. Dates not listed are shifted by the VR
# rule; UIDs by the UI rule (listed here too where the table says U, for the record).
BASIC_PROFILE: Final[dict[str, str]] = {
    # Patient
    "PatientName": Z, "PatientID": Z, "PatientBirthDate": Z, "PatientSex": Z,
    "PatientBirthTime": X, "PatientAge": X, "PatientSize": X, "PatientWeight": X,
    "PatientAddress": X, "PatientTelephoneNumbers": X, "PatientMotherBirthName": X,
    "PatientBirthName": X, "OtherPatientIDs": X, "OtherPatientIDsSequence": X,
    "OtherPatientNames": X, "IssuerOfPatientID": X, "IssuerOfPatientIDQualifiersSequence": X,
    "MedicalRecordLocator": X, "EthnicGroup": X, "Occupation": X, "MilitaryRank": X,
    "BranchOfService": X, "CountryOfResidence": X, "RegionOfResidence": X,
    "PatientReligiousPreference": X, "AdditionalPatientHistory": X, "PatientComments": X,
    "MedicalAlerts": X, "Allergies": X, "SmokingStatus": X, "PregnancyStatus": X,
    "LastMenstrualDate": X, "PatientState": X, "SpecialNeeds": X,
    "PatientInsurancePlanCodeSequence": X, "PatientPrimaryLanguageCodeSequence": X,
    "ResponsiblePerson": X, "ResponsibleOrganization": X, "PatientTransportArrangements": X,
    "ReferencedPatientSequence": X, "ReferencedPatientPhotoSequence": X,
    "PatientBirthDateInAlternativeCalendar": X, "PatientDeathDateInAlternativeCalendar": X,
    "PatientAlternativeCalendar": X,
    # Visit, admission, request
    "AccessionNumber": Z, "StudyID": Z, "AdmissionID": X, "IssuerOfAdmissionIDSequence": X,
    "AdmittingDiagnosesDescription": X, "AdmittingDiagnosesCodeSequence": X,
    "CurrentPatientLocation": X, "PatientInstitutionResidence": X, "ServiceEpisodeID": X,
    "ServiceEpisodeDescription": X, "VisitComments": X, "ReasonForStudy": X,
    "RequestAttributesSequence": X, "RequestedProcedureDescription": X,
    "RequestedProcedureID": X, "RequestedProcedureLocation": X, "RequestingService": X,
    "ReasonForTheRequestedProcedure": X, "RequestedProcedureComments": X,
    "ImagingServiceRequestComments": X, "PlacerOrderNumberImagingServiceRequest": X,
    "FillerOrderNumberImagingServiceRequest": X, "OrderEnteredBy": X,
    "OrderEntererLocation": X, "OrderCallbackPhoneNumber": X,
    "ScheduledProcedureStepDescription": X, "ScheduledProcedureStepID": X,
    "ScheduledProcedureStepLocation": X, "ScheduledStationName": X,
    "PerformedProcedureStepID": X, "PerformedProcedureStepDescription": X,
    "PerformedStationName": X, "PerformedLocation": X,
    "CommentsOnThePerformedProcedureStep": X, "ReferencedStudySequence": X,
    "ReferencedPerformedProcedureStepSequence": X, "ProcedureCodeSequence": X,
    # People
    "ReferringPhysicianName": Z, "ReferringPhysicianAddress": X,
    "ReferringPhysicianTelephoneNumbers": X, "ReferringPhysicianIdentificationSequence": X,
    "ConsultingPhysicianName": X, "ConsultingPhysicianIdentificationSequence": X,
    "PhysiciansOfRecord": X, "PhysiciansOfRecordIdentificationSequence": X,
    "PerformingPhysicianName": X, "PerformingPhysicianIdentificationSequence": X,
    "NameOfPhysiciansReadingStudy": X, "PhysiciansReadingStudyIdentificationSequence": X,
    "OperatorsName": X, "OperatorIdentificationSequence": X, "RequestingPhysician": X,
    "ScheduledPerformingPhysicianName": X, "ReviewerName": X, "PersonName": X,
    "PersonAddress": X, "PersonTelephoneNumbers": X, "ContentCreatorName": X,
    "VerifyingObserverName": X,
    # Institution and device
    "InstitutionName": X, "InstitutionAddress": X, "InstitutionalDepartmentName": X,
    "InstitutionCodeSequence": X, "StationName": X, "DeviceSerialNumber": X,
    "DetectorID": X, "GantryID": X, "PlateID": X, "DeviceUID": U,
    # Descriptions and free text
    "StudyDescription": X, "SeriesDescription": X, "ProtocolName": X, "ImageComments": X,
    "DerivationDescription": X, "AcquisitionComments": X, "StudyComments": X,
    "TextComments": X, "TextString": X, "AcquisitionDeviceProcessingDescription": X,
    "ContrastBolusAgent": Z, "FrameComments": X, "IdentifyingComments": X,
    # Clinical trial
    "ClinicalTrialSponsorName": X, "ClinicalTrialProtocolID": X,
    "ClinicalTrialProtocolName": X, "ClinicalTrialSiteID": X, "ClinicalTrialSiteName": X,
    "ClinicalTrialSubjectID": X, "ClinicalTrialSubjectReadingID": X,
    "ClinicalTrialTimePointID": X, "ClinicalTrialCoordinatingCenterName": X,
    # Time zone, integrity and provenance wrappers (may hold originals)
    "TimezoneOffsetFromUTC": X, "DigitalSignaturesSequence": X, "MACParametersSequence": X,
    "EncryptedAttributesSequence": X, "OriginalAttributesSequence": X,
    "ModifiedAttributesSequence": X, "DataSetTrailingPadding": X,
    # UIDs (also caught by the UI rule)
    "StudyInstanceUID": U, "SeriesInstanceUID": U, "SOPInstanceUID": U,
    "FrameOfReferenceUID": U, "SynchronizationFrameOfReferenceUID": U,
    "ReferencedSOPInstanceUID": U, "ReferencedFrameOfReferenceUID": U,
    "IrradiationEventUID": U, "InstanceCreatorUID": U, "DimensionOrganizationUID": U,
    "ConcatenationUID": U, "StorageMediaFileSetUID": U,
}
FREE_TEXT_VRS: Final = frozenset({"LT", "ST", "UT"})
DATE_VRS: Final = frozenset({"DA", "DT"})
PATIENT_IDENTITY_REMOVED: Final = "YES"
DEID_METHOD: Final = "fedsight PS3.15 E.1 Basic; dates shifted; UIDs keyed-hash"
DEID_CODES: Final = (  # PS3.16 CID 7050
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)


def _registered(uid: str) -> bool:
    """A UID from the DICOM standard (SOP class, transfer syntax, coding scheme...)."""
    u = UID(uid)
    return u.name != str(u)


def _shift_da(value: str, days: int) -> str:
    """YYYYMMDD shifted by `days`; "" for a value that is not a full date (cannot shift it)."""
    v = value.strip().replace(".", "")  # ACR-NEMA YYYY.MM.DD
    if len(v) != 8 or not v.isdigit():
        return ""
    try:
        return (date(int(v[:4]), int(v[4:6]), int(v[6:])) + timedelta(days=days)).strftime(
            "%Y%m%d")
    except ValueError:
        return ""


def _shift_dt(value: str, days: int) -> str:
    """DT keeps its time part and offset; only the date moves."""
    v = value.strip()
    if len(v) < 8:
        return ""
    head = _shift_da(v[:8], days)
    return head + v[8:] if head else ""


def _map_values(value: object, fn: Callable[[str], str]) -> object:
    if isinstance(value, (list, MultiValue)):
        return [fn(str(v)) for v in value]
    return fn(str(value)) if value not in (None, "") else value


def deidentify(ds: Dataset, pseudo: Pseudonyms, patient_id: str) -> None:
    """De-identify `ds` in place. `patient_id` (the original) keys the date shift."""
    days = pseudo.day_shift(patient_id)
    _clean(ds, pseudo, days)
    ds.PatientIdentityRemoved = PATIENT_IDENTITY_REMOVED
    ds.DeidentificationMethod = DEID_METHOD
    codes = []
    for value, meaning in DEID_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(codes)
    ds.LongitudinalTemporalInformationModified = "MODIFIED"


def _clean(ds: Dataset, pseudo: Pseudonyms, days: int) -> None:
    for tag in list(ds.keys()):
        elem = ds[tag]
        group = tag.group
        if group % 2 == 1 or 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
            del ds[tag]
            continue
        action = BASIC_PROFILE.get(elem.keyword)
        if action == X:
            del ds[tag]
        elif action == Z:
            elem.value = Sequence() if elem.VR == "SQ" else ""
        elif elem.VR == "SQ":
            for item in elem.value:
                _clean(item, pseudo, days)
        elif elem.VR == "UI":
            elem.value = _map_values(elem.value,
                                     lambda u: u if _registered(u) else pseudo.uid(u))
        elif elem.VR == "PN" or elem.VR in FREE_TEXT_VRS:
            del ds[tag]
        elif elem.VR == "DA":
            elem.value = _map_values(elem.value, lambda v: _shift_da(v, days))
        elif elem.VR == "DT":
            elem.value = _map_values(elem.value, lambda v: _shift_dt(v, days))
