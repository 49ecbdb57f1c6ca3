"""DICOM network entry: receive (Storage SCP) and pull (C-GET SCU) CT studies into a site root.

Every instance is admitted (CT only, decodable transfer syntax, pixel budget), de-identified on
arrival (PS3.15 Basic profile, `deid.py`), written durably into a staging folder outside `ct/`
and made visible as `ct/<case_id>/` only once its study is complete (`store.py`). The case id
and the UID/date remapping come from a keyed hash with a site secret kept outside the data root
(`pseudonym.py`); the re-identification table lives outside it too (`lookup.py`).
"""
