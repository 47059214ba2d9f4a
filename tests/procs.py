"""The relay and the agent as processes (the `atlax` CLI), observed from outside.

The abuse tests drive a relay the way an attacker and an operator would: sockets, the control
socket, the CLI, `/metrics`, the log, and the process's resident memory (`VmRSS` in
/proc/PID/status, what a pod's memory limit is about). Nothing here imports the relay's modules,
so these tests hold whatever shape the code takes inside.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ATLAX = [sys.executable, "-m", "atlax.cli"]
MIB = 1 << 20


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def poll(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Wait for a truthy value (returned) or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


@dataclass
class Proc:
    """A CLI process whose output goes to a log file."""

    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_log(self, fragment: str, timeout: float = 20.0, *, after: int = 0) -> str:
        """Wait until `fragment` appears in the log (past offset `after`); return the log."""

        def seen() -> str | None:
            text = self.log()
            if fragment in text[after:]:
                return text
            if not self.alive():
                raise AssertionError(f"process exited ({self.popen.returncode}): {text[-2000:]}")
            return None

        return str(poll(seen, timeout, f"{fragment!r} in {self.log_path.name}"))

    def stop(self, timeout: float = 15.0) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


def spawn(args: list[str], log_path: Path, cwd: Path | None = None) -> Proc:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as out:
        popen = subprocess.Popen(
            [*ATLAX, *args], stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env
        )
    return Proc(popen, log_path)


@dataclass
class RelayProc(Proc):
    listen: int = 0
    metrics_port: int = 0
    control_socket: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by (name, sorted labels)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """One sample (0 when it has not appeared yet, as for a counter never incremented)."""
        return self.scrape().get((name, tuple(sorted(labels.items()))), 0.0)

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False


def relay_toml(
    path: Path,
    pki: Any,
    *,
    listen: int,
    metrics: int,
    agents: str = "",
    extra: str = "",
) -> Path:
    path.write_text(
        f'[relay]\nlisten = "127.0.0.1:{listen}"\nca = "{pki.ca}"\ncert = "{pki.relay_crt}"\n'
        f'key = "{pki.relay_key}"\npublic_host = "127.0.0.1"\nmetrics = "127.0.0.1:{metrics}"\n'
        f"{extra}\n{agents}"
    )
    return path


def agent_table(name: str, services: dict[str, int], options: str = "", each: str = "") -> str:
    """An [[agents]] table; `options` go into the agent's table, `each` into every service's."""
    more = f", {each}" if each else ""
    items = ", ".join(f'{{ name = "{s}", port = {p}{more} }}' for s, p in services.items())
    return f'[[agents]]\nname = "{name}"\nservices = [{items}]\n{options}\n'


@contextmanager
def relay_process(
    tmp: Path, pki: Any, *, agents: str = "", extra: str = "", name: str = "relay"
) -> Iterator[RelayProc]:
    """`atlax relay` with a metrics port; yields once /readyz answers 200."""
    listen, metrics = free_port(), free_port()
    config = relay_toml(
        tmp / f"{name}.toml", pki, listen=listen, metrics=metrics, agents=agents, extra=extra
    )
    proc = spawn(["relay", "--config", str(config)], tmp / f"{name}.log")
    relay = RelayProc(proc.popen, proc.log_path, listen=listen, metrics_port=metrics)
    try:
        poll(lambda: relay.ready() or (not relay.alive() and _died(relay)), 30, "the relay")
        yield relay
    finally:
        relay.stop()


def _died(proc: Proc) -> bool:
    raise AssertionError(f"relay exited ({proc.popen.returncode}): {proc.log()[-2000:]}")


@contextmanager
def agent_process(
    tmp: Path,
    pki: Any,
    relay_port: int,
    services: dict[str, tuple[str, int]],
    *,
    identity: str = "home-nas",
    cert: Path | None = None,
    key: Path | None = None,
    ca: Path | None = None,
    relay_host: str = "localhost",
    config: str = "",
    name: str = "agent",
    wait: bool = True,
) -> Iterator[Proc]:
    """`atlax agent`; yields once its tunnel is up (unless `wait` is False).

    Certificates default to `identity`'s in the test PKI. With `config`, the agent reads an
    agent.toml holding those settings plus `config` (extra [agent] keys); else flags.
    """
    default_cert, default_key = pki.agent(identity) if pki is not None else (None, None)
    files = {"ca": ca or pki.ca, "cert": cert or default_cert, "key": key or default_key}
    relay = f"{relay_host}:{relay_port}"
    if config:
        path = tmp / f"{name}.toml"
        lines = [
            f'relay = "{relay}"',
            *(f'{k} = "{v}"' for k, v in files.items()),
            "backoff_cap = 1.0",
            config,
        ]
        table = "\n".join(f'{s} = "{h}:{p}"' for s, (h, p) in services.items())
        path.write_text("[agent]\n" + "\n".join(lines) + "\n\n[services]\n" + table + "\n")
        args = ["agent", "--config", str(path)]
    else:
        args = ["agent", "--relay", relay, "--backoff-cap", "1"]
        for flag, value in files.items():
            args += [f"--{flag}", str(value)]
        for service, (host, port) in services.items():
            args += ["--service", f"{service}={host}:{port}"]
    proc = spawn(args, tmp / f"{name}.log")
    try:
        if wait:
            proc.wait_log("tunnel up to", 30)
        yield proc
    finally:
        proc.stop()


# -- services and clients, in threads of the test process ---------------------------------------


@contextmanager
def service(handler: str) -> Iterator[tuple[str, int]]:
    """A TCP service on 127.0.0.1: `echo`, or `source` (sends 8 MiB, then waits for EOF)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    stop = threading.Event()
    chunk = os.urandom(256 * 1024)

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                if handler == "echo":
                    while data := conn.recv(262144):
                        conn.sendall(data)
                else:
                    for _ in range(32):
                        conn.sendall(chunk)
                    while conn.recv(65536):
                        pass
            except OSError:
                return

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def echo_once(port: int, payload: bytes, timeout: float = 20.0) -> bytes:
    """Connect to the public port, send, half-close, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        out = bytearray()
        while data := conn.recv(262144):
            out += data
        return bytes(out)


def served(port: int) -> bool:
    """A real client's round trip through the relay, with a random payload checked by hash."""
    payload = os.urandom(64 * 1024)
    try:
        reply = echo_once(port, payload)
    except OSError:
        return False
    return hashlib.sha256(reply).digest() == hashlib.sha256(payload).digest()


