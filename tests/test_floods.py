"""The abuse suite: floods against a relay process, each measured against its memory budget.

Every test runs `atlax relay` (and `atlax agent`) as processes and attacks them from outside:
idle TCP connects on the agent port, public clients that push or never read, thousands of idle
connections from a few addresses, a valid agent flooding frames the relay ignores. Each prints
one `[abuse]` line with the relay's RSS beside the budget it must stay within (run with `-s`,
or set ATLAX_ABUSE_REPORT=FILE to collect them as JSON lines).
"""

from __future__ import annotations

import os
import resource
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import Pki
from procs import (
    MIB,
    RssSampler,
    agent_process,
    agent_table,
    free_port,
    mib,
    poll,
    relay_process,
    report,
    served,
    service,
    steady,
)


@pytest.fixture(autouse=True)
def _many_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def connect_idle(port: int, sources: list[str], count: int) -> list[socket.socket]:
    """`count` TCP connections that never send, spread over `sources` (addresses in 127/8)."""
    socks = []
    for i in range(count):
        sock = socket.socket()
        sock.bind((sources[i % len(sources)], 0))
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:  # reset by the relay before connect() returned
            sock.close()
            continue
        socks.append(sock)
    return socks


def readable(sock: socket.socket, timeout: float) -> bool:
    poller = select.poll()  # not select(): descriptors above 1024
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def closed_by_peer(sock: socket.socket) -> bool:
    """The relay closed or reset this connection (readable and EOF or an error)."""
    if not readable(sock, 0):
        return False
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def sources(n: int) -> list[str]:
    return [f"127.0.0.{2 + i}" for i in range(n)]


# -- 4: unauthenticated handshakes ---------------------------------------------------------------


def test_idle_handshakes_are_capped_per_source_and_memory_is_given_back(
    pki: Pki, tmp_path: Path
) -> None:
    """4,000 idle TCP connects from 8 addresses on the agent port: the relay refuses the ones over
    its handshake caps at once instead of holding a TLS session for each until the handshake
    timeout, a real agent still gets in, and the memory is back once the attackers are gone."""
    budget = 32 * MIB  # handshake caps x the cost of one pending TLS handshake, with margin
    with (
        service("echo") as echo,
        relay_process(tmp_path, pki, agents=agent_table("home-nas", {"web": free_port()})) as relay,
        RssSampler(relay.pid) as rss,
    ):
        started = time.monotonic()
        attackers = connect_idle(relay.listen, sources(8), 4000)
        time.sleep(1.0)
        refused = sum(closed_by_peer(s) for s in attackers)
        # The next one over the caps: how long until the relay lets go of it?
        late = socket.socket()
        late.bind(("127.0.0.2", 0))
        late.connect(("127.0.0.1", relay.listen))
        t0 = time.monotonic()
        late.settimeout(30)
        try:
            late.recv(1)
        except OSError:
            pass
        time_to_refuse = time.monotonic() - t0
        late.close()
        with agent_process(tmp_path, pki, relay.listen, {"web": echo}) as agent:
            agent_in = "tunnel up to" in agent.log()
        close_all(attackers)
        flood_seconds = time.monotonic() - started
        time.sleep(heldback := 4.0)
        held = relay.rss() - rss.baseline
    report(
        "4 handshake flood (4000 idle connects, 8 sources)",
        rss_baseline_mib=mib(rss.baseline),
        rss_peak_growth_mib=mib(rss.peak - rss.baseline),
        rss_held_after_mib=mib(held),
        budget_mib=mib(budget),
        refused_at_once=refused,
        time_to_refuse_s=time_to_refuse,
        flood_s=flood_seconds,
        held_measured_after_s=heldback,
    )
    assert agent_in
    assert time_to_refuse < 2.0
    assert refused >= 3000
    assert rss.peak - rss.baseline <= budget
    assert held <= 8 * MIB


def test_a_flood_from_many_addresses_evicts_the_oldest_handshake_and_an_agent_gets_in(
    pki: Pki, tmp_path: Path
) -> None:
    """600 idle connects from 600 addresses against max_handshakes = 64: each newcomer ends
    the oldest pending handshake (counted), so the flood cannot hold the port shut: a real
    agent's handshake, which takes milliseconds, gets through."""
    extra = "max_handshakes = 64\n"
    many = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(600)]
    with (
        service("echo") as echo,
        relay_process(
            tmp_path, pki, agents=agent_table("home-nas", {"web": free_port()}), extra=extra
        ) as relay,
    ):
        attackers = connect_idle(relay.listen, many, 600)
        evictions = "atlax_handshake_failures_total"
        poll(lambda: relay.metric(evictions, reason="handshake_evicted") >= 500, 20, "evictions")
        with agent_process(tmp_path, pki, relay.listen, {"web": echo}):
            pass
        evicted = relay.metric(evictions, reason="handshake_evicted")
        close_all(attackers)
    report("4b handshake flood from 600 addresses (max_handshakes 64)", evicted=evicted)
    assert evicted >= 500


