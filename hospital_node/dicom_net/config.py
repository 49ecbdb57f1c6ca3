"""Typed configuration of the DICOM entry, built once at the CLI edge, with path checks.

The secret and the re-identification table must live outside the data root (whoever can read
the site's images must not also get the key that links them to patients); staging must be
outside `ct/` (so that a half-received study is never a case) and on the data root's
filesystem (so that publishing is a rename).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from vocab.errors import ConfigError
from vocab.site_layout import CT_DIR

DEFAULT_AE_TITLE: Final = "FEDSIGHT"
DEFAULT_QUIET_S: Final = 10.0
# 1 GiB decoded: an Enhanced CT of ~2000 512x512 16-bit frames; a classic slice is 0.5 MiB.
DEFAULT_MAX_PIXEL_BYTES: Final = 1 << 30


def config_home() -> Path:
    """Per-user config folder (XDG), where the secret and lookup table go by default."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fedsight"


@dataclass(frozen=True)
class Peer:
    """A DICOM peer allowed to associate: calling AE title at a host (IP address or name)."""

    ae_title: str
    host: str

    @classmethod
    def parse(cls, text: str, option: str = "--allow") -> Peer:
        ae, sep, host = text.partition("@")
        if not sep or not ae.strip() or not host.strip() or len(ae.strip()) > 16:
            raise ConfigError(f"{option} {text!r}: expected AE@HOST (AE title of 1-16 "
                              "characters, then the peer's address)")
        return cls(ae.strip(), host.strip())


@dataclass(frozen=True)
class RemoteAE:
    """A PACS to pull from: AE@HOST:PORT."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, option: str = "--pacs") -> RemoteAE:
        ae, sep, rest = text.partition("@")
        host, sep2, port = rest.rpartition(":")
        if not sep or not sep2 or not ae or not host or not port.isdigit() or len(ae) > 16:
            raise ConfigError(f"{option} {text!r}: expected AE@HOST:PORT")
        return cls(ae, host, int(port))


@dataclass(frozen=True)
class IntakeConfig:
    """Where received instances go and how they are judged.

    data_root:  the site data root; studies become `data_root/ct/<case_id>/`.
    staging:    durable holding folder for incomplete studies (outside ct/, same filesystem).
    secret_file:the site's pseudonymisation key (outside the data root).
    lookup:     the re-identification table, SQLite (outside the data root).
    quiet_s:    a study is complete this long after its last sending association released.
    max_pixel_bytes: refuse an instance whose Rows x Columns x frames x bits/8 exceeds this.
    """

    data_root: Path
    staging: Path
    secret_file: Path
    lookup: Path
    quiet_s: float = DEFAULT_QUIET_S
    max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES

    @classmethod
    def build(cls, data_root: Path, *, staging: Path | None = None,
              secret_file: Path | None = None, lookup: Path | None = None,
              quiet_s: float = DEFAULT_QUIET_S,
              max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES) -> IntakeConfig:
        """Resolve defaults and refuse unsafe locations (ConfigError naming the option)."""
        root = Path(data_root).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise ConfigError(f"--data {root}: exists and is not a folder")
        digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
        stage = (Path(staging).expanduser().resolve() if staging
                 else root.parent / f".fedsight-incoming-{digest}")
        secret = Path(secret_file).expanduser().resolve() if secret_file else (
            config_home() / "receive-secret")
        table = Path(lookup).expanduser().resolve() if lookup else (
            config_home() / "receive-lookup.sqlite")
        for option, path in (("--secret-file", secret), ("--lookup", table)):
            if path.is_relative_to(root) or path.is_relative_to(stage):
                raise ConfigError(f"{option} {path}: inside the data root or staging folder; "
                                  "keep it outside so image readers never get the "
                                  "re-identification key")
        if stage.is_relative_to(root / CT_DIR):
            raise ConfigError(f"--staging {stage}: inside {root / CT_DIR}; staging must be "
                              "outside ct/ so that an incomplete study is never a case")
        if root.is_relative_to(stage):
            raise ConfigError(f"--staging {stage}: contains the data root")
        if not quiet_s >= 0:
            raise ConfigError(f"--quiet-seconds {quiet_s}: must be >= 0")
        if max_pixel_bytes <= 0:
            raise ConfigError(f"--max-pixel-bytes {max_pixel_bytes}: must be > 0")
        return cls(root, stage, secret, table, float(quiet_s), int(max_pixel_bytes))


@dataclass(frozen=True)
class ReceiveConfig:
    """`fedsight node receive`: a Storage SCP.

    allow: peers allowed to associate; empty means loopback peers only (any AE title), and
    the server then binds to 127.0.0.1 unless `bind` says otherwise.
    """

    intake: IntakeConfig
    port: int
    ae_title: str = DEFAULT_AE_TITLE
    allow: tuple[Peer, ...] = ()
    bind: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port}: must be 1-65535")
        if not self.ae_title or len(self.ae_title) > 16:
            raise ConfigError(f"--ae-title {self.ae_title!r}: must be 1-16 characters")

    @property
    def bind_address(self) -> str:
        return self.bind or ("0.0.0.0" if self.allow else "127.0.0.1")


@dataclass(frozen=True)
class PullConfig:
    """`fedsight node pull`: C-GET studies (by StudyInstanceUID) or patients (by PatientID)."""

    intake: IntakeConfig
    pacs: RemoteAE
    studies: tuple[str, ...] = ()
    patients: tuple[str, ...] = ()
    ae_title: str = DEFAULT_AE_TITLE
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.studies and not self.patients:
            raise ConfigError("pull: give at least one --study UID or --patient ID")
        if not self.ae_title or len(self.ae_title) > 16:
            raise ConfigError(f"--ae-title {self.ae_title!r}: must be 1-16 characters")
