"""kopf handlers: one per concern, idempotent, state in the TunnelAgent's status.

- create/resume/update: certificate Secret, desired state at the relay, ports on the Service.
- timer: live state from the relay into status; re-push after a relay restart; retry conflicts;
  renew certificates two thirds into their lifetime.
- delete: revoke at the relay, remove the ports, delete the Secret.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
from cryptography import x509

from atlax import certs
from atlax.control import ControlClient, ControlSocketError

from . import GROUP, KIND, PLURAL, VERSION, kube, pki
from .conditions import condition_true, same_conditions, set_condition

log = logging.getLogger("atlax.operator")


@dataclass(frozen=True)
class OperatorConfig:
    namespace: str
    control_socket: Path
    service_name: str
    relay_address: str  # host:port the agents dial, written into their Secrets
    relay_sans: tuple[str, ...]
    relay_tls_dir: Path | None
    status_interval: float = 10.0
    public_address: str | None = None


@dataclass
class OperatorState:
    config: OperatorConfig
    ca: certs.CertKeyPair | None = None
    relay_id: str | None = None
    client: ControlClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = ControlClient(self.config.control_socket)


def _relay_services(spec: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for s in spec.get("services", []):
        item: dict[str, Any] = {"name": s["name"], "port": s["port"]}
        if s.get("proxyProtocol"):
            item["proxy_protocol"] = s["proxyProtocol"]
        if s.get("allowedSourceRanges"):
            item["allow"] = s["allowedSourceRanges"]
        if s.get("maxConnections"):
            item["max_connections"] = s["maxConnections"]
        out.append(item)
    return out


def _ports_text(spec: dict[str, Any]) -> str:
    return ",".join(f"{s['name']}:{s['port']}" for s in spec.get("services", []))


def _owner(body: kopf.Body) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": body["metadata"]["name"],
        "uid": body["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Reconciler:
    def __init__(self, state: OperatorState) -> None:
        self.state = state
        self.config = state.config

    async def startup(self) -> None:
        cfg = self.config
        self.state.ca = await pki.load_or_create_ca(cfg.namespace)
        await pki.ensure_relay_certificate(
            cfg.namespace, self.state.ca, cfg.relay_sans, cfg.relay_tls_dir
        )

    async def reconcile(self, body: kopf.Body, patch: kopf.Patch) -> None:
        """Bring one TunnelAgent to its desired state and write what happened into status."""
        cfg, ca = self.config, self.state.ca
        assert ca is not None
        name, spec = body["metadata"]["name"], dict(body.get("spec", {}))
        generation = body["metadata"].get("generation")
        conditions: list[dict[str, Any]] = list(body.get("status", {}).get("conditions", []))
        try:
            lifetime = certs.parse_lifetime(spec.get("certificateLifetime", "90d"))
        except certs.CertificateError as exc:
            raise kopf.PermanentError(str(exc)) from None
        cert, reissued = await pki.ensure_agent_secret(
            cfg.namespace, name, ca, lifetime, cfg.relay_address, _owner(body)
        )
        secret = pki.agent_secret_name(name)
        if reissued:
            kopf.info(
                body,
                reason="CertificateIssued",
                message=f"certificate for {name!r} valid until "
                f"{_iso(cert.not_valid_after_utc)} written to Secret {secret}",
            )
        conditions = set_condition(
            conditions, "CertificateIssued", True, "Issued", f"Secret {secret}", generation
        )

        ports_ok, reason, message = await self._push(name, spec)
        address = cfg.public_address
        if ports_ok:
            try:
                lb = await kube.sync_service_ports(
                    cfg.namespace,
                    cfg.service_name,
                    f"{cfg.namespace}/{name}",
                    {s["port"] for s in spec.get("services", [])},
                )
                address = lb or address
            except kube.PortTakenError as exc:
                ports_ok, reason, message = False, "PortConflict", str(exc)
        was_ok = condition_true(conditions, "PortsOpen")
        conditions = set_condition(conditions, "PortsOpen", ports_ok, reason, message, generation)
        if ports_ok and not was_ok:
            kopf.info(body, reason="PortsOpen", message=message)
        elif not ports_ok:
            kopf.warn(body, reason=reason, message=message)
        connected = bool(body.get("status", {}).get("connected", False))
        conditions = self._ready(conditions, connected, generation)
        patch.status["conditions"] = conditions
        patch.status["observedGeneration"] = generation
        patch.status["ports"] = _ports_text(spec)
        patch.status["secretName"] = secret
        patch.status["certificateNotAfter"] = _iso(cert.not_valid_after_utc)
        patch.status["publicAddress"] = address or cfg.relay_address.rsplit(":", 1)[0]
        if not ports_ok and reason == "RelayUnavailable":
            raise kopf.TemporaryError(message, delay=5)

    async def _push(self, name: str, spec: dict[str, Any]) -> tuple[bool, str, str]:
        extra = {"max_streams": spec["maxStreams"]} if spec.get("maxStreams") else {}
        try:
            status, reply = await self.state.client.put_agent(name, _relay_services(spec), **extra)
            health = await self.state.client.health()
        except ControlSocketError as exc:
            return False, "RelayUnavailable", str(exc)
        self.state.relay_id = str(health.get("relayId"))
        error = reply.get("error", "") if isinstance(reply, dict) else str(reply)
        if status == 200:
            return True, "Open", f"ports {_ports_text(spec)} open on the relay"
        if status == 409:
            return False, "PortConflict", error
        return False, "Rejected", f"the relay rejected the spec: {error}"

    @staticmethod
    def _ready(
        conditions: list[dict[str, Any]], connected: bool, generation: int | None
    ) -> list[dict[str, Any]]:
        ready = (
            condition_true(conditions, "CertificateIssued")
            and condition_true(conditions, "PortsOpen")
            and connected
        )
        if ready:
            reason, message = "Ready", "the tunnel is up and its ports are open"
        elif not condition_true(conditions, "PortsOpen"):
            reason, message = "PortsNotOpen", "see the PortsOpen condition"
        else:
            reason, message = (
                "AgentNotConnected",
                "waiting for the agent to connect with its certificate",
            )
        return set_condition(conditions, "Ready", ready, reason, message, generation)

    async def observe(self, body: kopf.Body, patch: kopf.Patch) -> None:
        """Timer: copy live state from the relay into status; repair what drifted."""
        name = body["metadata"]["name"]
        status = dict(body.get("status", {}))
        generation = body["metadata"].get("generation")
        try:
            listing = await self.state.client.agents()
        except ControlSocketError as exc:
            live: dict[str, Any] | None = None
            relay_error: str | None = str(exc)
        else:
            relay_error = None
            live = next((a for a in listing.get("agents", []) if a["name"] == name), None)
            restarted = (
                self.state.relay_id is not None and listing.get("relayId") != self.state.relay_id
            )
            if restarted:
                log.info("relay restarted (new relayId); re-pushing TunnelAgents")
            due = await self._renewal_due(name)
            if live is None or not condition_true(status.get("conditions", []), "PortsOpen") or due:
                # The relay came back empty, a conflicting holder may be gone, or renewal is due.
                await self.reconcile(body, patch)
                status = {**status, **dict(patch.status)}
                listing = await self.state.client.agents()
                live = next((a for a in listing.get("agents", []) if a["name"] == name), None)
            else:
                # The Service's ports can be reset behind our back (`helm upgrade` rewrites the
                # port list): put this agent's back. No write when nothing changed.
                await self._repair_service_ports(name, body)
        connected = bool(live and live.get("connected"))
        conditions = list(status.get("conditions", []))
        if relay_error is not None:
            message = f"relay not reachable: {relay_error}"
        else:
            message = (
                f"tunnel up from {live.get('peer')}"
                if connected and live
                else "the agent is not connected"
            )
        new = set_condition(
            conditions,
            "Connected",
            connected,
            "TunnelUp" if connected else "TunnelDown",
            message,
            generation,
        )
        new = self._ready(new, connected, generation)
        was_connected = bool(body.get("status", {}).get("connected", False))
        if connected != was_connected:
            (kopf.info if connected else kopf.warn)(
                body, reason="Connected" if connected else "Disconnected", message=message
            )
        updates: dict[str, Any] = {"connected": connected}
        if live is not None:
            updates.update(
                bytesIn=live.get("bytesIn", 0),
                bytesOut=live.get("bytesOut", 0),
                activeStreams=live.get("activeStreams", 0),
            )
            if live.get("lastHeartbeat"):
                updates["lastSeen"] = live["lastHeartbeat"]
        current = {k: status.get(k) for k in updates}
        if current != updates or not same_conditions(status.get("conditions", []), new):
            for key, value in updates.items():
                patch.status[key] = value
            patch.status["conditions"] = new

    async def _repair_service_ports(self, name: str, body: kopf.Body) -> None:
        cfg = self.config
        ports = {s["port"] for s in body.get("spec", {}).get("services", [])}
        try:
            await kube.sync_service_ports(
                cfg.namespace, cfg.service_name, f"{cfg.namespace}/{name}", ports
            )
        except kube.PortTakenError as exc:
            log.warning("TunnelAgent %r: %s", name, exc)

    async def _renewal_due(self, name: str) -> bool:
        data = await kube.read_secret(self.config.namespace, pki.agent_secret_name(name))
        if data is None or "tls.crt" not in data:
            return True
        cert = x509.load_pem_x509_certificate(data["tls.crt"])
        if certs.needs_renewal(cert, datetime.now(UTC)):
            log.info("renewing the certificate of %r", name)
            return True
        return False

    async def delete(self, body: kopf.Body, retry: int) -> None:
        cfg = self.config
        name = body["metadata"]["name"]
        try:
            await self.state.client.delete_agent(name)
        except ControlSocketError as exc:
            if retry < 5:
                raise kopf.TemporaryError(
                    f"cannot revoke {name!r} at the relay yet: {exc}", delay=2
                ) from None
            log.warning(
                "relay unreachable while deleting %r; a restarted relay will not know it anyway",
                name,
            )
        await kube.remove_service_ports(cfg.namespace, cfg.service_name, f"{cfg.namespace}/{name}")
        await kube.delete_secret(
            cfg.namespace, pki.agent_secret_name(name)
        )  # no GC in every cluster
        kopf.info(body, reason="Revoked", message=f"{name!r} revoked at the relay, ports closed")


def build_registry(config: OperatorConfig) -> tuple[kopf.OperatorRegistry, Reconciler]:
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(OperatorState(config))
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)  # KUBECONFIG, else the in-cluster ServiceAccount

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.peering.standalone = True
        # One known namespace and one known CRD (installed before the operator starts): no
        # cluster-wide watching of CRDs and namespaces, so the RBAC stays namespaced.
        settings.scanning.disabled = True
        settings.posting.level = logging.INFO
        settings.persistence.finalizer = "atlax.dev/cleanup"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="atlax.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="atlax.dev")
        settings.watching.server_timeout = 60
        await reconciler.startup()

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, field="spec", registry=registry)
    async def reconcile(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        await reconciler.reconcile(body, patch)

    @kopf.on.delete(*resource, registry=registry)
    async def delete(body: kopf.Body, retry: int, **_: Any) -> None:
        await reconciler.delete(body, retry)

    @kopf.timer(*resource, interval=config.status_interval, registry=registry)
    async def observe(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        await reconciler.observe(body, patch)

    return registry, reconciler
