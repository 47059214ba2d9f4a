"""Key pins: the relay's small DER reader agrees with `cryptography` and openssl, and garbage is
a PinError, never a crash."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from atlax import certs, pins

DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def _certificate(key: object, extensions: bool) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "home-nas")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    if extensions:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("a" * 300)]), critical=False
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


KEYS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
    "rsa4096": lambda: rsa.generate_private_key(65537, 4096),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


@pytest.mark.parametrize("extensions", [False, True], ids=["plain", "long-extension"])
@pytest.mark.parametrize("kind", sorted(KEYS))
def test_the_key_read_from_der_is_the_one_cryptography_reads(kind: str, extensions: bool) -> None:
    cert = _certificate(KEYS[kind](), extensions)
    der = cert.public_bytes(DER)
    assert pins.subject_public_key_info(der) == cert.public_key().public_bytes(DER, SPKI)


def test_agent_certificates_and_version_1_certificates(tmp_path: Path) -> None:
    ca = certs.create_ca("Test CA")
    agent = certs.issue_client_certificate(ca, "home-nas")
    assert pins.pin_of_certificate(agent.cert.public_bytes(DER)) == certs.key_pin(agent.cert)
    # A version 1 certificate has no [0] version field: openssl makes one without extensions.
    key, csr, crt = tmp_path / "k.pem", tmp_path / "r.csr", tmp_path / "v1.pem"
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=x", "-out", str(csr)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-key",
            str(key),
            "-days",
            "1",
            "-out",
            str(crt),
        ],
        check=True,
        capture_output=True,
    )
    v1 = x509.load_pem_x509_certificate(crt.read_bytes())
    assert v1.version is x509.Version.v1
    der = v1.public_bytes(DER)
    assert pins.subject_public_key_info(der) == v1.public_key().public_bytes(DER, SPKI)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_certificates_are_a_pin_error_never_a_crash(data: st.DataObject) -> None:
    der = bytearray(_DER)
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(der) - 1))
        der[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(der)))
    damaged = bytes(der[:cut])
    try:
        pins.subject_public_key_info(damaged)
    except pins.PinError:
        pass


@given(st.binary(max_size=600))
def test_garbage_is_a_pin_error(junk: bytes) -> None:
    try:
        pins.pin_of_certificate(junk)
    except pins.PinError:
        pass


def test_pin_text() -> None:
    pin = "sha256:" + "ab" * 32
    assert pins.parse_pin(pin.upper().replace("SHA256", "sha256")) == pin
    for bad in ("sha256:abc", "md5:" + "0" * 32, "sha256:" + "g" * 64, "", "sha256:" + "0" * 65):
        with pytest.raises(pins.PinError, match="sha256:<64 hex digits>"):
            pins.parse_pin(bad)


_DER = _certificate(ec.generate_private_key(ec.SECP256R1()), True).public_bytes(DER)
