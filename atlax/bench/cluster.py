"""python -m atlax.bench.cluster [--balance leastconn] [--rate 20] [--json FILE]

Three relay instances behind a real HAProxy, with real processes: relays on 127.0.0.2, 127.0.0.3
and 127.0.0.4 (the same ports on each, like three hosts), HAProxy on 127.0.0.1 in front of the agent
port and the public port (health checks on each relay's /readyz), one agent dialling HAProxy, an
echo service. Measured:

- convergence: agent start -> every instance reports the agent connected (its metrics), in ms;
- rolling restart: a client opens connections at a fixed rate (4 KiB of random bytes each, echoed
  and checked by SHA-256) while each relay in turn gets SIGTERM and is started again; counted:
  attempted, failed (refused, reset, or closed before the whole echo came back) and corrupted
  (bytes came back that were not the ones sent).

Nothing is asserted: it measures (the same figures become `convergence_ms` and `rollout_failed` of
`python -m atlax.bench`). HAProxy comes from Debian: `apt-get install haproxy` (`hack/test-deps`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .haproxy import HAPROXY, SERVER_HOSTS, Frontend, HAProxy, HAProxyError, Server, shared_port
from .harness import LIMITED, BenchError, Lab, bench_pki

PAYLOAD = 4096


@dataclass
class RolloutResult:
    attempted: int = 0
    failed: int = 0
    corrupted: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # the first few, for the log

    def as_dict(self) -> dict[str, Any]:
        return {
            "attempted": self.attempted,
            "failed": self.failed,
            "corrupted": self.corrupted,
            "seconds": self.seconds,
            "failures": self.failures[:10],
        }


class ClusterLab:
    """Relays, HAProxy and an agent; every process is killed when the lab's `Lab` exits."""

    def __init__(self, lab: Lab, *, balance: str = "leastconn", drain_timeout: float = 5.0) -> None:
        if not Path(HAPROXY).exists():
            raise BenchError("haproxy is missing: apt-get install haproxy (or hack/test-deps)")
        self.lab = lab
        self.dir = lab.dir
        self.balance = balance
        self.drain_timeout = drain_timeout
        self.hosts = SERVER_HOSTS
        self.relays: list[subprocess.Popen[bytes] | None] = [None] * len(self.hosts)
        self.agent: subprocess.Popen[bytes] | None = None
        self.haproxy: HAProxy | None = None

    def start(self) -> None:
        self.pki = bench_pki(self.dir / "pki")
        service = self.lab.services()
        self.service_echo = service.echo
        self.agent_port, self.echo_port, self.metrics_port = (shared_port() for _ in range(3))
        for i in range(len(self.hosts)):
            self.start_relay(i)
        self.haproxy = HAProxy(
            self.dir,
            [Frontend("agent", self.agent_port, self.balance), Frontend("echo", self.echo_port)],
            [Server(f"r{i + 1}", h, self.metrics_port) for i, h in enumerate(self.hosts)],
        )
        try:
            self.haproxy.start()
            for i in range(len(self.hosts)):
                self.haproxy.wait_status(f"r{i + 1}", "UP")
        except (HAProxyError, AssertionError) as exc:
            raise BenchError(f"haproxy: {exc}") from None

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()

    # -- relays --------------------------------------------------------------------------------

    def _config(self, i: int) -> Path:
        host = self.hosts[i]
        config = self.dir / f"relay-{i + 1}.toml"
        config.write_text(
            f'[relay]\nlisten = "{host}:{self.agent_port}"\nca = "pki/ca.crt"\n'
            f'cert = "pki/relay.crt"\nkey = "pki/relay.key"\npublic_host = "{host}"\n'
            f'metrics = "{host}:{self.metrics_port}"\ndrain_timeout = {self.drain_timeout}\n'
            f"replicas = {len(self.hosts)}\n"  # three relays: the cluster size they advertise
            "max_connections_per_port = 20000\nmax_connections_per_source = 20000\n"
            f'[[agents]]\nname = "bench"\nservices = [ {{ name = "echo", port = {self.echo_port} }} ]\n'
        )
        return config

    def start_relay(self, i: int) -> None:
        argv = [sys.executable, "-c", LIMITED, "relay", "--config", str(self._config(i))]
        self.relays[i] = self.lab.spawn(f"relay-{i + 1}", argv)
        deadline = time.monotonic() + 30
        while not self.relay_ready(i):
            if time.monotonic() > deadline:
                raise BenchError(f"relay {i + 1} not ready within 30s; logs in {self.dir}")
            time.sleep(0.05)

    def stop_relay(self, i: int, sig: signal.Signals = signal.SIGTERM) -> None:
        relay = self.relays[i]
        assert relay is not None
        relay.send_signal(sig)
        relay.wait(self.drain_timeout + 30)

    def relay_ready(self, i: int) -> bool:
        try:
            url = f"http://{self.hosts[i]}:{self.metrics_port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def instances_connected(self) -> int:
        """Relay instances that report the agent connected."""
        count = 0
        for host in self.hosts:
            try:
                url = f"http://{host}:{self.metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    text = resp.read().decode()
            except OSError:
                continue
            match = re.search(r"^atlax_agents_connected ([0-9.e+]+)$", text, re.M)
            if match and float(match.group(1)) >= 1:
                count += 1
        return count

    # -- the agent -----------------------------------------------------------------------------

    def start_agent(self) -> None:
        pki = self.pki
        argv = [
            sys.executable,
            "-c",
            LIMITED,
            "agent",
            "--relay",
            f"localhost:{self.agent_port}",
            "--ca",
            str(pki / "ca.crt"),
            "--cert",
            str(pki / "bench.crt"),
            "--key",
            str(pki / "bench.key"),
            "--service",
            f"echo=127.0.0.1:{self.service_echo}",
        ]
        self.agent = self.lab.spawn("agent", argv)

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.send_signal(signal.SIGTERM)
            self.agent.wait(30)
            self.agent = None

    def wait_instances(self, want: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.instances_connected() == want:
                return True
            time.sleep(0.02)
        return False

    # -- measurements --------------------------------------------------------------------------

    def convergence_ms(self, timeout: float = 60.0) -> float | None:
        """Agent start -> every instance has it; None if that did not happen within `timeout`."""
        self.stop_agent()
        if not self.wait_instances(0, 30):
            raise BenchError("relays still report the agent after it stopped")
        start = time.perf_counter()
        self.start_agent()
        done = self.wait_instances(len(self.hosts), timeout)
        return (time.perf_counter() - start) * 1e3 if done else None

    def rollout(self, rate: float, settle: float = 2.0) -> RolloutResult:
        """Each relay in turn: SIGTERM, start again, wait until ready and joined by the agent
        (at most 30 s), while connections arrive at `rate` per second."""
        result = RolloutResult()
        stop = threading.Event()
        client = threading.Thread(target=client_at_rate, args=(self.echo_port, rate, stop, result))
        start = time.monotonic()
        client.start()
        try:
            time.sleep(settle)
            for i in range(len(self.hosts)):
                self.stop_relay(i, signal.SIGTERM)
                self.start_relay(i)
                self.wait_instances(len(self.hosts), 30)
                time.sleep(settle)
        finally:
            stop.set()
            client.join()
        result.seconds = time.monotonic() - start
        return result


def client_at_rate(port: int, rate: float, stop: threading.Event, result: RolloutResult) -> None:
    """One connection every 1/rate s, each in a thread of its own; waits for all at the end."""
    lock = threading.Lock()
    threads: list[threading.Thread] = []

    def one() -> None:
        payload = os.urandom(PAYLOAD)
        try:
            got = echo_once(port, payload)
        except OSError as exc:
            with lock:
                result.failed += 1
                result.failures.append(f"{type(exc).__name__}: {exc}")
            return
        if hashlib.sha256(got).digest() == hashlib.sha256(payload).digest():
            return
        with lock:
            if payload.startswith(got):  # closed early: nothing wrong arrived, but it failed
                result.failed += 1
                result.failures.append(f"closed after {len(got)} of {len(payload)} bytes")
            else:
                result.corrupted += 1
                result.failures.append(f"corrupted: {len(got)} bytes back, not the ones sent")

    next_at = time.monotonic()
    while not stop.is_set():
        thread = threading.Thread(target=one)
        thread.start()
        threads.append(thread)
        with lock:
            result.attempted += 1
        next_at += 1 / rate
        time.sleep(max(0.0, next_at - time.monotonic()))
    for thread in threads:
        thread.join()


def echo_once(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.settimeout(15)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def run(
    balance: str, rate: float, convergence_runs: int, log: Callable[[str], None]
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="atlax-cluster-") as tmp, Lab(Path(tmp)) as lab:
        cluster = ClusterLab(lab, balance=balance)
        try:
            log("starting 3 relays, haproxy, the agent ...")
            cluster.start()
            times = []
            for n in range(convergence_runs):
                log(f"convergence {n + 1}/{convergence_runs} ...")
                times.append(cluster.convergence_ms())
            reached = [t for t in times if t is not None]
            log(f"rolling restart of 3 relays at {rate:g} connections/s ...")
            rollout = cluster.rollout(rate)
        finally:
            cluster.stop()
    return {
        "balance": balance,
        "convergence_ms": statistics.median(reached) if reached else None,
        "convergence_runs_ms": times,
        "rollout": rollout.as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atlax.bench.cluster", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument(
        "--balance",
        default="leastconn",
        choices=["leastconn", "roundrobin", "random"],
        help="HAProxy's balance algorithm on the agent port (default leastconn)",
    )
    parser.add_argument("--rate", type=float, default=20.0, help="connections per second")
    parser.add_argument("--convergence-runs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        results = run(args.balance, args.rate, args.convergence_runs, log)
    except BenchError as exc:
        print(f"atlax.bench.cluster: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
