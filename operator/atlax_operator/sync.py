"""`atlax operator sync`: the sidecar of every relay pod. Reads the cluster, writes only its report.

It makes its own relay hold exactly the agents the TunnelAgents describe, through the relay's
local control socket, and keeps it so: level-triggered, one pass at a time (nothing to lock), on
every change it is told of (watches of the TunnelAgents, the relay's Service and its
EndpointSlices), every `interval` seconds anyway, and every `poll` seconds against the relay
itself (a relay that restarted comes back empty and is given everything again).

Who may hold a port or a hostname is the controller's decision, recorded in the Service's
annotations (claims.py): an agent is pushed once everything its spec claims is granted to it
there, and an agent that holds a port or hostname granted to someone else (or no longer exists,
or is being deleted) is revoked.
Nothing is changed while the API cannot be read: an empty answer would revoke every agent.

After each pass it tells its relay the cluster size and writes a report of what its relay holds
(see reports.py). The cluster size counts the relay pods that are in the Service's EndpointSlices
and not terminating, and whose sidecar reports its relay ready (its state applied), itself
included: a new pod counts as soon as its relay can take agents, before it is Ready, so that the
agents, told a larger size by the relays they hold, dial until they reach it.

Serving readiness (`GET /readyz` on --health-port, the pod's readiness with the relay's own): the
relay has its state, and every TunnelAgent that holds a tunnel elsewhere (its status says so) holds
one to every instance of this relay too, or `join_grace` seconds passed since the relay took its
state. Until then the pod takes no public connection that it would have to make wait or refuse.
Once ready it stays ready while the relay process is the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from atlax.control.client import ControlClient, ControlSocketError

from . import GROUP, PLURAL, VERSION, kube
from .claims import Claims, Holdings
from .reports import REPORT_LABEL, AgentReport, RelayReport, ReportStore
from .status import PortsReason, ports_text, service_keys

log = logging.getLogger("atlax.operator")


@dataclass(frozen=True)
class SyncConfig:
    namespace: str
    control_socket: Path
    service_name: str
    pod: str  # this relay pod's name: its report is named after it
    count_replicas: bool = True  # False: one relay, no EndpointSlices (`atlax operator`)
    interval: float = 10.0  # read the API at least this often; heartbeat of the report
    poll: float = 1.0  # read the relay's live state this often
    join_grace: float = 30.0  # serving readiness without the agents' tunnels after this long


@dataclass(frozen=True)
class Desired:
    """What the relay should hold, from the TunnelAgents and the Service's port grants."""

    specs: Mapping[str, dict[str, Any]]  # agent -> the body of its PUT
    holdings: Holdings  # who holds which port and hostname on the Service
    existing: frozenset[str]  # every TunnelAgent not being deleted
    owners: Mapping[str, str]  # agent -> its owner name in the claims ("ns/name")
    replicas: int = 1
    connected: frozenset[str] = frozenset()  # agents whose status says they hold a tunnel

    def may_keep(self, name: str, live: Mapping[str, Any]) -> bool:
        """An agent the relay holds but that is not to be pushed (yet) stays while it exists
        and nothing it holds is granted to anyone else: its spec change is in flight."""
        claims = Claims.of(live.get("services", []))
        owner = self.owners.get(name, "")
        return name in self.existing and self.holdings.conflict(owner, claims) is None


def relay_spec(agent: Mapping[str, Any]) -> dict[str, Any]:
    """A TunnelAgent as the relay's control API takes it (`PUT /agents/NAME`)."""
    spec = agent.get("spec", {})
    services = []
    for s in spec.get("services", []):
        item: dict[str, Any] = {"name": s["name"], "port": int(s["port"])}
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
        services.append(item)
    # The keys the agent may present (the controller's status.keyPins: the current
    # certificate's, and a renewed one's predecessor for a while); anything else is refused.
    body: dict[str, Any] = {"services": services, "pins": list(key_pins_of(agent))}
    if spec.get("maxStreams"):
        body["max_streams"] = spec["maxStreams"]
    return body


def key_pins_of(agent: Mapping[str, Any]) -> tuple[str, ...]:
    """The TunnelAgent's key pins as its status records them (none before its certificate)."""
    pins = agent.get("status", {}).get("keyPins") or []
    return tuple(str(p) for p in pins)


