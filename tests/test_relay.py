"""The relay's rooms one by one: agent admission (ALPN), the refusal policy, the registry.

The labels and log lines users alert on are read from the docs, so docs and code cannot drift.
"""

from __future__ import annotations

import re
import ssl
from ipaddress import ip_address, ip_network

import anyio
import anyio.abc
import pytest
from conftest import ROOT, Pki, free_port, relay_settings, running_relay, spec

from atlax.config import AgentSpec, ServiceSpec
from atlax.idle import IdleClock, IdleOrder
from atlax.logs import describe
from atlax.metrics import RelayMetrics
from atlax.protocol import ErrorCode, Origin
from atlax.protocol.decoder import FrameDecoder
from atlax.protocol.frames import FrameType
from atlax.relay import HandshakeFailure, Refusal, Relay
from atlax.relay.policy import limits, make_room, refusal
from atlax.relay.registry import AgentState, PortBinding

pytestmark = pytest.mark.anyio


def _documented_labels(metric: str) -> list[str]:
    row = next(
        line
        for line in (ROOT / "docs" / "metrics.md").read_text().splitlines()
        if line.startswith(f"| `{metric}`")
    )
    labels = row.split("|")[4].split(":", 1)[1]
    return re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", labels))  # not the (notes)


def test_refusal_labels_are_the_documented_ones() -> None:
    assert [r.value for r in Refusal] == _documented_labels("atlax_connections_refused_total")
    assert all(r.text and r.text != r.value for r in Refusal)


def test_handshake_failure_labels_are_the_documented_ones() -> None:
    documented = _documented_labels("atlax_handshake_failures_total")
    assert [f.value for f in HandshakeFailure] == documented


# -- the refusal policy, without sockets ---------------------------------------------------------


class _Session:
    """Stands in for a live tunnel: the policy reads only these two attributes."""

    def __init__(self, active: int = 0, can_open: bool = True) -> None:
        self.active_streams = active
        self.can_open_stream = can_open


def _binding(service: ServiceSpec, session: object | None, **agent: object) -> PortBinding:
    """A binding as the registry makes it (its cancel scope needs a running event loop)."""
    state = AgentState(
        AgentSpec.model_validate({"name": "home-nas", "services": [service], **agent})
    )
    state.session = session  # type: ignore[assignment]
    return PortBinding(state, service)


def _origin(source: str) -> Origin:
    destination = ip_address("127.0.0.1" if ip_address(source).version == 4 else "::1")
    return Origin(ip_address(source), 40000, destination, 8080)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("127.0.0.1", None),
        ("10.1.2.3", None),
        ("192.0.2.1", Refusal.SOURCE_DENIED),
        ("::ffff:10.9.9.9", None),  # a dual-stack socket's view of an IPv4 client
        ("2001:db8::1", Refusal.SOURCE_DENIED),
    ],
)
async def test_allow_lists_match_sources(pki: Pki, source: str, expected: Refusal | None) -> None:
    service = ServiceSpec(
        name="web", port=8080, allow=(ip_network("127.0.0.1/32"), ip_network("10.0.0.0/8"))
    )
    binding = _binding(service, _Session())
    assert refusal(binding, _origin(source), relay_settings(pki)) is expected


async def test_the_first_reason_that_applies_is_the_reason(pki: Pki) -> None:
    settings = relay_settings(pki, max_connections_per_source=1, max_streams_per_agent=5)
    service = ServiceSpec(name="web", port=8080, max_connections=2)
    origin = _origin("127.0.0.1")
    assert refusal(_binding(service, None), origin, settings) is Refusal.AGENT_OFFLINE
    draining = _Session(can_open=False)  # after GOAWAY: no new streams
    assert refusal(_binding(service, draining), origin, settings) is Refusal.AGENT_OFFLINE
    busy_source = _binding(service, _Session())
    busy_source.by_source[origin.source] = 1
    assert refusal(busy_source, origin, settings) is Refusal.SOURCE_LIMIT  # never evicts
    assert refusal(busy_source, _origin("127.0.0.2"), settings) is None


