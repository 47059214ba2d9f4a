"""What tunnel users ask for most: PROXY protocol v2, source allowlists, metrics, limits."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from conftest import (
    Pki,
    agent_settings,
    echo_handler,
    exchange,
    free_port,
    receive_reset,
    relay_settings,
    running_agent,
    running_relay,
    tcp_service,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families
from proxyprotocol.v2 import ProxyProtocolV2

from atlax.addresses import HostPort
from atlax.agent import Agent
from atlax.config import AgentSpec, ServiceSpec
from atlax.http import request
from atlax.relay_main import RelayMain

pytestmark = pytest.mark.anyio


def service(name: str, port: int, **options: object) -> AgentSpec:
    return AgentSpec(
        name="home-nas",
        services=(ServiceSpec.model_validate({"name": name, "port": port, **options}),),
    )


async def connect_from(source: str, port: int) -> anyio.abc.SocketStream:
    return await anyio.connect_tcp("127.0.0.1", port, local_host=source)


async def proxy_reporter(stream: anyio.abc.SocketStream) -> None:
    """Parse the PROXY v2 header with the proxy-protocol library; answer 'src:port dst:port'."""
    async with stream:
        data = b""
        while len(data) < 16:
            data += await stream.receive()
        total = 16 + int.from_bytes(data[14:16], "big")
        while len(data) < total:
            data += await stream.receive()
        result = ProxyProtocolV2().unpack(data[:total])
        src, dst = result.source, result.dest
        rest = data[total:]
        while not rest:  # the client's first bytes may arrive in a later segment
            rest += await stream.receive()
        await stream.send(f"{src[0]}:{src[1]} {dst[0]}:{dst[1]} {rest.decode()}".encode())  # type: ignore[index]


@asynccontextmanager
async def tunnel(
    pki: Pki, spec: AgentSpec, services: dict[str, HostPort], **relay_options: object
) -> AsyncIterator[RelayMain]:
    settings = relay_settings(pki, **relay_options)
    relay = RelayMain(settings, [spec])
    async with running_relay(relay), running_agent(Agent(agent_settings(pki, settings), services)):
        yield relay


# -- PROXY protocol ------------------------------------------------------------------------------


async def test_service_sees_the_real_client_address(pki: Pki) -> None:
    port = free_port()
    async with (
        tcp_service(proxy_reporter) as reporter,
        tunnel(pki, service("web", port, proxy_protocol="v2"), {"web": reporter}),
    ):
        async with await connect_from("127.0.0.3", port) as client:
            local_port = client.extra(anyio.abc.SocketAttribute.local_port)
            await client.send(b"first bytes")
            reply = (await client.receive()).decode()
    assert reply == f"127.0.0.3:{local_port} 127.0.0.1:{port} first bytes"


async def test_without_proxy_protocol_the_stream_is_untouched(pki: Pki) -> None:
    port = free_port()
    async with tcp_service(echo_handler) as echo, tunnel(pki, service("web", port), {"web": echo}):
        assert await exchange(port, b"\r\n\r\n\x00\r\nQUIT\n") == b"\r\n\r\n\x00\r\nQUIT\n"


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


async def test_real_nginx_reads_the_header(pki: Pki, tmp_path: Path) -> None:
    """A real PROXY protocol consumer: nginx with `listen ... proxy_protocol`."""
    assert os.path.exists(NGINX), "nginx is missing: run hack/test-deps (make test does)"
    nginx_port, public = free_port(), free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        "daemon off; worker_processes 1; pid %s/nginx.pid; error_log stderr;\n"
        "events { worker_connections 64; }\n"
        "http { access_log off; client_body_temp_path %s;\n"
        "  server { listen 127.0.0.1:%d proxy_protocol;\n"
        '    location / { return 200 "client=$proxy_protocol_addr:$proxy_protocol_port\\n"; } } }\n'
        % (tmp_path, tmp_path, nginx_port)
    )
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.PIPE)
    try:
        await wait_until(lambda: _listening(nginx_port), 10)
        async with tunnel(
            pki,
            service("web", public, proxy_protocol="v2"),
            {"web": HostPort("127.0.0.1", nginx_port)},
        ):
            async with await connect_from("127.0.0.7", public) as client:
                local_port = client.extra(anyio.abc.SocketAttribute.local_port)
                await client.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                reply = b""
                try:
                    while True:
                        reply += await client.receive()
                except anyio.EndOfStream:
                    pass
        assert reply.startswith(b"HTTP/1.1 200")
        assert f"client=127.0.0.7:{local_port}".encode() in reply
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- source allowlists ---------------------------------------------------------------------------


async def test_denied_source_never_reaches_the_agent(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    seen: list[str] = []

    async def recording_echo(stream: anyio.abc.SocketStream) -> None:
        seen.append("connection")
        await echo_handler(stream)

    spec = service("web", port, allow=["127.0.0.1/32", "::1/128"])
    async with tcp_service(recording_echo) as echo, tunnel(pki, spec, {"web": echo}) as relay:
        for _ in range(3):
            async with await connect_from("127.0.0.2", port) as denied:
                await receive_reset(denied)
        assert seen == []
        assert relay.registry.agent("home-nas")["streamsTotal"] == 0  # type: ignore[index]
        async with await connect_from("127.0.0.1", port) as allowed:
            await allowed.send(b"hi")
            assert await allowed.receive() == b"hi"
        assert seen == ["connection"]
        assert (
            _value(relay, "atlax_connections_refused_total", port=str(port), reason="source_denied")
            == 3
        )
    lines = [r for r in caplog.records if "not in the port's allow list" in r.getMessage()]
    assert len(lines) == 1  # rate limited: one line for three refusals


# -- metrics and health --------------------------------------------------------------------------


def _value(relay: RelayMain, name: str, **labels: str) -> float:
    return relay.metrics.registry.get_sample_value(name, labels) or 0.0


async def _get(port: int, path: str) -> tuple[int, bytes]:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        return await request(stream, "GET", path)


async def test_metrics_endpoint_parses_and_counters_move_exactly(pki: Pki) -> None:
    port, metrics_port = free_port(), free_port()
    spec = service("web", port)
    async with (
        tcp_service(echo_handler) as echo,
        tunnel(pki, spec, {"web": echo}, metrics=f"127.0.0.1:{metrics_port}") as relay,
    ):
        status, body = await _get(metrics_port, "/metrics")
        assert status == 200
        before = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode())
            for s in f.samples
        }
        assert before[("atlax_agents_connected", ())] == 1.0
        payloads = [os.urandom(n) for n in (1, 1000, 123456)]
        for payload in payloads:
            assert await exchange(port, payload) == payload
        await wait_until(lambda: _value(relay, "atlax_streams_open", agent="home-nas") == 0, 5)
        status, body = await _get(metrics_port, "/metrics")
        after = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode())
            for s in f.samples
        }
        total = sum(len(p) for p in payloads)

        def key(direction: str) -> tuple[str, tuple[tuple[str, str], ...]]:
            labels = (("agent", "home-nas"), ("direction", direction), ("service", "web"))
            return "atlax_bytes_total", labels

        assert after[key("to_agent")] == total
        assert after[key("from_agent")] == total
        assert after[("atlax_streams_total", (("agent", "home-nas"), ("service", "web")))] == 3
        # A refused agent identity shows up as a handshake failure with its reason.
        stranger = Agent(agent_settings(pki, relay.settings, identity="stranger"), {})
        async with anyio.create_task_group() as tg:
            tg.start_soon(stranger.run)
            await wait_until(
                lambda: (
                    _value(relay, "atlax_handshake_failures_total", reason="unknown_identity") >= 1
                ),
                5,
            )
            tg.cancel_scope.cancel()
        # Keepalive PINGs (every second in tests) feed the RTT histogram.
        await wait_until(
            lambda: _value(relay, "atlax_tunnel_rtt_seconds_count", agent="home-nas") >= 1, 5
        )
        assert (await _get(metrics_port, "/healthz"))[0] == 200
        status, body = await _get(metrics_port, "/readyz")
        assert status == 200 and b'"listening"' in body


async def test_health_answers_while_the_relay_waits_for_its_certificate(
    pki: Pki, tmp_path: Path
) -> None:
    """In a pod the operator writes the relay's certificate after the relay starts: meanwhile
    the process is alive (/healthz 200) and not ready (/readyz 503 "starting")."""
    tls, metrics_port = tmp_path / "tls", free_port()
    files = {"ca": "ca.crt", "cert": "relay.crt", "key": "relay.key"}
    settings = relay_settings(
        pki, metrics=f"127.0.0.1:{metrics_port}", **{k: tls / f for k, f in files.items()}
    )
    relay = RelayMain(settings, tls_wait=30)
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.serve)
        await wait_until(lambda: _listening(metrics_port), 10)
        assert (await _get(metrics_port, "/healthz"))[0] == 200
        status, body = await _get(metrics_port, "/readyz")
        assert status == 503 and b'"starting"' in body
        tls.mkdir()
        for source, name in (
            (pki.ca, "ca.crt"),
            (pki.relay_crt, "relay.crt"),
            (pki.relay_key, "relay.key"),
        ):
            shutil.copy(source, tls / name)
        await wait_until(lambda: relay.readiness() == (True, "listening"), 10)
        status, body = await _get(metrics_port, "/readyz")
        assert status == 200 and b'"listening"' in body
        tg.cancel_scope.cancel()


# -- limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["port", "agent"])
async def test_a_limit_refuses_exactly_the_stream_over_it(pki: Pki, limit: str) -> None:
    port = free_port()
    spec = (
        service("web", port, max_connections=2)
        if limit == "port"
        else AgentSpec(
            name="home-nas", services=(ServiceSpec(name="web", port=port),), max_streams=2
        )
    )
    async with tcp_service(echo_handler) as echo, tunnel(pki, spec, {"web": echo}) as relay:
        held = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(2)]
        for conn in held:  # both are really served
            await conn.send(b"held")
            assert await conn.receive() == b"held"
        async with await anyio.connect_tcp("127.0.0.1", port) as extra:
            await receive_reset(extra)
        reason = "port_limit" if limit == "port" else "agent_limit"
        assert _value(relay, "atlax_connections_refused_total", port=str(port), reason=reason) == 1
        await held.pop().aclose()
        await wait_until(lambda: relay.registry.agent("home-nas")["activeStreams"] == 1, 5)  # type: ignore[index]
        assert await exchange(port, b"served again") == b"served again"
        for conn in held:
            await conn.aclose()


async def test_max_agents_refuses_the_agent_over_the_limit(pki: Pki) -> None:
    settings = relay_settings(pki, max_agents=1)
    specs = [
        AgentSpec(name=n, services=(ServiceSpec(name="web", port=free_port()),))
        for n in ("home-nas", "office")
    ]
    relay = RelayMain(settings, specs)
    async with running_relay(relay), running_agent(Agent(agent_settings(pki, settings), {})):
        office = Agent(agent_settings(pki, settings, identity="office"), {})
        async with anyio.create_task_group() as tg:
            tg.start_soon(office.run)
            await wait_until(lambda: "limit of 1 agents" in (office.last_error or ""), 5)
            tg.cancel_scope.cancel()
        # Told why in a GOAWAY: ENHANCE_YOUR_CALM and the limit.
        assert "ENHANCE_YOUR_CALM" in (office.last_error or "")
        assert "relay already serves its limit of 1 agents" in (office.last_error or "")
        assert _value(relay, "atlax_handshake_failures_total", reason="agent_limit") >= 1
