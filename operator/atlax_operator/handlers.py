"""The controller's kopf handlers: one per concern, idempotent, state in the TunnelAgent's status.

- create/resume/update: the certificate Secret, the agent's ports granted on the relay Service.
- timer: renew the certificate when due (the time is kept in status, so a tick reads no Secret);
  put the agent's ports back on the Service if someone rewrote them; status from the relays'
  reports: ports open on every ready relay, tunnels held to how many relay instances.
- delete: take the ports back from the Service and wait until no ready relay holds the agent any
  more (the relays' sync sidecars revoke it when they see it marked); the agent's Secret goes
  with the TunnelAgent (owner reference, garbage collector).

The controller never talks to a relay: each relay pod's sync sidecar does (sync.py). Who holds a
port or a hostname is the controller's decision, recorded in the Service's annotations
(claims.py), which outlive every relay process; a sidecar pushes an agent once its claims are
granted there. The controller never reads an agent's Secret back: what it issued is recorded in
the TunnelAgent's status (certificate, relayAddress).
Handlers and the timer of one TunnelAgent take the same lock; a timer tick that gets the lock
after the TunnelAgent was marked for deletion does nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubernetes.client.exceptions import ApiException

from atlax import certs
from atlax.isotime import iso_utc

from . import FINALIZER, GROUP, PLURAL, VERSION, kube, pki
from .claims import ClaimConflictError, Claims
from .conditions import condition_true, same_conditions, set_condition
from .keypins import key_pins, moved_to_current_key, previous_expired
from .locks import AgentLocks
from .reports import ReportCache, ServiceKey
from .status import (
    ConnectedReason,
    LiveAgent,
    PortsReason,
    PortsResult,
    live_agent,
    ports_text,
    service_keys,
)

log = logging.getLogger("atlax.operator")

RELAY_CERT_CHECK_INTERVAL = 3600.0
REVOCATION_PATIENCE = 60.0  # seconds the delete handler waits for the relays to revoke
ONE_SECOND = timedelta(seconds=1)


@dataclass(frozen=True)
class ControllerConfig:
    namespace: str
    service_name: str
    relay_address: str  # host:port the agents dial, written into their Secrets
    relay_sans: tuple[str, ...]
    relay_tls_dir: Path | None = None  # `atlax operator`: the relay's files, written directly
    status_interval: float = 10.0
    public_address: str | None = None


@dataclass
class ControllerState:
    config: ControllerConfig
    reports: ReportCache
    ca: certs.CertKeyPair | None = None


def _spec_services(spec: dict[str, Any]) -> tuple[ServiceKey, ...]:
    return service_keys(spec.get("services", []))


def _issued_certificate(status: dict[str, Any]) -> x509.Certificate | None:
    """The certificate last written into the agent's Secret, as status records it."""
    try:
        return x509.load_pem_x509_certificate(status["certificate"].encode())
    except (KeyError, AttributeError, ValueError):
        return None


def _condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any]:
    return next((c for c in conditions if c.get("type") == type_), {})


def _renewal_due(status: dict[str, Any]) -> bool:
    """The certificate's renewal time (from status) has come, or cannot be read."""
    when = status.get("certificateRenewalTime")
    try:
        return not when or datetime.now(UTC) >= datetime.fromisoformat(when)
    except (TypeError, ValueError):
        return True


def _ready(
    conditions: list[dict[str, Any]], live: LiveAgent, generation: int | None
) -> list[dict[str, Any]]:
    ports_open = condition_true(conditions, "PortsOpen")
    ready = condition_true(conditions, "CertificateIssued") and ports_open and live.connected
    if ready:
        reason, message = "Ready", "the tunnels are up and the ports are open"
    elif not ports_open:
        reason, message = "PortsNotOpen", "see the PortsOpen condition"
    elif live.reason is ConnectedReason.PARTIAL:
        reason, message = "AgentPartiallyConnected", "see the Connected condition"
    else:
        reason, message = "AgentNotConnected", "waiting for the agent to connect"
    return set_condition(conditions, "Ready", ready, reason, message, generation)