def steady(value: Callable[[], float], quiet: float = 1.0, limit: float = 30.0) -> float:
    """Poll `value` until it has not changed for `quiet` seconds (or `limit` passed); return it."""
    deadline = time.monotonic() + limit
    last, since = value(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


class RssSampler:
    """Samples a process's RSS in a thread; `peak` is the highest seen."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.pid = pid
        self.every = every
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, AssertionError):
                return
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def settle(self, quiet: float = 2.0, limit: float = 20.0) -> None:
        """Wait until the peak has not grown by more than 1 MiB for `quiet` seconds."""
        deadline = time.monotonic() + limit
        mark, since = self.peak, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if self.peak > mark + MIB:
                mark, since = self.peak, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return


def report(what: str, **figures: object) -> None:
    """One line of figures for the abuse suite's report (shown with `pytest -s` and in -rA)."""
    parts = []
    for key, value in figures.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.1f}")
        else:
            parts.append(f"{key}={value}")
    line = f"[abuse] {what}: " + ", ".join(parts)
    print(line, flush=True)
    results = os.environ.get("ATLAX_ABUSE_REPORT")
    if results:
        with open(results, "a") as out:
            out.write(json.dumps({"what": what, **{k: str(v) for k, v in figures.items()}}) + "\n")


def mib(n: int | float) -> float:
    return n / MIB
