"""Network addresses as users write them: HOST:PORT, and a service's target HOST:PORT[/udp]."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BeforeValidator


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(
    text: str, *, default_port: int | None = None, allow_zero: bool = False
) -> HostPort:
    """'host:port', '1.2.3.4:5', '[::1]:80' (or a bare host with `default_port`)."""
    text = text.strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]\s]+)(?::(\d+))?", text)
    if not match:
        raise ValueError(f"{text!r} is not HOST:PORT (use [addr]:port for IPv6)")
    host = match.group(1) or match.group(3)
    port_text = match.group(2) or match.group(4)
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r} has no port (expected HOST:PORT)")
        return HostPort(host, default_port)
    port = int(port_text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"{text!r}: port must be between {0 if allow_zero else 1} and 65535")
    return HostPort(host, port)


def _host_port(value: Any) -> Any:
    if isinstance(value, str):
        return parse_host_port(value)
    if not isinstance(value, HostPort):
        raise ValueError('expected a string like "HOST:PORT"')
    return value


HostPortField = Annotated[HostPort, BeforeValidator(_host_port)]


class ServiceTarget(NamedTuple):
    """Where the agent sends a service's streams: HOST:PORT, or HOST:PORT/udp for UDP flows."""

    host: str
    port: int
    protocol: Literal["tcp", "udp"] = "tcp"

    def __str__(self) -> str:
        address = str(HostPort(self.host, self.port))
        return address if self.protocol == "tcp" else f"{address}/{self.protocol}"


def parse_service_target(text: str) -> ServiceTarget:
    """'127.0.0.1:53/udp', '[::1]:8080', 'nas.lan:445/tcp'."""
    address, slash, protocol = text.strip().rpartition("/")
    if not slash:
        address, protocol = text, "tcp"
    if protocol not in ("tcp", "udp"):
        raise ValueError(f"{text!r}: the protocol after '/' must be tcp or udp")
    host, port = parse_host_port(address)
    return ServiceTarget(host, port, "udp" if protocol == "udp" else "tcp")


def _service_target(value: Any) -> Any:
    if isinstance(value, str):
        return parse_service_target(value)
    if not isinstance(value, ServiceTarget):
        raise ValueError('expected a string like "HOST:PORT" or "HOST:PORT/udp"')
    return value


ServiceTargetField = Annotated[ServiceTarget, BeforeValidator(_service_target)]
