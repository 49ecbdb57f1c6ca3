"""`fedsight node check DIR [--json]`: validate a site and say whether it can train."""

from __future__ import annotations

import json
from pathlib import Path

from hospital_node.dataset import load_site
from hospital_node.site_config import read_site_config
from multimodal.grid import InputConfig

EXIT_OK, EXIT_UNUSABLE, EXIT_NO_ROOT = 0, 1, 2


def check_site(root: Path, as_json: bool = False, cache_dir: Path | None = None
               ) -> tuple[int, str]:
    """(exit code, text): 0 if at least one usable labelled case, 1 if none, 2 if no root.

    Runs the full load (so preprocessing problems show too) and warms the cache for training.
    """
    root = Path(root)
    if not root.is_dir():
        msg = f"site data root {root} does not exist or is not a folder"
        return EXIT_NO_ROOT, json.dumps({"error": msg}) if as_json else msg
    cfg = read_site_config(root)
    # The site's own schema (the federation compares id and hash each round); without a usable
    # one, the default grid's, so images are still checked and the EHR reported excluded.
    inputs = InputConfig(ehr_schema=cfg.ehr_schema or InputConfig().ehr_schema)
    site = load_site(root, inputs, cache_dir)
    code = EXIT_OK if site.report.n_trainable > 0 else EXIT_UNUSABLE
    schema = {"ehr_schema_version": cfg.schema.version if cfg.schema else "",
              "ehr_schema_hash": cfg.schema_hash}
    if as_json:
        return code, json.dumps({**site.report.to_json(), **schema}, indent=2)
    verdict = ("site usable for training" if code == EXIT_OK
               else "site NOT usable: no case with a usable modality and a label")
    label = (f"EHR schema {cfg.schema.label} (version {cfg.schema.version}; the federation "
             "must use the same id and hash)" if cfg.schema else
             "EHR schema: none usable (see site.json problems); EHR excluded")
    return code, f"{site.report.render_table()}\n\n{label}\n{verdict}"
