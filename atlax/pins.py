"""Key pins: an agent's identity as the SHA-256 of its public key.

A pin is `sha256:` and 64 lowercase hex digits: the SHA-256 of the certificate's DER-encoded
SubjectPublicKeyInfo, as `openssl x509 -noout -pubkey | openssl pkey -pubin -outform DER |
sha256sum` computes it. The relay reads the key out of the peer certificate's DER with the small
reader below rather than with `cryptography`, whose import would add about 12 MB to every relay;
tests check the reader against `cryptography` on many certificates and on garbage.
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "sha256:"
_PIN = re.compile(r"sha256:[0-9a-f]{64}")
FORMAT = "sha256:<64 hex digits>"

_SEQUENCE = 0x30
_VERSION = 0xA0  # [0] EXPLICIT, the optional first field of TBSCertificate


class PinError(ValueError):
    """Not a pin, or a certificate the key cannot be read from."""


def parse_pin(text: str) -> str:
    """The pin in its canonical form (lowercase), or PinError saying what a pin looks like."""
    pin = text.strip().lower() if isinstance(text, str) else ""
    if not _PIN.fullmatch(pin):
        raise PinError(f"{text!r} is not a key pin like {FORMAT}")
    return pin


def pin_of_key(spki_der: bytes) -> str:
    return PREFIX + hashlib.sha256(spki_der).hexdigest()


def pin_of_certificate(cert_der: bytes) -> str:
    """The pin of the public key in a DER certificate (as `ssl` returns the peer's)."""
    return pin_of_key(subject_public_key_info(cert_der))


def subject_public_key_info(cert_der: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of an X.509 certificate (RFC 5280, section 4.1)."""
    tag, start, end = _element(cert_der, 0)
    if tag != _SEQUENCE or end != len(cert_der):
        raise PinError("not a DER certificate")
    tag, pos, tbs_end = _element(cert_der, start)  # tbsCertificate
    if tag != _SEQUENCE:
        raise PinError("not a DER certificate")
    tag, _, after = _element(cert_der, pos, tbs_end)
    if tag == _VERSION:
        pos = after
    # serialNumber, signature, issuer, validity, subject, then subjectPublicKeyInfo
    for _ in range(5):
        pos = _element(cert_der, pos, tbs_end)[2]
    tag, _, after = _element(cert_der, pos, tbs_end)
    if tag != _SEQUENCE:
        raise PinError("certificate has no subjectPublicKeyInfo where RFC 5280 puts it")
    return cert_der[pos:after]


def _element(der: bytes, offset: int, limit: int | None = None) -> tuple[int, int, int]:
    """(tag, start of contents, end) of the DER element at `offset`, inside `limit`."""
    limit = len(der) if limit is None else limit
    if offset + 2 > limit:
        raise PinError("truncated DER")
    tag, length = der[offset], der[offset + 1]
    pos = offset + 2
    if tag & 0x1F == 0x1F:
        raise PinError("unexpected high-number DER tag in a certificate")
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or pos + count > limit:
            raise PinError("bad DER length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    end = pos + length
    if end > limit:
        raise PinError("truncated DER")
    return tag, pos, end