def _post_transitions(
    body: kopf.Body, before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> None:
    """Events when PortsOpen or Connected changes (never for a tick that changed nothing)."""
    old, new = _condition(before, "PortsOpen"), _condition(after, "PortsOpen")
    if _ports_key(old) != _ports_key(new) and new.get("reason") != PortsReason.PENDING:
        post = kopf.info if new.get("status") == "True" else kopf.warn
        post(body, reason=new["reason"], message=new["message"])
    old, new = _condition(before, "Connected"), _condition(after, "Connected")
    if old.get("reason") != new.get("reason") and (old or new.get("status") == "True"):
        reason = {
            ConnectedReason.TUNNEL_UP: "Connected",
            ConnectedReason.PARTIAL: "PartiallyConnected",
        }.get(new["reason"], "Disconnected")
        post = kopf.info if new.get("status") == "True" else kopf.warn
        post(body, reason=reason, message=new["message"])


def _ports_key(condition: dict[str, Any]) -> tuple[Any, ...]:
    """What makes a PortsOpen change worth an event: a conflict naming another holder is one."""
    return (condition.get("status"), condition.get("reason"), condition.get("message"))


class Reconciler:
    def __init__(self, state: ControllerState) -> None:
        self.state = state
        self.config = state.config
        self.locks = AgentLocks()

    async def startup(self) -> None:
        """The CA (created once) and the relay's certificate, in Secrets (and files, if asked)."""
        cfg = self.config
        self.state.ca = await pki.load_or_create_ca(cfg.namespace)
        await pki.ensure_relay_certificate(
            cfg.namespace, self.state.ca, cfg.relay_sans, cfg.relay_tls_dir
        )

    async def keep_relay_certificate(self, interval: float = RELAY_CERT_CHECK_INTERVAL) -> None:
        """Re-issue the relay's certificate two thirds into its lifetime (the relays reload it)."""
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
            try:
                status = await self._certificate(body, patch)
                await self._status(body, patch, status)
            except ApiException as exc:
                raise kopf.TemporaryError(kube.describe(exc), delay=10) from None

    async def _certificate(
        self, body: kopf.Body, patch: kopf.Patch, *, agent_moved: bool = False
    ) -> dict[str, Any]:
        """The agent's certificate Secret and its key pins; returns status as it will be after
        `patch`. `agent_moved`: the relays see the agent's tunnels with its current key, so a
        renewal's predecessor need not be accepted any longer (see keypins)."""
        cfg, ca = self.config, self.state.ca
        assert ca is not None
        name, spec = body["metadata"]["name"], dict(body.get("spec", {}))
        generation = body["metadata"].get("generation")
        try:
            lifetime = certs.parse_lifetime(spec.get("certificateLifetime", "90d"))
        except certs.CertificateError as exc:
            raise kopf.PermanentError(str(exc)) from None
        status = dict(body.get("status", {}))
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
        secret = pki.agent_secret_name(name)
        if reissued:
            kopf.info(
                body,
                reason="CertificateIssued",
                message=f"certificate for {name!r} valid until "
                f"{iso_utc(cert.not_valid_after_utc)} written to Secret {secret}",
            )
        patch.status["conditions"] = status["conditions"] = set_condition(
            list(status.get("conditions", [])),
            "CertificateIssued",
            True,
            "Issued",
            f"Secret {secret}",
            generation,
        )
        patch.status["observedGeneration"] = generation
        patch.status["ports"] = ports_text(_spec_services(spec))
        patch.status["secretName"] = secret
        patch.status["certificateNotAfter"] = iso_utc(cert.not_valid_after_utc)
        # Read back by the timer (no Secret read per tick). A second later than the exact time,
        # which the timestamp's whole seconds would cut: never due before pki's own check agrees.
        renewal = iso_utc(certs.renewal_time(cert) + ONE_SECOND)
        patch.status["certificateRenewalTime"] = status["certificateRenewalTime"] = renewal
        patch.status["certificate"] = cert.public_bytes(serialization.Encoding.PEM).decode()
        patch.status["relayAddress"] = cfg.relay_address
        # What the syncs push to the relays as the keys this agent may present.
        patch.status["keyPins"] = status["keyPins"] = list(pins.pins)
        until = iso_utc(pins.previous_until) if pins.previous_until else None
        patch.status["previousCertificateNotAfter"] = status["previousCertificateNotAfter"] = until
        return status

    # -- timer -------------------------------------------------------------------------------

    async def observe(self, body: kopf.Body, patch: kopf.Patch) -> None:
        async with self.locks.hold(body["metadata"]["name"]):
            # kopf's timers see the live body. Marked for deletion while this tick waited for the
            # lock (held by `delete`): nothing more to do for it.
            if body["metadata"].get("deletionTimestamp"):
                return
            try:
                name = body["metadata"]["name"]
                status = dict(body.get("status", {}))
                # No renewal time yet: the create handler has not issued it (or this tick's body
                # predates its patch); minting here too would issue two certificates.
                if status.get("certificateRenewalTime") and _renewal_due(status):
                    log.info("TunnelAgent %r: renewing its certificate", name)
                    status = await self._certificate(body, patch)
                elif status.get("certificateRenewalTime"):
                    moved = moved_to_current_key(status, await self._live_key(name))
                    if moved or previous_expired(status):
                        why = "it has moved to its renewed key" if moved else "it has expired"
                        log.info("TunnelAgent %r: unpinning the replaced key (%s)", name, why)
                        status = await self._certificate(body, patch, agent_moved=moved)
                await self._status(body, patch, status)
            except ApiException as exc:
                raise kopf.TemporaryError(kube.describe(exc), delay=10) from None

    async def _live_key(self, name: str) -> dict[str, Any] | None:
        """The agent's live key as the ready relays see it: {"pin": P} when every relay that
        holds a tunnel of it reports the same key P, else None (no tunnel, or keys differ: the
        agent has not moved everywhere yet)."""
        pins = {
            r.agents[name].pin
            for r in await self.state.reports.get()
            if r.ready and name in r.agents and r.agents[name].tunnels > 0
        }
        return {"pin": pins.pop()} if len(pins) == 1 and None not in pins else None

    # -- status ------------------------------------------------------------------------------

    async def _status(self, body: kopf.Body, patch: kopf.Patch, status: dict[str, Any]) -> None:
        """Grant the ports on the Service (again: it may have been rewritten), read the relays'
        reports, and write what changed: conditions, counts, events on transitions."""
        cfg = self.config
        name, spec = body["metadata"]["name"], dict(body.get("spec", {}))
        generation = body["metadata"].get("generation")
        claim = await self._claim(name, spec)
        live = live_agent(name, _spec_services(spec), await self.state.reports.get())
        ports = live.ports if claim.open else claim
        before = list(status.get("conditions", []))
        conditions = set_condition(
            before, "PortsOpen", ports.open, ports.reason.value, ports.message, generation
        )
        conditions = set_condition(
            conditions, "Connected", live.connected, live.reason.value, live.message, generation
        )
        conditions = _ready(conditions, live, generation)
        _post_transitions(body, list(body.get("status", {}).get("conditions", [])), conditions)
        updates: dict[str, Any] = {
            "connected": live.connected_instances > 0,
            "connectedInstances": live.connected_instances,
            "relayInstances": live.relay_instances,
            "tunnels": live.tunnels,
            "bytesIn": live.bytes_in,
            "bytesOut": live.bytes_out,
            "activeStreams": live.active_streams,
            "publicAddress": claim.address
            or cfg.public_address
            or cfg.relay_address.rsplit(":", 1)[0],
        }
        if live.last_seen:
            updates["lastSeen"] = live.last_seen
        current = {k: status.get(k) for k in updates}
        if current != updates or not same_conditions(status.get("conditions", []), conditions):
            for key, value in updates.items():
                patch.status[key] = value
            patch.status["conditions"] = conditions

    async def _claim(self, name: str, spec: dict[str, Any]) -> PortsResult:
        """The agent's ports and hostnames on the Service, written to it in its annotations
        (OPEN: granted)."""
        cfg = self.config
        claims = Claims.of(spec.get("services", []))
        try:
            address = await kube.sync_claims(
                cfg.namespace, cfg.service_name, f"{cfg.namespace}/{name}", claims
            )
        except ClaimConflictError as exc:
            return PortsResult(PortsReason.PORT_CONFLICT, str(exc))
        except kube.ServiceNotFoundError as exc:
            return PortsResult(PortsReason.SERVICE_NOT_FOUND, str(exc))
        return PortsResult(PortsReason.OPEN, "granted", address)

    # -- delete ------------------------------------------------------------------------------

    async def delete(self, body: kopf.Body) -> None:
        async with self.locks.hold(body["metadata"]["name"]):
            await self._delete(body)

    async def _delete(self, body: kopf.Body) -> None:
        cfg = self.config
        name = body["metadata"]["name"]
        try:
            # The agent's Secret is owned by the TunnelAgent: the garbage collector deletes it
            # (the controller's Role has no `delete` on Secrets).
            await kube.remove_claims(cfg.namespace, cfg.service_name, f"{cfg.namespace}/{name}")
            holding = await self._holding(name)
        except ApiException as exc:
            raise kopf.TemporaryError(kube.describe(exc), delay=5) from None
        if holding:
            log.warning("relay(s) %s still hold %r; releasing it anyway", ", ".join(holding), name)
        kopf.info(body, reason="Revoked", message=f"{name!r} revoked at the relays, ports closed")

    async def _holding(self, name: str) -> list[str]:
        """Wait (up to REVOCATION_PATIENCE) until no ready relay holds `name`; the ones that
        still do. A relay that is gone or unreachable holds nothing: it will not know the agent
        when it comes back, as its sidecar gives it only what the TunnelAgents say."""
        deadline = asyncio.get_running_loop().time() + REVOCATION_PATIENCE
        while True:
            reports = await self.state.reports.get(fresh=True)
            holding = sorted(r.pod for r in reports if r.ready and name in r.agents)
            if not holding or asyncio.get_running_loop().time() >= deadline:
                return holding
            await asyncio.sleep(0.5)


def build_registry(
    config: ControllerConfig, reports: ReportCache
) -> tuple[kopf.OperatorRegistry, Reconciler]:
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(ControllerState(config, reports))
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
        # kopf would SIGKILL the whole process 10 minutes after being stopped in any other way
        # than a signal: a controller that loses its Lease stops kopf and stays a candidate.
        settings.process.ultimate_exiting_timeout = None
        if reconciler.state.ca is None:  # the CLI prepares certificates before kopf
            await reconciler.startup()

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, field="spec", registry=registry)
    async def reconcile(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        await reconciler.reconcile(body, patch)

    @kopf.on.delete(*resource, registry=registry)
    async def delete(body: kopf.Body, **_: Any) -> None:
        await reconciler.delete(body)

    @kopf.timer(*resource, interval=config.status_interval, registry=registry)
    async def observe(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        await reconciler.observe(body, patch)

    return registry, reconciler
