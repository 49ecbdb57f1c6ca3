"""`fedsight node import-fhir BUNDLE... --schema S --out DIR`: FHIR R4 bundles -> ehr.csv."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

MAX_LISTED = 50  # skipped resources printed one per line; --json lists them all


def register_import_fhir(node_sub: argparse._SubParsersAction) -> None:
    p = node_sub.add_parser(
        "import-fhir",
        help="write ehr.csv from FHIR R4 Bundles (Patient + Observation by LOINC code)",
        description="Map Patient (age, sex) and Observation resources (by the schema's LOINC "
                    "codes, converting the units the schema lists) onto an EHR schema and write "
                    "DIR/ehr.csv; every resource that could not be mapped is reported with a "
                    "reason. The latest observation per field and patient is used. Exit code: 0 "
                    "written, 1 nothing written (bad bundle, ehr.csv exists).",
    )
    p.add_argument("bundles", type=Path, nargs="+", metavar="BUNDLE",
                   help="FHIR Bundle JSON file(s) (any type: collection, searchset, ...)")
    p.add_argument("--schema", required=True,
                   help="EHR schema: a shipped id (chest-v1, uci-heart) or a .toml file")
    p.add_argument("--out", type=Path, required=True, help="folder to write ehr.csv into")
    p.add_argument("--as-of", type=dt.date.fromisoformat, default=None, metavar="YYYY-MM-DD",
                   help="date at which age is computed from birthDate (default: the patient's "
                        "latest observation date)")
    p.add_argument("--id-system", default=None, metavar="URI",
                   help="take case_id from the Patient.identifier of this system (default: "
                        "Patient.id)")
    p.add_argument("--force", action="store_true", help="replace an existing ehr.csv")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_import_fhir)


def _import_fhir(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from hospital_node.fhir_import import import_bundles, write_ehr_csv
    from vocab.ehr_schema import get_schema
    from vocab.errors import ConfigError, DataError

    try:
        schema = get_schema(args.schema)
        result = import_bundles(args.bundles, schema, as_of=args.as_of,
                                id_system=args.id_system)
        target = write_ehr_csv(result, schema, args.out, force=args.force)
    except (ConfigError, DataError, KeyError) as e:
        print(f"import-fhir: {e}")
        return 1
    if args.json:
        print(json.dumps({"written": str(target), "schema": schema.label,
                          "patients": result.n_patients,
                          "observations_used": result.n_observations_used,
                          "skipped_by_code": result.summary(),
                          "skipped": [asdict(s) for s in result.skipped]}, indent=2))
        return 0
    print(f"wrote {target}: {len(result.rows)} cases, {result.n_observations_used} observations "
          f"used, schema {schema.label}")
    if result.skipped:
        print(f"not mapped ({len(result.skipped)}): " + ", ".join(
            f"{code} x{n}" for code, n in result.summary().items()))
        for s in result.skipped[:MAX_LISTED]:
            print(f"  {s.bundle or '-'}: {s.resource}: {s.code}: {s.message}")
        if len(result.skipped) > MAX_LISTED:
            print(f"  ... {len(result.skipped) - MAX_LISTED} more (--json lists all)")
    return 0
