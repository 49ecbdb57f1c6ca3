"""EHR rows in the CHEST_V1 schema, drawn from the EHR score s_ehr and the site's case mix.

Informative fields are noisy readings of s_ehr (age, pack_years, family_history, cea);
sex, bmi, systolic_bp and creatinine are independent of the nodule label. With the second disease
on, the fibrosis EHR score t_ehr shifts bmi (down), systolic_bp and creatinine (up) and age (a
little), drawn from the fibrosis stream so the nodule draws stay the same. Values are rounded as a
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


# Fibrosis shifts per unit of t_ehr (and the noise of each reading), added to the base values.
FIBROSIS_EHR_SHIFT: dict[str, tuple[float, float]] = {
    "age": (2.5, 1.5),  # years
    "bmi": (-2.0, 1.0),  # kg/m^2: weight loss, reduced exercise tolerance
    "systolic_bp": (6.0, 4.0),  # mmHg: pulmonary hypertension / treatment effects
    "creatinine": (0.12, 0.05),  # log scale: creatinine *= exp(0.12 t + noise)
}


def draw_ehr(
    site: SiteConfig,
    score: float,
    rng: np.random.Generator,
    fibrosis_score: float | None = None,
    fibrosis_rng: np.random.Generator | None = None,
) -> dict[str, float | None]:
    """One patient's EHR values (None = missing cell), keyed by schema field name.

    fibrosis_score (t_ehr, with its own fibrosis_rng) adds FIBROSIS_EHR_SHIFT; None = the
    one-task values exactly.
    """
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
    if fibrosis_score is not None:
        if fibrosis_rng is None:
            raise ValueError("draw_ehr: fibrosis_score needs its own fibrosis_rng")
        for name, (slope, sd) in FIBROSIS_EHR_SHIFT.items():
            shift = slope * fibrosis_score + fibrosis_rng.normal(0.0, sd)
            if name == "creatinine":  # multiplicative, like the log-normal base value
                values[name] = values[name] * float(np.exp(shift))
            else:
                values[name] = values[name] + shift
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
