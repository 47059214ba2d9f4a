"""Ports shared by hostname, end to end with real clients: curl and openssl s_client through SNI
passthrough to home services that hold their own certificates, curl through Host routing; and
the bad inputs (garbage, a huge or slow ClientHello, no or unknown host) refused with nothing
reaching an agent."""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.tls import TLSListener
from conftest import (
    Pki,
    agent_settings,
    receive_reset,
    relay_settings,
    running_agent,
    running_relay,
    wait_until,
)

from atlax import certs
from atlax.addresses import HostPort
from atlax.agent import Agent
from atlax.config import AgentSpec, ServiceSpec
from atlax.demo import free_port
from atlax.relay_main import RelayMain

pytestmark = pytest.mark.anyio

NAS, WIKI = "nas.example.com", "wiki.office.example.com"


@dataclass(frozen=True)
class HomePki:
    """The home services' own CA and certificates: nothing the relay has or could use."""

    ca: Path
    nas: tuple[Path, Path]
    wiki: tuple[Path, Path]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> HomePki:
    d = tmp_path_factory.mktemp("home-pki")
    ca = certs.create_ca("Home CA")
    certs.write_ca(ca, d)
    nas = certs.write_pair(certs.issue_server_certificate(ca, NAS, [NAS]), d, "nas")
    wiki = certs.write_pair(certs.issue_server_certificate(ca, WIKI, [WIKI]), d, "wiki")
    return HomePki(d / "ca.crt", nas, wiki)


async def answer_http(stream: anyio.abc.ByteStream, name: str) -> None:
    """A tiny HTTP/1.1 server: answers each request with its name and the SHA-256 of the body."""
    buffer = b""
    try:
        while True:
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive()
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                buffer += await stream.receive()
            body, buffer = buffer[:length], buffer[length:]
            path = head.split(b" ")[1].decode()
            reply = f"{name} {path} {hashlib.sha256(body).hexdigest()}".encode()
            await stream.send(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply)
            )
    except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, OSError):
        pass
    finally:
        await stream.aclose()


@asynccontextmanager
async def http_service(name: str, cert: tuple[Path, Path] | None = None) -> AsyncIterator[HostPort]:
    """An HTTP service on 127.0.0.1; HTTPS with its own certificate when `cert` is given."""
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = tcp.extra(anyio.abc.SocketAttribute.local_port)
    listener: anyio.abc.Listener[anyio.abc.ByteStream] = tcp  # type: ignore[assignment]
    if cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*cert)
        listener = TLSListener(tcp, context, standard_compatible=False)

    async def handle(stream: anyio.abc.ByteStream) -> None:
        await answer_http(stream, name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield HostPort("127.0.0.1", port)
        finally:
            tg.cancel_scope.cancel()


def routed(name: str, port: int, route: str, *hostnames: str) -> ServiceSpec:
    return ServiceSpec(name=name, port=port, route=route, hostnames=hostnames)  # type: ignore[arg-type]


@asynccontextmanager
async def shared_port(
    pki: Pki, route: str, nas: HostPort, wiki: HostPort, **options: object
) -> AsyncIterator[tuple[RelayMain, int]]:
    """One public port shared by two agents: nas.example.com at home-nas, *.office.example.com
    at office."""
    port = free_port()
    settings = relay_settings(pki, **options)
    specs = [
        AgentSpec(name="home-nas", services=(routed("nas", port, route, NAS),)),
        AgentSpec(name="office", services=(routed("wiki", port, route, "*.office.example.com"),)),
    ]
    relay = RelayMain(settings, specs)
    async with (
        running_relay(relay),
        running_agent(Agent(agent_settings(pki, settings, "home-nas"), {"nas": nas})),
        running_agent(Agent(agent_settings(pki, settings, "office"), {"wiki": wiki})),
    ):
        yield relay, port


def streams_total(relay: RelayMain) -> int:
    return sum(agent["streamsTotal"] for agent in relay.registry.agents())


def refused(relay: RelayMain, port: int, reason: str) -> float:
    labels = {"port": str(port), "reason": reason}
    return relay.metrics.registry.get_sample_value("atlax_connections_refused_total", labels) or 0


async def run(*argv: str | Path) -> tuple[int, str]:
    result = await anyio.run_process([str(a) for a in argv], check=False)
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


def curl(port: int, host: str, scheme: str, *extra: str | Path) -> list[str | Path]:
    return [
        "curl", "-sS", "--max-time", "20", "--resolve", f"{host}:{port}:127.0.0.1",
        *extra, f"{scheme}://{host}:{port}/",
    ]  # fmt: skip


# -- TLS: SNI passthrough ------------------------------------------------------------------------


async def test_curl_and_openssl_reach_the_home_services_by_sni(pki: Pki, home: HomePki) -> None:
    """The client's TLS ends at the home service, verified against the home CA: the relay only
    read the server name. Two agents share the port; a 1 MiB upload arrives intact."""
    payload = os.urandom(1 << 20)
    upload = home.ca.parent / "upload.bin"
    upload.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    async with (
        http_service("nas", home.nas) as nas,
        http_service("wiki", home.wiki) as wiki,
        shared_port(pki, "tls", nas, wiki) as (relay, port),
    ):
        code, out = await run(
            *curl(port, NAS, "https", "--cacert", home.ca, "--data-binary", f"@{upload}")
        )
        assert (code, out) == (0, f"nas / {digest}")
        code, out = await run(*curl(port, WIKI, "https", "--cacert", home.ca))
        assert (code, out) == (0, f"wiki / {hashlib.sha256(b'').hexdigest()}")
        code, out = await run(
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", NAS,
            "-CAfile", home.ca, "-verify_return_error", "-brief",
        )  # fmt: skip
        assert code == 0, out
        assert "Verification: OK" in out and f"CN = {NAS}" in out
        assert {a["name"]: a["streamsTotal"] for a in relay.registry.agents()} == {
            "home-nas": 2,
            "office": 1,
        }


async def test_bad_client_hellos_are_refused_before_any_agent(pki: Pki, home: HomePki) -> None:
    async with (
        http_service("nas", home.nas) as nas,
        http_service("wiki", home.wiki) as wiki,
        shared_port(pki, "tls", nas, wiki, route_timeout=1.0) as (relay, port),
    ):
        # An unknown host and no server name at all: curl and openssl see the connection reset.
        code, _ = await run(*curl(port, "photos.example.com", "https", "--cacert", home.ca))
        assert code != 0
        code, _ = await run(
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-noservername", "-brief"
        )
        assert code != 0
        # Garbage instead of a ClientHello, and a ClientHello that says it is 100 kB.
        for first in (b"GET / HTTP/1.1\r\nHost: nas.example.com\r\n\r\n", huge_hello_head()):
            async with await anyio.connect_tcp("127.0.0.1", port) as conn:
                await conn.send(first)
                await receive_reset(conn)
        # A slow one: half a ClientHello, then nothing until route_timeout.
        async with await anyio.connect_tcp("127.0.0.1", port) as conn:
            await conn.send(huge_hello_head()[:3])
            await receive_reset(conn, timeout=10)
        for reason in ("unknown_host", "no_hostname", "not_tls", "too_large", "route_timeout"):
            assert refused(relay, port, reason) == 1, reason
        assert streams_total(relay) == 0  # nothing reached an agent


def huge_hello_head() -> bytes:
    """A handshake record whose ClientHello says it is 100,000 bytes long."""
    return b"\x16\x03\x01\x40\x00" + b"\x01" + (100_000).to_bytes(3, "big")


async def test_clients_that_never_finish_their_hello_hold_a_bounded_number(pki: Pki) -> None:
    async with (
        http_service("nas") as nas,
        http_service("wiki") as wiki,
        shared_port(pki, "tls", nas, wiki, max_connections_per_source=3) as (relay, port),
    ):
        silent = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(3)]
        public = relay.registry.port(port)
        assert public is not None
        await wait_until(lambda: public.sniffing == 3, 10, "three connections being read")
        async with await anyio.connect_tcp("127.0.0.1", port) as fourth:
            await receive_reset(fourth)
        assert refused(relay, port, "source_limit") == 1
        for conn in silent:
            await conn.aclose()
        await wait_until(lambda: public.sniffing == 0 and not public.sniffing_by_source, 10)
        assert streams_total(relay) == 0


