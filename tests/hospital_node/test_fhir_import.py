"""`fedsight node import-fhir`: hand-built FHIR R4 bundles -> ehr.csv, unmappable reported."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hospital_node.ehr import read_ehr
from hospital_node.fhir_import import import_bundles, write_ehr_csv
from vocab.ehr_schema import CHEST_V1, UCI_HEART
from vocab.errors import ConfigError, DataError

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def patient(pid: str, gender: str | None = "male", birth: str | None = "1960-05-01",
            identifier: str | None = None) -> dict:
    res: dict = {"resourceType": "Patient", "id": pid}
    if gender:
        res["gender"] = gender
    if birth:
        res["birthDate"] = birth
    if identifier:
        res["identifier"] = [{"system": "urn:mrn", "value": identifier}]
    return {"fullUrl": f"urn:uuid:{pid}", "resource": res}


def obs(oid: str, code: str, value: float | None, unit: str | None, subject: str | None,
        when: str | None = "2024-03-01T10:00:00Z", status: str = "final") -> dict:
    res: dict = {"resourceType": "Observation", "id": oid, "status": status,
                 "code": {"coding": [{"system": LOINC, "code": code}]}}
    if subject:
        res["subject"] = {"reference": subject}
    if when:
        res["effectiveDateTime"] = when
    if value is not None:
        res["valueQuantity"] = {"value": value, **({"unit": unit, "system": UCUM, "code": unit}
                                                   if unit else {})}
    return {"resource": res}


def bundle(tmp_path: Path, entries: list[dict], name: str = "b.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                "entry": entries}))
    return path


def test_mapping_conversion_latest_and_roundtrip(tmp_path: Path) -> None:
    entries = [
        patient("p1"), patient("p2", gender="female", birth="1990-12-31"),
        obs("o1", "2160-0", 97, "umol/L", "Patient/p1"),                  # creatinine, converted
        obs("o2", "2039-6", 3.0, "ng/mL", "urn:uuid:p1", when="2023-01-01"),
        obs("o3", "2039-6", 5.5, "ng/mL", "Patient/p1", when="2024-02-01"),  # latest CEA wins
        obs("o4", "8480-6", 128, "mm[Hg]", "Patient/p2", when="2024-06-30"),
        obs("o5", "39156-5", 24.2, "kg/m2", "Patient/p2"),
    ]
    result = import_bundles([bundle(tmp_path, entries)], CHEST_V1)
    p1, p2 = result.rows["p1"], result.rows["p2"]
    assert math.isclose(p1["creatinine"], 97 * 0.01131) and p1["cea"] == 5.5
    assert p1["sex"] == 1 and p1["age"] == 63  # at the latest observation, 2024-03-01
    assert p2["sex"] == 0 and p2["age"] == 33 and p2["systolic_bp"] == 128
    assert result.skipped == [] and result.n_observations_used == 5
    out = tmp_path / "site"
    write_ehr_csv(result, CHEST_V1, out)
    table = read_ehr(out / "ehr.csv", CHEST_V1)
    assert not table.problems
    assert table.values["p1"][CHEST_V1.names.index("cea")] == pytest.approx(5.5)
    as_of = import_bundles([bundle(tmp_path, entries)], CHEST_V1,
                           as_of=__import__("datetime").date(2000, 1, 1))
    assert as_of.rows["p1"]["age"] == 39


def test_unmappable_resources_are_reported_never_guessed(tmp_path: Path) -> None:
    entries = [
        patient("p1", gender="other"), patient("p2", birth="1960"),
        obs("a", "8867-4", 70, "/min", "Patient/p1"),              # heart rate: not in chest-v1
        obs("b", "2160-0", 1.1, "mmol/L", "Patient/p1"),           # no conversion listed
        obs("c", "2039-6", 5000, "ng/mL", "Patient/p1"),           # out of range
        obs("d", "2039-6", 2.0, "ng/mL", None),                    # no subject
        obs("e", "2039-6", 2.0, "ng/mL", "Patient/ghost"),         # unknown subject
        obs("f", "2039-6", 2.0, "ng/mL", "Patient/p1", status="preliminary"),
        obs("g", "39156-5", 22, "kg/m2", "Patient/p2", when="2024-01-01"),
        obs("h", "39156-5", 23, "kg/m2", "Patient/p2", when="2024-01-01"),  # same time, differ
        {"resource": {"resourceType": "Encounter", "id": "enc1", "status": "finished"}},
        {"resource": {"resourceType": "Observation", "id": "bad"}},  # status/code missing
    ]
    result = import_bundles([bundle(tmp_path, entries)], CHEST_V1)
    got = {(s.resource, s.code) for s in result.skipped}
    assert {("Observation/a", "fhir.unknown_code"),
            ("Observation/b", "fhir.unit_without_conversion"),
            ("Observation/c", "fhir.out_of_range"), ("Observation/d", "fhir.missing_subject"),
            ("Observation/e", "fhir.unknown_subject"), ("Observation/f", "fhir.status"),
            ("Patient/p1", "fhir.unmapped_gender"), ("Patient/p2", "fhir.partial_date"),
            ("case p2", "fhir.conflict"), ("entry 11", "fhir.unsupported_resource"),
            ("entry 12", "fhir.invalid_resource")} <= got
    assert result.rows["p1"] == {} and "bmi" not in result.rows["p2"]
    assert "age" not in result.rows["p2"]


def test_id_system_categorical_and_heart_schema(tmp_path: Path) -> None:
    entries = [patient("p1", identifier="MRN-7"),
               obs("c", "2093-3", 5.2, "mmol/L", "Patient/p1")]  # cholesterol, converted
    result = import_bundles([bundle(tmp_path, entries)], UCI_HEART, id_system="urn:mrn")
    assert list(result.rows) == ["MRN-7"]
    assert result.rows["MRN-7"]["chol"] == pytest.approx(5.2 * 38.67)
    missing = import_bundles([bundle(tmp_path, [patient("p9")])], UCI_HEART,
                             id_system="urn:mrn")
    assert missing.rows == {} and missing.skipped[0].code == "fhir.no_case_id"


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"resourceType": "Patient"}',
                                     b'{"resourceType": "Bundle"}',
                                     b'{"resourceType": "Bundle", "type": [1]}',
                                     b'{"resourceType": "Bundle", "type": "collection", '
                                     b'"entry": 5}', b"[" * 50_000 + b"]" * 50_000])
def test_malformed_bundle_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.json"):
        import_bundles([path], CHEST_V1)


def test_refuses_to_overwrite_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cli.main import main

    src = bundle(tmp_path, [patient("p1"), obs("o", "2039-6", 3.0, "ng/mL", "Patient/p1"),
                            obs("x", "1234-5", 1.0, "ng/mL", "Patient/p1")])
    out = tmp_path / "site"
    out.mkdir()
    (out / "ehr.csv").write_text("keep me\n")
    with pytest.raises(ConfigError, match="--force"):
        write_ehr_csv(import_bundles([src], CHEST_V1), CHEST_V1, out)
    args = ["node", "import-fhir", str(src), "--schema", "chest-v1", "--out", str(out)]
    assert main(args) == 1 and (out / "ehr.csv").read_text() == "keep me\n"
    assert main([*args, "--force", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["skipped_by_code"] == {"fhir.unknown_code": 1} and report["patients"] == 1
    assert (out / "ehr.csv").read_text().splitlines()[1].startswith("p1,63,1,,,3,")
