"""UDP through the tunnel with real parts: dig asking dnsmasq, a hashed datagram echo with loss
counted, idle flows ending, and floods from many source ports refused before any agent."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import pytest
from conftest import (
    Pki,
    agent_settings,
    relay_settings,
    running_agent,
    running_relay,
    wait_for,
    wait_until,
)

from atlax.addresses import ServiceTarget
from atlax.agent import Agent
from atlax.agent import tunnel as agent_tunnel
from atlax.config import AgentSpec, ServiceSpec
from atlax.protocol import Settings
from atlax.relay_main import RelayMain

pytestmark = pytest.mark.anyio

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def dnsmasq(tmp_path: Path) -> Iterator[int]:
    """A real DNS server on 127.0.0.1 that knows one name and forwards nothing. A free port can
    be taken by someone else before dnsmasq binds it (the machine is shared): then another one."""
    assert os.path.exists(DNSMASQ), "dnsmasq is missing: run hack/test-deps (make test does)"
    for _ in range(5):
        port = free_udp_port()
        proc = subprocess.Popen(
            [
                DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", f"--port={port}",
                "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                "--pid-file=", "--address=/nas.example.com/192.0.2.10", "--log-facility=-",
            ],
            stdout=(tmp_path / "dnsmasq.log").open("w"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(
                lambda p=proc, n=port: p.poll() is not None or _dig(n, timeout=1) == "192.0.2.10",  # type: ignore[misc]
                20,
                "dnsmasq to answer",
            )
            if proc.poll() is None:
                yield port
                return
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
    raise AssertionError(f"dnsmasq did not start: {(tmp_path / 'dnsmasq.log').read_text()}")


def _dig(port: int, name: str = "nas.example.com", timeout: int = 3) -> str:
    result = subprocess.run(
        ["dig", "+short", f"+time={timeout}", "+tries=2", "-p", str(port), "@127.0.0.1", name, "A"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout.strip()


class EchoService:
    """A UDP echo service on 127.0.0.1; counts datagrams and the addresses they came from."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self.datagrams = 0
        self.sources: set[tuple[str, int]] = set()

    async def serve(self) -> None:
        while True:
            await anyio.wait_readable(self.sock)
            while True:
                try:
                    data, addr = self.sock.recvfrom(65535)
                except BlockingIOError:
                    break
                self.datagrams += 1
                self.sources.add(addr)
                self.sock.sendto(data, addr)


@asynccontextmanager
async def udp_tunnel(
    pki: Pki, target: ServiceTarget, **service_options: object
) -> AsyncIterator[tuple[RelayMain, Agent, int]]:
    relay_options = {
        k: service_options.pop(k)
        for k in list(service_options)
        if k.startswith(("udp_", "max_connections_per"))
    }
    port = free_udp_port()
    settings = relay_settings(pki, **relay_options)
    service = ServiceSpec.model_validate(
        {"name": "dns", "port": port, "protocol": "udp", **service_options}
    )
    relay = RelayMain(settings, [AgentSpec(name="home-nas", services=(service,))])
    agent = Agent(agent_settings(pki, settings), {"dns": target})
    async with running_relay(relay), running_agent(agent):
        yield relay, agent, port


@asynccontextmanager
async def echoed_flow(
    pki: Pki, **options: object
) -> AsyncIterator[tuple[RelayMain, Agent, int, socket.socket]]:
    """A UDP echo service through the tunnel, and a client whose first datagram came back: one
    live flow."""
    echo = EchoService()
    async with anyio.create_task_group() as tg:
        tg.start_soon(echo.serve)
        target = ServiceTarget("127.0.0.1", echo.port, "udp")
        async with udp_tunnel(pki, target, **options) as (relay, agent, port):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(10)
                client.sendto(b"one", ("127.0.0.1", port))
                assert await anyio.to_thread.run_sync(client.recv, 100) == b"one"
                yield relay, agent, port, client
        tg.cancel_scope.cancel()


def value(relay: RelayMain, name: str, **labels: str) -> float:
    return relay.metrics.registry.get_sample_value(name, labels) or 0.0


def streams_total(relay: RelayMain) -> int:
    return sum(a["streamsTotal"] for a in relay.registry.agents())


