"""`atlax relay --workers 3` as a process: workers sharing the ports (SO_REUSEPORT), the agent
joining each, a killed worker restarted and re-joined with no failed connection, the control
socket fanning out, metrics summed, SIGTERM draining every worker. Hashed payloads throughout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from cluster import wait_gone
from conftest import (
    Pki,
    agent_settings,
    echo_handler,
    exchange,
    running_agent,
    tcp_service,
    wait_until,
)
from test_ha import echoes

from atlax.agent import Agent
from atlax.control.client import ControlClient
from atlax.demo import free_port

pytestmark = pytest.mark.anyio

ATLAX_RELAY = [sys.executable, "-m", "atlax.cli", "relay"]


class Supervised:
    """A supervisor process and what it listens on."""

    def __init__(self, tmp_path: Path, pki: Pki, *, control: bool = False) -> None:
        self.agent_port, self.web, self.metrics_port = free_port(), free_port(), free_port()
        self.control = tmp_path / "run" / "control.sock"
        self.log = tmp_path / "supervisor.log"
        self.config = tmp_path / "relay.toml"
        text = (
            f'[relay]\nlisten = "127.0.0.1:{self.agent_port}"\nca = "{pki.ca}"\n'
            f'cert = "{pki.relay_crt}"\nkey = "{pki.relay_key}"\npublic_host = "127.0.0.1"\n'
            f'metrics = "127.0.0.1:{self.metrics_port}"\ndrain_timeout = 5.0\n'
            "keepalive_interval = 2.0\nkeepalive_timeout = 10.0\n"
        )
        if control:
            text += f'control_socket = "{self.control}"\n'
        else:
            text += f'[[agents]]\nname = "home-nas"\nservices = [{{ name = "web", port = {self.web} }}]\n'
        self.config.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*ATLAX_RELAY, "--config", str(self.config), "--workers", "3"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def readyz(self) -> tuple[int, dict[str, str]]:
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except OSError:
            return 0, {}

    def metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def workers(self) -> list[int]:
        """The pids of the supervisor's children (its workers)."""
        assert self.proc is not None
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and fields[0] not in ("Z", "X"):
                pids.append(int(entry.name))
        return sorted(pids)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: it and its workers
            self.proc.wait(10)


@contextmanager
def supervised(tmp_path: Path, pki: Pki, *, control: bool = False) -> Iterator[Supervised]:
    sup = Supervised(tmp_path, pki, control=control)
    sup.start()
    try:
        yield sup
    finally:
        sup.stop()
        print(sup.log.read_text()[-4000:])


async def ready(sup: Supervised) -> None:
    """Ready (at least one worker), and all three workers up (bounded wait)."""
    await wait_until(
        lambda: sup.readyz()[1].get("detail") == "3 of 3 workers ready", 60, "3 workers ready"
    )


async def test_workers_share_the_ports_and_the_agent_joins_each(pki: Pki, tmp_path: Path) -> None:
    with supervised(tmp_path, pki) as sup:
        await ready(sup)
        assert sup.readyz()[0] == 200 and len(sup.workers()) == 3
        async with tcp_service(echo_handler) as echo:
            agent = Agent(agent_settings(pki, sup.agent_port), {"web": echo})
            async with running_agent(agent):
                await wait_until(lambda: len(agent.tunnels) == 3, 60, "3 tunnels")
                assert len({t.instance for t in agent.tunnels.values()}) == 3
                assert await echoes(sup.web, 90) == []
                assert sup.metric("atlax_relay_workers") == 3
                assert sup.metric("atlax_agents_connected") == 1  # one agent, three tunnels
                assert sup.metric("atlax_tunnels_connected") == 3
                assert sup.metric("atlax_streams_total") == 90  # summed over the workers


