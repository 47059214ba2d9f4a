"""Starts the three paths (Atlax, `ssh -R`, direct) for measure.py to measure.

Every process is started in its own session and killed at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..demo import free_port

ROOT = Path(__file__).resolve().parents[2]
NOFILE = 65536
LIMITED = (
    "import resource,sys;"
    "s,h=resource.getrlimit(resource.RLIMIT_NOFILE);"
    f"resource.setrlimit(resource.RLIMIT_NOFILE,(min(h,{NOFILE}),h));"
    "from atlax.cli import main;sys.exit(main(sys.argv[1:]))"
)


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, NOFILE), hard))


def stable_port(host: str = "127.0.0.1") -> int:
    """A free port below the kernel's ephemeral range (32768 and up), for a relay that is stopped
    and started again on the same ports: while it is down, a port that some other process's
    `bind(0)` or outgoing connection may pick is taken more often than one might think."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    return free_port(host)


def bench_pki(pki: Path) -> Path:
    """A throwaway CA in `pki`, the relay's certificate (localhost, 127.0.0.1) and agent `bench`'s."""
    from datetime import timedelta

    from atlax import certs

    ca = certs.create_ca("bench CA")
    certs.write_ca(ca, pki)
    relay = certs.issue_server_certificate(
        ca, "relay", ["localhost", "127.0.0.1"], timedelta(days=1)
    )
    certs.write_pair(relay, pki, "relay")
    certs.write_pair(certs.issue_client_certificate(ca, "bench", timedelta(days=1)), pki, "bench")
    return pki


@dataclass(frozen=True)
class Ports:
    sink: int
    echo: int
    hold: int | None = None
    source: int | None = None
    sni: int | None = None  # the echo behind a port shared by SNI (Atlax only)
    udp: int | None = None  # a UDP echo (not through ssh -R, which carries only TCP)


SNI_NAME = "echo.bench.example"


class BenchError(Exception):
    """Something the benchmark needs could not be started; the message says what."""


