"""Relay processes on 127.0.0.2-4 behind a real HAProxy: the high-availability tests' cluster.

Each relay is `atlax relay` as a process of its own (so it can be killed, frozen and restarted),
on its own loopback address with the same port numbers, like three hosts. Its state comes through
its control socket as a sync sidecar would send it: the agent's services, then the cluster's
replicas (which marks the relay ready). HAProxy (atlax/bench/haproxy.py) listens on 127.0.0.1:
the agent port with `leastconn`, the public port with `roundrobin`, health checks on /readyz.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anyio
from conftest import Pki
from haproxy import SERVER_HOSTS, Frontend, HAProxy, Server, shared_port

from atlax.control.client import ControlClient, ControlSocketError

AGENT = "home-nas"


class RelayProcess:
    def __init__(
        self,
        name: str,
        host: str,
        directory: Path,
        pki: Pki,
        ports: dict[str, int],
        replicas: int,
        extra: str = "",
    ) -> None:
        self.name, self.host, self.dir = name, host, directory
        self.ports = ports
        self.replicas = replicas
        directory.mkdir(parents=True, exist_ok=True)
        self.control = directory / "control.sock"
        self.log = directory / "relay.log"
        self.config = directory / "relay.toml"
        self.config.write_text(
            f'[relay]\nlisten = "{host}:{ports["agent"]}"\nca = "{pki.ca}"\n'
            f'cert = "{pki.relay_crt}"\nkey = "{pki.relay_key}"\npublic_host = "{host}"\n'
            f'metrics = "{host}:{ports["metrics"]}"\ncontrol_socket = "{self.control}"\n'
            "keepalive_interval = 2.0\nkeepalive_timeout = 10.0\ndrain_timeout = 5.0\n"
            "max_connections_per_port = 10000\nmax_connections_per_source = 10000\n" + extra
        )
        self.proc: subprocess.Popen[bytes] | None = None

    # -- process -----------------------------------------------------------------------------

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "atlax.cli", "relay", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """At the end of a test, whatever state it is in."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for signum in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:
                return
        proc.wait(10)

    # -- state -------------------------------------------------------------------------------

    async def push(self, timeout: float = 30.0) -> None:
        """What a sync sidecar does: the agent, then the replicas (the relay is ready after)."""
        client = ControlClient(self.control, timeout=5)
        with anyio.fail_after(timeout):
            while True:
                try:
                    await client.health()
                    break
                except ControlSocketError:
                    await anyio.sleep(0.05)
            status, body = await client.put_agent(
                AGENT, [{"name": "web", "port": self.ports["web"]}]
            )
            assert status == 200, body
            status, body = await client.set_cluster(self.replicas)
            assert status == 200 and body["synced"], body

    async def set_replicas(self, replicas: int) -> None:
        self.replicas = replicas
        status, body = await ControlClient(self.control, timeout=5).set_cluster(replicas)
        assert status == 200, body

    async def cluster(self) -> dict[str, object]:
        return await ControlClient(self.control, timeout=5).cluster()

    def metrics(self) -> str:
        url = f"http://{self.host}:{self.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of the relay's /metrics (0 if absent)."""
        pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
        match = re.search(pattern, self.metrics(), re.M)
        return float(match.group(1)) if match else 0.0


class RelayCluster:
    """Three relays (r1, r2, r3) and HAProxy; `async with` starts and stops everything."""

    def __init__(
        self, directory: Path, pki: Pki, *, balance: str = "leastconn", extra: str = ""
    ) -> None:
        self.ports = {"agent": shared_port(), "web": shared_port(), "metrics": shared_port()}
        self.relays = [
            RelayProcess(f"r{i + 1}", host, directory / f"r{i + 1}", pki, self.ports, 3, extra)
            for i, host in enumerate(SERVER_HOSTS)
        ]
        self.haproxy = HAProxy(
            directory,
            [Frontend("agent", self.ports["agent"], balance), Frontend("web", self.ports["web"])],
            [Server(r.name, r.host, self.ports["metrics"]) for r in self.relays],
        )

    @property
    def agent_port(self) -> int:
        return self.ports["agent"]

    @property
    def web_port(self) -> int:
        return self.ports["web"]

    async def __aenter__(self) -> RelayCluster:
        try:
            for relay in self.relays:
                relay.start()
            for relay in self.relays:
                await relay.push()
            await anyio.to_thread.run_sync(self.haproxy.start)
            for relay in self.relays:
                await self.wait_status(relay, "UP")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.haproxy.stop()
        for relay in self.relays:
            relay.stop()

    async def wait_status(self, relay: RelayProcess, status: str, timeout: float = 30) -> None:
        await anyio.to_thread.run_sync(
            lambda: self.haproxy.wait_status(relay.name, status, timeout)
        )

    async def restart(self, relay: RelayProcess) -> None:
        """Start a stopped relay again and give it its state; returns once HAProxy sends to it."""
        relay.start()
        await relay.push()
        await self.wait_status(relay, "UP")

    def logs(self) -> str:
        return "\n".join(
            f"--- {r.name}\n{r.log.read_text()[-3000:] if r.log.exists() else ''}"
            for r in self.relays
        )


def wait_gone(pid: int, timeout: float = 15.0) -> None:
    """Until process `pid` has exited and been reaped. Not merely a zombie: a killed process's
    main thread turns zombie while its other threads still exit, and their shared file table,
    listening sockets included, is closed only after the last one (the relay runs threads for
    name lookups), so a connection made meanwhile can still land on the dying process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still there after {timeout:g}s")
