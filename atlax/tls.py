"""TLS 1.3 contexts for both ends of the tunnel, and the agent identity from a peer certificate.

Verification is always on: the relay requires a client certificate from its CA, the agent checks
the relay's certificate and host name against the same CA. Contexts are built from files on every
call, so a renewed certificate is picked up on the next connection.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

from .logs import describe
from .protocol import ALPN


class CertificateError(Exception):
    """A certificate or key problem, phrased for the user (names the file or value)."""


class TLSConfigError(Exception):
    """A certificate, key or CA file could not be used; the message names the file."""


def _load(ctx: ssl.SSLContext, ca: Path, cert: Path, key: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load CA certificate {ca}: {describe(exc)}") from None
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(
            f"cannot load certificate {cert} with key {key}: {describe(exc)}"
        ) from None


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def relay_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Server side of the agent port: client certificates from `ca` are required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, ca, cert, key)
    return ctx


def agent_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Client side: verifies the relay's certificate and host name against `ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, ca, cert, key)
    return ctx


def peer_common_name(peercert: object) -> str | None:
    """The subject Common Name from `SSLObject.getpeercert()`'s dict form."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def file_fingerprint(*paths: Path) -> str:
    """A digest of the files' contents, to notice renewed certificates on disk."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"missing")
    return digest.hexdigest()