class Lab:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.relay: subprocess.Popen[bytes] | None = None
        self.relay_argv: list[str] = []
        self.relay_pid = 0
        self.agent_port = 0
        self.metrics_port = 0

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{name}.log").open("ab")  # a restarted process appends
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    # -- the service ---------------------------------------------------------------------------

    def services(self) -> Ports:
        proc = subprocess.Popen(
            [sys.executable, "-m", "atlax.bench.services"],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise BenchError("the benchmark service did not start")
        ports = json.loads(line)
        return Ports(ports["sink"], ports["echo"], ports["hold"], ports["source"], udp=ports["udp"])

    # -- Atlax ---------------------------------------------------------------------------------

    def atlax(self, service: Ports, workers: int = 1) -> Ports:
        """The Atlax path: a relay (`--workers N`), an agent, the service behind it."""
        pki = bench_pki(self.dir / "pki")
        public = Ports(*(stable_port() for _ in range(6)))
        agent_port, self.metrics_port = stable_port(), free_port()
        services = ", ".join(
            f'{{ name = "{n}", port = {getattr(public, n)} }}'
            for n in ("sink", "echo", "hold", "source")
        )
        services += (
            f', {{ name = "sni", port = {public.sni}, route = "tls", hostnames = ["{SNI_NAME}"] }}'
            f', {{ name = "udp", port = {public.udp}, protocol = "udp" }}'
        )
        config = self.dir / "relay.toml"
        config.write_text(
            f'[relay]\nlisten = "127.0.0.1:{agent_port}"\nca = "pki/ca.crt"\ncert = "pki/relay.crt"\n'
            f'key = "pki/relay.key"\npublic_host = "127.0.0.1"\nmetrics = "127.0.0.1:{self.metrics_port}"\n'
            "max_connections_per_port = 20000\nmax_connections_per_source = 20000\n"
            "max_streams_per_agent = 20000\n"
            f'[[agents]]\nname = "bench"\nservices = [ {services} ]\n'
        )
        self.relay_argv = [
            sys.executable,
            "-c",
            LIMITED,
            "--log-level",
            "warning",
            "relay",
            "--config",
            str(config),
            "--workers",
            str(workers),
        ]
        self.relay = self.spawn("relay", self.relay_argv)
        self.relay_pid = self.relay.pid
        self.agent_port = agent_port
        argv = [
            sys.executable,
            "-c",
            LIMITED,
            "--log-level",
            "warning",
            "agent",
            "--relay",
            f"localhost:{agent_port}",
            "--ca",
            str(pki / "ca.crt"),
            "--cert",
            str(pki / "bench.crt"),
            "--key",
            str(pki / "bench.key"),
        ]
        for name in ("sink", "echo", "hold", "source"):
            argv += ["--service", f"{name}=127.0.0.1:{getattr(service, name)}"]
        argv += ["--service", f"sni=127.0.0.1:{service.echo}"]
        argv += ["--service", f"udp=127.0.0.1:{service.udp}/udp"]
        self.spawn("agent", argv)
        # A bound for a loaded machine (the relay and the agent start as Python processes beside
        # whatever else runs), not a measurement: startup is not what the benchmark reports.
        self._wait_echo(public.echo, "the Atlax tunnel", timeout=60, logs=("relay", "agent"))
        return public

    def kill_relay(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Stop the Atlax relay (the agent keeps running) and wait until it has exited."""
        assert self.relay is not None, "start the Atlax path first"
        self.relay.send_signal(sig)
        self.relay.wait(60)

    def restart_relay(self) -> None:
        """Start the relay again with the same configuration (same ports, same CA)."""
        self.relay = self.spawn("relay", self.relay_argv)
        self.relay_pid = self.relay.pid

    def relay_rss_mb(self) -> float:
        text = Path(f"/proc/{self.relay_pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", text)
        assert match
        return int(match.group(1)) / 1024

    def relay_open_streams(self) -> float:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as resp:
            text = resp.read().decode()
        match = re.search(r'^atlax_streams_open\{agent="bench"\} ([0-9.e+]+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    # -- ssh -R --------------------------------------------------------------------------------

    def ssh(self, service: Ports) -> Ports:
        sshd = "/usr/sbin/sshd"
        if not os.path.exists(sshd):
            subprocess.run([str(ROOT / "hack" / "install-sshd")], check=True)
        d = self.dir / "ssh"
        d.mkdir()
        for key in ("host_key", "user_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True
            )
        shutil.copy(d / "user_key.pub", d / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)
        port = free_port()
        (d / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "AllowTcpForwarding yes\nLogLevel ERROR\nMaxStartups 100\n"
        )
        self.spawn("sshd", [sshd, "-D", "-e", "-f", str(d / "sshd_config")])
        self._wait_port(port, "sshd")
        public = Ports(free_port(), free_port(), free_port(), free_port())
        argv = [
            "ssh",
            "-N",
            "-T",
            "-i",
            str(d / "user_key"),
            "-p",
            str(port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
        ]
        for name in ("sink", "echo", "hold", "source"):
            argv += ["-R", f"127.0.0.1:{getattr(public, name)}:127.0.0.1:{getattr(service, name)}"]
        self.spawn("ssh", [*argv, f"{os.environ.get('USER', 'root')}@127.0.0.1"])
        self._wait_echo(public.echo, "the ssh -R tunnel")
        return public

    # -- helpers -------------------------------------------------------------------------------

    def _wait_port(self, port: int, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise BenchError(
            f"{what} did not listen on 127.0.0.1:{port} within {timeout:g}s; logs in {self.dir}"
        )

    def _wait_echo(
        self, port: int, what: str, timeout: float = 20, logs: tuple[str, ...] = ()
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"x")
                    if sock.recv(1) == b"x":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        tails = "".join(self._tail(name) for name in logs)  # the directory goes with the run
        raise BenchError(
            f"{what} did not carry traffic within {timeout:g}s; logs in {self.dir}{tails}"
        )

    def _tail(self, name: str, lines: int = 8) -> str:
        try:
            text = (self.dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return f"\n{name}.log ends:\n" + "\n".join(text.splitlines()[-lines:])
