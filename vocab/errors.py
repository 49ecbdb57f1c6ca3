"""Typed errors shared across packages.

Messages name the offending file/field and value *inside the hospital*; anything that crosses the
hospital boundary is built from codes and counts only (see `DataProblem.public`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


class FedsightError(Exception):
    """Base class of every error fedsight raises on purpose."""


class ConfigError(FedsightError):
    """A configuration value is unknown, missing or out of range."""


class DataError(FedsightError):
    """Input data is unusable; the message names the file/field and what is wrong."""


class CheckpointError(FedsightError):
    """A checkpoint is missing, corrupt, or belongs to another model config."""


class EhrSchemaMismatch(ConfigError):
    """This hospital's EHR schema is not the federation's. Built from schema labels (`id@hash8`)
    only, so its message may leave the hospital: the coordinator is told why the node refused."""

    def __init__(self, site_label: str, federation_label: str) -> None:
        super().__init__(f"this hospital's EHR schema {site_label} differs from the "
                         f"federation's {federation_label}")


class PrivacyRefusal(FedsightError):
    """This hospital refuses the round for a privacy reason. The message is one of the fixed
    sentences below (no values), so it may be sent to the coordinator."""

    EXHAUSTED: Final = "privacy budget exhausted: this round would exceed the hospital's budget"
    NEEDS_DP: Final = ("this hospital trains only with differential privacy "
                       "(dp-noise-multiplier and dp-max-grad-norm), and the round has none")
    LEDGER: Final = ("the hospital's privacy ledger is unreadable or does not verify; an "
                     "operator must resolve it before training")
    DELTA: Final = "the hospital's privacy delta is above 1/n of its training cases"

    def __init__(self, reason: str) -> None:
        if reason not in (self.EXHAUSTED, self.NEEDS_DP, self.LEDGER, self.DELTA):
            raise ValueError("PrivacyRefusal takes one of its fixed sentences")
        super().__init__(reason)


# Errors whose message is public by construction (see public_reason).
PUBLIC_ERRORS: tuple[type[Exception], ...] = (EhrSchemaMismatch, PrivacyRefusal)


def public_reason(e: BaseException) -> str:
    """What of an exception may be sent off-site: its type, plus the message of a public error."""
    if isinstance(e, PUBLIC_ERRORS):
        return f"{type(e).__name__}: {e}"
    return type(e).__name__


@dataclass(frozen=True)
class DataProblem:
    """One problem found in a site's data.

    code:    stable machine-readable reason (e.g. "dicom.truncated"); safe to send off-site.
    message: human-readable detail for hospital IT; may name local files, never sent off-site.
    file:    path relative to the site data root (local only).
    field:   DICOM keyword or EHR column, if any.
    fatal:   True when the case (or the modality) is excluded because of it.
    """

    code: str
    message: str
    file: str = ""
    field: str = ""
    fatal: bool = True

    def public(self) -> str:
        """The only part that may leave the hospital: the code."""
        return self.code
