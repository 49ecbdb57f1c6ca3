"""Validation report of a site: every case, usable or not, and every problem with its reason.

`to_json()` and `render_table()` are for hospital IT and name cases and files; only
`public_summary()` (counts per problem code) may leave the hospital.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from vocab.errors import DataProblem
from vocab.modalities import MODALITIES


@dataclass
class CaseReport:
    """modalities: the usable ones; excluded: present on disk but unusable."""

    case_id: str
    modalities: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    label: int | None = None
    problems: list[DataProblem] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """At least one usable modality: the model handles the missing ones."""
        return bool(self.modalities)

    @property
    def trainable(self) -> bool:
        return self.usable and self.label is not None

    def to_json(self) -> dict:
        return {"case_id": self.case_id, "usable": self.usable, "trainable": self.trainable,
                "label": self.label, "modalities": self.modalities, "excluded": self.excluded,
                "problems": [asdict(p) for p in self.problems]}


@dataclass
class SiteReport:
    site_id: str
    ehr_schema: str
    cases: list[CaseReport] = field(default_factory=list)
    problems: list[DataProblem] = field(default_factory=list)  # site-level

    @property
    def n_usable(self) -> int:
        return sum(c.usable for c in self.cases)

    @property
    def n_trainable(self) -> int:
        return sum(c.trainable for c in self.cases)

    def all_problems(self) -> list[DataProblem]:
        return self.problems + [p for c in self.cases for p in c.problems]

    def codes(self, case_id: str | None = None) -> set[str]:
        """Problem codes of one case (or of the whole site)."""
        if case_id is None:
            return {p.code for p in self.all_problems()}
        return {p.code for c in self.cases if c.case_id == case_id for p in c.problems}

    def case(self, case_id: str) -> CaseReport:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(f"no case {case_id!r} in the report of site {self.site_id!r}")

    def to_json(self) -> dict:
        """Full local report (names cases and files: never send it off-site)."""
        return {"site_id": self.site_id, "ehr_schema": self.ehr_schema,
                "n_cases": len(self.cases), "n_usable": self.n_usable,
                "n_trainable": self.n_trainable,
                "problems": [asdict(p) for p in self.problems],
                "cases": [c.to_json() for c in self.cases]}

    def public_summary(self) -> dict:
        """Counts only (cases per problem code): what may leave the hospital (invariant 1)."""
        return {"n_cases": len(self.cases), "n_usable": self.n_usable,
                "n_trainable": self.n_trainable,
                "modalities": {m: sum(m in c.modalities for c in self.cases) for m in MODALITIES},
                "problems": dict(sorted(self._code_counts().items()))}

    def _code_counts(self) -> Counter[str]:
        """Site-level problems once each; a case counts once per code, however many files."""
        counts = Counter(p.public() for p in self.problems)
        for c in self.cases:
            counts.update({p.public() for p in c.problems})
        return counts

    def render_table(self) -> str:
        """Terminal table, one line per case, then every problem's message."""
        w = max([len("case")] + [len(c.case_id) for c in self.cases])
        lines = [f"site {self.site_id} (EHR schema {self.ehr_schema}): {len(self.cases)} cases, "
                 f"{self.n_usable} usable, {self.n_trainable} with label",
                 f"{'case':<{w}}  {'status':<8} {'label':<5} {'modalities':<13} problems"]
        for c in self.cases:
            status = "ok" if c.usable and not c.problems else "warn" if c.usable else "EXCLUDED"
            label = "-" if c.label is None else str(c.label)
            codes = ", ".join(sorted({p.code for p in c.problems}))
            lines.append(f"{c.case_id:<{w}}  {status:<8} {label:<5} "
                         f"{'+'.join(c.modalities) or '-':<13} {codes}")
        details = [(p, "") for p in self.problems] + [
            (p, c.case_id) for c in self.cases for p in c.problems]
        if details:
            lines.append("")
            lines.append("problems:")
            for p, cid in details:
                kind = "ERROR" if p.fatal else "warn "
                where = f"[{cid}] " if cid else "[site] "
                lines.append(f"  {kind} {p.code:<30} {where}{p.message}")
        return "\n".join(lines)
