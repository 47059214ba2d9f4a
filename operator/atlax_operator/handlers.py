"""kopf handlers: one per concern, idempotent, state in the TunnelAgent's status.

- create/resume/update: certificate Secret, desired state at the relay, ports on the Service.
- timer: live state from the relay into status; re-push after a relay restart or drift; retry
  conflicts; renew certificates two thirds into their lifetime (the time is kept in status, so
  a tick reads no Secret).
- delete: revoke at the relay, remove the ports, delete the Secret.

Port ownership: the relay serializes claims while it runs, but forgets everything when it
restarts; the Service's `atlax.dev/ports` annotation survives, so it is checked before every push.
Handlers and the timer of one TunnelAgent take the same lock, so they never push concurrently;
a timer tick that gets the lock after the TunnelAgent was marked for deletion does nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubernetes.client.exceptions import ApiException

from atlax import certs
from atlax.control.client import ControlClient, ControlSocketError
from atlax.isotime import iso_utc

from . import FINALIZER, GROUP, PLURAL, VERSION, kube, pki
from .claims import ClaimConflictError, Claims
from .conditions import condition_true, same_conditions, set_condition
from .keypins import key_pins, moved_to_current_key, previous_expired
from .locks import AgentLocks

log = logging.getLogger("atlax.operator")

RELAY_CERT_CHECK_INTERVAL = 3600.0
RELAY_START_TIMEOUT = 120.0  # the chart's relay waits as long for its certificate
RETRYING = "its ports are not open yet (retrying)"
ONE_SECOND = timedelta(seconds=1)


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
    client: ControlClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = ControlClient(self.config.control_socket)


class PortsReason(StrEnum):
    """The PortsOpen condition's reason (and the event's) after trying to open an agent's ports."""

    OPEN = "Open"
    PORT_CONFLICT = "PortConflict"
    PORT_NOT_PERMITTED = "PortNotPermitted"  # below 1024 without the chart's sysctl
    SERVICE_NOT_FOUND = "ServiceNotFound"
    RELAY_UNAVAILABLE = "RelayUnavailable"  # retried soon: the relay is starting or restarting
    REJECTED = "Rejected"


@dataclass(frozen=True)
class PortsResult:
    reason: PortsReason
    message: str
    address: str | None = None  # the Service's load-balancer address, once the ports are open

    @property
    def open(self) -> bool:
        return self.reason is PortsReason.OPEN


@dataclass(frozen=True)
class RelayView:
    """What the relay's control socket says about one agent, or why it could not be asked."""

    agent: dict[str, Any] | None = None  # None: the relay does not know it (or is unreachable)
    relay_id: str | None = None  # changes when the relay process restarts
    error: str | None = None  # the relay could not be reached


def _relay_services(spec: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for s in spec.get("services", []):
        item: dict[str, Any] = {"name": s["name"], "port": s["port"]}
        if s.get("protocol", "tcp") != "tcp":
            item["protocol"] = s["protocol"]
        if s.get("route"):
            item["route"] = s["route"]
            item["hostnames"] = list(s.get("hostnames", []))
        if s.get("proxyProtocol"):
            item["proxy_protocol"] = s["proxyProtocol"]
        if s.get("allowedSourceRanges"):
            item["allow"] = s["allowedSourceRanges"]
        if s.get("maxConnections"):
            item["max_connections"] = s["maxConnections"]
        out.append(item)
    return out


def _ports_text(spec: dict[str, Any]) -> str:
    return ",".join(
        f"{s['name']}:{s['port']}" + ("/udp" if s.get("protocol") == "udp" else "")
        for s in spec.get("services", [])
    )


def _ports(services: list[dict[str, Any]]) -> set[tuple[str, int, str, str, tuple[str, ...]]]:
    """What a service list (the spec's or the relay's live one) claims, to compare the two."""
    return {
        (
            s["name"],
            int(s["port"]),
            s.get("protocol", "tcp"),
            s.get("route") or "",
            tuple(sorted(s.get("hostnames") or ())),
        )
        for s in services
    }


def _condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any]:
    return next((c for c in conditions if c.get("type") == type_), {})