async def test_dig_asks_dnsmasq_through_the_tunnel(pki: Pki, tmp_path: Path) -> None:
    with dnsmasq(tmp_path) as dns:
        async with udp_tunnel(pki, ServiceTarget("127.0.0.1", dns, "udp")) as (relay, _, port):
            for _ in range(3):
                assert await anyio.to_thread.run_sync(_dig, port) == "192.0.2.10"
            # dig uses a new source port per run: a flow each, each its own socket at the agent.
            assert streams_total(relay) == 3
            assert await anyio.to_thread.run_sync(_dig, port, "other.example.com") == ""


async def test_hashed_datagrams_come_back_intact_and_losses_are_counted(pki: Pki) -> None:
    """2,000 random datagrams of 0..1,400 bytes from one client, at most 64 in flight: every
    reply is byte for byte a datagram that was sent; what did not come back is counted."""
    echo = EchoService()
    async with anyio.create_task_group() as tg:
        tg.start_soon(echo.serve)
        async with udp_tunnel(pki, ServiceTarget("127.0.0.1", echo.port, "udp")) as (
            relay,
            _,
            port,
        ):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.bind(("127.0.0.1", 0))
            client.setblocking(False)
            sent = [os.urandom(n % 1401) for n in range(2000)]
            wanted = {hashlib.sha256(d).digest() for d in sent}
            back: list[bytes] = []
            in_flight = 0
            with client, anyio.fail_after(120):
                for datagram in sent:
                    while in_flight >= 64:
                        with anyio.move_on_after(1.0):
                            await anyio.wait_readable(client)
                        got = _drain(client)
                        if not got:
                            in_flight = 0  # a second of silence: the rest were lost
                        back += got
                        in_flight -= len(got)
                    client.sendto(datagram, ("127.0.0.1", port))
                    in_flight += 1
                with anyio.move_on_after(2.0):
                    while len(back) < len(sent):
                        await anyio.wait_readable(client)
                        back += _drain(client)
            corrupted = [d for d in back if hashlib.sha256(d).digest() not in wanted]
            lost = len(sent) - len(back)
            print(f"UDP echo through the tunnel: {len(back)} of {len(sent)} back, {lost} lost")
            assert corrupted == [] and lost >= 0
            assert len(back) >= 0.95 * len(sent)  # loopback: losses are rare, and counted
            assert streams_total(relay) == 1 and echo.sources and len(echo.sources) == 1
        tg.cancel_scope.cancel()


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65535))
        except BlockingIOError:
            return out


async def test_idle_flows_end_and_come_back(pki: Pki) -> None:
    async with echoed_flow(pki, udp_idle_timeout=0.5) as (relay, agent, port, client):
        binding = relay.registry.binding(port, "udp")
        assert binding is not None
        await wait_until(lambda: binding.connections == 0, 10, "the idle flow to end")
        session = agent.session
        assert session is not None  # the RESET reaches the agent, which closes its socket
        await wait_until(lambda: session.active_streams == 0, 10, "the agent's flow to end")
        client.sendto(b"two", ("127.0.0.1", port))  # the same client: a new flow
        assert await anyio.to_thread.run_sync(client.recv, 100) == b"two"
        assert streams_total(relay) == 2


async def test_a_flood_from_many_source_ports_is_refused_before_the_agent(pki: Pki) -> None:
    """200 source ports from an address the allow list does not name reach nothing; 200 from an
    allowed address get at most max_connections_per_source flows; a real client still gets
    answers throughout."""
    echo = EchoService()
    async with anyio.create_task_group() as tg:
        tg.start_soon(echo.serve)
        target = ServiceTarget("127.0.0.1", echo.port, "udp")
        async with udp_tunnel(
            pki, target, allow=["127.0.0.1/32", "127.0.0.3/32"], max_connections_per_source=10
        ) as (relay, _, port):

            def flood(source: str) -> None:
                socks = []
                for _ in range(200):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.bind((source, 0))
                    s.sendto(b"flood", ("127.0.0.1", port))
                    socks.append(s)
                for s in socks:
                    s.close()

            await anyio.to_thread.run_sync(flood, "127.0.0.2")
            await wait_until(
                lambda: (
                    value(
                        relay,
                        "atlax_connections_refused_total",
                        port=str(port),
                        reason="source_denied",
                    )
                    == 200
                ),
                10,
                "200 refusals",
            )
            assert echo.datagrams == 0 and streams_total(relay) == 0  # nothing reached the agent

            await anyio.to_thread.run_sync(flood, "127.0.0.3")
            # The relay reads the 200 datagrams in its own time: wait for all of them.
            await wait_until(
                lambda: (
                    value(
                        relay,
                        "atlax_connections_refused_total",
                        port=str(port),
                        reason="source_limit",
                    )
                    == 190
                ),
                10,
                "190 refusals",
            )
            await wait_until(lambda: echo.datagrams == 10, 10, "the ten flows' datagrams")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(10)
                client.sendto(b"real", ("127.0.0.1", port))
                assert await anyio.to_thread.run_sync(client.recv, 100) == b"real"
            assert streams_total(relay) == 11
        tg.cancel_scope.cancel()


