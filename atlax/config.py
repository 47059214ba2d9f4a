"""The relay and agent configuration files (TOML), validated with pydantic.

Paths inside a file are relative to that file. Every validation problem reaches the user as one
line naming the file, the key and what is wrong.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .addresses import HostPortField, ServiceTarget, ServiceTargetField, parse_service_target
from .pins import FORMAT as PIN_FORMAT
from .pins import PinError, parse_pin
from .protocol import names
from .sniff.hostnames import InvalidHostnameError, parse_pattern

# Public ports (services) one agent may have; each is a listening socket at the relay.
MAX_SERVICES = 256
# Keys one agent may be pinned to at once (current, previous during a renewal, spares).
MAX_PINS = 16


class ConfigError(Exception):
    """A configuration problem, as one line naming the file and key."""


AgentName = Annotated[str, AfterValidator(names.check_agent_name)]
ServiceName = Annotated[str, AfterValidator(names.check_service_name)]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServiceSpec(_Model):
    """A public port on the relay, forwarded to the agent's service of the same name.

    With `route` and `hostnames` several services (of several agents) share one TCP port and
    each client goes to the service that serves the name it asked for (docs/routing.md).
    """

    name: ServiceName
    port: int = Field(strict=True, ge=1, le=65535)
    protocol: Literal["tcp", "udp"] = "tcp"
    route: Literal["tls", "http"] | None = None
    hostnames: tuple[str, ...] = ()
    proxy_protocol: Literal["v2"] | None = None
    allow: tuple[Network, ...] = ()
    max_connections: int | None = Field(strict=True, default=None, ge=1)

    @field_validator("hostnames")
    @classmethod
    def _hostnames(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out: list[str] = []
        for text in value:
            try:
                name = parse_pattern(text)
            except InvalidHostnameError as exc:
                raise ValueError(str(exc)) from None
            if name in out:
                raise ValueError(f"hostname {text!r} appears twice")
            out.append(name)
        return tuple(out)

    @model_validator(mode="after")
    def _routing(self) -> ServiceSpec:
        if self.protocol == "udp":
            if self.route is not None or self.hostnames:
                raise ValueError("a UDP service cannot be routed by hostname (route, hostnames)")
            if self.proxy_protocol is not None:
                raise ValueError("proxy_protocol is for TCP services")
        elif self.route is not None and not self.hostnames:
            raise ValueError(f'route = "{self.route}" needs the hostnames it serves')
        elif self.hostnames and self.route is None:
            raise ValueError('hostnames need route = "tls" or route = "http"')
        return self

    @property
    def key(self) -> PortKey:
        """The public port it listens on: the same number is a TCP and a UDP port."""
        return PortKey(self.port, self.protocol)

    @field_validator("allow", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            out = []
            for item in value:
                try:
                    out.append(ipaddress.ip_network(item, strict=False))
                except (ValueError, TypeError):
                    raise ValueError(f"{item!r} is not a CIDR range like 203.0.113.0/24") from None
            return tuple(out)
        return value


class PortKey(NamedTuple):
    port: int
    protocol: str

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol}"


def sharing_conflict(claims: Iterable[tuple[str, ServiceSpec]]) -> str | None:
    """Why services, each with the agent that owns it, cannot all have their public ports, or
    None. Services share a port only if every one of them routes by hostname, with the same
    route, and no hostname (or wildcard) is claimed twice."""
    users: dict[PortKey, list[tuple[str, ServiceSpec]]] = {}
    for agent, service in claims:
        users.setdefault(service.key, []).append((agent, service))
    for key, sharing in sorted(users.items()):
        if len(sharing) < 2:
            continue
        first, second = sharing[0], sharing[1]
        if any(service.route is None for _, service in sharing):
            return (
                f"port {key} is used by {_who(*first)} and {_who(*second)} "
                "(a shared port needs route and hostnames on every service)"
            )
        routes = sorted({str(service.route) for _, service in sharing})
        if len(routes) > 1:
            return f"port {key} mixes route {' and '.join(repr(r) for r in routes)}"
        owners: dict[str, tuple[str, ServiceSpec]] = {}
        for agent, service in sharing:
            for hostname in service.hostnames:
                owner = owners.setdefault(hostname, (agent, service))
                if owner != (agent, service):
                    return (
                        f"hostname {hostname!r} on port {key} is claimed by "
                        f"{_who(*owner)} and {_who(agent, service)}"
                    )
    return None


def _who(agent: str, service: ServiceSpec) -> str:
    return f"agent {agent!r} (service {service.name!r})"


class AgentSpec(_Model):
    name: AgentName
    services: tuple[ServiceSpec, ...]
    max_streams: int | None = Field(strict=True, default=None, ge=1)
    # Keys the agent may present (atlax.pins); empty: any certificate of the CA with this name.
    pins: tuple[str, ...] = ()

    @field_validator("services", mode="before")
    @classmethod
    def _few_enough(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and len(value) > MAX_SERVICES:
            raise ValueError(f"at most {MAX_SERVICES} services per agent ({len(value)} given)")
        return value

    @field_validator("pins", mode="before")
    @classmethod
    def _pins(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise ValueError(f"must be a list of key pins like {PIN_FORMAT}")
        if len(value) > MAX_PINS:
            raise ValueError(f"at most {MAX_PINS} pins per agent ({len(value)} given)")
        try:
            return tuple(dict.fromkeys(parse_pin(pin) for pin in value))
        except PinError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _unique(self) -> AgentSpec:
        seen: set[str] = set()
        for service in self.services:
            if service.name in seen:
                raise ValueError(f"service name {service.name!r} appears twice")
            seen.add(service.name)
        conflict = sharing_conflict((self.name, service) for service in self.services)
        if conflict is not None:
            raise ValueError(conflict)
        return self


class _Keepalive(_Model):
    keepalive_interval: float = Field(strict=True, default=10.0, gt=0)
    keepalive_timeout: float = Field(strict=True, default=30.0, gt=0)

    @model_validator(mode="after")
    def _keepalive_order(self) -> _Keepalive:
        if self.keepalive_timeout <= self.keepalive_interval:
            raise ValueError("keepalive_timeout must be greater than keepalive_interval")
        return self


class RelaySettings(_Keepalive):
    listen: HostPortField
    ca: Path
    cert: Path
    key: Path
    control_socket: Path | None = None
    public_host: str = "0.0.0.0"
    metrics: HostPortField | None = None
    handshake_timeout: float = Field(strict=True, default=10.0, gt=0)
    # For a shared port's ClientHello or Host; a UDP flow without datagrams for this long ends.
    route_timeout: float = Field(strict=True, default=5.0, gt=0)
    udp_idle_timeout: float = Field(strict=True, default=60.0, gt=0)
    max_handshakes: int = Field(strict=True, default=256, ge=1)
    max_handshakes_per_source: int = Field(strict=True, default=16, ge=1)
    max_agents: int = Field(strict=True, default=1000, ge=1)
    max_streams_per_agent: int = Field(strict=True, default=16384, ge=1)
    max_connections_per_port: int = Field(strict=True, default=16384, ge=1)
    max_public_connections: int = Field(strict=True, default=65536, ge=1)
    max_buffered_bytes: int = Field(strict=True, default=256 << 20, ge=1 << 20)
    max_connections_per_source: int = Field(strict=True, default=256, ge=1)
    drain_timeout: float = Field(strict=True, default=30.0, ge=0)
    # High availability (docs/high-availability.md): worker processes sharing the ports, relays
    # behind one load balancer, and how long a public connection waits for its agent's tunnel
    # on an instance that has none yet.
    workers: int = Field(strict=True, default=1, ge=1, le=64)
    replicas: int = Field(strict=True, default=1, ge=1, le=4096)
    agent_wait: float = Field(strict=True, default=3.0, ge=0)


class RelayConfig(_Model):
    relay: RelaySettings
    agents: tuple[AgentSpec, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> RelayConfig:
        names: set[str] = set()
        for agent in self.agents:
            if agent.name in names:
                raise ValueError(f"agent {agent.name!r} appears twice")
            names.add(agent.name)
        conflict = sharing_conflict((a.name, s) for a in self.agents for s in a.services)
        if conflict is not None:
            raise ValueError(conflict)
        return self


class AgentSettings(_Keepalive):
    relay: HostPortField
    ca: Path
    cert: Path
    key: Path
    server_name: str | None = None
    backoff_initial: float = Field(strict=True, default=0.5, gt=0)
    backoff_cap: float = Field(strict=True, default=30.0, gt=0)
    connect_timeout: float = Field(strict=True, default=3.0, gt=0)  # TCP connect and TLS handshake
    # Connecting to a local service, its name resolved too: longer than the relay's, since a
    # lost DNS packet costs glibc's 5 s retry and nothing else can serve that stream.
    service_connect_timeout: float = Field(strict=True, default=10.0, gt=0)
    # Look for new relay instances this often; tunnels to distinct instances at most.
    probe_interval: float = Field(strict=True, default=30.0, gt=0)
    max_tunnels: int = Field(strict=True, default=16, ge=1, le=1024)
    # How often the certificate files are checked for a renewal, and how long a tunnel replaced
    # by a renewal may finish its open streams.
    cert_check_interval: float = Field(strict=True, default=30.0, gt=0)
    drain_timeout: float = Field(strict=True, default=30.0, ge=0)

    @model_validator(mode="after")
    def _backoff_order(self) -> AgentSettings:
        if self.backoff_cap < self.backoff_initial:
            raise ValueError("backoff_cap must not be smaller than backoff_initial")
        return self


class AgentConfig(_Model):
    agent: AgentSettings
    services: dict[str, ServiceTargetField] = Field(default_factory=dict)

    @field_validator("services")
    @classmethod
    def _names(cls, value: dict[str, ServiceTarget]) -> dict[str, ServiceTarget]:
        for name in value:
            names.check_service_name(name)
        return value


# -- loading -------------------------------------------------------------------------------------


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith(("function-", "tagged-union")):
            out += f".{part}" if out else part
    return out


def _one_line(source: str, exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    where = _location(err["loc"])
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required key is missing"
    elif err["type"] == "path_type":
        message = "expected a file path (a string)"
    elif err["type"] == "string_pattern_mismatch":
        message = f"{err.get('input')!r} has characters that are not allowed"
    more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return ConfigError(f"{source}: {where + ': ' if where else ''}{message}{more}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _resolve(base: Path, table: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out = dict(table)
    for key in keys:
        value = out.get(key)
        if isinstance(value, str):
            out[key] = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
    return out


def load_relay_config(path: Path) -> RelayConfig:
    data = _read_toml(path)
    relay = data.get("relay")
    if isinstance(relay, dict):
        data["relay"] = _resolve(path.parent, relay, ("ca", "cert", "key", "control_socket"))
    try:
        return RelayConfig.model_validate(data)
    except ValidationError as exc:
        raise _one_line(path.name, exc) from None


def load_agent_config(path: Path) -> AgentConfig:
    data = _read_toml(path)
    agent = data.get("agent")
    if isinstance(agent, dict):
        data["agent"] = _resolve(path.parent, agent, ("ca", "cert", "key"))
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise _one_line(path.name, exc) from None


def parse_agent_spec(data: object, *, source: str) -> AgentSpec:
    try:
        return AgentSpec.model_validate(data)
    except ValidationError as exc:
        raise _one_line(source, exc) from None


def parse_service_mapping(text: str) -> tuple[str, ServiceTarget]:
    """'web=127.0.0.1:8080' or 'dns=127.0.0.1:53/udp' for the agent's --service flag."""
    name, sep, target = text.partition("=")
    if not sep:
        raise ValueError(f"--service {text!r}: expected NAME=HOST:PORT or NAME=HOST:PORT/udp")
    if not names.is_service_name(name):
        raise ValueError(f"--service {text!r}: NAME must be {names.SERVICE_RULE}")
    try:
        return name, parse_service_target(target)
    except ValueError as exc:
        raise ValueError(f"--service {text!r}: {exc}") from None
