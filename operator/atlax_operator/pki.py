"""The operator's certificates: the CA in a Secret, the relay's certificate, agent certificates."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import kopf
from cryptography import x509

from atlax import certs

from . import kube

log = logging.getLogger("atlax.operator")

CA_SECRET = "atlax-ca"
RELAY_SECRET = "atlax-relay-tls"
RELAY_LIFETIME = timedelta(days=365)


def agent_secret_name(name: str) -> str:
    return f"atlax-agent-{name}"


async def load_or_create_ca(namespace: str) -> certs.CertKeyPair:
    """The CA lives in Secret atlax-ca. Created once: if two operators race, the loser reads the
    winner's CA (create answers 409), so every certificate comes from one CA."""
    for _ in range(3):
        data = await kube.read_secret(namespace, CA_SECRET)
        if data is not None:
            return _pair(data)
        ca = certs.create_ca("Atlax CA")
        created = await kube.create_secret(
            namespace, CA_SECRET, {"tls.crt": ca.cert_pem(), "tls.key": ca.key_pem()}
        )
        if created:
            log.info("created the Atlax CA in Secret %s/%s", namespace, CA_SECRET)
            return ca
    raise kube.KubernetesAccessError(
        f"cannot read or create Secret {namespace}/{CA_SECRET}: it keeps appearing and vanishing"
    )


def _pair(data: dict[str, bytes]) -> certs.CertKeyPair:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    key = serialization.load_pem_private_key(data["tls.key"], password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return certs.CertKeyPair(cert, key)


def _sans(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = {str(n) for n in ext.get_values_for_type(x509.DNSName)}
    names |= {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}
    return names


def still_good(
    cert: x509.Certificate, ca: certs.CertKeyPair, *, name: str, sans: Sequence[str] = ()
) -> bool:
    """Issued by this CA, for this name (and SANs), not yet 2/3 through its lifetime."""
    if not _issued_for(cert, ca, name) or certs.needs_renewal(cert, datetime.now(UTC)):
        return False
    wanted = {str(ipaddress.ip_address(s)) if _is_ip(s) else s.lower() for s in sans}
    return not sans or _sans(cert) == wanted


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


async def ensure_relay_certificate(
    namespace: str, ca: certs.CertKeyPair, sans: Sequence[str], directory: Path | None
) -> None:
    """Secret atlax-relay-tls and (in the pod) files in the shared directory the relay reads."""
    data = await kube.read_secret(namespace, RELAY_SECRET)
    if data is not None and "tls.crt" in data:
        cert = x509.load_pem_x509_certificate(data["tls.crt"])
        pair = _pair(data) if still_good(cert, ca, name="atlax-relay", sans=sans) else None
    else:
        pair = None
    if pair is None:
        pair = certs.issue_server_certificate(ca, "atlax-relay", list(sans), RELAY_LIFETIME)
        await kube.put_secret(
            namespace,
            RELAY_SECRET,
            {"tls.crt": pair.cert_pem(), "tls.key": pair.key_pem(), "ca.crt": ca.cert_pem()},
        )
        log.info("issued the relay certificate for %s", ", ".join(sans))
    if directory is not None:
        current = directory / "relay.crt"
        if not current.exists() or current.read_bytes() != pair.cert_pem():
            # ca.crt first: the relay starts (or reloads) once relay.crt and relay.key are there.
            _write_atomically(directory / "ca.crt", ca.cert_pem())
            certs.write_pair(pair, directory, "relay")


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


@dataclass(frozen=True)
class AgentCertificate:
    """The certificate in an agent's Secret, and the one it replaced if this call renewed it."""

    cert: x509.Certificate
    reissued: bool
    replaced: x509.Certificate | None = None  # a renewal's predecessor (same TunnelAgent)


async def ensure_agent_secret(
    namespace: str,
    name: str,
    ca: certs.CertKeyPair,
    lifetime: timedelta,
    relay: str,
    owner: kopf.Body,
    issued: x509.Certificate | None,
    issued_relay: str | None,
) -> AgentCertificate:
    """Keep the agent's certificate while it is good; else mint a new one (always a new key).
    The Secret is owned by the TunnelAgent `owner` (garbage-collected with it). A new one
    names the certificate it replaced, if that is still valid (its key stays pinned a while).

    The operator never reads an agent's Secret back (its Role may not: no token can read agent
    keys). `issued` and `issued_relay` are what it last wrote, as the TunnelAgent's status
    records them. While they are good, a `create` only makes sure the Secret still exists: it
    answers 409 if it does, and mints a replacement if someone deleted it.
    """
    secret = agent_secret_name(name)
    pair = certs.issue_client_certificate(ca, name, lifetime)
    data = {
        "tls.crt": pair.cert_pem(),
        "tls.key": pair.key_pem(),
        "ca.crt": ca.cert_pem(),
        "relay": relay.encode(),
    }
    labels = {"atlax.dev/agent": name}
    if issued is not None and issued_relay == relay and still_good(issued, ca, name=name):
        if not await kube.create_secret(namespace, secret, data, owner=owner, labels=labels):
            return AgentCertificate(issued, reissued=False)
        log.info("Secret %s/%s was missing: issued a new certificate", namespace, secret)
    else:
        await kube.put_secret(namespace, secret, data, owner=owner, labels=labels)
    replaced = None
    if issued is not None and _issued_for(issued, ca, name):
        replaced = issued if issued.not_valid_after_utc > datetime.now(UTC) else None
    return AgentCertificate(pair.cert, reissued=True, replaced=replaced)


def _issued_for(cert: x509.Certificate, ca: certs.CertKeyPair, name: str) -> bool:
    try:
        certs.verify_issued_by(cert, ca.cert)
    except certs.CertificateError:
        return False
    return certs.common_name(cert) == name
