"""The site data root layout (DESIGN.md section 2), as constants.

    <root>/ct/<case_id>/*.dcm       one CT series per case
    <root>/pathology/<case_id>.png  one RGB H&E tile per case (.png, .tif, .tiff)
    <root>/ehr.csv                  case_id + the EHR schema's columns, one row per case
    <root>/labels.csv               case_id,label (0 = benign/negative, 1 = malignant/positive)
    <root>/feedback.db              clinician feedback (SQLite), written by the UI
    <root>/site.json                optional: {"site_id": ..., "ehr_schema": ...}
"""

from typing import Final

CT_DIR: Final = "ct"
PATHOLOGY_DIR: Final = "pathology"
PATHOLOGY_SUFFIXES: Final = (".png", ".tif", ".tiff")
EHR_FILE: Final = "ehr.csv"
LABELS_FILE: Final = "labels.csv"
FEEDBACK_DB: Final = "feedback.db"
SITE_FILE: Final = "site.json"
CASE_ID_COLUMN: Final = "case_id"
LABEL_COLUMN: Final = "label"
TRUTH_DIR: Final = "_truth"  # synthetic ground truth, beside (never inside) the site roots