async def test_an_agent_without_the_udp_service_resets_the_flow(
    pki: Pki, caplog_info: pytest.LogCaptureFixture
) -> None:
    """The agent decides what it exposes: a UDP service it maps as TCP is refused."""
    async with udp_tunnel(pki, ServiceTarget("127.0.0.1", 9, "tcp")) as (relay, agent, port):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"hello?", ("127.0.0.1", port))
            binding = relay.registry.binding(port, "udp")
            assert binding is not None
            await wait_until(lambda: streams_total(relay) == 1 and binding.connections == 0, 10)
    assert "relay asked for a UDP flow to TCP service 'dns'; refusing" in caplog_info.text


async def test_an_agent_from_before_udp_gets_no_flows(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent whose SETTINGS do not say DATAGRAMS (every agent before UDP) is never sent a
    datagram stream: the relay refuses the flow, and says why."""
    old = Settings(initial_window=1 << 20, max_frame_size=256 * 1024, max_streams=16384)
    monkeypatch.setattr(agent_tunnel, "TUNNEL_SETTINGS", old)  # where the agent dials
    async with udp_tunnel(pki, ServiceTarget("127.0.0.1", 9, "udp")) as (relay, _, port):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"hello?", ("127.0.0.1", port))
            await wait_until(
                lambda: (
                    value(
                        relay,
                        "atlax_connections_refused_total",
                        port=str(port),
                        reason="agent_no_udp",
                    )
                    == 1
                ),
                10,
            )
        assert streams_total(relay) == 0


def test_drop_labels_are_the_documented_ones() -> None:
    from atlax.relay import DatagramDrop

    row = next(
        line
        for line in (Path(__file__).parent.parent / "docs" / "metrics.md").read_text().splitlines()
        if line.startswith("| `atlax_udp_datagrams_dropped_total`")
    )
    documented = row.split("|")[4].split(":", 1)[1].split(".")[0]
    assert [d.value for d in DatagramDrop] == [
        label for label in ("tunnel_full", "socket_full") if f"`{label}`" in documented
    ]


async def test_removing_the_agent_closes_its_udp_port_and_flows(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with echoed_flow(pki) as (relay, agent, port, client):
        public = relay.registry.port(port, "udp")
        assert public is not None
        assert await relay.registry.remove_agent("home-nas")
        assert relay.registry.port(port, "udp") is None
        await wait_until(lambda: all(s.fileno() == -1 for s in public.listeners), 10)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(("127.0.0.1", port))  # the port is free again
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_a_draining_relay_ends_its_udp_flows_instead_of_waiting_for_them(pki: Pki) -> None:
    """SIGTERM closes a UDP port's socket: its flows can neither receive nor answer any more, so
    they end at once (the agent closes its sockets) and the drain is over when the TCP streams
    are. It waited for them until drain_timeout: every relay that had answered a DNS query in the
    last minute took the whole drain_timeout to stop."""
    async with echoed_flow(pki, udp_idle_timeout=600.0) as (relay, agent, port, client):
        session = agent.session
        assert session is not None and session.active_streams == 1
        with anyio.fail_after(120):  # far below the grace: the drain did not wait it out
            await relay.shutdown(grace=600.0)
        await wait_until(lambda: session.active_streams == 0, 10, "the agent's flow to end")
