"""Who holds which public port and hostname on the relay's Service, across relay restarts.

The relay forgets every claim when it restarts, and would then hand a port or a hostname to
whichever TunnelAgent asks first; the relay's Service outlives it, so its annotations decide:

- `atlax.dev/ports`: a port one TunnelAgent has to itself, to its owner: `{"445": "ns/home-nas",
  "53/udp": "ns/home-nas"}` (a bare number is TCP, as before UDP existed).
- `atlax.dev/hostnames`: a TCP port shared by hostname, to its route and each name's owner:
  `{"443": {"route": "tls", "hostnames": {"nas.example.com": "ns/home-nas"}}}`.

Pure: the operator reads the Service, asks `Holdings.conflict` before it pushes an agent to the
relay, and writes `Holdings.claim(...)` back. A later claim on a taken port or hostname is
refused with a message that names the owner.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PORTS_ANNOTATION = "atlax.dev/ports"
HOSTNAMES_ANNOTATION = "atlax.dev/hostnames"

ServicePort = tuple[int, str]  # (port, "TCP" | "UDP"), as a Kubernetes Service names it


@dataclass(frozen=True)
class Claims:
    """What one TunnelAgent's services need: ports of their own, and names on shared ports."""

    ports: frozenset[str] = frozenset()  # "445", "53/udp"
    shared: Mapping[int, tuple[str, frozenset[str]]] = field(default_factory=dict)

    @classmethod
    def of(cls, services: Iterable[Mapping[str, Any]]) -> Claims:
        """From `spec.services` (camelCase) or the relay's live service list (same keys)."""
        ports: set[str] = set()
        shared: dict[int, tuple[str, set[str]]] = {}
        for service in services:
            port = int(service["port"])
            if service.get("route"):
                _, names = shared.setdefault(port, (str(service["route"]), set()))
                names.update(str(h) for h in service.get("hostnames", ()))
            else:
                ports.add(_port_key(port, str(service.get("protocol", "tcp"))))
        return cls(frozenset(ports), {p: (r, frozenset(n)) for p, (r, n) in shared.items()})

    def service_ports(self) -> set[ServicePort]:
        return {_service_port(key) for key in self.ports} | {(p, "TCP") for p in self.shared}


class ClaimConflictError(Exception):
    """A port or hostname another owner (or the Service itself) holds; the message names it."""

    def __init__(self, message: str, owner: str) -> None:
        super().__init__(message)
        self.owner = owner


@dataclass
class Holdings:
    """The claims written on the Service, and the ports it has of its own (not ours)."""

    ports: dict[str, str] = field(default_factory=dict)
    shared: dict[str, dict[str, Any]] = field(default_factory=dict)
    unmanaged: set[ServicePort] = field(default_factory=set)

    @classmethod
    def read(cls, annotations: Mapping[str, str], service_ports: Iterable[ServicePort]) -> Holdings:
        ports = {str(k): str(v) for k, v in _json(annotations.get(PORTS_ANNOTATION)).items()}
        shared: dict[str, dict[str, Any]] = {}
        for port, entry in _json(annotations.get(HOSTNAMES_ANNOTATION)).items():
            if isinstance(entry, dict) and isinstance(entry.get("hostnames"), dict):
                names = {str(h): str(o) for h, o in entry["hostnames"].items()}
                shared[str(port)] = {"route": str(entry.get("route")), "hostnames": names}
        holdings = cls(ports, shared)
        holdings.unmanaged = set(service_ports) - holdings.managed()
        return holdings

    def managed(self) -> set[ServicePort]:
        """The Service ports these claims need."""
        return {_service_port(k) for k in self.ports} | {
            (int(p), "TCP") for p, e in self.shared.items() if e["hostnames"]
        }

    def annotate(self, annotations: Mapping[str, str]) -> dict[str, str]:
        """`annotations` with these claims written in (the hostnames one only if any)."""
        out = {k: v for k, v in annotations.items() if k != HOSTNAMES_ANNOTATION}
        out[PORTS_ANNOTATION] = json.dumps(self.ports, sort_keys=True)
        shared = {p: e for p, e in self.shared.items() if e["hostnames"]}
        if shared:
            out[HOSTNAMES_ANNOTATION] = json.dumps(shared, sort_keys=True)
        return out

    def conflict(self, owner: str, claims: Claims) -> ClaimConflictError | None:
        """Why `owner` cannot have `claims` beside what others hold, or None."""
        for key in sorted(claims.ports):
            holder = self.ports.get(key)
            if holder is not None and holder != owner:
                return _taken(f"port {key}", holder)
            port, protocol = _service_port(key)
            others = self._sharers(port, owner) if protocol == "TCP" else []
            if others:
                return _taken(f"port {key}", others[0])
            if (port, protocol) in self.unmanaged:
                return _taken(f"port {key}", f"(the Service's own port {key})")
        for port, (route, names) in sorted(claims.shared.items()):
            holder = self.ports.get(str(port))
            if holder is not None and holder != owner:
                return _taken(f"port {port}", holder)
            if (port, "TCP") in self.unmanaged:
                return _taken(f"port {port}", f"(the Service's own port {port})")
            entry = self.shared.get(str(port))
            others = self._sharers(port, owner)
            if entry is not None and others and entry["route"] != route:
                return ClaimConflictError(
                    f"port {port} routes by {entry['route']!r} (TunnelAgent {others[0]}), "
                    f"not {route!r}",
                    others[0],
                )
            for name in sorted(names):
                holder = (entry or {}).get("hostnames", {}).get(name)
                if holder is not None and holder != owner:
                    return _taken(f"hostname {name!r} on port {port}", holder)
        return None

    def claim(self, owner: str, claims: Claims) -> Holdings:
        """These holdings with `owner`'s replaced by `claims` (check `conflict` first)."""
        out = self.release(owner)
        out.ports.update({key: owner for key in claims.ports})
        for port, (route, names) in claims.shared.items():
            entry = out.shared.setdefault(str(port), {"route": route, "hostnames": {}})
            entry["route"] = route
            entry["hostnames"].update({name: owner for name in names})
        return out

    def release(self, owner: str) -> Holdings:
        """These holdings without anything of `owner`'s."""
        shared = {
            port: {
                "route": entry["route"],
                "hostnames": {h: o for h, o in entry["hostnames"].items() if o != owner},
            }
            for port, entry in self.shared.items()
        }
        return Holdings(
            {k: o for k, o in self.ports.items() if o != owner},
            {p: e for p, e in shared.items() if e["hostnames"]},
            set(self.unmanaged),
        )

    def _sharers(self, port: int, owner: str) -> list[str]:
        entry = self.shared.get(str(port))
        names = entry["hostnames"] if entry else {}
        return sorted({o for o in names.values() if o != owner})


def _taken(what: str, owner: str) -> ClaimConflictError:
    return ClaimConflictError(f"{what} is already used by TunnelAgent {owner}", owner)


def _port_key(port: int, protocol: str) -> str:
    return str(port) if protocol == "tcp" else f"{port}/{protocol}"


def _service_port(key: str) -> ServicePort:
    port, _, protocol = key.partition("/")
    return int(port), (protocol or "tcp").upper()


def _json(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