async def test_a_killed_worker_is_restarted_and_rejoined_with_no_failed_connection(
    pki: Pki, tmp_path: Path
) -> None:
    with supervised(tmp_path, pki) as sup:
        await ready(sup)
        async with tcp_service(echo_handler) as echo:
            agent = Agent(agent_settings(pki, sup.agent_port), {"web": echo})
            async with running_agent(agent):
                await wait_until(lambda: len(agent.tunnels) == 3, 60, "3 tunnels")
                before = set(agent.tunnels)
                victim = sup.workers()[1]
                os.kill(victim, signal.SIGKILL)
                await anyio.to_thread.run_sync(wait_gone, victim)
                # From here on (the dead worker's listeners are gone) nothing may fail: the
                # others serve, and the new worker listens on the public port only once the
                # agent has joined it.
                rounds = 0
                while not (len(agent.tunnels) == 3 and set(agent.tunnels) != before):
                    assert await echoes(sup.web, 20, concurrency=5) == []
                    rounds += 1
                    assert rounds < 300, "the agent did not join the restarted worker"
                assert await echoes(sup.web, 60) == []
                assert len(set(agent.tunnels) - before) == 1  # exactly the dead one's successor
        assert sup.metric("atlax_worker_restarts_total") == 1
        assert len(sup.workers()) == 3
    assert "exited (signal SIGKILL)" in sup.log.read_text()


async def test_the_control_socket_fans_out_and_undoes_nothing_half(
    pki: Pki, tmp_path: Path
) -> None:
    with supervised(tmp_path, pki, control=True) as sup:
        await wait_until(lambda: sup.control.exists(), 60, "the control socket")
        await wait_until(lambda: sup.readyz()[0] == 503, 30, "readyz answering")
        assert sup.readyz()[1]["detail"] == "waiting for its control state"
        client = ControlClient(sup.control)
        status, body = await client.put_agent("home-nas", [{"name": "web", "port": sup.web}])
        assert status == 200 and body["changed"] is True
        status, cluster = await client.set_cluster(1)
        assert status == 200 and cluster["synced"] and cluster["size"] == 3
        await ready(sup)
        async with tcp_service(echo_handler) as echo:
            agent = Agent(agent_settings(pki, sup.agent_port), {"web": echo})
            async with running_agent(agent):
                await wait_until(lambda: len(agent.tunnels) == 3, 60, "3 tunnels")
                cluster = await client.cluster()

                async def instances() -> list[str]:
                    _, view = await client.call("GET", "/agents/home-nas")
                    return sorted(i["instance"] for i in view["instances"])

                with anyio.fail_after(10):
                    while await instances() != sorted(cluster["instances"]):
                        await anyio.sleep(0.1)
                assert await exchange(sup.web, b"through a worker") == b"through a worker"
                with socket.socket() as squatter:  # another program holds this port
                    squatter.bind(("127.0.0.1", 0))
                    squatter.listen()
                    taken = squatter.getsockname()[1]
                    status, body = await client.put_agent("office", [{"name": "f", "port": taken}])
                    assert status == 409 and body["port"] == taken, body
                status, _ = await client.call("GET", "/agents/office")
                assert status == 404  # on no worker
                status, _ = await client.delete_agent("home-nas")
                assert status == 200
                await wait_until(lambda: not agent.tunnels, 30, "every worker dropped the agent")
                assert "UNAUTHORIZED" in (agent.last_error or "")  # removed, or not configured


async def test_sigterm_drains_every_worker_and_exits_zero(pki: Pki, tmp_path: Path) -> None:
    with supervised(tmp_path, pki) as sup:
        await ready(sup)
        workers = sup.workers()
        async with tcp_service(echo_handler) as echo:
            agent = Agent(agent_settings(pki, sup.agent_port), {"web": echo})
            async with running_agent(agent):
                await wait_until(lambda: len(agent.tunnels) == 3, 60, "3 tunnels")
                async with await anyio.connect_tcp("127.0.0.1", sup.web) as client:
                    await client.send(b"open before SIGTERM")
                    assert await client.receive() == b"open before SIGTERM"
                    assert sup.proc is not None
                    sup.proc.send_signal(signal.SIGTERM)
                    await wait_until(lambda: sup.readyz()[0] != 200, 10, "readyz false")
                    await client.send(b"still flowing")
                    assert await client.receive() == b"still flowing"
                    await client.send_eof()
                    with pytest.raises(anyio.EndOfStream):
                        await client.receive()
                assert await anyio.to_thread.run_sync(lambda: sup.proc.wait(30)) == 0  # type: ignore[union-attr]
        for pid in workers:
            await anyio.to_thread.run_sync(wait_gone, pid)
