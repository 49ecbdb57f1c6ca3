"""CT-map faithfulness on synthetic cases with known lesions, shared by bench_model and bench_ui.

Cases: malignant, with CT and an index lesion (from the generator's truth). Maps: LayerGradCam at
the CT encoder's conv stages and LayerGradientXActivation at the fixed nodule channel (what the
app shows); each scored by the pointing game and attribution mass inside the lesion, plus the
Adebayo weight-randomisation check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MAPS = (("gradcam", "encoders.ct.stem"), ("gradcam", "encoders.ct.stages.0"),
        ("gradcam", "encoders.ct.stages.1"), ("gradcam", "encoders.ct.feature_layer"),
        ("grad_x_act", "encoders.ct.blob"))


def lesion_cases(fed: Path, cases: list[Any]) -> list[Any]:
    """The malignant cases with CT and an index lesion, as explain.faithfulness.LesionCase."""
    from explain.faithfulness import LesionCase
    from synth.truth import load_truth

    truth: dict[str, dict] = {}
    out = []
    for c in cases:
        if c.site_id not in truth:
            truth[c.site_id] = load_truth(fed, c.site_id)
        t = truth[c.site_id].get(c.case_id)
        if t is None or t.label != 1 or c.ct is None:
            continue
        idx = [les for les in t.lesions if les.kind == "index"]
        if idx:
            out.append(LesionCase(c, tuple(tuple(x.centre_mm) for x in idx),
                                  tuple(x.radius_mm for x in idx)))
    return out


def faithfulness_report(model: Any, cases: list[Any], tolerance_mm: float,
                        n_random: int = 10) -> dict[str, Any]:
    from explain.faithfulness import pointing_game, randomisation_check

    res: dict[str, Any] = {"n_cases": len(cases), "tolerance_mm": tolerance_mm, "maps": {}}
    for method, layer in MAPS:
        r = {k: round(v, 4) for k, v in pointing_game(model, cases, layer, tolerance_mm,
                                                       method).items()}
        corr = randomisation_check(model, [c.case for c in cases[:n_random]], layer,
                                   method=method)
        if corr:
            r["randomisation_spearman_median"] = round(float(np.median(corr)), 3)
            r["randomisation_spearman_max"] = round(float(np.max(corr)), 3)
        res["maps"][f"{method}:{layer}"] = r
        print(f"[faithfulness] {method} {layer}: {r}", flush=True)
    return res
