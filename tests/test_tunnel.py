"""End to end on 127.0.0.1: real TCP, real TLS 1.3 with real certificates, relay + agent + services."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import threading
import time

import anyio
import pytest
from conftest import (
    Pki,
    agent_settings,
    echo_handler,
    exchange,
    free_port,
    hash_handler,
    receive_reset,
    relay_settings,
    running_agent,
    running_relay,
    spec,
    tcp_service,
    wait_until,
)

from atlax.addresses import HostPort
from atlax.agent import Agent
from atlax.metrics import RelayMetrics
from atlax.mux import MuxSession, MuxStream
from atlax.protocol import ALPN, EndReason, ErrorCode, Role, Settings
from atlax.protocol.decoder import FrameDecoder
from atlax.protocol.frames import FrameType, encode_frame, encode_settings, encode_u32
from atlax.relay import TUNNEL_SETTINGS, Relay

pytestmark = pytest.mark.anyio


async def test_many_concurrent_streams_over_two_services(pki: Pki) -> None:
    """60 streams, 2 MB each way, across two services; every byte checked by SHA-256."""
    web, smb = free_port(), free_port()
    settings = relay_settings(pki)
    async with (
        tcp_service(echo_handler) as echo,
        tcp_service(hash_handler) as hasher,
        running_relay(Relay(settings, [spec("home-nas", web=web, smb=smb)])),
        running_agent(Agent(agent_settings(pki, settings), {"web": echo, "smb": hasher})),
    ):
        failures: list[str] = []

        async def one(i: int) -> None:
            payload = os.urandom(2 * 1024 * 1024 + i)
            if i % 2:
                got = await exchange(web, payload)
                ok = hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            else:
                got = await exchange(smb, payload)
                ok = got == hashlib.sha256(payload).hexdigest().encode()
            if not ok:
                failures.append(f"stream {i}: {len(got)} bytes back")

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(60):
                    tg.start_soon(one, i)
        assert failures == []


@pytest.mark.parametrize("size", [1, 64 * 1024 * 1024])
async def test_one_byte_and_64_megabytes_with_half_close(pki: Pki, size: int) -> None:
    """The client half-closes and still reads the whole reply (the service's digest)."""
    port = free_port()
    settings = relay_settings(pki)
    async with (
        tcp_service(hash_handler) as hasher,
        running_relay(Relay(settings, [spec("home-nas", smb=port)])),
        running_agent(Agent(agent_settings(pki, settings), {"smb": hasher})),
    ):
        payload = os.urandom(size)
        with anyio.fail_after(120):
            reply = await exchange(port, payload, chunk=1 << 20)
        assert reply == hashlib.sha256(payload).hexdigest().encode()


async def test_echo_of_one_byte(pki: Pki) -> None:
    port = free_port()
    settings = relay_settings(pki)
    async with (
        tcp_service(echo_handler) as echo,
        running_relay(Relay(settings, [spec("home-nas", web=port)])),
        running_agent(Agent(agent_settings(pki, settings), {"web": echo})),
    ):
        assert await exchange(port, b"x") == b"x"


async def test_paused_reader_does_not_stall_the_other_stream(pki: Pki) -> None:
    """Stream A's client stops reading; stream B moves 64 MB meanwhile; A's relay buffer <= window."""
    source_port, sink_port = free_port(), free_port()
    settings = relay_settings(pki)

    async def endless(stream: anyio.abc.SocketStream) -> None:
        block = os.urandom(65536)
        async with stream:
            try:
                while True:
                    await stream.send(block)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    relay = Relay(settings, [spec("home-nas", source=source_port, sink=sink_port)])
    async with (
        tcp_service(endless) as source,
        tcp_service(hash_handler) as hasher,
        running_relay(relay),
        running_agent(Agent(agent_settings(pki, settings), {"source": source, "sink": hasher})),
    ):
        async with await anyio.connect_tcp("127.0.0.1", source_port) as stalled:
            await stalled.receive()  # data flows, then this client never reads again
            state = relay.registry.get("home-nas")
            session = state.session if state is not None else None
            assert session is not None

            def stalled_buffer() -> int:
                return max(
                    (s.buffered for s in session.streams if s.service == "source"),
                    default=0,
                )

            # Wait until the client's socket buffers are full: from then on what the agent sends
            # stays at the relay, up to the window. (How far up depends on where the credit
            # stood when the kernel filled, so the wait is for the stall, not for a level.)
            await wait_until(lambda: stalled_buffer() > 0, 30)
            peak = 0
            payload = os.urandom(64 * 1024 * 1024)
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:

                    async def watch() -> None:
                        nonlocal peak
                        while True:
                            peak = max(peak, stalled_buffer())
                            await anyio.sleep(0.005)

                    tg.start_soon(watch)
                    reply = await exchange(sink_port, payload, chunk=1 << 20)
                    tg.cancel_scope.cancel()
            assert reply == hashlib.sha256(payload).hexdigest().encode()
            assert 0 < peak <= TUNNEL_SETTINGS.initial_window


async def test_client_of_offline_agent_is_closed_at_once(pki: Pki) -> None:
    """With agent_wait 0; the default holds the client for its agent first (test_ha_relay.py)."""
    port = free_port()
    settings = relay_settings(pki, agent_wait=0)
    async with running_relay(Relay(settings, [spec("home-nas", web=port)])):
        async with await anyio.connect_tcp("127.0.0.1", port) as conn:
            await receive_reset(conn, timeout=2)  # refused (agent_offline): a RST, not a FIN


async def test_local_service_refusing_resets_the_stream(pki: Pki) -> None:
    port = free_port()
    settings = relay_settings(pki)
    dead = HostPort("127.0.0.1", free_port())  # nothing listens here
    async with (
        running_relay(Relay(settings, [spec("home-nas", web=port)])),
        running_agent(Agent(agent_settings(pki, settings), {"web": dead})),
    ):
        async with await anyio.connect_tcp("127.0.0.1", port) as conn:
            await receive_reset(conn)  # the agent's CONNECT_FAILED reaches the client as a RST


async def test_agent_refuses_services_it_does_not_expose(
    pki: Pki, caplog_info: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    settings = relay_settings(pki)
    async with (
        tcp_service(echo_handler) as echo,
        running_relay(Relay(settings, [spec("home-nas", admin=port)])),
        running_agent(Agent(agent_settings(pki, settings), {"web": echo})),
    ):
        async with await anyio.connect_tcp("127.0.0.1", port) as conn:
            await receive_reset(conn)  # the agent's UNKNOWN_SERVICE reaches the client as a RST
    assert "relay asked for unknown service 'admin'; refusing" in caplog_info.text


# -- authentication ------------------------------------------------------------------------------


async def _handshake(
    pki: Pki, relay_port: int, cert: str | None, ca: object | None = None
) -> bytes:
    """Dial the agent port as a hand-made client; return what the relay sent before closing."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.set_alpn_protocols([ALPN])
    if cert is not None:
        crt, key = pki.agent(cert)
        ctx.load_cert_chain(crt, key)
    received = b""
    try:
        async with await anyio.connect_tcp(
            "127.0.0.1",
            relay_port,
            ssl_context=ctx,
            tls_hostname="localhost",
            tls_standard_compatible=False,
        ) as tls:
            await tls.send(encode_settings(Settings()))
            with anyio.fail_after(5):
                while True:
                    received += await tls.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, OSError):
        pass
    return received


@pytest.mark.parametrize(
    ("cert", "log_line"),
    [
        (None, "TLS handshake from 127.0.0.1"),
        ("foreign", "client certificate rejected"),
        ("expired", "certificate has expired"),
        ("stranger", "refused 'stranger' from 127.0.0.1"),
    ],
)
async def test_bad_agents_are_refused_and_the_good_one_keeps_working(
    pki: Pki, caplog_info: pytest.LogCaptureFixture, cert: str | None, log_line: str
) -> None:
    port = free_port()
    settings = relay_settings(pki)
    async with (
        tcp_service(echo_handler) as echo,
        running_relay(Relay(settings, [spec("home-nas", web=port)])),
        running_agent(Agent(agent_settings(pki, settings), {"web": echo})),
    ):
        received = await _handshake(pki, settings.listen.port, cert)
        frames = list(FrameDecoder(1 << 20).feed(received)) if received else []
        assert all(f.type is not FrameType.OPEN for f in frames)
        if cert == "stranger":  # reached the tunnel layer: told why, in a GOAWAY
            goaway = [f for f in frames if f.type is FrameType.GOAWAY]
            assert (
                goaway and int.from_bytes(goaway[0].payload[4:8], "big") == ErrorCode.UNAUTHORIZED
            )
            assert b"identity 'stranger' is not configured" in goaway[0].payload
        assert await exchange(port, b"still serving") == b"still serving"
    assert log_line in caplog_info.text


async def test_agent_with_unconfigured_identity_reports_why(pki: Pki) -> None:
    settings = relay_settings(pki)
    agent = Agent(agent_settings(pki, settings, identity="stranger"), {})
    async with running_relay(Relay(settings, [spec("home-nas", web=free_port())])):
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent.run)
            await wait_until(lambda: agent.last_error is not None or False, 5)
            tg.cancel_scope.cancel()
    assert agent.connects == 0
    assert "UNAUTHORIZED" in (agent.last_error or "")  # the relay's GOAWAY, with the reason
    assert "identity 'stranger' is not configured" in (agent.last_error or "")


# -- reconnect -----------------------------------------------------------------------------------


async def test_agent_reconnects_after_the_relay_restarts(pki: Pki) -> None:
    port = free_port()
    settings = relay_settings(pki)
    agent = Agent(agent_settings(pki, settings, backoff_cap=0.5), {"web": HostPort("127.0.0.1", 0)})
    async with tcp_service(echo_handler) as echo:
        agent.services["web"] = echo
        async with running_agent(agent, wait=False):
            async with running_relay(Relay(settings, [spec("home-nas", web=port)])):
                await wait_until(lambda: agent.session is not None, 10)
                assert await exchange(port, b"before") == b"before"
            # The relay is gone (its sockets closed abruptly); start a new one on the same ports.
            await wait_until(lambda: agent.session is None, 10)
            async with running_relay(Relay(settings, [spec("home-nas", web=port)])):
                started = anyio.current_time()
                await wait_until(lambda: agent.session is not None, 10)
                assert anyio.current_time() - started < 0.5 + 1.0  # backoff cap + handshake slack
                assert await exchange(port, b"after") == b"after"
    assert agent.connects == 2


async def test_killing_the_agent_mid_stream_closes_clients_and_keeps_the_port(pki: Pki) -> None:
    port = free_port()
    settings = relay_settings(pki)
    metrics = RelayMetrics()
    relay = Relay(settings, [spec("home-nas", web=port)], observer=metrics)
    async with tcp_service(echo_handler) as echo, running_relay(relay):
        client = await anyio.connect_tcp("127.0.0.1", port)
        async with client:
            async with running_agent(Agent(agent_settings(pki, settings), {"web": echo})):
                async with await anyio.connect_tcp("127.0.0.1", port) as inner:
                    await inner.send(b"ping")
                    assert await inner.receive() == b"ping"
                await client.aclose()
                client = await anyio.connect_tcp("127.0.0.1", port)
                await client.send(b"mid-stream")
                assert await client.receive() == b"mid-stream"
            # The agent was killed when its block ended: its sockets are gone mid-stream.
            with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                while True:
                    await client.receive()
        await wait_until(lambda: not relay.registry.agent("home-nas")["connected"], 5)
        assert relay.registry.port_owner(port) == "home-nas"
        ends = metrics.registry.get_sample_value(
            "atlax_tunnel_ends_total", {"reason": "peer_closed"}
        )
        assert ends == 1  # the agent's process went away without a GOAWAY
        async with running_agent(Agent(agent_settings(pki, settings), {"web": echo})):
            assert await exchange(port, b"back again") == b"back again"


async def test_second_connection_with_same_identity_replaces_the_first(pki: Pki) -> None:
    port = free_port()
    settings = relay_settings(pki)
    relay = Relay(settings, [spec("home-nas", web=port)])
    async with tcp_service(echo_handler) as echo, running_relay(relay):
        first = Agent(
            agent_settings(pki, settings, backoff_initial=5.0, backoff_cap=10.0), {"web": echo}
        )
        async with running_agent(first):
            old_session = first.session
            second = Agent(agent_settings(pki, settings), {"web": echo})
            async with running_agent(second):
                assert second.session is not None
                assert old_session is not None
                await wait_until(lambda: first.session is None, 5)  # told to go away
                assert await exchange(port, b"served by the newest") == b"served by the newest"


# -- bad input -----------------------------------------------------------------------------------


async def test_a_connection_closed_during_the_handshake_is_named(
    pki: Pki, caplog_info: pytest.LogCaptureFixture
) -> None:
    settings = relay_settings(pki)
    metrics = RelayMetrics()
    relay = Relay(settings, [], observer=metrics)
    async with running_relay(relay):
        raw = await anyio.connect_tcp("127.0.0.1", settings.listen.port)
        await raw.send(b"\x16\x03\x01")  # the start of a ClientHello, then gone
        await raw.aclose()
        failures = "atlax_handshake_failures_total", {"reason": "connection_lost"}
        await wait_until(lambda: metrics.registry.get_sample_value(*failures) == 1, 5)
    assert "failed: connection closed during the handshake" in caplog_info.text


async def test_an_agent_names_a_relay_that_closes_during_the_handshake(
    pki: Pki, caplog_info: pytest.LogCaptureFixture
) -> None:
    async def hang_up(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            await conn.receive()  # the ClientHello; then close without answering

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hang_up)
        agent = Agent(agent_settings(pki, port, backoff_cap=0.3), {})
        tg.start_soon(agent.run)
        await wait_until(lambda: "down: connection closed" in caplog_info.text, 5)
        tg.cancel_scope.cancel()


async def test_garbage_on_the_agent_port_is_refused(
    pki: Pki, caplog_info: pytest.LogCaptureFixture
) -> None:
    settings = relay_settings(pki)
    port = free_port()
    async with (
        tcp_service(echo_handler) as echo,
        running_relay(Relay(settings, [spec("home-nas", web=port)])),
        running_agent(Agent(agent_settings(pki, settings), {"web": echo})),
    ):
        async with await anyio.connect_tcp("127.0.0.1", settings.listen.port) as raw:
            await raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(512))
            with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                while True:
                    await raw.receive()
        assert await exchange(port, b"fine") == b"fine"
    assert "TLS handshake from 127.0.0.1" in caplog_info.text


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (
            encode_frame(FrameType.DATA, 0, 1, b"\x00" * 10)[:4]
            + (2**24).to_bytes(4, "big")
            + bytes(4),
            ErrorCode.FRAME_SIZE_ERROR,
        ),
        (
            encode_frame(FrameType.DATA, 0, 0, b"")[:8] + bytes([0x42, 0, 0, 0]),
            ErrorCode.PROTOCOL_ERROR,
        ),
        (encode_frame(FrameType.DATA, 0, 2, b"unknown stream"), ErrorCode.PROTOCOL_ERROR),
        (
            encode_frame(FrameType.WINDOW_UPDATE, 0, 2, encode_u32(2**31 - 1)),
            ErrorCode.FLOW_CONTROL_ERROR,
        ),
    ],
    ids=["oversized", "unknown-type", "unknown-stream", "window-overflow"],
)
async def test_malformed_frames_close_only_that_tunnel(
    pki: Pki, frame: bytes, code: ErrorCode
) -> None:
    settings = relay_settings(pki)
    port = free_port()
    office_port = free_port()
    relay = Relay(settings, [spec("home-nas", web=port), spec("office", files=office_port)])
    async with (
        tcp_service(echo_handler) as echo,
        running_relay(relay),
        running_agent(Agent(agent_settings(pki, settings), {"web": echo})),
    ):
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctx.set_alpn_protocols([ALPN])
        ctx.load_cert_chain(*pki.agent("office"))
        async with await anyio.connect_tcp(
            "127.0.0.1",
            settings.listen.port,
            ssl_context=ctx,
            tls_hostname="localhost",
            tls_standard_compatible=False,
        ) as tls:
            await tls.send(encode_settings(Settings()))
            await wait_until(lambda: bool(relay.registry.agent("office")["connected"]), 5)
            if code is ErrorCode.FLOW_CONTROL_ERROR:  # needs a live stream: have a client open one
                client = await anyio.connect_tcp("127.0.0.1", office_port)
                await wait_until(lambda: relay.registry.agent("office")["activeStreams"] == 1, 5)
            await tls.send(frame)
            received = b""
            with anyio.fail_after(5):
                try:
                    while True:
                        received += await tls.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
            if code is ErrorCode.FLOW_CONTROL_ERROR:
                await client.aclose()
        goaway = [f for f in FrameDecoder(1 << 20).feed(received) if f.type is FrameType.GOAWAY]
        assert goaway, "the relay closed the tunnel without GOAWAY"
        assert int.from_bytes(goaway[-1].payload[4:8], "big") == code
        assert not relay.registry.agent("office")["connected"]
        assert await exchange(port, b"unaffected") == b"unaffected"


async def test_mux_session_over_plain_tcp_is_transport_agnostic() -> None:
    """The session runs over any asyncio transport; here plain TCP, no TLS. Each side joins its
    streams to sockets as the relay and the agent do: bytes and half-close go through."""

    async def reverse(conn: anyio.abc.SocketStream) -> None:
        async with conn:
            data = b""
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    data += await conn.receive()
            await conn.send(data[::-1])

    loop = asyncio.get_running_loop()
    servers: list[MuxSession] = []
    async with tcp_service(reverse) as service, anyio.create_task_group() as tg:

        async def serve_stream(stream: MuxStream) -> None:
            await loop.create_connection(lambda: stream, service.host, service.port)

        def new_server_session() -> MuxSession:
            servers.append(MuxSession(Role.SERVER, handler=serve_stream))
            tg.start_soon(servers[-1].run)
            return servers[-1]

        tunnel = await loop.create_server(new_server_session, "127.0.0.1", 0)
        client = MuxSession(Role.CLIENT)
        await loop.create_connection(
            lambda: client, "127.0.0.1", tunnel.sockets[0].getsockname()[1]
        )
        tg.start_soon(client.run)
        with anyio.fail_after(5):
            await client.wait_ready()
        # The client side's streams are the protocol of a listening socket's connections.
        public = await loop.create_server(lambda: client.open_stream_now("echo"), "127.0.0.1", 0)
        with anyio.fail_after(5):
            reply = await exchange(public.sockets[0].getsockname()[1], b"hello tunnel")
        assert reply == b"lennut olleh"
        client.close()
        with anyio.fail_after(5):
            await client.wait_closed()
            await servers[0].wait_closed()
        assert client.end is not None and client.end.reason is EndReason.LOCAL_CLOSE
        assert servers[0].end is not None and servers[0].end.reason is EndReason.PEER_GOAWAY
        public.close()
        tunnel.close()


async def test_a_slow_local_service_gets_longer_than_the_relay_dial(pki: Pki) -> None:
    """Connecting to a local service may take longer than the 3 s the agent gives the relay: a
    lost DNS answer costs glibc a 5 s retry, and no other path can serve that stream. A service
    whose accept queue stays full for 4 s completes our connect only then: served (it was reset
    after 3 s), with the relay's dial at its default."""
    port = free_port()
    settings = relay_settings(pki)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # room for one connection not yet accepted
    service = HostPort("127.0.0.1", listener.getsockname()[1])
    plug = socket.create_connection(
        (service.host, service.port)
    )  # fills that room: SYNs are dropped

    def serve() -> None:
        time.sleep(4.0)  # longer than the relay's connect_timeout
        first, _ = listener.accept()
        first.close()
        plug.close()
        listener.settimeout(20)
        conn, _ = listener.accept()
        with conn:
            conn.sendall(hashlib.sha256(conn.recv(64)).digest())

    server = threading.Thread(target=serve, daemon=True)
    try:
        async with (
            running_relay(Relay(settings, [spec("home-nas", web=port)])),
            running_agent(
                Agent(agent_settings(pki, settings, connect_timeout=3.0), {"web": service})
            ),
        ):
            server.start()
            with anyio.fail_after(30):
                async with await anyio.connect_tcp("127.0.0.1", port) as conn:
                    await conn.send(b"slow service")
                    answer = await conn.receive()
            assert answer == hashlib.sha256(b"slow service").digest()
    finally:
        server.join(30)
        plug.close()
        listener.close()