# -- 5: the tunnel's write high-water mark -------------------------------------------------------


class StalledLink:
    """A TCP forwarder between agent and relay that can stop reading from the relay, so that
    the relay's tunnel buffer fills as it would behind a slow uplink."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stalled = threading.Event()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []

    def _pump(self, src: socket.socket, dst: socket.socket, stall: bool) -> None:
        try:
            while not self._stop.is_set():
                while stall and self.stalled.is_set() and not self._stop.is_set():
                    time.sleep(0.02)
                if not readable(src, 0.1):
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                down, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            for sock in (down, up):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            self._socks += [down, up]
            threading.Thread(target=self._pump, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, True), daemon=True).start()

    @contextmanager
    def running(self) -> Iterator[StalledLink]:
        thread = threading.Thread(target=self._serve, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(5)
            self.listener.close()
            close_all(self._socks)


def test_streams_that_connect_while_the_tunnel_is_full_do_not_read(
    pki: Pki, tmp_path: Path
) -> None:
    """The agent's link stops taking data; public clients keep connecting and pushing. Every
    stream, also one that connects while the tunnel is already full, waits for the tunnel to
    drain before reading: the relay holds about the tunnel's high-water mark, not one socket read
    per new connection (the clients' bytes wait in their own sockets)."""
    budget = 16 * MIB  # the 2 MiB high-water mark, a read per reading stream, the streams' state
    web = free_port()
    relay_cfg = agent_table("home-nas", {"web": web})
    extra = "keepalive_interval = 20.0\nkeepalive_timeout = 60.0\n"
    with (
        service("echo") as echo,
        relay_process(tmp_path, pki, agents=relay_cfg, extra=extra) as relay,
        StalledLink(relay.listen).running() as link,
        agent_process(tmp_path, pki, link.port, {"web": echo}),
    ):
        assert served(web)
        link.stalled.set()  # nothing leaves the relay toward the agent from now on
        payload = os.urandom(256 * 1024)
        clients: list[socket.socket] = []
        with RssSampler(relay.pid) as rss:
            for i in range(400):
                client = socket.create_connection(
                    ("127.0.0.1", web), source_address=(sources(4)[i % 4], 0)
                )
                client.setblocking(False)
                try:
                    client.send(payload)  # as much as the socket takes now
                except BlockingIOError:
                    pass
                clients.append(client)
            rss.settle()
        growth = rss.peak - rss.baseline
        link.stalled.clear()
        close_all(clients)
        poll(lambda: served(web), 30, "the tunnel to serve again")
    report(
        "5 pushing clients behind a full tunnel (400 x 256 KiB)",
        rss_baseline_mib=mib(rss.baseline),
        rss_peak_growth_mib=mib(growth),
        budget_mib=mib(budget),
    )
    assert growth <= budget


# -- 6: clients that never read ------------------------------------------------------------------


def never_reading_clients(port: int, count: int, addresses: list[str]) -> list[socket.socket]:
    socks = []
    for i in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind((addresses[i % len(addresses)], 0))
        sock.connect(("127.0.0.1", port))
        socks.append(sock)
    return socks


def test_clients_that_never_read_stay_within_the_buffer_budget(pki: Pki, tmp_path: Path) -> None:
    """300 clients download from a service and never read: the relay buffers for each only the
    small window a stream starts with (a window grows only for a reader that keeps up), so 300
    stalled streams stay far below the relay-wide buffer budget, and a real client is served."""
    budget = 64 * MIB
    web, dl = free_port(), free_port()
    agents = agent_table("home-nas", {"web": web, "dl": dl})
    with (
        service("echo") as echo,
        service("source") as source,
        relay_process(tmp_path, pki, agents=agents) as relay,
        agent_process(tmp_path, pki, relay.listen, {"web": echo, "dl": source}),
        RssSampler(relay.pid) as rss,
    ):
        stalled = never_reading_clients(dl, 300, sources(4))
        # The service pushes; whatever the relay accepts for the clients piles up in it. Wait
        # until the relay takes no more (bytes it wrote toward the clients stop growing).
        moved = steady(
            lambda: relay.metric(
                "atlax_bytes_total", agent="home-nas", service="dl", direction="from_agent"
            ),
            quiet=3.0,
            limit=60.0,
        )
        real = served(web)
        growth = rss.peak - rss.baseline
        close_all(stalled)
    report(
        "6 clients that never read (300, 4 sources)",
        rss_baseline_mib=mib(rss.baseline),
        rss_peak_growth_mib=mib(growth),
        budget_mib=mib(budget),
        accepted_for_stalled_mib=mib(moved),
        real_client_served=real,
    )
    assert real
    assert growth <= budget


def test_over_the_buffer_budget_the_most_stalled_reader_makes_room(
    pki: Pki, tmp_path: Path
) -> None:
    """With a small relay-wide budget, stalled readers past it are reset (longest-stalled first)
    and counted; a client that reads keeps downloading at full speed."""
    budget = 8 * MIB
    dl = free_port()
    extra = f"max_buffered_bytes = {budget}\n"
    with (
        service("source") as source,
        relay_process(
            tmp_path, pki, agents=agent_table("home-nas", {"dl": dl}), extra=extra
        ) as relay,
        agent_process(tmp_path, pki, relay.listen, {"dl": source}),
        RssSampler(relay.pid) as rss,
    ):
        stalled = never_reading_clients(dl, 300, sources(4))
        rss.settle()
        with socket.create_connection(("127.0.0.1", dl), timeout=20) as reader:
            got = 0
            while got < 8 * MIB and (data := reader.recv(262144)):
                got += len(data)
        evicted = relay.metric(
            "atlax_connections_evicted_total", port=str(dl), reason="buffer_budget"
        )
        growth = rss.peak - rss.baseline
        close_all(stalled)
    report(
        "6b stalled readers over a small budget (300, budget 8 MiB)",
        rss_peak_growth_mib=mib(growth),
        budget_mib=mib(budget),
        evicted=evicted,
        reader_got_mib=mib(got),
    )
    assert got == 8 * MIB
    assert evicted > 0
    assert growth <= budget + 16 * MIB  # the budget plus the relay's own working set


# -- 7: distributed slowloris --------------------------------------------------------------------


def test_two_thousand_idle_connections_from_eight_sources_never_lock_out_a_real_client(
    pki: Pki, tmp_path: Path
) -> None:
    """With the default caps, 2,000 idle connections from 8 addresses fit (an idle connection
    costs a few KB) and a real client is served throughout."""
    budget = 32 * MIB  # 2,000 idle connections at a few KB each, with margin
    web = free_port()
    with (
        service("echo") as echo,
        relay_process(tmp_path, pki, agents=agent_table("home-nas", {"web": web})) as relay,
        agent_process(tmp_path, pki, relay.listen, {"web": echo}),
        RssSampler(relay.pid) as rss,
    ):
        idle = connect_idle(web, sources(8), 2000)
        held = steady(lambda: relay.metric("atlax_streams_open", agent="home-nas"))
        real = [served(web) for _ in range(5)]
        reset = sum(closed_by_peer(s) for s in idle)
        growth = rss.peak - rss.baseline
        close_all(idle)
    report(
        "7 idle connections (2000, 8 sources, default caps)",
        rss_peak_growth_mib=mib(growth),
        budget_mib=mib(budget),
        real_clients_served=f"{sum(real)}/5",
        idle_held=held,
        idle_reset=reset,
    )
    assert all(real)
    assert growth <= budget


def test_a_full_port_makes_room_by_closing_the_connection_idle_longest(
    pki: Pki, tmp_path: Path
) -> None:
    """A port at its max_connections: the newcomer is served and the connection idle the longest
    (no bytes either way) is closed and counted; a connection in use is kept."""
    web = free_port()
    agents = agent_table("home-nas", {"web": web}, each="max_connections = 100")
    with (
        service("echo") as echo,
        relay_process(tmp_path, pki, agents=agents) as relay,
        agent_process(tmp_path, pki, relay.listen, {"web": echo}),
    ):
        busy = socket.create_connection(("127.0.0.1", web), timeout=20)
        idle = connect_idle(web, sources(8), 99)
        poll(lambda: relay.metric("atlax_streams_open", agent="home-nas") == 100, 30, "100 open")
        time.sleep(2.5)  # a connection must be idle a moment before it is the one to go
        # `busy` keeps talking while the port fills up and overflows.
        newcomers = []
        for i in range(20):
            busy.sendall(b"ping %d" % i)
            assert busy.recv(64) == b"ping %d" % i
            newcomers.append(served(web))
        evicted = relay.metric("atlax_connections_evicted_total", port=str(web), reason="idle")
        first_idle_gone = closed_by_peer(idle[0])
        busy.sendall(b"still here")
        assert busy.recv(64) == b"still here"
        busy.close()
        close_all(idle)
    report(
        "7b full port (max_connections 100)",
        newcomers_served=f"{sum(newcomers)}/20",
        evicted=evicted,
    )
    assert all(newcomers)
    assert evicted >= 1 and first_idle_gone


# -- 8: frames the relay ignores -----------------------------------------------------------------


def raw_agent(pki: Pki, port: int, identity: str) -> ssl.SSLSocket:
    """A hand-driven agent: TLS with the agent's certificate, SETTINGS sent, SETTINGS read."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.set_alpn_protocols(["atlax/1"])
    ctx.load_cert_chain(*pki.agent(identity))
    sock = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=20), server_hostname="localhost"
    )
    sock.sendall(frame(6, 0, 0, b""))  # SETTINGS, defaults
    return sock


def frame(type_: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">IIBBH", stream_id, len(payload), type_, flags, 0) + payload


def read_frames(sock: ssl.SSLSocket, until: float) -> Iterator[tuple[int, int, int, bytes]]:
    buf = b""
    while time.monotonic() < until:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return
        if not data:
            return
        buf += data
        while len(buf) >= 12:
            stream_id, length, type_, flags, _ = struct.unpack(">IIBBH", buf[:12])
            if len(buf) < 12 + length:
                break
            yield type_, flags, stream_id, buf[12 : 12 + length]
            buf = buf[12 + length :]


def test_a_flood_of_frames_for_closed_streams_is_answered_with_enhance_your_calm(
    pki: Pki, tmp_path: Path
) -> None:
    """A valid agent resets the stream the relay opened for a client, then floods WINDOW_UPDATE
    and RESET for it (frames the relay ignores): it gets GOAWAY ENHANCE_YOUR_CALM and only its
    tunnel closes; another agent's round trips go on."""
    web, files = free_port(), free_port()
    agents = agent_table("home-nas", {"web": web}) + agent_table("office", {"files": files})
    with (
        service("echo") as echo,
        relay_process(tmp_path, pki, agents=agents) as relay,
        agent_process(tmp_path, pki, relay.listen, {"web": echo}),
    ):
        attacker = raw_agent(pki, relay.listen, "office")
        poll(lambda: relay.metric("atlax_agents_connected") == 2, 20, "both agents connected")
        client = socket.create_connection(("127.0.0.1", files), timeout=20)
        stream_id = None
        for type_, _, sid, _ in read_frames(attacker, time.monotonic() + 10):
            if type_ == 1:  # OPEN from the relay
                stream_id = sid
                break
        assert stream_id is not None
        attacker.sendall(frame(3, 0, stream_id, struct.pack(">I", 7)))  # RESET(CANCEL)
        noop = (
            frame(2, 0, stream_id, struct.pack(">I", 1))
            + frame(3, 0, stream_id, struct.pack(">I", 7))
        ) * 2048
        stop = threading.Event()
        sent = 0

        def flood() -> None:
            nonlocal sent
            deadline = time.monotonic() + 5.0
            try:
                while not stop.is_set() and time.monotonic() < deadline:
                    attacker.sendall(noop)
                    sent += 4096
            except OSError:
                return

        quiet_rtts = []
        for _ in range(5):
            t0 = time.monotonic()
            assert served(web)
            quiet_rtts.append(time.monotonic() - t0)
        started = time.monotonic()
        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        rtts = []
        for _ in range(20):
            t0 = time.monotonic()
            ok = served(web)
            rtts.append(time.monotonic() - t0)
            assert ok
        goaway = None
        for type_, _, _, payload in read_frames(attacker, time.monotonic() + 10):
            if type_ == 5:
                goaway = int.from_bytes(payload[4:8], "big")
                break
        time_to_refuse = time.monotonic() - started
        stop.set()
        thread.join(10)
        client.close()
        attacker.close()
    report(
        "8 no-op frame flood (WINDOW_UPDATE/RESET for a closed stream)",
        frames_written=sent,
        time_to_goaway_s=time_to_refuse,
        goaway=goaway,
        other_agent_round_trip_ms_before=1000 * sorted(quiet_rtts)[len(quiet_rtts) // 2],
        other_agent_round_trip_ms_during=1000 * sorted(rtts)[len(rtts) // 2],
    )
    assert goaway == 0xD  # ENHANCE_YOUR_CALM
    assert time_to_refuse < 3.0
