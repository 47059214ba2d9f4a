"""What each relay pod's sync sidecar reports, and where the controller reads it.

A sync sidecar knows its own relay only. After every pass it writes what its relay holds (which
agents, which ports, how many of its instances hold each agent's tunnel, what it refused) into
one object of its own, a Lease named after its pod: its `renewTime` and `leaseDurationSeconds`
say how fresh the report is, an annotation carries the report. The controller lists the reports
and aggregates them into each TunnelAgent's status: one small write per relay pod per heartbeat,
never every pod writing into the same TunnelAgent. A pod that dies stops renewing, and its report
is ignored once it expires (its owner reference to the pod lets the garbage collector delete it).

`atlax operator` (both roles in one process, one relay) hands its one report over in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from . import kube

log = logging.getLogger("atlax.operator")

REPORT_LABEL = "atlax.dev/relay-report"  # value: the relay Service's name
REPORT_ANNOTATION = "atlax.dev/report"

# One service as the relay holds it: name, port, protocol, route, hostnames (status.service_keys).
ServiceKey = tuple[str, int, str, str, tuple[str, ...]]


@dataclass(frozen=True)
class AgentReport:
    """One agent as one relay pod holds it."""

    ports: tuple[ServiceKey, ...] = ()  # the services open at this relay; () = not there
    tunnels: int = 0  # instances of this relay holding a live tunnel of the agent
    peer: str | None = None
    last_heartbeat: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    active_streams: int = 0
    refused: str | None = None  # a PortsReason when the relay refused the spec
    message: str = ""
    pin: str | None = None  # the key pin of a live tunnel of the agent (any instance's)


@dataclass(frozen=True)
class RelayReport:
    """One relay pod: reachable and in the desired state (`ready`), its instances, its agents."""

    pod: str
    ready: bool
    instances: int = 1  # relay instances in the pod (its workers)
    relay_id: str | None = None
    error: str | None = None  # why it is not ready
    agents: Mapping[str, AgentReport] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["agents"] = {name: asdict(a) for name, a in sorted(self.agents.items())}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RelayReport:
        data = json.loads(text)
        agents = {
            name: AgentReport(**{**a, "ports": tuple(_service_key(k) for k in a.get("ports", []))})
            for name, a in data.pop("agents", {}).items()
        }
        return cls(**data, agents=agents)

    def material(self) -> RelayReport:
        """The report without the counters that change with every byte: what makes a new
        report worth writing before the next heartbeat."""
        quiet = {
            name: AgentReport(
                a.ports, a.tunnels, a.peer, refused=a.refused, message=a.message, pin=a.pin
            )
            for name, a in self.agents.items()
        }
        return RelayReport(self.pod, self.ready, self.instances, self.relay_id, self.error, quiet)


def _service_key(item: list[Any]) -> ServiceKey:
    name, port, protocol, route, hostnames = item
    return (str(name), int(port), str(protocol), str(route), tuple(str(h) for h in hostnames))


class ReportStore(Protocol):
    async def publish(self, report: RelayReport) -> None: ...

    async def collect(self) -> list[RelayReport]:
        """The reports that are fresh now."""
        ...


class MemoryReports:
    """One relay in the same process (`atlax operator`): the report is handed over as is."""

    def __init__(self) -> None:
        self._report: RelayReport | None = None

    async def publish(self, report: RelayReport) -> None:
        self._report = report

    async def collect(self) -> list[RelayReport]:
        return [] if self._report is None else [self._report]


def report_lease_name(pod: str) -> str:
    """`atlax-report-POD`, shortened with a hash where a pod name is too long for it."""
    name = f"atlax-report-{pod}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(pod.encode()).hexdigest()[:10]
    return f"{name[:242].rstrip('-.')}-{digest}"


class LeaseReports:
    """Reports in Leases: the sync sidecar writes its own, the controller lists them all."""

    def __init__(
        self,
        namespace: str,
        service: str,
        *,
        pod: str = "",
        pod_uid: str | None = None,
        ttl: float = 30.0,
    ) -> None:
        self.namespace = namespace
        self.service = service
        self.pod = pod
        self.pod_uid = pod_uid
        self.ttl = ttl
        self._version: str | None = None  # resourceVersion of our Lease, once known
        self._exists: bool | None = None

    async def publish(self, report: RelayReport) -> None:
        name = report_lease_name(self.pod)
        for _ in range(3):
            if self._exists is None:
                lease = await kube.read_lease(self.namespace, name)
                self._exists = lease is not None
                self._version = lease.metadata.resource_version if lease is not None else None
            written = await kube.write_lease(
                self.namespace, self._body(name, report), create=not self._exists
            )
            if written is not None:
                self._exists, self._version = True, written.metadata.resource_version
                return
            self._exists = None  # changed or deleted meanwhile: read it again
        log.warning("cannot write report Lease %s/%s: it keeps changing", self.namespace, name)

    def _body(self, name: str, report: RelayReport) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
            "labels": {REPORT_LABEL: self.service, "app.kubernetes.io/managed-by": "atlax-sync"},
            "annotations": {REPORT_ANNOTATION: report.to_json()},
        }
        if self._exists and self._version is not None:
            metadata["resourceVersion"] = self._version
        if self.pod_uid:  # deleted with the pod by the garbage collector
            metadata["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Pod", "name": self.pod, "uid": self.pod_uid}
            ]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.pod,
                "leaseDurationSeconds": max(1, round(self.ttl)),
                "renewTime": now,
            },
        }

    async def collect(self) -> list[RelayReport]:
        now = datetime.now(UTC)
        reports = []
        for lease in await kube.list_leases(self.namespace, f"{REPORT_LABEL}={self.service}"):
            spec, annotations = lease.spec, lease.metadata.annotations or {}
            if spec is None or spec.renew_time is None or REPORT_ANNOTATION not in annotations:
                continue
            if spec.renew_time + timedelta(seconds=spec.lease_duration_seconds or 0) < now:
                continue  # its sync stopped reporting: the pod is gone or cut off
            try:
                reports.append(RelayReport.from_json(annotations[REPORT_ANNOTATION]))
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("ignoring report Lease %s: %s", lease.metadata.name, exc)
        return reports


class ReportCache:
    """The controller's view of the reports, listed at most once per `max_age` seconds (every
    TunnelAgent's timer asks for them)."""

    def __init__(self, store: ReportStore, max_age: float) -> None:
        self.store = store
        self.max_age = max_age
        self._at = float("-inf")
        self._reports: list[RelayReport] = []
        self._lock = asyncio.Lock()

    async def get(self, *, fresh: bool = False) -> list[RelayReport]:
        """The reports, listed anew if the last list is older than `max_age` (or `fresh`)."""
        async with self._lock:
            if fresh or time.monotonic() - self._at >= self.max_age:
                self._reports = await self.store.collect()
                self._at = time.monotonic()
            return self._reports
