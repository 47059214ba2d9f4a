"""`atlax demo`: a relay, an agent and a small HTTP service on this machine, wired together.

Everything is throwaway: a fresh CA and certificates in a temporary directory, free loopback
ports, and a tiny HTTP service (h11) that says hello and echoes what it was asked.
"""

from __future__ import annotations

import logging
import socket
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import anyio
import anyio.abc
import h11

from . import certs
from .addresses import HostPort
from .agent import Agent
from .config import AgentSettings, AgentSpec, RelaySettings, ServiceSpec
from .relay import Relay

log = logging.getLogger("atlax.demo")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def serve_http_once(stream: anyio.abc.ByteStream, greeting: str) -> None:
    """Answer HTTP/1.1 requests on one connection until the client is done."""
    conn = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    conn.receive_data(b"")
                continue
            if isinstance(event, h11.Request):
                body = (
                    f"{greeting}\nYou asked for {event.target.decode(errors='replace')}\n".encode()
                )
                headers = [
                    ("content-type", "text/plain; charset=utf-8"),
                    ("content-length", str(len(body))),
                ]
                data = conn.send(h11.Response(status_code=200, headers=headers)) or b""
                data += conn.send(h11.Data(data=body)) or b""
                data += conn.send(h11.EndOfMessage()) or b""
                await stream.send(data)
            elif isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return


def write_demo_pki(directory: Path) -> dict[str, Path]:
    ca = certs.create_ca("Atlax demo CA")
    relay = certs.issue_server_certificate(
        ca, "relay", ["localhost", "127.0.0.1"], timedelta(days=1)
    )
    agent = certs.issue_client_certificate(ca, "demo", timedelta(days=1))
    ca_crt, _ = certs.write_ca(ca, directory)
    relay_crt, relay_key = certs.write_pair(relay, directory, "relay")
    agent_crt, agent_key = certs.write_pair(agent, directory, "demo")
    return {
        "ca": ca_crt,
        "relay_crt": relay_crt,
        "relay_key": relay_key,
        "agent_crt": agent_crt,
        "agent_key": agent_key,
    }


async def run_demo(
    public_port: int = 0,
    agent_port: int = 0,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run until cancelled. `on_ready` gets the public URL once a request can go through."""
    with tempfile.TemporaryDirectory(prefix="atlax-demo-") as tmp:
        files = write_demo_pki(Path(tmp))
        public_port = public_port or free_port()
        agent_port = agent_port or free_port()
        service_listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        service_port = service_listener.extra(anyio.abc.SocketAttribute.local_port)
        relay = Relay(
            RelaySettings(
                listen=HostPort("127.0.0.1", agent_port),
                ca=files["ca"],
                cert=files["relay_crt"],
                key=files["relay_key"],
                public_host="127.0.0.1",
            ),
            [AgentSpec(name="demo", services=(ServiceSpec(name="web", port=public_port),))],
        )
        agent = Agent(
            AgentSettings(
                relay=HostPort("localhost", agent_port),
                ca=files["ca"],
                cert=files["agent_crt"],
                key=files["agent_key"],
            ),
            {"web": HostPort("127.0.0.1", service_port)},
        )
        greeting = "Hello from behind the tunnel: this response came through Atlax."

        async def handle(stream: anyio.abc.SocketStream) -> None:
            await serve_http_once(stream, greeting)

        async with anyio.create_task_group() as tg:
            tg.start_soon(service_listener.serve, handle)
            await tg.start(relay.serve)
            tg.start_soon(agent.run)
            with anyio.fail_after(15):
                await agent.connected.wait()
            url = f"http://127.0.0.1:{public_port}/"
            if on_ready is not None:
                on_ready(url)
            await anyio.sleep_forever()
