"""Typed errors shared across packages.

Messages name the offending file/field and value *inside the hospital*; anything that crosses the
hospital boundary is built from codes and counts only (see `DataProblem.public`).
"""

from __future__ import annotations

from dataclasses import dataclass


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


# Errors whose message is public by construction (see public_reason).
PUBLIC_ERRORS: tuple[type[Exception], ...] = (EhrSchemaMismatch,)


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
