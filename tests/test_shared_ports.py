"""The registry's shared ports: who may join a port, hostname ownership, leaving, UDP beside TCP."""

from __future__ import annotations

import pytest

from atlax.config import AgentSpec, ServiceSpec
from atlax.demo import free_port
from atlax.relay.registry import AgentRegistry, PortConflictError, PublicPort

pytestmark = pytest.mark.anyio


def agent(name: str, *services: ServiceSpec) -> AgentSpec:
    return AgentSpec(name=name, services=services)


def tls(name: str, port: int, *hostnames: str, route: str = "tls") -> ServiceSpec:
    return ServiceSpec(name=name, port=port, route=route, hostnames=hostnames)  # type: ignore[arg-type]


async def test_agents_share_a_port_by_hostname_and_leave_it() -> None:
    served: list[PublicPort] = []
    registry = AgentRegistry("127.0.0.1", served.append)
    port = free_port()
    await registry.apply_agent(agent("a", tls("nas", port, "nas.example.com")))
    await registry.apply_agent(agent("b", tls("wiki", port, "*.example.com")))
    assert len(served) == 1  # one port, served once
    public = registry.port(port)
    assert public is not None and public.route == "tls"
    nas, wiki = public.lookup("nas.example.com"), public.lookup("x.example.com")
    assert nas is not None and (nas.agent, nas.service.name) == ("a", "nas")
    assert wiki is not None and wiki.agent == "b"
    assert registry.port_owner(port) is None and registry.binding(port) is None  # shared

    nas.connections = 7  # a binding that stays keeps its counters across an update
    await registry.apply_agent(agent("a", tls("nas", port, "nas.example.com", "nas.example.org")))
    assert public.lookup("nas.example.org") is nas and nas.connections == 7

    await registry.remove_agent("a")
    assert public.lookup("nas.example.com") is wiki  # now only the wildcard serves it
    assert registry.port(port) is public and public.listeners[0].fileno() != -1
    await registry.remove_agent("b")
    assert registry.port(port) is None and public.listeners[0].fileno() == -1


@pytest.mark.parametrize(
    ("claim", "message"),
    [
        (
            tls("x", 1, "nas.example.com"),
            "hostname 'nas.example.com' on port {port} is already used by agent 'a'",
        ),
        (
            tls("x", 1, "site.example.com", route="http"),
            "port {port} routes by 'tls' (agent 'a'), not 'http'",
        ),
        (ServiceSpec(name="x", port=1), "port {port} is already used by agent 'a'"),
    ],
)
async def test_a_later_claim_is_refused_and_names_the_owner(
    claim: ServiceSpec, message: str
) -> None:
    registry = AgentRegistry("127.0.0.1", lambda public: None)
    port = free_port()
    await registry.apply_agent(agent("a", tls("nas", port, "nas.example.com")))
    later = claim.model_copy(update={"port": port})
    with pytest.raises(PortConflictError) as info:
        await registry.apply_agent(agent("b", later))
    assert str(info.value) == message.format(port=port)
    assert registry.get("b") is None  # nothing changed


async def test_a_port_of_its_own_cannot_be_shared() -> None:
    registry = AgentRegistry("127.0.0.1", lambda public: None)
    port = free_port()
    await registry.apply_agent(agent("a", ServiceSpec(name="web", port=port)))
    with pytest.raises(PortConflictError, match=f"port {port} is already used by agent 'a'"):
        await registry.apply_agent(agent("b", tls("nas", port, "nas.example.com")))


async def test_the_same_number_as_udp_is_another_port() -> None:
    registry = AgentRegistry("127.0.0.1", lambda public: None)
    port = free_port()
    await registry.apply_agent(
        agent(
            "a",
            ServiceSpec(name="dns-tcp", port=port),
            ServiceSpec(name="dns", port=port, protocol="udp"),
        )
    )
    tcp, udp = registry.port(port), registry.port(port, "udp")
    assert tcp is not None and udp is not None and tcp is not udp
    assert udp.text == f"{port}/udp" and registry.port_owner(port, "udp") == "a"
    snapshot = registry.agent("a")
    assert snapshot is not None
    assert snapshot["services"] == [
        {"name": "dns-tcp", "port": port},
        {"name": "dns", "port": port, "protocol": "udp"},
    ]
    await registry.remove_agent("a")
    assert registry.port(port) is None and registry.port(port, "udp") is None
