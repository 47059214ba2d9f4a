"""Certificates with `cryptography`: the CA, the relay's server certificate, agent certificates.

ECDSA P-256 keys (small, fast handshakes). An agent certificate's Common Name is its identity.
Key files are written atomically with mode 0600, so a reader never sees a half-written or
world-readable key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .pins import pin_of_key
from .protocol import names
from .tls import CertificateError as CertificateError  # re-exported: defined without cryptography

_DNS = re.compile(
    r"(\*\.)?[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*"
)
_LIFETIME = re.compile(r"(\d+)([smhdy])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "y": 365 * 86400}
# Tolerate clocks that disagree a little: certificates start being valid a bit in the past.
_BACKDATE = timedelta(minutes=5)


@dataclass(frozen=True)
class CertKeyPair:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def common_name(self) -> str:
        return common_name(self.cert)

    @property
    def not_valid_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @property
    def not_valid_before(self) -> datetime:
        return self.cert.not_valid_before_utc


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def key_pin(cert: x509.Certificate) -> str:
    """The certificate's key pin (`sha256:...`, see atlax.pins): what relay.toml's `pins` and
    the control API's agent spec list."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pin_of_key(spki)


def parse_lifetime(text: str) -> timedelta:
    """'90d', '12h', '30m', '3600s', '1y' (365 days)."""
    match = _LIFETIME.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise CertificateError(
            f"lifetime {text!r} is not a positive number followed by s, m, h, d or y (e.g. 90d)"
        )
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def _check_name(name: str, what: str) -> None:
    if not names.is_agent_name(name):
        raise CertificateError(f"{what} {name!r} must be {names.AGENT_RULE}")


def _new_cert(
    ca: CertKeyPair | None,
    subject: str,
    lifetime: timedelta,
    not_before: datetime | None,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> CertKeyPair:
    if lifetime <= timedelta(0):
        raise CertificateError("certificate lifetime must be positive")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    # Valid a little in the past for skewed clocks, but never so much that a short lifetime
    # would be mostly spent already: the lifetime counts from now.
    backdate = min(_BACKDATE, lifetime / 10)
    start = not_before or (now - backdate)
    end = (not_before + lifetime) if not_before else (now + lifetime)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    signer_key = ca.key if ca else key
    issuer = ca.cert.subject if ca else name
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return CertKeyPair(builder.sign(signer_key, hashes.SHA256()), key)


def create_ca(
    common_name: str = "Atlax CA", lifetime: timedelta = timedelta(days=3650)
) -> CertKeyPair:
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    return _new_cert(
        None,
        common_name,
        lifetime,
        None,
        [(x509.BasicConstraints(ca=True, path_length=0), True), (usage, True)],
    )


def _leaf_extensions(
    usage: x509.ObjectIdentifier, *extra: x509.ExtensionType
) -> list[tuple[x509.ExtensionType, bool]]:
    """What every leaf certificate carries: not a CA, signatures only, one extended usage."""
    key_usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (key_usage, True),
        (x509.ExtendedKeyUsage([usage]), False),
        *((ext, False) for ext in extra),
    ]


def issue_client_certificate(
    ca: CertKeyPair,
    name: str,
    lifetime: timedelta = timedelta(days=90),
    *,
    not_before: datetime | None = None,
) -> CertKeyPair:
    """An agent certificate: CN = `name`, the agent's identity; usable for client auth only."""
    _check_name(name, "agent name")
    return _new_cert(
        ca, name, lifetime, not_before, _leaf_extensions(ExtendedKeyUsageOID.CLIENT_AUTH)
    )


def issue_server_certificate(
    ca: CertKeyPair,
    name: str,
    sans: Sequence[str] = (),
    lifetime: timedelta = timedelta(days=365),
    *,
    not_before: datetime | None = None,
) -> CertKeyPair:
    """The relay's certificate: every SAN is an IP address or a DNS name the agents dial."""
    entries: list[x509.GeneralName] = []
    for san in list(sans) or [name]:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(san)))
            continue
        except ValueError:
            pass
        if not (len(san) <= 253 and _DNS.fullmatch(san)):
            raise CertificateError(
                f"subject alternative name {san!r} is neither an IP address nor a DNS name"
            )
        entries.append(x509.DNSName(san.lower()))
    extensions = _leaf_extensions(
        ExtendedKeyUsageOID.SERVER_AUTH, x509.SubjectAlternativeName(entries)
    )
    return _new_cert(ca, name, lifetime, not_before, extensions)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _prepare_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CertificateError(f"cannot create directory {directory}: {exc.strerror}") from None


def write_pair(pair: CertKeyPair, directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.crt (0644) and NAME.key (0600) into `directory`."""
    _prepare_dir(directory)
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    try:
        _atomic_write(key, pair.key_pem(), 0o600)
        _atomic_write(crt, pair.cert_pem(), 0o644)
    except OSError as exc:
        raise CertificateError(f"cannot write {crt} / {key}: {exc.strerror}") from None
    return crt, key


def write_ca(pair: CertKeyPair, directory: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    if (directory / "ca.key").exists() and not overwrite:
        raise CertificateError(
            f"{directory / 'ca.key'} already exists; every certificate it issued depends on it "
            "(use --force to replace it)"
        )
    return write_pair(pair, directory, "ca")


def load_certificates(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{path} does not hold a PEM certificate") from None


def load_pair(cert_path: Path, key_path: Path) -> CertKeyPair:
    cert = load_certificates(cert_path)[0]
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise CertificateError(f"cannot read {key_path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise CertificateError(f"{key_path} does not hold an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_path} is not an ECDSA key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise CertificateError(f"{key_path} is not the key of {cert_path}")
    return CertKeyPair(cert, key)


def load_ca(directory: Path) -> CertKeyPair:
    return load_pair(directory / "ca.crt", directory / "ca.key")


def renewal_time(cert: x509.Certificate, fraction: float = 2 / 3) -> datetime:
    """When `fraction` of the certificate's lifetime has passed."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * fraction


def needs_renewal(cert: x509.Certificate, now: datetime, fraction: float = 2 / 3) -> bool:
    """True once `fraction` of the certificate's lifetime has passed."""
    return now >= renewal_time(cert, fraction)


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(
            f"certificate {common_name(cert)!r} was not issued by this CA"
        ) from None
