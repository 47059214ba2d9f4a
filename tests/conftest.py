"""Shared fixtures: real certificates, a real relay and agent on 127.0.0.1, real services."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.abc
import pytest

from atlax import certs
from atlax.addresses import HostPort
from atlax.agent import Agent
from atlax.config import AgentSettings, AgentSpec, RelaySettings, ServiceSpec
from atlax.demo import free_port
from atlax.relay import Relay
from atlax.relay_main import RelayMain

ROOT = Path(__file__).resolve().parent.parent
R = TypeVar("R", Relay, RelayMain)  # a bare relay, or one with its metrics and control socket


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    relay_crt: Path
    relay_key: Path

    def agent(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, the relay's certificate, good agents, and the bad certificates auth tests need."""
    d = tmp_path_factory.mktemp("pki")
    ca = certs.create_ca("Test CA")
    certs.write_ca(ca, d)
    certs.write_pair(
        certs.issue_server_certificate(ca, "relay", ["localhost", "127.0.0.1"]), d, "relay"
    )
    for name in ("home-nas", "office", "stranger"):
        certs.write_pair(certs.issue_client_certificate(ca, name), d, name)
    past = datetime.now(UTC) - timedelta(days=10)
    expired = certs.issue_client_certificate(ca, "home-nas", timedelta(days=1), not_before=past)
    certs.write_pair(expired, d, "expired")
    foreign = certs.create_ca("Foreign CA")
    certs.write_pair(certs.issue_client_certificate(foreign, "home-nas"), d, "foreign")
    return Pki(d, d / "ca.crt", d / "relay.crt", d / "relay.key")


def relay_settings(pki: Pki, **overrides: object) -> RelaySettings:
    values: dict[str, object] = {
        "listen": HostPort("127.0.0.1", free_port()),
        "ca": pki.ca,
        "cert": pki.relay_crt,
        "key": pki.relay_key,
        "public_host": "127.0.0.1",
        "keepalive_interval": 1.0,
        "keepalive_timeout": 3.0,
        "drain_timeout": 2.0,
    }
    values.update(overrides)
    return RelaySettings.model_validate(values)


def agent_settings(
    pki: Pki, relay: RelaySettings | int, identity: str = "home-nas", **overrides: object
) -> AgentSettings:
    cert, key = pki.agent(identity)
    port = relay if isinstance(relay, int) else relay.listen.port
    values: dict[str, object] = {
        "relay": HostPort("localhost", port),
        "ca": pki.ca,
        "cert": cert,
        "key": key,
        "backoff_initial": 0.05,
        "backoff_cap": 0.5,
        # The default connect timeout (3 s: TCP and TLS) is short on purpose; a loaded test
        # machine may take longer for a TLS handshake, and a retry is not what a test checks.
        "connect_timeout": 10.0,
        "keepalive_interval": 1.0,
        "keepalive_timeout": 3.0,
    }
    values.update(overrides)
    return AgentSettings.model_validate(values)


def spec(name: str, **ports: int) -> AgentSpec:
    return AgentSpec(
        name=name, services=tuple(ServiceSpec(name=s, port=p) for s, p in ports.items())
    )


# -- services ------------------------------------------------------------------------------------


async def echo_handler(stream: anyio.abc.SocketStream) -> None:
    """Echo everything; on EOF, half-close back."""
    async with stream:
        try:
            while True:
                await stream.send(await stream.receive(262144))
        except anyio.EndOfStream:
            await stream.send_eof()
        except anyio.BrokenResourceError:
            pass


async def hash_handler(stream: anyio.abc.SocketStream) -> None:
    """Read to EOF, then answer with the SHA-256 of what arrived (proves half-close works)."""
    async with stream:
        digest = hashlib.sha256()
        try:
            while True:
                digest.update(await stream.receive(262144))
        except anyio.EndOfStream:
            await stream.send(digest.hexdigest().encode())


@asynccontextmanager
async def tcp_service(
    handler: Callable[[anyio.abc.SocketStream], Awaitable[None]],
) -> AsyncIterator[HostPort]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        try:
            yield HostPort("127.0.0.1", port)
        finally:
            tg.cancel_scope.cancel()


@asynccontextmanager
async def running_relay(relay: R) -> AsyncIterator[R]:
    async with anyio.create_task_group() as tg:
        await tg.start(relay.serve)
        try:
            yield relay
        finally:
            tg.cancel_scope.cancel()


@asynccontextmanager
async def running_agent(agent: Agent, wait: bool = True) -> AsyncIterator[Agent]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        if wait:
            with anyio.fail_after(10):
                await agent.connected.wait()
        try:
            yield agent
        finally:
            tg.cancel_scope.cancel()


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """Blocking poll for tests that drive processes; returns the predicate's truthy value."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


async def receive_reset(conn: anyio.abc.SocketStream, timeout: float = 5.0) -> None:
    """The peer ends `conn` with a TCP RST: a connection reset, not an end of stream (FIN)."""
    with anyio.fail_after(timeout), pytest.raises(anyio.BrokenResourceError) as info:
        await conn.receive()
    assert isinstance(info.value.__cause__, ConnectionResetError), repr(info.value.__cause__)


async def exchange(port: int, payload: bytes, *, chunk: int = 65536) -> bytes:
    """Connect to 127.0.0.1:port, send payload, half-close, return everything received."""
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        received = bytearray()

        async def reader() -> None:
            try:
                while True:
                    received.extend(await conn.receive(262144))
            except anyio.EndOfStream:
                return

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            view = memoryview(payload)
            for i in range(0, len(view), chunk):
                await conn.send(view[i : i + chunk])
            await conn.send_eof()
        return bytes(received)


@pytest.fixture
def caplog_info(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="atlax")
    yield caplog


def atlax_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real etcd + kube-apiserver for the whole session (see tests/controlplane.py)."""
    from controlplane import ControlPlane

    plane = ControlPlane(tmp_path_factory.mktemp("k8s"))
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


def pod_relay(dir: Path, relay_port: int, control_socket: Path, extra: str = "") -> Path:
    """relay.toml as the chart's pod has it: TLS files that the operator writes into `tls/`
    and a control socket. Returns the config's path; `start_relay_process` runs it."""
    (dir / "tls").mkdir(exist_ok=True)
    config = dir / "relay.toml"
    config.write_text(
        f'[relay]\nlisten = "127.0.0.1:{relay_port}"\nca = "tls/ca.crt"\ncert = "tls/relay.crt"\n'
        f'key = "tls/relay.key"\npublic_host = "127.0.0.1"\ncontrol_socket = "{control_socket}"\n'
        + extra
    )
    return config


def start_relay_process(config: Path, log: Path) -> subprocess.Popen[str]:
    """`atlax relay` as a process that waits for the operator to write its certificate."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atlax.cli",
            "relay",
            "--config",
            str(config),
            "--wait-for-tls",
            "60",
        ],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        text=True,
    )
