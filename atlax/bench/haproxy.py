"""A real HAProxy in front of several relays, for the high-availability tests and benchmarks.

Each relay instance stands in for a host of its own: it binds the same port numbers on its own
loopback address (127.0.0.2, 127.0.0.3, 127.0.0.4), and HAProxy listens on 127.0.0.1 with one
TCP frontend per port (the agent port and every public port), forwarding to the same port on every
server. Health checks ask each relay's `/readyz` (its metrics port) or, without one, just connect
to the port, fast enough for tests (`inter`, `fall`, `rise` below). The runtime API (an admin
socket in the fixture's directory) marks a server down or up by hand.

There is no session affinity (no `stick` table, no `balance source`): an agent converges to one
tunnel per relay instance only because its successive dials can land on different instances. With
affinity every dial from the agent's address reaches the same instance, and the others never see
it (README, "High availability and scaling").

    with HAProxy(tmp_path, [Frontend("agent", port, "leastconn")], servers) as lb:
        lb.mark_down("r2")
        lb.wait_status("r2", "MAINT")

HAProxy comes from Debian (`hack/test-deps` installs it). The tests import this module through
tests/haproxy.py.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
FRONTEND_HOST = "127.0.0.1"
SERVER_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def shared_port(hosts: Iterable[str] = (FRONTEND_HOST, *SERVER_HOSTS), tries: int = 50) -> int:
    """A TCP port that is free on every one of `hosts` (the frontend and each server use it)."""
    hosts = tuple(hosts)
    for _ in range(tries):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port: int = probe.getsockname()[1]
        if all(_bindable(host, port) for host in hosts[1:]):
            return port
    raise RuntimeError(f"no port free on all of {', '.join(hosts)} after {tries} tries")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class Frontend:
    """`FRONTEND_HOST:port`, forwarded to `port` on every server."""

    name: str
    port: int
    balance: str = "roundrobin"  # leastconn suits the agent port: a dial goes where it has fewest


@dataclass(frozen=True)
class Server:
    """One relay instance: `host` carries every frontend's port; `check_port` serves /readyz."""

    name: str
    host: str
    check_port: int | None = None  # None: a TCP connect to the frontend's port is the check


class HAProxyError(Exception):
    """HAProxy rejected its configuration or did not come up; the message has its output."""