def _issued_certificate(status: dict[str, Any]) -> x509.Certificate | None:
    """The certificate last written into the agent's Secret, as status records it."""
    try:
        return x509.load_pem_x509_certificate(status["certificate"].encode())
    except (KeyError, AttributeError, ValueError):
        return None


def _renewal_due(status: dict[str, Any]) -> bool:
    """The certificate's renewal time (from status) has come, or status does not tell it yet."""
    when = status.get("certificateRenewalTime")
    try:
        return not when or datetime.now(UTC) >= datetime.fromisoformat(when)
    except (TypeError, ValueError):
        return True


class Reconciler:
    def __init__(self, state: OperatorState) -> None:
        self.state = state
        self.config = state.config
        self.locks = AgentLocks()
        # relayId of the relay process each agent was last pushed to: a new id is a restart.
        self._pushed_to: dict[str, str] = {}

    async def startup(self) -> None:
        cfg = self.config
        self.state.ca = await pki.load_or_create_ca(cfg.namespace)
        await pki.ensure_relay_certificate(
            cfg.namespace, self.state.ca, cfg.relay_sans, cfg.relay_tls_dir
        )

    async def wait_for_relay(self, patience: float = RELAY_START_TIMEOUT) -> None:
        """In the pod the relay starts once the certificate `startup` wrote is there: let it come
        up before the first reconcile, so that a normal start is not reported as an error."""
        client, loop = self.state.client, asyncio.get_running_loop()
        deadline = loop.time() + patience
        waiting = False
        while True:
            try:
                health = await client.health()
            except ControlSocketError as exc:
                if loop.time() >= deadline:
                    log.warning(
                        "the relay does not answer after %gs (%s); starting anyway, "
                        "TunnelAgents are retried until it does",
                        patience,
                        exc,
                    )
                    return
                if not waiting:
                    log.info("waiting for the relay's control socket %s", client.path)
                    waiting = True
                await asyncio.sleep(0.5)
                continue
            log.info("relay is up (relay id %s)", health.get("relayId"))
            return

    async def keep_relay_synced(self, interval: float = 1.0, eager: float = 0.2) -> None:
        """Tell the relay when its control state is complete: once every TunnelAgent whose
        ports the relay can open is there (after a relay restart too), `PUT /cluster`. The
        relay takes agents only from then on (docs/high-availability.md); while it waits, this
        looks every `eager` seconds."""
        while True:
            synced = False
            try:
                synced = await self._sync_relay()
            except (ControlSocketError, ApiException, OSError) as exc:
                log.debug("relay sync check: %s", kube.describe(exc))
            await asyncio.sleep(interval if synced else eager)

    async def _sync_relay(self) -> bool:
        """Whether the relay is synced (now or already)."""
        client = self.state.client
        status, cluster = await client.call("GET", "/cluster")
        if status != 200 or not isinstance(cluster, dict) or cluster.get("synced"):
            return True  # synced already (or a relay without the cluster API)
        items = await kube.list_custom(self.config.namespace, GROUP, VERSION, PLURAL)
        wanted = {
            item["metadata"]["name"]: _ports(item.get("spec", {}).get("services", []))
            for item in items
            if not item["metadata"].get("deletionTimestamp")
            and condition_true(item.get("status", {}).get("conditions", []), "PortsOpen")
        }
        listing = await client.agents()
        live = {a["name"]: _ports(a.get("services", [])) for a in listing.get("agents", [])}
        missing = sorted(n for n, ports in wanted.items() if live.get(n) != ports)
        if missing:
            log.debug("relay not synced yet: waiting for %s", ", ".join(missing))
            return False
        replicas = cluster.get("replicas")  # the relay's own (its config file's): kept
        status, _ = await client.set_cluster(replicas if isinstance(replicas, int) else 1)
        if status == 200:
            log.info("relay has all %d TunnelAgent(s): marked synced", len(wanted))
        return status == 200

    async def keep_relay_certificate(self, interval: float = RELAY_CERT_CHECK_INTERVAL) -> None:
        """Re-issue the relay's certificate two thirds into its lifetime (the relay reloads it)."""
        cfg = self.config
        while True:
            await asyncio.sleep(interval)
            assert self.state.ca is not None
            try:
                await pki.ensure_relay_certificate(
                    cfg.namespace, self.state.ca, cfg.relay_sans, cfg.relay_tls_dir
                )
            except (ApiException, OSError, certs.CertificateError) as exc:
                log.warning("cannot renew the relay certificate yet: %s", kube.describe(exc))

    # -- create / resume / update ------------------------------------------------------------

    async def reconcile(self, body: kopf.Body, patch: kopf.Patch) -> None:
        async with self.locks.hold(body["metadata"]["name"]):
            await self._reconcile(body, patch)

    async def _reconcile(
        self, body: kopf.Body, patch: kopf.Patch, *, agent_moved: bool = False
    ) -> None:
        """Bring one TunnelAgent to its desired state and write what happened into status.

        `agent_moved`: the relay saw the agent's tunnel with its current key, so the key of a
        renewal's predecessor need not be accepted any longer (see keypins)."""
        cfg, ca = self.config, self.state.ca
        assert ca is not None
        name, spec = body["metadata"]["name"], dict(body.get("spec", {}))
        generation = body["metadata"].get("generation")
        conditions: list[dict[str, Any]] = list(body.get("status", {}).get("conditions", []))
        try:
            lifetime = certs.parse_lifetime(spec.get("certificateLifetime", "90d"))
        except certs.CertificateError as exc:
            raise kopf.PermanentError(str(exc)) from None
        status = body.get("status", {})
        try:
            issued = await pki.ensure_agent_secret(
                cfg.namespace,
                name,
                ca,
                lifetime,
                cfg.relay_address,
                body,
                _issued_certificate(status),
                status.get("relayAddress"),
            )
            cert, reissued = issued.cert, issued.reissued
            pins = key_pins(status, issued, agent_moved=agent_moved)
            ports = await self._open_ports(name, spec, pins.pins)
        except ApiException as exc:
            raise kopf.TemporaryError(kube.describe(exc), delay=10) from None
        secret = pki.agent_secret_name(name)
        if reissued:
            kopf.info(
                body,
                reason="CertificateIssued",
                message=f"certificate for {name!r} valid until "
                f"{iso_utc(cert.not_valid_after_utc)} written to Secret {secret}",
            )
        conditions = set_condition(
            conditions, "CertificateIssued", True, "Issued", f"Secret {secret}", generation
        )
        before = _condition(conditions, "PortsOpen")
        conditions = set_condition(
            conditions, "PortsOpen", ports.open, ports.reason.value, ports.message, generation
        )
        if (before.get("status"), before.get("message")) != (
            "True" if ports.open else "False",
            ports.message,
        ):  # events on transitions only: the timer retries conflicts every few seconds
            post = kopf.info if ports.open else kopf.warn
            post(body, reason=ports.reason.value, message=ports.message)
        connected = bool(body.get("status", {}).get("connected", False))
        conditions = self._ready(conditions, connected, generation)
        patch.status["conditions"] = conditions
        patch.status["observedGeneration"] = generation
        patch.status["ports"] = _ports_text(spec)
        patch.status["secretName"] = secret
        patch.status["certificateNotAfter"] = iso_utc(cert.not_valid_after_utc)
        # Read back by the timer (no Secret read per tick). A second later than the exact time,
        # which the timestamp's whole seconds would cut: never due before pki's own check agrees.
        patch.status["certificateRenewalTime"] = iso_utc(certs.renewal_time(cert) + ONE_SECOND)
        patch.status["certificate"] = cert.public_bytes(serialization.Encoding.PEM).decode()
        patch.status["relayAddress"] = cfg.relay_address
        patch.status["keyPins"] = list(pins.pins)
        patch.status["previousCertificateNotAfter"] = (
            iso_utc(pins.previous_until) if pins.previous_until else None
        )
        patch.status["publicAddress"] = (
            ports.address or cfg.public_address or cfg.relay_address.rsplit(":", 1)[0]
        )
        if ports.reason is PortsReason.RELAY_UNAVAILABLE:
            raise kopf.TemporaryError(ports.message, delay=5)

    async def _open_ports(
        self, name: str, spec: dict[str, Any], pins: tuple[str, ...]
    ) -> PortsResult:
        """Service ownership first (it survives relay restarts), then the relay, then the Service's
        port list."""
        cfg = self.config
        owner = f"{cfg.namespace}/{name}"
        claims = Claims.of(spec.get("services", []))
        try:
            await kube.check_claims(cfg.namespace, cfg.service_name, owner, claims)
            pushed = await self._push(name, spec, pins)
            if not pushed.open:
                return pushed
            lb = await kube.sync_claims(cfg.namespace, cfg.service_name, owner, claims)
        except ClaimConflictError as exc:
            await self._release_foreign_ports(name, owner)
            return PortsResult(PortsReason.PORT_CONFLICT, str(exc))
        except kube.ServiceNotFoundError as exc:
            return PortsResult(PortsReason.SERVICE_NOT_FOUND, str(exc))
        return PortsResult(pushed.reason, pushed.message, lb)

    async def _push(self, name: str, spec: dict[str, Any], pins: tuple[str, ...]) -> PortsResult:
        extra: dict[str, Any] = {"pins": list(pins)}
        if spec.get("maxStreams"):
            extra["max_streams"] = spec["maxStreams"]
        try:
            # relayId before the PUT: if the relay restarts in between, the next tick sees a new id.
            relay_id = str((await self.state.client.health()).get("relayId"))
            status, reply = await self.state.client.put_agent(name, _relay_services(spec), **extra)
        except ControlSocketError as exc:
            return PortsResult(PortsReason.RELAY_UNAVAILABLE, str(exc))
        error = reply.get("error", "") if isinstance(reply, dict) else str(reply)
        if status == 200:
            self._pushed_to[name] = relay_id
            return PortsResult(PortsReason.OPEN, f"ports {_ports_text(spec)} open on the relay")
        if status == 409:
            return PortsResult(PortsReason.PORT_CONFLICT, error)
        if status == 403:  # a port below 1024 without the sysctl: a setting, not a conflict
            return PortsResult(PortsReason.PORT_NOT_PERMITTED, error)
        return PortsResult(PortsReason.REJECTED, f"the relay rejected the spec: {error}")

    async def _release_foreign_ports(self, name: str, owner: str) -> None:
        """If the relay lets this agent hold a port the Service gives to another TunnelAgent (it
        asked first after a relay restart), take the agent off the relay until that is settled."""
        cfg = self.config
        try:
            status, live = await self.state.client.call("GET", f"/agents/{name}")
            if status != 200 or not isinstance(live, dict):
                return
            held = await kube.holdings(cfg.namespace, cfg.service_name)
            foreign = held.conflict(owner, Claims.of(live.get("services", [])))
            if foreign is not None:
                log.warning(
                    "TunnelAgent %r holds a port or hostname at the relay that belongs to "
                    "others (%s): removing it from the relay until the conflict is resolved",
                    name,
                    foreign,
                )
                await self.state.client.delete_agent(name)
                self._pushed_to.pop(name, None)
        except (ControlSocketError, kube.ServiceNotFoundError):
            return

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

    # -- timer -------------------------------------------------------------------------------

    async def observe(self, body: kopf.Body, patch: kopf.Patch) -> None:
        async with self.locks.hold(body["metadata"]["name"]):
            # kopf's timers see the live body. Marked for deletion while this tick waited for the
            # lock (held by `delete`): a re-push now would bring the agent back at the relay.
            if body["metadata"].get("deletionTimestamp"):
                return
            try:
                await self._observe(body, patch)
            except ApiException as exc:
                raise kopf.TemporaryError(kube.describe(exc), delay=10) from None

    async def _observe(self, body: kopf.Body, patch: kopf.Patch) -> None:
        """Copy live state from the relay into status; repair what drifted."""
        name = body["metadata"]["name"]
        spec = dict(body.get("spec", {}))
        status = dict(body.get("status", {}))
        generation = body["metadata"].get("generation")
        view = await self._relay_view(name)
        if view.error is None:
            why = self._push_needed(name, spec, status, view)
            if why is None and _renewal_due(status):
                why = "its certificate is due for renewal"
            moved = moved_to_current_key(status, view.agent)
            if why is None and moved:
                why = "the agent has moved to its renewed key: the previous one is unpinned"
            elif why is None and previous_expired(status):
                why = "the certificate its renewal replaced has expired: unpinning its key"
            if why is not None:
                level = logging.DEBUG if why == RETRYING else logging.INFO
                log.log(level, "TunnelAgent %r: reconciling because %s", name, why)
                await self._reconcile(body, patch, agent_moved=moved)
                status = {**status, **dict(patch.status)}
                view = await self._relay_view(name)  # the relay may be gone again
            else:
                # The Service's ports can be reset behind our back (`helm upgrade` rewrites the
                # port list): put this agent's back. No write when nothing changed.
                await self._repair_service_ports(name, spec)
        live = view.agent
        connected = bool(live and live.get("connected"))
        conditions = list(status.get("conditions", []))
        if view.error is not None:
            message = f"relay not reachable: {view.error}"
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

    async def _relay_view(self, name: str) -> RelayView:
        try:
            listing = await self.state.client.agents()
        except ControlSocketError as exc:
            return RelayView(error=str(exc))
        live = next((a for a in listing.get("agents", []) if a["name"] == name), None)
        return RelayView(live, str(listing.get("relayId")))

    def _push_needed(
        self, name: str, spec: dict[str, Any], status: dict[str, Any], view: RelayView
    ) -> str | None:
        """Why the desired state must be pushed again, or None."""
        live = view.agent
        if not condition_true(status.get("conditions", []), "PortsOpen"):
            return RETRYING
        if live is None:
            return "the relay does not know it (restarted?)"
        if self._pushed_to.get(name) != view.relay_id:
            return "the relay restarted"
        if _ports(live.get("services", [])) != _ports(spec.get("services", [])):
            return "the relay's ports differ from the spec"
        if list(live.get("pins", [])) != list(status.get("keyPins", [])):
            return "the relay's key pins differ from status"
        return None

    async def _repair_service_ports(self, name: str, spec: dict[str, Any]) -> None:
        cfg = self.config
        claims = Claims.of(spec.get("services", []))
        try:
            await kube.sync_claims(
                cfg.namespace, cfg.service_name, f"{cfg.namespace}/{name}", claims
            )
        except (ClaimConflictError, kube.ServiceNotFoundError) as exc:
            log.warning("TunnelAgent %r: %s", name, exc)

    # -- delete ------------------------------------------------------------------------------

    async def delete(self, body: kopf.Body, retry: int) -> None:
        name = body["metadata"]["name"]
        async with self.locks.hold(name):
            await self._delete(body, retry)
            self._pushed_to.pop(name, None)

    async def _delete(self, body: kopf.Body, retry: int) -> None:
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
        try:
            # The agent's Secret is owned by the TunnelAgent: the garbage collector deletes it
            # (the operator's Role has no `delete` on Secrets).
            await kube.remove_claims(cfg.namespace, cfg.service_name, f"{cfg.namespace}/{name}")
        except ApiException as exc:
            raise kopf.TemporaryError(kube.describe(exc), delay=5) from None
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
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="atlax.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="atlax.dev")
        settings.watching.server_timeout = 60
        # A TunnelAgent is released (its finalizer removed) only once its timer has exited; if
        # a tick is still running when kopf checks and no later event comes, kopf looks again
        # after this many seconds (its default is 60).
        settings.background.cancellation_polling = 1.0
        if reconciler.state.ca is None:  # `atlax operator` prepares certificates before kopf
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
