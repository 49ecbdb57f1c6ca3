"""EHR schemas: the columns of `ehr.csv`, their units and valid ranges.

The model's EHR encoder has one token per field of the schema; values are normalised with the
schema's fixed reference centre/scale (never with statistics pooled across hospitals, which would
need patient data to leave a site).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

FieldKind = Literal["numeric", "binary", "categorical"]


@dataclass(frozen=True)
class FieldSpec:
    """One EHR column.

    lo/hi: the physiologically possible range; a value outside it is an error, not an outlier.
    center/scale: fixed normalisation, (value - center) / scale, chosen from clinical references.
    levels: the allowed codes of a categorical field (stored as numbers in the CSV).
    """

    name: str
    unit: str
    kind: FieldKind
    lo: float
    hi: float
    center: float
    scale: float
    description: str
    levels: tuple[int, ...] = ()

    def normalise(self, value: float) -> float:
        return (value - self.center) / self.scale


@dataclass(frozen=True)
class EhrSchema:
    name: str
    fields: tuple[FieldSpec, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"EHR schema {self.name!r} has no field {name!r}; fields: {self.names}")


CHEST_V1: Final = EhrSchema(
    name="chest-v1",
    fields=(
        FieldSpec("age", "years", "numeric", 18, 100, 60, 12, "age at imaging"),
        FieldSpec("sex", "0=female 1=male", "binary", 0, 1, 0.5, 0.5, "administrative sex", (0, 1)),
        FieldSpec("pack_years", "pack-years", "numeric", 0, 200, 20, 20, "smoking exposure"),
        FieldSpec("family_history", "0=no 1=yes", "binary", 0, 1, 0.5, 0.5,
                  "first-degree relative with lung cancer", (0, 1)),
        FieldSpec("cea", "ng/mL", "numeric", 0, 1000, 4, 4, "serum carcinoembryonic antigen"),
        FieldSpec("bmi", "kg/m2", "numeric", 10, 80, 26, 5, "body-mass index (uninformative)"),
        FieldSpec("systolic_bp", "mmHg", "numeric", 60, 260, 130, 18,
                  "systolic blood pressure (uninformative)"),
        FieldSpec("creatinine", "mg/dL", "numeric", 0.1, 20, 1.0, 0.3,
                  "serum creatinine (uninformative)"),
    ),
)

# UCI heart disease after FLamby's Fed-Heart-Disease preprocessing (slope/ca/thal dropped).
UCI_HEART: Final = EhrSchema(
    name="uci-heart",
    fields=(
        FieldSpec("age", "years", "numeric", 18, 100, 54, 9, "age"),
        FieldSpec("sex", "0=female 1=male", "binary", 0, 1, 0.5, 0.5, "sex", (0, 1)),
        FieldSpec("cp", "code 1-4", "categorical", 1, 4, 2.5, 1, "chest pain type", (1, 2, 3, 4)),
        FieldSpec("trestbps", "mmHg", "numeric", 60, 250, 132, 18, "resting blood pressure"),
        FieldSpec("chol", "mg/dL", "numeric", 0, 700, 200, 100,
                  "serum cholesterol (0 = not measured in some centres)"),
        FieldSpec("fbs", "0/1", "binary", 0, 1, 0.5, 0.5, "fasting blood sugar > 120 mg/dL",
                  (0, 1)),
        FieldSpec("restecg", "code 0-2", "categorical", 0, 2, 0.6, 0.8, "resting ECG", (0, 1, 2)),
        FieldSpec("thalach", "bpm", "numeric", 50, 230, 138, 26, "maximum heart rate achieved"),
        FieldSpec("exang", "0/1", "binary", 0, 1, 0.5, 0.5, "exercise induced angina", (0, 1)),
        FieldSpec("oldpeak", "mm", "numeric", -5, 10, 0.9, 1.1, "ST depression by exercise"),
    ),
)

SCHEMAS: Final[dict[str, EhrSchema]] = {s.name: s for s in (CHEST_V1, UCI_HEART)}


def get_schema(name: str) -> EhrSchema:
    try:
        return SCHEMAS[name]
    except KeyError:
        raise KeyError(f"unknown EHR schema {name!r}; known: {sorted(SCHEMAS)}") from None
