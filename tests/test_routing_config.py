"""relay.toml's routing keys: route, hostnames, protocol; who may share a port; one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from atlax.addresses import ServiceTarget
from atlax.config import (
    AgentSpec,
    ConfigError,
    ServiceSpec,
    load_agent_config,
    load_relay_config,
    parse_agent_spec,
    parse_service_mapping,
    sharing_conflict,
)


def service(name: str, port: int = 443, **keys: object) -> ServiceSpec:
    return ServiceSpec.model_validate({"name": name, "port": port, **keys})


def tls(name: str, *hostnames: str, port: int = 443) -> ServiceSpec:
    return service(name, port, route="tls", hostnames=list(hostnames))


def test_defaults_are_a_tcp_port_of_its_own() -> None:
    web = service("web", 8080)
    assert (web.protocol, web.route, web.hostnames) == ("tcp", None, ())
    assert str(web.key) == "8080/tcp" and str(service("dns", 53, protocol="udp").key) == "53/udp"


def test_hostnames_are_kept_in_table_form() -> None:
    nas = tls("nas", "NAS.Example.com.", "*.Home.Example.com", "bücher.example")
    assert nas.hostnames == ("nas.example.com", "*.home.example.com", "xn--bcher-kva.example")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"route": "tls"}, 'route = "tls" needs the hostnames it serves'),
        ({"hostnames": ["a.example"]}, 'hostnames need route = "tls" or route = "http"'),
        ({"route": "ssh", "hostnames": ["a.example"]}, "route"),
        ({"protocol": "sctp"}, "protocol"),
        ({"protocol": "udp", "route": "tls", "hostnames": ["a.example"]}, "cannot be routed"),
        ({"protocol": "udp", "proxy_protocol": "v2"}, "proxy_protocol is for TCP services"),
        ({"route": "tls", "hostnames": ["a.example", "A.example."]}, "appears twice"),
        ({"route": "tls", "hostnames": ["a.*.example"]}, "only allowed as the whole first label"),
        ({"route": "http", "hostnames": ["192.0.2.1"]}, "IP address"),
    ],
)
def test_bad_routing_keys(keys: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")) as info:
        parse_agent_spec({"name": "a", "services": [{"name": "s", "port": 1, **keys}]}, source="x")
    assert "\n" not in str(info.value)


def test_who_may_share_a_port() -> None:
    nas, photos = tls("nas", "nas.example.com"), tls("photos", "*.photos.example.com")
    assert sharing_conflict([("a", nas), ("b", photos)]) is None
    assert sharing_conflict([("a", nas), ("a", photos)]) is None  # one agent, two names
    # The same number as UDP is another port.
    assert (
        sharing_conflict([("a", service("web", 443)), ("b", service("q", 443, protocol="udp"))])
        is None
    )
    assert sharing_conflict([("a", service("web", 443)), ("b", nas)]) == (
        "port 443/tcp is used by agent 'a' (service 'web') and agent 'b' (service 'nas') "
        "(a shared port needs route and hostnames on every service)"
    )
    http = service("site", 443, route="http", hostnames=["site.example.com"])
    assert (
        sharing_conflict([("a", nas), ("b", http)]) == "port 443/tcp mixes route 'http' and 'tls'"
    )
    again = tls("nas2", "nas.example.com")
    assert sharing_conflict([("a", nas), ("b", again)]) == (
        "hostname 'nas.example.com' on port 443/tcp is claimed by agent 'a' (service 'nas') "
        "and agent 'b' (service 'nas2')"
    )


def test_an_agent_may_not_claim_a_port_twice_without_routes() -> None:
    with pytest.raises(ConfigError, match="port 80/tcp is used by agent 'a'"):
        parse_agent_spec(
            {"name": "a", "services": [{"name": "x", "port": 80}, {"name": "y", "port": 80}]},
            source="PUT",
        )
    spec = AgentSpec(
        name="a", services=(service("dns", 53, protocol="udp"), service("dns-tcp", 53))
    )
    assert [str(s.key) for s in spec.services] == ["53/udp", "53/tcp"]


def test_relay_toml(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    head = '[relay]\nlisten = "127.0.0.1:7443"\nca = "ca.crt"\ncert = "r.crt"\nkey = "r.key"\n'
    config.write_text(
        head
        + """
[[agents]]
name = "home"
services = [
  { name = "nas", port = 443, route = "tls", hostnames = ["nas.example.com"] },
  { name = "dns", port = 53, protocol = "udp", allow = ["192.0.2.0/24"] },
]
[[agents]]
name = "office"
services = [{ name = "wiki", port = 443, route = "tls", hostnames = ["*.office.example.com"] }]
"""
    )
    loaded = load_relay_config(config)
    assert [s.key for a in loaded.agents for s in a.services] == [
        (443, "tcp"),
        (53, "udp"),
        (443, "tcp"),
    ]
    config.write_text(
        head
        + """
[[agents]]
name = "home"
services = [{ name = "nas", port = 443, route = "tls", hostnames = ["nas.example.com"] }]
[[agents]]
name = "office"
services = [{ name = "nas", port = 443, route = "tls", hostnames = ["NAS.example.com"] }]
"""
    )
    with pytest.raises(ConfigError) as info:
        load_relay_config(config)
    assert str(info.value) == (
        "relay.toml: hostname 'nas.example.com' on port 443/tcp is claimed by agent 'home' "
        "(service 'nas') and agent 'office' (service 'nas')"
    )


def test_agent_toml_and_flag_name_udp_services(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        '[agent]\nrelay = "relay.example.com:7443"\nca = "ca.crt"\ncert = "a.crt"\nkey = "a.key"\n'
        '[services]\nweb = "127.0.0.1:8080"\ndns = "127.0.0.1:53/udp"\nv6 = "[::1]:5353/udp"\n'
    )
    services = load_agent_config(config).services
    assert services == {
        "web": ServiceTarget("127.0.0.1", 8080),
        "dns": ServiceTarget("127.0.0.1", 53, "udp"),
        "v6": ServiceTarget("::1", 5353, "udp"),
    }
    assert [str(t) for t in services.values()] == [
        "127.0.0.1:8080",
        "127.0.0.1:53/udp",
        "[::1]:5353/udp",
    ]
    assert parse_service_mapping("dns=127.0.0.1:53/udp") == (
        "dns",
        ServiceTarget("127.0.0.1", 53, "udp"),
    )
    assert parse_service_mapping("web=nas.lan:80/tcp") == ("web", ServiceTarget("nas.lan", 80))
    with pytest.raises(ValueError, match="the protocol after '/' must be tcp or udp"):
        parse_service_mapping("dns=127.0.0.1:53/quic")
    config.write_text(config.read_text().replace("53/udp", "53/dccp"))
    with pytest.raises(
        ConfigError, match=re.escape("services.dns: '127.0.0.1:53/dccp': the protocol")
    ):
        load_agent_config(config)