async def test_a_full_scope_makes_room_by_its_idlest_connection_or_refuses(pki: Pki) -> None:
    """Port, then agent, then relay: at a limit the connection idle the longest in that scope
    goes (if it has been idle EVICT_AFTER_IDLE_TICKS), else the newcomer is refused."""
    settings = relay_settings(pki, max_streams_per_agent=4, max_public_connections=6)
    clock = IdleClock()
    everyone: IdleOrder[str] = IdleOrder(clock)
    binding = _binding(ServiceSpec(name="web", port=8080, max_connections=2), _Session())
    binding.idle, binding.state.idle = IdleOrder(clock), IdleOrder(clock)
    evicted: list[tuple[str, int, Refusal]] = []

    def connect(name: str, *orders: IdleOrder[str]) -> None:
        for order in orders:
            order.add(name)

    def evict(victim: str, idle: int, reason: Refusal) -> None:
        evicted.append((victim, idle, reason))
        for order in (binding.idle, binding.state.idle, everyone):
            order.discard(victim)

    def decide() -> Refusal | None:
        return make_room(limits(binding, settings, everyone), evict)

    for name in ("a", "b"):  # this port: 2 of 2
        connect(name, binding.idle, binding.state.idle, everyone)
    assert decide() is Refusal.PORT_LIMIT  # both moved bytes just now
    clock.advance()
    clock.advance()
    for order in (binding.idle, binding.state.idle, everyone):
        order.touch("a")  # a is busy: b is the idlest
    assert decide() is None and evicted == [("b", 2, Refusal.PORT_LIMIT)]
    connect("b2", binding.idle, binding.state.idle, everyone)  # the newcomer
    binding.service = ServiceSpec(name="web", port=8080)  # no port limit: the agent's next
    for name in ("c", "d"):  # another port of the agent: 4 of 4
        connect(name, binding.state.idle, everyone)
    assert decide() is Refusal.AGENT_LIMIT  # c and d are fresh, a and b2 busy
    clock.advance()
    clock.advance()
    evicted.clear()
    assert decide() is None and evicted == [("a", 2, Refusal.AGENT_LIMIT)]
    for name in ("x", "y", "z"):  # other agents: the relay at 6 of 6
        connect(name, everyone)
    for name in ("b2", "c", "d"):
        for order in (binding.idle, binding.state.idle, everyone):
            order.touch(name)
    settings = relay_settings(pki, max_streams_per_agent=10, max_public_connections=6)
    assert decide() is Refusal.RELAY_LIMIT  # all six moved bytes just now
    clock.advance()
    clock.advance()
    everyone.touch("x")
    evicted.clear()
    assert decide() is None and evicted == [("y", 2, Refusal.RELAY_LIMIT)]


# -- admission -----------------------------------------------------------------------------------


async def test_an_agent_without_alpn_gets_the_documented_refusal(
    pki: Pki, caplog_info: pytest.LogCaptureFixture
) -> None:
    """docs/protocol.md quotes the log line, the GOAWAY and the metric; all three happen."""
    doc = (ROOT / "docs" / "protocol.md").read_text()
    documented = re.search(r"logs\s+`(agent port: [^`]+)`", doc)
    assert documented is not None, "docs/protocol.md no longer quotes the ALPN log line"
    settings = relay_settings(pki)
    metrics = RelayMetrics()
    relay = Relay(settings, [spec("office", files=free_port())], observer=metrics)
    ctx = ssl.create_default_context(cafile=str(pki.ca))  # offers no ALPN at all
    ctx.load_cert_chain(*pki.agent("office"))
    async with running_relay(relay):
        async with await anyio.connect_tcp(
            "127.0.0.1",
            settings.listen.port,
            ssl_context=ctx,
            tls_hostname="localhost",
            tls_standard_compatible=False,
        ) as tls:
            host, port = tls.extra(anyio.abc.SocketAttribute.local_address)[:2]
            received = b""
            with anyio.fail_after(5):
                try:
                    while True:
                        received += await tls.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
        assert relay.registry.agent("office")["connected"] is False  # type: ignore[index]
    goaway = [f for f in FrameDecoder(1 << 20).feed(received) if f.type is FrameType.GOAWAY]
    assert goaway, "refused without a GOAWAY"
    assert int.from_bytes(goaway[0].payload[4:8], "big") == ErrorCode.PROTOCOL_ERROR
    assert goaway[0].payload[8:] == b"ALPN atlax/1 required"
    line = documented.group(1).replace("NAME", "office").replace("ADDRESS", f"{host}:{port}")
    assert line in caplog_info.text
    assert (
        metrics.registry.get_sample_value("atlax_handshake_failures_total", {"reason": "alpn"}) == 1
    )


# -- one line per failure ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (ConnectionResetError(), "connection closed during the handshake"),
        (ConnectionResetError(104, "Connection reset by peer"), "Connection reset by peer"),
        (ConnectionRefusedError(111, "Connection refused"), "Connection refused"),
        (EOFError(), "connection closed during the handshake"),
        (TimeoutError(), "timed out"),
        (ssl.SSLError(1, "[SSL] PEER_DID_NOT_RETURN_A_CERTIFICATE"), "TLS error: "),
        (ValueError("bad\nsecond line"), "bad"),
        (RuntimeError(), "RuntimeError"),
        (
            ExceptionGroup("two", [OSError(113, "No route to host"), TimeoutError()]),
            "No route to host; timed out",
        ),
    ],
)
def test_describe_gives_one_line(exc: BaseException, text: str) -> None:
    got = describe(exc, peer="client", during="during the handshake")
    assert got.startswith(text) and "\n" not in got


def test_describe_names_whose_certificate_was_rejected() -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "certificate has expired"
    assert describe(exc, peer="relay") == "relay certificate rejected: certificate has expired"