# -- HTTP: Host ----------------------------------------------------------------------------------


async def test_curl_reaches_each_service_by_host(pki: Pki) -> None:
    """Host routing carries an ACME HTTP-01 challenge to the home service; later requests on a
    kept-alive connection go where the first went; an unknown host gets a 421."""
    async with (
        http_service("nas") as nas,
        http_service("wiki") as wiki,
        shared_port(pki, "http", nas, wiki) as (relay, port),
    ):
        challenge = f"http://{NAS}:{port}/.well-known/acme-challenge/t0ken"
        code, out = await run(
            "curl", "-sS", "--max-time", "20", "--resolve", f"{NAS}:{port}:127.0.0.1", challenge
        )
        assert (code, out) == (
            0,
            f"nas /.well-known/acme-challenge/t0ken {hashlib.sha256(b'').hexdigest()}",
        )
        code, out = await run(
            "curl", "-sS", "--max-time", "20", "--resolve", f"{WIKI}:{port}:127.0.0.1",
            f"http://{WIKI}:{port}/a", f"http://{WIKI}:{port}/b",
        )  # fmt: skip
        empty = hashlib.sha256(b"").hexdigest()
        assert (code, out) == (0, f"wiki /a {empty}wiki /b {empty}")
        agents = {a["name"]: a["streamsTotal"] for a in relay.registry.agents()}
        assert agents == {"home-nas": 1, "office": 1}  # curl kept its connection for /b
        code, out = await run(*curl(port, "photos.example.com", "http", "-w", " %{http_code}"))
        assert (code, out) == (0, "no service on this port serves that host\n 421")
        assert refused(relay, port, "unknown_host") == 1
        assert streams_total(relay) == 2


async def test_bad_http_requests_are_refused_before_any_agent(pki: Pki) -> None:
    async with (
        http_service("nas") as nas,
        http_service("wiki") as wiki,
        shared_port(pki, "http", nas, wiki) as (relay, port),
    ):
        async with await anyio.connect_tcp("127.0.0.1", port) as conn:
            await conn.send(huge_hello_head())  # TLS to an HTTP port
            await receive_reset(conn)
        async with await anyio.connect_tcp("127.0.0.1", port) as conn:
            await conn.send(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            reply = b""
            with anyio.fail_after(10):
                try:
                    while True:
                        reply += await conn.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
            assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        code, out = await run(
            "curl", "-sS", "--max-time", "20", "-H", "Host: 192.0.2.1", "-w", " %{http_code}",
            f"http://127.0.0.1:{port}/",
        )  # fmt: skip
        assert out.endswith(" 421") and refused(relay, port, "no_hostname") == 1
        assert refused(relay, port, "not_http") == 1 and refused(relay, port, "malformed") == 1
        assert streams_total(relay) == 0