class HAProxy:
    def __init__(
        self,
        directory: Path,
        frontends: Sequence[Frontend],
        servers: Sequence[Server],
        *,
        inter_ms: int = 200,
        fall: int = 2,
        rise: int = 2,
        readyz: str = "/readyz",
    ) -> None:
        self.dir = directory
        self.frontends = list(frontends)
        self.servers = list(servers)
        self.inter_ms, self.fall, self.rise, self.readyz = inter_ms, fall, rise, readyz
        self.config = directory / "haproxy.cfg"
        self.admin = directory / "haproxy-admin.sock"
        self.log = directory / "haproxy.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- configuration -----------------------------------------------------------------------

    def config_text(self) -> str:
        lines = [
            "global",
            "    maxconn 4096",  # two descriptors each: within a 20,000 descriptor limit
            f"    stats socket {self.admin} mode 600 level admin",
            "    log stdout format raw local0 info",
            "",
            "defaults",
            "    mode tcp",
            "    log global",
            "    option tcplog",
            "    timeout connect 2s",
            "    timeout client 1h",  # tunnels and streams are long-lived; keepalive is Atlax's job
            "    timeout server 1h",
            "    timeout check 1s",
            # A connect that fails (a relay that just died, before the checks mark it down) is
            # retried, on another server: new connections do not fail for a dead instance.
            "    retries 3",
            "    option redispatch 1",
            "",
        ]
        check = (
            f"inter {self.inter_ms}ms fastinter {self.inter_ms}ms downinter {self.inter_ms}ms "
            f"fall {self.fall} rise {self.rise}"
        )
        for fe in self.frontends:
            lines += [
                f"frontend fe_{fe.name}",
                f"    bind {FRONTEND_HOST}:{fe.port}",
                f"    default_backend be_{fe.name}",
                "",
                f"backend be_{fe.name}",
                f"    balance {fe.balance}",  # no stick table, no source hash: no affinity
            ]
            if any(s.check_port is not None for s in self.servers):
                lines += [
                    f"    option httpchk GET {self.readyz}",
                    "    http-check expect status 200",
                ]
            for s in self.servers:
                port = f" port {s.check_port}" if s.check_port is not None else ""
                lines.append(f"    server {s.name} {s.host}:{fe.port} check{port} {check}")
            lines.append("")
        return "\n".join(lines)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> HAProxy:
        if not Path(HAPROXY).exists():
            raise HAProxyError("haproxy is missing: run hack/test-deps (make test does)")
        self.config.write_text(self.config_text())
        checked = subprocess.run(
            [HAPROXY, "-c", "-q", "-f", str(self.config)], capture_output=True, text=True
        )
        if checked.returncode != 0:
            raise HAProxyError(f"haproxy rejected {self.config}: {checked.stderr.strip()}")
        self._proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(self.config)],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise HAProxyError(f"haproxy exited with {self._proc.returncode}: see {self.log}")
            if self._frontends_open():
                return self
            time.sleep(0.05)
        self.stop()
        raise HAProxyError(f"haproxy did not come up within {timeout:g}s: see {self.log}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # hard stop: closes every connection at once
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- runtime API -------------------------------------------------------------------------

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One command on the admin socket; its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.admin))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def set_state(self, server: str, state: str) -> None:
        """`ready`, `drain` or `maint` for `server` in every backend (every port at once)."""
        for fe in self.frontends:
            answer = self.command(f"set server be_{fe.name}/{server} state {state}").strip()
            if answer:
                raise HAProxyError(f"set server be_{fe.name}/{server} state {state}: {answer}")

    def mark_down(self, server: str) -> None:
        """Send no new connection to `server` (open ones stay): what a failed check does."""
        self.set_state(server, "maint")

    def mark_up(self, server: str) -> None:
        self.set_state(server, "ready")

    def stats(self) -> dict[tuple[str, str], dict[str, str]]:
        """`show stat` as {(frontend name, server name): row}, for the servers of each backend."""
        text = self.command("show stat")
        header, *rows = [line for line in text.splitlines() if line.strip()]
        fields = header.lstrip("# ").split(",")
        out: dict[tuple[str, str], dict[str, str]] = {}
        for row in rows:
            values = dict(zip(fields, row.split(","), strict=False))
            backend, server = values.get("pxname", ""), values.get("svname", "")
            if backend.startswith("be_") and server not in ("BACKEND", "FRONTEND"):
                out[backend.removeprefix("be_"), server] = values
        return out

    def status(self, server: str, frontend: str | None = None) -> str:
        """`UP`, `DOWN`, `MAINT`, ... of `server` (in `frontend`'s backend, else the first)."""
        name = frontend or self.frontends[0].name
        return self.stats()[name, server]["status"].split()[0]

    def wait_status(
        self, server: str, want: str, timeout: float = 20.0, frontend: str | None = None
    ) -> None:
        """Until every backend (or `frontend`'s) reports `want` for `server`."""
        names = [frontend] if frontend else [fe.name for fe in self.frontends]
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            stats = self.stats()
            seen = [stats[name, server]["status"].split()[0] for name in names]
            if all(s == want for s in seen):
                return
            time.sleep(0.05)
        raise AssertionError(f"haproxy: {server} is {seen}, not {want}, after {timeout:g}s")

    def sessions_total(self, server: str, frontend: str) -> int:
        """Connections HAProxy has sent to `server` on `frontend`'s port so far."""
        return int(self.stats()[frontend, server]["stot"] or 0)

    def _frontends_open(self) -> bool:
        """The admin socket answers and every frontend listens (asked without connecting to it:
        a test connection would be forwarded and counted)."""
        try:
            text = self.command("show stat", timeout=1.0)
        except OSError:
            return False
        open_ = {
            row.split(",")[0]
            for row in text.splitlines()
            if ",FRONTEND," in row and ",OPEN," in row
        }
        return all(f"fe_{fe.name}" in open_ for fe in self.frontends)