def desired_state(
    agents: list[dict[str, Any]], holdings: Holdings, namespace: str, replicas: int = 1
) -> Desired:
    """Pure: the relay's desired state. An agent is pushed once everything its spec claims is
    granted to it on the Service."""
    specs: dict[str, dict[str, Any]] = {}
    owners: dict[str, str] = {}
    connected: set[str] = set()
    for agent in agents:
        metadata = agent["metadata"]
        if metadata.get("deletionTimestamp"):
            continue
        name = metadata["name"]
        owners[name] = f"{namespace}/{name}"
        body = relay_spec(agent)
        claims = Claims.of(agent.get("spec", {}).get("services", []))
        if body["services"] and body["pins"] and holds(holdings, owners[name], claims):
            specs[name] = body
        if int(agent.get("status", {}).get("connectedInstances") or 0) > 0:
            connected.add(name)
    return Desired(specs, holdings, frozenset(owners), owners, replicas, frozenset(connected))


def serving_readiness(
    desired: Desired | None, report: RelayReport, waited: float, grace: float
) -> tuple[bool, str]:
    """Pure: whether this relay pod may take public connections, and why (not). `waited`:
    seconds since its relay took its state."""
    if desired is None or not report.ready:
        return False, report.error or "the relay does not have its state yet"
    missing = sorted(
        name
        for name in desired.specs
        if name in desired.connected
        and (report.agents.get(name) or AgentReport()).tunnels < report.instances
    )
    if not missing:
        return True, "the relay has its state and every connected agent's tunnels"
    if waited >= grace:
        return True, f"waited {grace:g}s for the tunnels of {', '.join(missing)}"
    return False, f"waiting for the tunnels of {', '.join(missing)}"


def cluster_replicas(endpoints: Mapping[str, bool], ready_reports: set[str], pod: str) -> int:
    """Pure: the relay pods to count (`endpoints`: pod name -> terminating): those not
    terminating whose relay is ready, and this one."""
    serving = {name for name, terminating in endpoints.items() if not terminating}
    return len((serving & ready_reports) | {pod})


def holds(holdings: Holdings, owner: str, claims: Claims) -> bool:
    """Every port and hostname of `claims` is written on the Service to `owner`."""
    if any(holdings.ports.get(key) != owner for key in claims.ports):
        return False
    for port, (route, names) in claims.shared.items():
        entry = holdings.shared.get(str(port))
        if entry is None or entry["route"] != route:
            return False
        if any(entry["hostnames"].get(name) != owner for name in names):
            return False
    return True


def live_tunnels(live: Mapping[str, Any]) -> int:
    """Instances of this relay that hold the agent's tunnel: one entry each in `instances` (a
    relay with instances, issue 14), else the single relay's `connected`."""
    instances = live.get("instances")
    if isinstance(instances, list):
        return sum(1 for i in instances if isinstance(i, dict) and i.get("connected", True))
    return 1 if live.get("connected") else 0


async def tell_cluster_size(relay: ControlClient, replicas: int) -> int:
    """Tell the relay how many relay pods are ready (it multiplies by its workers and tells its
    agents); answer how many instances the relay runs. The one call of issue 14's control API
    (`PUT /cluster`) the sidecar makes: a relay without it (404) is one instance."""
    status, reply = await relay.call("PUT", "/cluster", {"replicas": replicas})
    if status == 404:
        return 1
    if status != 200 or not isinstance(reply, dict):
        raise ControlSocketError(f"PUT /cluster: HTTP {status}: {reply}")
    workers = reply.get("workers")
    return workers if isinstance(workers, int) and workers > 0 else 1


@dataclass
class _RelayMemory:
    """What this sidecar did to the relay process it knows (relay id): reset when it restarts."""

    relay_id: str | None = None
    pushed: dict[str, dict[str, Any]] = field(default_factory=dict)
    told: int | None = None  # replicas last told
    instances: int = 1
    synced_at: float | None = None  # when it first had its state (monotonic)
    serving: bool = False  # serving readiness reached (it stays)


