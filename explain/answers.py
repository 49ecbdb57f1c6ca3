"""Templated answers to a clinician's follow-up questions, built only from an `Explanation`.

Every number in an answer is formatted from a field of the explanation by the helpers below, so
an answer can never disagree with the diagnosis card (tests check this). Free-text questions are
matched to one of the supported intents by keywords; anything else gets the list of intents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from explain.explanation import Explanation
from vocab.modalities import MODALITY_LABELS


def pct(p: float) -> str:
    """A probability as the UI shows it ('73.4%')."""
    return f"{100 * p:.1f}%"


def signed(x: float) -> str:
    """A logit-scale contribution ('+0.42' / '-0.10')."""
    return f"{x:+.2f}"


def _names(mods: tuple[str, ...] | list[str]) -> str:
    return ", ".join(MODALITY_LABELS[m] for m in mods) if mods else "none"


def answer_why(e: Explanation) -> str:
    lines = [f"The model gives {pct(e.probability)} for {e.condition}, so at the threshold of "
             f"{pct(e.threshold)} the decision is {e.decision}."]
    base = e.baseline
    lines.append(f"With no data at all it would say {pct(base.probability)}; the available "
                 f"modalities ({_names(e.present)}) moved the score (logit scale) as follows:")
    for m, v in sorted(e.modality_contrib.items(), key=lambda kv: -abs(kv[1])):
        direction = f"towards {e.positive}" if v > 0 else f"towards {e.negative}"
        lines.append(f"- {MODALITY_LABELS[m]}: {signed(v)} ({direction})")
    if e.missing:
        lines.append(f"Not available for this case: {_names(e.missing)}.")
    top = sorted((f for f in e.ehr if f.value is not None), key=lambda f: -abs(f.contribution))
    if top and abs(top[0].contribution) > 0:
        parts = [f"{f.name} {signed(f.contribution)}" for f in top[:3]]
        lines.append("Strongest EHR fields (effect of knowing the value vs. not): "
                     + ", ".join(parts) + ".")
    if e.ct_location is not None and e.ct_top_slice is not None:
        lines.append(f"In the CT the map is strongest on slice {e.ct_top_slice + 1}.")
    return "\n".join(lines)


@dataclass(frozen=True)
class NativePlace:
    """The CT map's peak in the series as acquired (the viewer computes it from the native
    volume's affine and DICOM headers; this module only words it).

    slice_index: 0-based native slice; n_slices: slices in the native stack
    slice_label: "instance 57" / "between instances 3 and 4 (interpolated)"
    table_mm:    patient z (LPS, + superior) of that slice's centre
    row, column: 0-based pixel of the stored image
    inside:      False when the peak lies outside the scanned volume (the grid's padding)
    """

    slice_index: int
    n_slices: int
    slice_label: str
    table_mm: float
    row: int
    column: int
    inside: bool = True


def answer_where(e: Explanation, native: NativePlace | None = None) -> str:
    if e.ct_location is None or e.ct_top_slice is None or e.ct_map is None:
        return "This case has no CT, so there is no CT map."
    loc = e.ct_location
    n_slices = e.ct_map.shape[0]
    d, h, w = loc.voxel
    if native is not None and loc.mm is not None:
        x, y, z = loc.mm
        side = "left" if x > 0 else "right"
        text = (f"The CT attribution is strongest at {native.slice_label} (slice "
                f"{native.slice_index + 1} of {native.n_slices} as acquired, table position "
                f"{native.table_mm:+.1f} mm), row {native.row + 1}, column {native.column + 1}"
                f", at patient position x {x:.0f} mm, y {y:.0f} mm, z {z:.0f} mm (LPS; the "
                f"patient's {side} side).")
        if not native.inside:
            text += (" That point lies outside the scanned volume (the model grid's padding), "
                     "so the viewer shows the nearest acquired slice.")
        return text + (f" On the model grid that is slice {d + 1} of {n_slices}; model-grid "
                       f"slice {e.ct_top_slice + 1} holds the most positive attribution "
                       f"({pct(loc.slice_share)}). The viewer opens on the peak's slice; red "
                       f"marks evidence towards {e.positive}, the yellow line the top region.")
    text = (f"The CT attribution is strongest on slice {e.ct_top_slice + 1} of {n_slices}, "
            f"which holds {pct(loc.slice_share)} of the positive attribution. The single "
            f"strongest point is slice {d + 1}, row {h + 1}, column {w + 1} of the model grid")
    if loc.mm is not None:
        x, y, z = loc.mm
        side = "left" if x > 0 else "right"
        text += (f", at patient position x {x:.0f} mm, y {y:.0f} mm, z {z:.0f} mm "
                 f"(LPS; the patient's {side} side)")
    return text + f". The viewer opens on that slice; red marks evidence towards {e.positive}."


def answer_pathology_added(e: Explanation) -> str:
    if "path" not in e.present:
        return "This case has no pathology tile, so pathology added nothing."
    without = e.subset(tuple(m for m in e.present if m != "path"))
    return (f"Pathology's share of the score is {signed(e.modality_contrib['path'])} on the logit "
            f"scale (exact Shapley value over the available modalities). Adding it to the other "
            f"data moves the probability from {pct(without.probability)} to "
            f"{pct(e.probability)}.")


def answer_no_pathology(e: Explanation) -> str:
    if "path" not in e.present:
        return (f"This case already has no pathology: the answer stays {pct(e.probability)} "
                f"({e.decision}).")
    without = e.subset(tuple(m for m in e.present if m != "path"))
    decision = e.decision_at(without.probability)
    same = "the same decision" if decision == e.decision else "a different decision"
    return (f"Without the pathology tile (replaced by the model's learned 'missing' tokens) the "
            f"model would give {pct(without.probability)} instead of {pct(e.probability)}: "
            f"{decision} at the {pct(e.threshold)} threshold, {same}.")


def answer_how_sure(e: Explanation) -> str:
    margin = abs(e.probability - e.threshold)
    text = (f"The calibrated probability is {pct(e.probability)}, {pct(margin)} from the "
            f"{pct(e.threshold)} threshold. ")
    if e.near_threshold:
        text += (f"That is within {pct(e.uncertain_band)} of the threshold: treat the decision "
                 "as uncertain. ")
    else:
        text += "That is a clear margin. "
    if e.missing:
        text += (f"The case lacks {_names(e.missing)}; the model stood in learned 'missing' "
                 "tokens for it. ")
    if e.temperature == 1.0:
        return text + ("This model version has no fitted temperature: the probability is "
                       "uncalibrated.")
    return text + (f"The probability is the model's logit divided by a temperature of "
                   f"{e.temperature:.2f} fitted on validation data (calibration).")


INTENTS: Final[dict[str, tuple[tuple[str, ...], Callable[[Explanation], str]]]] = {
    "Why?": (("why", "reason", "explain"), answer_why),
    "Where in the CT?": (("where", "ct", "slice", "location", "lesion", "nodule"), answer_where),
    "What did the pathology add?": (("add", "contribut", "pathology add"),
                                    answer_pathology_added),
    "What if we had no pathology?": (("what if", "without", "no pathology", "had no"),
                                     answer_no_pathology),
    "How sure is it?": (("sure", "confiden", "certain", "uncertain", "probab"), answer_how_sure),
}
QUESTIONS: Final[tuple[str, ...]] = tuple(INTENTS)


def answer(e: Explanation, question: str, native: NativePlace | None = None) -> str:
    """Answer `question` (one of QUESTIONS or free text) from the explanation; `native` (the
    viewer's native geometry, when known) words "where?" in DICOM instance numbers and mm."""
    q = question.strip().lower()

    def run(key: str) -> str:
        return answer_where(e, native) if key == "Where in the CT?" else INTENTS[key][1](e)

    if question in INTENTS:
        return run(question)
    # Most specific intents first: "what if ... no pathology" beats "pathology add".
    for key in ("What if we had no pathology?", "What did the pathology add?", "Where in the CT?",
                "How sure is it?", "Why?"):
        if any(k in q for k in INTENTS[key][0]):
            return run(key)
    return "I can answer: " + "; ".join(f'"{k}"' for k in QUESTIONS)
