"""The relay's control socket: declarative, atomic, revocation; raw HTTP edge cases."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
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
    relay_settings,
    running_agent,
    tcp_service,
    wait_until,
)

from atlax.agent import Agent
from atlax.control.client import ControlClient, ControlSocketError
from atlax.control.server import ControlServer
from atlax.http import request
from atlax.relay_main import RelayMain

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def control_relay(pki: Pki, tmp_path: Path) -> AsyncIterator[tuple[RelayMain, ControlClient]]:
    path = tmp_path / "run" / "control.sock"
    relay = RelayMain(relay_settings(pki, control_socket=path))
    async with anyio.create_task_group() as tg:
        await tg.start(relay.serve)
        assert isinstance(relay.control, ControlServer)
        # A lone relay takes agents at once, as it always did (whoever drives its control
        # socket need not know PUT /cluster); a control client's PUT /cluster marks it synced.
        assert relay.readiness() == (True, "listening")
        assert port_is_open(relay.settings.listen.port)
        client = ControlClient(path)
        assert (await client.cluster())["synced"] is False
        status, cluster = await client.call("PUT", "/cluster", {"replicas": 1})
        assert status == 200 and cluster["synced"] is True and cluster["size"] == 1
        assert relay.readiness() == (True, "listening")
        try:
            yield relay, client
        finally:
            tg.cancel_scope.cancel()


def services(**ports: int) -> list[dict[str, object]]:
    return [{"name": n, "port": p} for n, p in ports.items()]


def port_is_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_put_is_idempotent_and_opens_ports(pki: Pki, tmp_path: Path) -> None:
    web, smb = free_port(), free_port()
    async with control_relay(pki, tmp_path) as (relay, client):
        status, body = await client.put_agent("home-nas", services(web=web, smb=smb))
        assert status == 200 and body["changed"] is True
        assert port_is_open(web) and port_is_open(smb)
        status, body = await client.put_agent("home-nas", services(web=web, smb=smb))
        assert status == 200 and body["changed"] is False
        # Shrinking the spec closes the dropped port.
        status, _ = await client.put_agent("home-nas", services(web=web))
        assert status == 200 and not port_is_open(smb) and port_is_open(web)
        listing = await client.agents()
        assert [a["name"] for a in listing["agents"]] == ["home-nas"]
        assert listing["agents"][0]["services"] == [{"name": "web", "port": web}]
        assert listing["agents"][0]["connected"] is False


async def test_conflicts_change_nothing(pki: Pki, tmp_path: Path) -> None:
    web, fresh = free_port(), free_port()
    async with control_relay(pki, tmp_path) as (relay, client):
        assert (await client.put_agent("home-nas", services(web=web)))[0] == 200
        status, body = await client.put_agent("office", services(files=fresh, web=web))
        assert status == 409 and body == {
            "error": f"port {web} is already used by agent 'home-nas'",
            "port": web,
        }
        assert not port_is_open(fresh), "a port was opened although the request failed"
        assert relay.registry.agent("office") is None
        with socket.socket() as held:  # a port the OS has given to someone else
            held.bind(("127.0.0.1", 0))
            held.listen()
            taken = held.getsockname()[1]
            status, body = await client.put_agent("office", services(files=fresh, other=taken))
            assert status == 409 and body["port"] == taken
            assert "Address already in use" in body["error"]
            assert not port_is_open(fresh)


async def test_delete_revokes_the_identity(pki: Pki, tmp_path: Path) -> None:
    web = free_port()
    async with control_relay(pki, tmp_path) as (relay, client), tcp_service(echo_handler) as echo:
        await client.put_agent("home-nas", services(web=web))
        agent = Agent(agent_settings(pki, relay.settings, backoff_cap=0.2), {"web": echo})
        async with running_agent(agent):
            assert await exchange(web, b"allowed") == b"allowed"
            await wait_until(
                lambda: (relay.registry.agent("home-nas") or {}).get("connected", False), 5
            )
            state = relay.registry.agent("home-nas")
            assert state is not None and state["bytesOut"] == 7 and state["bytesIn"] == 7
            status, _ = await client.delete_agent("home-nas")
            assert status == 200
            await wait_until(lambda: agent.session is None, 5)  # the live tunnel was dropped
            assert not port_is_open(web)
            # ... and the same certificate is refused from now on, with the reason in a GOAWAY.
            await wait_until(lambda: "not configured" in (agent.last_error or ""), 5)
            assert "UNAUTHORIZED" in (agent.last_error or "")
            assert "identity 'home-nas' is not configured" in (agent.last_error or "")
            assert agent.session is None
        assert (await client.delete_agent("home-nas"))[0] == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "fragment"),
    [
        ("PUT", "/agents/x", b"{not json", 400, "not JSON"),
        ("PUT", "/agents/x", b"[1]", 400, "must be a JSON object"),
        (
            "PUT",
            "/agents/x",
            b'{"services": [{"name": "web", "port": 0}]}',
            400,
            "services[0].port",
        ),
        (
            "PUT",
            "/agents/x",
            b'{"services": [{"name": "a", "port": 1}, {"name": "a", "port": 2}]}',
            400,
            "appears twice",
        ),
        ("PUT", "/agents/x", b'{"name": "y", "services": []}', 400, "path names 'x'"),
        ("PUT", "/agents/Bad!", b'{"services": []}', 400, "name"),
        ("GET", "/agents/nobody", b"", 404, "not configured"),
        ("GET", "/nowhere", b"", 404, "no such endpoint"),
        ("POST", "/agents", b"", 405, "method not allowed"),
    ],
)
async def test_bad_requests_get_clear_errors(
    pki: Pki, tmp_path: Path, method: str, path: str, body: bytes, status: int, fragment: str
) -> None:
    async with control_relay(pki, tmp_path) as (_, client):
        got_status, payload = await _raw(client, method, path, body)
        assert got_status == status
        assert fragment in json.dumps(payload)


async def _raw(client: ControlClient, method: str, path: str, body: bytes) -> tuple[int, object]:
    async with await anyio.connect_unix(client.path) as stream:
        status, data = await request(stream, method, path, body)
    return status, json.loads(data)


async def test_garbage_on_the_control_socket_gets_400(pki: Pki, tmp_path: Path) -> None:
    async with control_relay(pki, tmp_path) as (_, client):
        async with await anyio.connect_unix(client.path) as stream:
            await stream.send(b"\x16\x03\x01 this is not http\r\n\r\n")
            reply = await stream.receive()
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert (await client.health())["status"] == "ok"


async def _read_then_close(stream: anyio.abc.SocketStream) -> None:
    await stream.receive()  # the request arrived; the relay is killed before it answers


async def _close_at_once(stream: anyio.abc.SocketStream) -> None:
    pass  # closed with the request unread: the client's socket is reset


async def _answer_garbage(stream: anyio.abc.SocketStream) -> None:
    await stream.receive()
    await stream.send(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")


@pytest.mark.parametrize(
    ("server", "message"),
    [
        (_read_then_close, "the connection was closed before the response was complete"),
        (_close_at_once, "the connection was reset before the response was complete"),
        (_answer_garbage, "invalid HTTP response"),
    ],
)
async def test_a_relay_that_hangs_up_mid_answer_is_a_control_socket_error(
    tmp_path: Path,
    server: Callable[[anyio.abc.SocketStream], Awaitable[None]],
    message: str,
) -> None:
    """What the operator's timer and `atlax relayctl` meet when the relay dies while answering:
    a ControlSocketError naming the socket (the operator retries it at the next tick), not an
    h11 or anyio exception (which kopf answered with a 60 s back-off, relayctl with a traceback)."""
    path = tmp_path / "control.sock"
    listener = await anyio.create_unix_listener(path)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await server(stream)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        with pytest.raises(ControlSocketError) as info:
            await ControlClient(path, timeout=10).agents()
        assert str(info.value).startswith(f"control socket {path}: {message}")
        ctl = await anyio.run_process(
            [sys.executable, "-m", "atlax.cli", "relayctl", "--socket", str(path), "list"],
            check=False,
        )
        tg.cancel_scope.cancel()
    stderr = ctl.stderr.decode()
    assert ctl.returncode == 1 and "Traceback" not in stderr, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"atlax: error: control socket {path}: {message}"), stderr


async def test_one_of_several_relays_is_not_ready_before_its_state(
    pki: Pki, tmp_path: Path
) -> None:
    """With replicas (or workers) the relay is one instance of several: its /readyz stays false
    and its agent port closed until a control client applied its state (PUT /cluster, last), so
    the load balancer sends clients and agents elsewhere: an agent refused as unknown would back
    off, where a refused connect is retried within a second."""
    path = tmp_path / "run" / "control.sock"
    relay = RelayMain(relay_settings(pki, control_socket=path, replicas=3))
    async with anyio.create_task_group() as tg:
        await tg.start(relay.serve)
        assert relay.readiness() == (False, "waiting for its control state")
        agent_port = relay.settings.listen.port
        assert not port_is_open(agent_port)
        status, cluster = await ControlClient(path).set_cluster(3)
        assert status == 200 and cluster["size"] == 3
        await wait_until(lambda: relay.readiness() == (True, "listening"), 10)
        await wait_until(lambda: port_is_open(agent_port), 10)
        tg.cancel_scope.cancel()