class RelaySync:
    def __init__(
        self, config: SyncConfig, reports: ReportStore, relay: ControlClient | None = None
    ) -> None:
        self.config = config
        self.reports = reports
        self.relay = relay or ControlClient(config.control_socket, timeout=5.0)
        self._desired: Desired | None = None
        self._memory = _RelayMemory()
        self._published: RelayReport | None = None
        self._published_at = float("-inf")
        self._api_error: str | None = None
        self._relay_error: str | None = None
        self._refused: dict[str, tuple[PortsReason, str]] = {}
        self._wake = asyncio.Event()
        self.relay_ready = asyncio.Event()  # set once the relay answered and took its state
        self.serving: tuple[bool, str] = (False, "not started")  # serving readiness, and why

    @property
    def relay_id(self) -> str | None:
        """The relay process this sidecar last gave the desired state to."""
        return self._memory.relay_id

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch, pass, report; until cancelled (then a last report: not ready)."""
        stops = self._watch()
        cfg = self.config
        try:
            next_read = 0.0
            while True:
                read = self._wake.is_set() or time.monotonic() >= next_read
                self._wake.clear()
                if read:
                    next_read = time.monotonic() + cfg.interval
                await self.step(read_api=read)
                with anyio.move_on_after(cfg.poll):
                    await self._wake.wait()
                    await anyio.sleep(0.1)  # let a burst of events arrive: one pass for all
        finally:
            for stop in stops:
                stop.set()
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                await self._publish(
                    RelayReport(cfg.pod, ready=False, error="its sync sidecar stopped"), force=True
                )

    def _watch(self) -> list[Any]:
        cfg = self.config
        loop = asyncio.get_running_loop()

        def wake() -> None:
            loop.call_soon_threadsafe(self._wake.set)

        stops = [
            kube.watch_in_background(
                "TunnelAgents",
                wake,
                client.CustomObjectsApi().list_namespaced_custom_object,
                GROUP,
                VERSION,
                cfg.namespace,
                PLURAL,
            ),
            kube.watch_in_background(
                f"Service {cfg.service_name}",
                wake,
                client.CoreV1Api().list_namespaced_service,
                cfg.namespace,
                field_selector=f"metadata.name={cfg.service_name}",
            ),
        ]
        if cfg.count_replicas:
            stops.append(
                kube.watch_in_background(
                    f"EndpointSlices of {cfg.service_name}",
                    wake,
                    client.DiscoveryV1Api().list_namespaced_endpoint_slice,
                    cfg.namespace,
                    label_selector=f"kubernetes.io/service-name={cfg.service_name}",
                )
            )
            stops.append(  # another relay's report: a pod that became ready, or stopped
                kube.watch_in_background(
                    "relay reports",
                    wake,
                    client.CoordinationV1Api().list_namespaced_lease,
                    cfg.namespace,
                    label_selector=f"{REPORT_LABEL}={cfg.service_name}",
                )
            )
        return stops

    # -- one pass ----------------------------------------------------------------------------

    async def step(self, *, read_api: bool = True) -> RelayReport:
        """One pass: read the cluster (if asked), bring the relay to it, report."""
        if read_api or self._desired is None:
            await self._read_desired()
        try:
            report = await self._apply()
        except ControlSocketError as exc:
            if self._relay_error is None:
                log.info("relay not reachable (%s); retrying", exc)
            self._relay_error = str(exc)
            self._memory = _RelayMemory()
            report = RelayReport(self.config.pod, ready=False, error=str(exc))
        if report.ready:
            self.relay_ready.set()
        self._judge_serving(report)
        await self._publish(report)
        return report

    def _judge_serving(self, report: RelayReport) -> None:
        memory = self._memory
        if not report.ready:
            self.serving = (False, report.error or "the relay is not ready")
            return
        if memory.serving:
            return
        now = time.monotonic()
        if memory.synced_at is None:
            memory.synced_at = now
        ready, why = serving_readiness(
            self._desired, report, now - memory.synced_at, self.config.join_grace
        )
        if ready:
            memory.serving = True
            log.info("ready to serve: %s", why)
        self.serving = (ready, why)

    async def _read_desired(self) -> None:
        cfg = self.config
        try:
            agents = await kube.list_tunnel_agents(cfg.namespace, GROUP, VERSION, PLURAL)
            holdings = await kube.holdings(cfg.namespace, cfg.service_name)
            replicas = 1
            if cfg.count_replicas:
                endpoints = await kube.relay_endpoints(cfg.namespace, cfg.service_name)
                ready = {r.pod for r in await self.reports.collect() if r.ready}
                replicas = cluster_replicas(endpoints, ready, cfg.pod)
        except (
            ApiException,
            urllib3.exceptions.HTTPError,
            OSError,
            kube.ServiceNotFoundError,
        ) as e:
            error = str(e) if isinstance(e, kube.ServiceNotFoundError) else kube.describe(e)
            if error != self._api_error:
                log.warning("cannot read the desired state (%s): the relay is left as it is", error)
            self._api_error = error
            return
        if self._api_error is not None:
            log.info("the Kubernetes API answers again")
        self._api_error = None
        self._desired = desired_state(agents, holdings, cfg.namespace, replicas)

    async def _apply(self) -> RelayReport:
        """Revoke, push, tell the cluster size; the report of what the relay then holds."""
        cfg, relay = self.config, self.relay
        listing = await relay.agents()
        memory = self._relay_process(str(listing.get("relayId")))
        desired = self._desired
        if desired is None:
            error = f"no desired state: {self._api_error}"
            return RelayReport(cfg.pod, ready=False, relay_id=memory.relay_id, error=error)
        live = {a["name"]: a for a in listing.get("agents", [])}
        revoked = await self._revoke(desired, live, memory)
        pushed, refused = await self._push(desired, live, memory)
        if memory.told != desired.replicas:
            memory.instances = await tell_cluster_size(relay, desired.replicas)
            memory.told = desired.replicas
            log.info(
                "told the relay: %d ready relay pod(s); it runs %d instance(s)",
                desired.replicas,
                memory.instances,
            )
        if revoked or pushed:
            listing = await relay.agents()
        agents = {a["name"]: _agent_report(a) for a in listing.get("agents", [])}
        for name, (reason, message) in refused.items():
            agents[name] = replace(agents.get(name, AgentReport()), refused=reason, message=message)
        relay_id = str(listing.get("relayId"))
        return RelayReport(cfg.pod, True, memory.instances, relay_id, None, agents)

    def _relay_process(self, relay_id: str) -> _RelayMemory:
        """What was done to this relay process; nothing if it is a new one (it restarted)."""
        if relay_id != self._memory.relay_id:
            log.info("relay %s is up: giving it the desired state", relay_id)
            self._memory = _RelayMemory(relay_id)
        self._relay_error = None
        return self._memory

    async def _revoke(
        self, desired: Desired, live: Mapping[str, Any], memory: _RelayMemory
    ) -> bool:
        """Revoke what the relay holds and may not keep (first: the ports it frees may be
        pushed next). True if anything was."""
        revoked = False
        for name, agent in live.items():
            if name in desired.specs or desired.may_keep(name, agent):
                continue
            await self.relay.delete_agent(name)
            memory.pushed.pop(name, None)
            log.info("revoked %r at the relay", name)
            revoked = True
        return revoked

    async def _push(
        self, desired: Desired, live: Mapping[str, Any], memory: _RelayMemory
    ) -> tuple[bool, dict[str, tuple[PortsReason, str]]]:
        """PUT every desired agent the relay does not hold as wanted (a refusal is retried on
        the next pass). Whether any was pushed, and what the relay refused and why."""
        pushed = False
        refused: dict[str, tuple[PortsReason, str]] = {}
        for name, body in desired.specs.items():
            agent = live.get(name)
            wanted = service_keys(body["services"])
            if agent is not None and memory.pushed.get(name) == body:
                same_pins = list(agent.get("pins", body["pins"])) == body["pins"]
                if service_keys(agent.get("services", [])) == wanted and same_pins:
                    continue
            status, reply = await self.relay.put_agent(name, body["services"], **_extra(body))
            error = reply.get("error", "") if isinstance(reply, dict) else str(reply)
            if status == 200:
                memory.pushed[name] = body
                pushed = True
                log.info("%r: ports %s open at the relay", name, ports_text(wanted))
            elif status == 409:
                refused[name] = (PortsReason.PORT_CONFLICT, error)
            elif status == 403:  # a port below 1024 without the sysctl: a setting
                refused[name] = (PortsReason.PORT_NOT_PERMITTED, error)
            else:
                refused[name] = (PortsReason.REJECTED, f"the relay rejected the spec: {error}")
        for name, (_, message) in refused.items():
            if self._refused.get(name, (None, ""))[1] != message:  # once per new refusal
                log.warning("%r: %s", name, message)
        self._refused = refused
        return pushed, refused

    async def _publish(self, report: RelayReport, *, force: bool = False) -> None:
        now = time.monotonic()
        last = self._published
        if (
            not force
            and last is not None
            and last.material() == report.material()
            and now - self._published_at < self.config.interval
        ):
            return
        try:
            await self.reports.publish(report)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("cannot publish this relay's report: %s", kube.describe(exc))
            return
        self._published, self._published_at = report, now


def _extra(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "services"}


def _agent_report(live: Mapping[str, Any]) -> AgentReport:
    return AgentReport(
        ports=service_keys(live.get("services", [])),
        tunnels=live_tunnels(live),
        peer=live.get("peer"),
        last_heartbeat=live.get("lastHeartbeat"),
        bytes_in=int(live.get("bytesIn") or 0),
        bytes_out=int(live.get("bytesOut") or 0),
        active_streams=int(live.get("activeStreams") or 0),
        pin=live.get("pin"),
    )
