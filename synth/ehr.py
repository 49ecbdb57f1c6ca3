"""EHR rows in the CHEST_V1 schema, drawn from the EHR score s_ehr and the site's case mix.

Informative fields are noisy readings of s_ehr (age, pack_years, family_history, cea);
sex, bmi, systolic_bp and creatinine are independent of the label. Values are rounded as a
hospital system would store them and always lie inside the schema ranges.
"""

from __future__ import annotations

import numpy as np

from synth.config import SiteConfig
from synth.model import sigmoid
from vocab.ehr_schema import CHEST_V1, EhrSchema

SCHEMA: EhrSchema = CHEST_V1
# Decimals stored per field (as a lab / registration system would).
DECIMALS: dict[str, int] = {
    "age": 0,
    "sex": 0,
    "pack_years": 1,
    "family_history": 0,
    "cea": 1,
    "bmi": 1,
    "systolic_bp": 0,
    "creatinine": 2,
}


def draw_ehr(site: SiteConfig, score: float, rng: np.random.Generator) -> dict[str, float | None]:
    """One patient's EHR values (None = missing cell), keyed by schema field name."""
    smoker = rng.random() < sigmoid(0.9 * score + 0.4)
    values = {
        "age": site.age_mean + 5.0 * score + rng.normal(0, 8.0),
        "sex": float(rng.random() < 0.55),
        "pack_years": float(np.exp(np.log(22.0) + 0.45 * score + rng.normal(0, 0.45)))
        if smoker
        else 0.0,
        "family_history": float(rng.random() < sigmoid(-1.6 + 0.9 * score)),
        "cea": float(np.exp(np.log(2.8) + 0.5 * score + rng.normal(0, 0.3))),
        "bmi": rng.normal(26.5, 4.5),
        "systolic_bp": rng.normal(132, 17),
        "creatinine": float(np.exp(rng.normal(np.log(0.95), 0.22))),
    }
    out: dict[str, float | None] = {}
    blank = rng.random(len(SCHEMA.fields)) < site.ehr_cell_missing_rate
    blank[0] &= not blank.all()  # a row is never entirely empty: age stays then
    for f, b in zip(SCHEMA.fields, blank, strict=True):
        v = round(float(np.clip(values[f.name], f.lo, f.hi)), DECIMALS[f.name])
        out[f.name] = None if b else v
    return out


def format_value(name: str, value: float | None) -> str:
    """CSV cell text: empty when missing, fixed decimals otherwise."""
    if value is None:
        return ""
    d = DECIMALS[name]
    return f"{value:.{d}f}" if d else str(int(round(value)))
