"""TLS files and SuperNode keys, checked before any process starts. Errors name the option or
path and what is wrong, never a key's contents."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vocab.errors import ConfigError
from vocab.key_files import read_key_file

AUTH_NEEDS_TLS = "--auth-key needs --tls: Flower authenticates SuperNodes only over TLS"


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path | None = None  # SuperLink only
    key: Path | None = None  # SuperLink only

    @classmethod
    def in_dir(cls, folder: Path) -> TlsFiles:
        """deploy/gen-certs.sh's layout: ca.crt, server.pem, server.key."""
        return cls(folder / "ca.crt", folder / "server.pem", folder / "server.key")

    def check(self, server: bool) -> None:
        need = [("CA certificate", self.ca)]
        if server:
            need += [("certificate", self.cert), ("private key", self.key)]
        for what, p in need:
            if p is None:
                raise ConfigError(f"TLS {what} path is required")
            if not Path(p).is_file():
                raise ConfigError(f"TLS {what} {str(p)!r} does not exist or is not a file")
            if b"-----BEGIN " not in Path(p).read_bytes()[:4096]:
                raise ConfigError(f"TLS {what} {str(p)!r} is not a PEM file")


def check_certificate(path: Path) -> None:
    """A hospital's copy of the coordinator's CA certificate (PEM)."""
    if not path.is_file():
        raise ConfigError(f"TLS CA certificate {str(path)!r} does not exist or is not a file")
    try:
        head = path.read_bytes()[:4096]
    except OSError as e:
        raise ConfigError(f"TLS CA certificate {str(path)!r} is unreadable: {e}") from e
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise ConfigError(f"TLS CA certificate {str(path)!r} is not a PEM certificate")


def check_node_public_key(path: Path) -> None:
    """A hospital's SuperNode public key as `flwr supernode register` accepts it: OpenSSH
    format, ECDSA on a NIST curve (deploy/gen-certs.sh: node-<hospital>.pub)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    what = f"SuperNode public key {str(path)!r}"
    data = read_key_file(path, what)
    if b"PRIVATE KEY-----" in data:  # the private key stays at the hospital
        raise ConfigError(f"{what} is a private key; register the hospital's .pub file")
    try:
        key = load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{what} is not an OpenSSH public key (one line 'ecdsa-sha2-nistp384 "
                          "...', e.g. node-<hospital>.pub from deploy/gen-certs.sh)") from None
    nist = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # what Flower accepts (and SSH has)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, nist):
        raise ConfigError(f"{what} is a key of type {_key_kind(key)}; Flower needs ECDSA on a "
                          "NIST curve (ssh-keygen -t ecdsa -b 384)")


def _key_kind(key: object) -> str:
    """'RSA', 'Ed25519', 'EC secp256k1', ...: the key's type, for messages."""
    curve = getattr(key, "curve", None)
    return f"EC {curve.name}" if curve is not None else \
        type(key).__name__.removesuffix("PublicKey")


def check_auth_key(path: Path) -> None:
    """--auth-key as flower-supernode reads it: an unencrypted OpenSSH ECDSA private key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    what = f"--auth-key {str(path)!r}"
    data = read_key_file(path, what)
    try:
        key = load_ssh_private_key(data, password=None)
    except ValueError:
        raise ConfigError(f"{what} {_not_a_private_key(data)}") from None
    except (TypeError, UnsupportedAlgorithm):  # encrypted: Flower passes no passphrase
        raise ConfigError(f"{what} is passphrase-protected or uses an unsupported cipher; "
                          "flower-supernode needs an unencrypted key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        kind = type(key).__name__.removesuffix("PrivateKey")
        raise ConfigError(f"{what} is a key of type {kind}; Flower needs ECDSA "
                          "(ssh-keygen -t ecdsa -b 384)")


def _not_a_private_key(data: bytes) -> str:
    """Why data is no OpenSSH private key, for the two usual mix-ups."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    try:
        load_ssh_public_key(data)
        is_public = True
    except (ValueError, UnsupportedAlgorithm):
        is_public = b"PUBLIC KEY-----" in data  # PEM
    if is_public:
        return ("is a public key; pass the private key (node-<hospital>, not the .pub "
                "registered at the coordinator)")
    if b"PRIVATE KEY-----" in data:
        return ("is a PEM private key; flower-supernode reads only the OpenSSH format "
                "(ssh-keygen -t ecdsa -b 384)")
    return "is not an OpenSSH private key"
