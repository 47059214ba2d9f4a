"""Relay pods and controller pods on a bare API server, as sets of real processes.

tests/controlplane.py runs no kubelet and no controller-manager, so what they would do for the
high-availability tests is done here, in the plainest way:
- a relay pod is `atlax relay` and `atlax operator sync` on its own loopback address (127.0.0.2,
  .3, .4, .5: an IP per pod, as a pod network gives, with the same port numbers on each), sharing a
  directory for the control socket;
- its certificate comes from Secret atlax-relay-tls, copied into the pod's `tls/` directory the
  way the kubelet projects a mounted Secret (and again when it changes);
- the Service's EndpointSlice lists the relay pods whose /readyz answers 200 and that are not
  terminating (the endpointslice controller's job, from the kubelet's readiness probes);
- the load balancer in front of them is HAProxy (atlax/bench/haproxy.py), health-checking /readyz;
- a controller pod is `atlax operator controller`;
- every process authenticates with a token of its role's ServiceAccount, bound to the Role the
  chart renders for it: whatever the chart forgets to allow fails here.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT, free_port, wait_for
from controlplane import ControlPlane
from test_chart import render

from atlax.bench.harness import stable_port

RELEASE = "atlax"  # the chart's fullname: Service, ServiceAccounts and Roles are named after it
SERVICE = RELEASE
LEASE = f"{RELEASE}-controller"
# Shorter than the defaults (15, 10, 2), long enough for a machine whose load is 10 on 2 cores.
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 8.0, 6.0, 1.0


def atlax(*args: str) -> list[str]:
    return [sys.executable, "-m", "atlax.cli", *args]


@dataclass
class Namespace:
    """A namespace with the CRD, the relay Service, and the chart's RBAC for each role."""

    cp: ControlPlane
    name: str
    dir: Path
    kubeconfigs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def create(cls, cp: ControlPlane, dir: Path) -> Namespace:
        ns = cls(cp, f"ha-{uuid.uuid4().hex[:8]}", dir)
        cp.kubectl("apply", "-f", str(ROOT / "manifests" / "crd.yaml"))
        cp.kubectl("create", "namespace", ns.name)
        cp.kubectl("create", "service", "loadbalancer", SERVICE, "--tcp=7443:7443", "-n", ns.name)
        wanted = {"ServiceAccount", "Role", "RoleBinding"}
        docs = [d for d in render(namespace=ns.name) if d["kind"] in wanted]
        cp.kubectl(
            "apply", "-n", ns.name, "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs)
        )
        for role in ("controller", "sync"):
            token = cp.kubectl(
                "create", "token", f"{RELEASE}-{role}", "-n", ns.name, "--duration=1h"
            ).stdout.strip()
            ns.kubeconfigs[role] = cp.kubeconfig_for_token(
                token, dir / f"{role}.kubeconfig", namespace=ns.name
            )
        return ns

    def env(self, role: str) -> dict[str, str]:
        return {
            "KUBECONFIG": str(self.kubeconfigs[role]),
            "PATH": "/usr/bin:/bin",
            "PYTHONUNBUFFERED": "1",
        }

    def get(self, *args: str) -> Any:
        result = self.cp.kubectl("get", *args, "-n", self.name, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def apply(self, obj: dict[str, Any]) -> None:
        obj.setdefault("metadata", {})["namespace"] = self.name
        self.cp.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def secret(self, name: str) -> dict[str, bytes] | None:
        secret = self.get("secret", name)
        if secret is None:
            return None
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    def lease_holder(self) -> str:
        lease = self.get("lease", LEASE)
        return (lease or {}).get("spec", {}).get("holderIdentity") or ""

    def ready_reports(self) -> set[str]:
        """The relay pods whose sidecar reports its relay ready (fresh or not)."""
        leases = self.get("leases", "-l", f"atlax.dev/relay-report={SERVICE}") or {"items": []}
        ready = set()
        for lease in leases["items"]:
            report = json.loads(lease["metadata"]["annotations"]["atlax.dev/report"])
            if report["ready"]:
                ready.add(report["pod"])
        return ready

    def status(self, agent: str) -> dict[str, Any]:
        obj = self.get("tunnelagent", agent)
        return (obj or {}).get("status", {})

    def condition(self, agent: str, type_: str) -> dict[str, Any]:
        conditions = self.status(agent).get("conditions", [])
        return next((c for c in conditions if c["type"] == type_), {})

    def cleanup(self) -> None:
        """No controller may be left to remove the finalizers: take them off, then delete."""
        names = self.cp.kubectl("get", "tunnelagents", "-n", self.name, "-o", "name").stdout.split()
        for name in names:
            unblock = '{"metadata": {"finalizers": null}}'
            self.cp.kubectl("patch", name, "-n", self.name, "--type=merge", "-p", unblock)
        self.cp.kubectl("delete", "namespace", self.name, "--wait=false")


class Process:
    """A process of a pod, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self.proc = subprocess.Popen(
            argv, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env, text=True
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, wait: float = 30.0) -> int | None:
        if self.alive():
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Controller:
    def __init__(
        self, ns: Namespace, identity: str, relay_address: str, kubeconfig: Path | None = None
    ) -> None:
        self.identity = identity
        argv = atlax(
            "operator",
            "controller",
            *("--namespace", ns.name, "--service-name", SERVICE, "--lease-name", LEASE),
            *("--identity", identity, "--relay-address", relay_address),
            *("--relay-san", "localhost", "--relay-san", "127.0.0.1", "--status-interval", "1"),
            *("--lease-duration", str(LEASE_DURATION), "--renew-deadline", str(RENEW_DEADLINE)),
            *("--retry-period", str(RETRY_PERIOD)),
        )
        env = ns.env("controller")
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        self.process = Process(identity, argv, env, ns.dir / f"{identity}.log")


class RelayPod:
    """`atlax relay` + `atlax operator sync` on 127.0.0.N, with the relay's Secret projected."""

    def __init__(
        self, ns: Namespace, name: str, ip: str, agent_port: int, metrics_port: int | None = None
    ) -> None:
        self.ns = ns
        self.name = name
        self.ip = ip
        self.agent_port = agent_port
        self.metrics_port = metrics_port or free_port()
        # The sync's /readyz listens on every address, so a port any outgoing connection holds as
        # its local port (the ephemeral range, busy under a rollout's load) makes it fail to start
        # with 'Address already in use': one from below that range, free on the wildcard address.
        self.health_port = stable_port("")
        self.terminating = False  # deleted: out of the EndpointSlice at once, as in Kubernetes
        self.dir = ns.dir / name
        (self.dir / "tls").mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "run" / "control.sock"
        self.config = self.dir / "relay.toml"
        self.config.write_text(
            f'[relay]\nlisten = "{ip}:{agent_port}"\nca = "tls/ca.crt"\ncert = "tls/tls.crt"\n'
            f'key = "tls/tls.key"\npublic_host = "{ip}"\ncontrol_socket = "{self.socket}"\n'
            f'metrics = "{ip}:{self.metrics_port}"\nkeepalive_interval = 1.0\n'
            "keepalive_timeout = 3.0\ndrain_timeout = 5.0\n"
        )
        self.relay: Process | None = None
        self.sync: Process | None = None
        self._projected: dict[str, bytes] = {}

    def project_tls(self) -> bool:
        """What the kubelet does for a Secret volume: the keys as files, replaced atomically."""
        data = self.ns.secret("atlax-relay-tls")
        if not data or data == self._projected:
            return bool(data)
        for key in ("ca.crt", "tls.crt", "tls.key"):
            tmp = self.dir / "tls" / f".{key}.tmp"
            tmp.write_bytes(data[key])
            os.replace(tmp, self.dir / "tls" / key)
        self._projected = data
        return True

    def start(self) -> None:
        """Like a pod: its containers start once its Secret volume can be mounted."""
        wait_for(self.project_tls, 60, f"Secret atlax-relay-tls for {self.name}")
        log = self.dir / "relay.log"
        self.relay = Process(
            f"{self.name}/relay",
            atlax("relay", "--config", str(self.config), "--wait-for-tls", "60"),
            {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},  # no token in the relay
            log,
        )
        self.sync = Process(
            f"{self.name}/sync",
            atlax(
                "operator",
                "sync",
                *("--namespace", self.ns.name, "--service-name", SERVICE),
                *("--control-socket", str(self.socket), "--pod-name", self.name),
                *("--interval", "2", "--health-port", str(self.health_port)),
            ),
            self.ns.env("sync"),
            self.dir / "sync.log",
        )

    def relay_ready(self) -> bool:
        """The relay's readiness probe: it has its state."""
        return _ok(f"http://{self.ip}:{self.metrics_port}/readyz")

    def ready(self) -> bool:
        """The pod's readiness, as the chart probes it: the relay's and the sync's (the relay
        also has the tunnels of every agent connected elsewhere)."""
        return self.relay_ready() and _ok(f"http://127.0.0.1:{self.health_port}/readyz")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for process in (self.sync, self.relay):
            if process is not None:
                process.stop(sig)

    def processes(self) -> list[Process]:
        return [p for p in (self.sync, self.relay) if p is not None]


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


class Kubelet:
    """Keeps the relay pods' Secret files current and the Service's EndpointSlice listing every
    started pod, ready when it passes its readiness probes, terminating once deleted, every half
    second, in a thread."""

    def __init__(self, ns: Namespace, pods: list[RelayPod], agent_port: int | None = None) -> None:
        self.ns = ns
        self.pods = pods  # the test adds and removes pods in this list as it starts and stops them
        self.agent_port = agent_port or pods[0].agent_port
        self._stop = threading.Event()
        self._state: list[tuple[str, bool, bool]] | None = None
        self._thread = threading.Thread(target=self._run, name="kubelet", daemon=True)

    def __enter__(self) -> Kubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            started = [p for p in list(self.pods) if p.relay is not None and p.relay.alive()]
            for pod in started:
                pod.project_tls()
            state = sorted(
                (p.name, p.terminating, not p.terminating and p.ready()) for p in started
            )
            if state != self._state:
                self._publish(started, {name: ready for name, _, ready in state})
                self._state = state

    def _publish(self, started: list[RelayPod], ready: dict[str, bool]) -> None:
        port = self.agent_port
        endpoint_slice = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{SERVICE}-pods",
                "namespace": self.ns.name,
                "labels": {"kubernetes.io/service-name": SERVICE},
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    # The API server refuses loopback addresses in an EndpointSlice: a stand-in
                    # pod-network address (only the pod name in targetRef is read).
                    "addresses": [f"10.244.0.{p.ip.rsplit('.', 1)[1]}"],
                    "conditions": {
                        "ready": ready[p.name],
                        "serving": ready[p.name],
                        "terminating": p.terminating,
                    },
                    "targetRef": {"kind": "Pod", "name": p.name, "namespace": self.ns.name},
                }
                for p in started
            ],
            "ports": [{"name": "agent", "port": port, "protocol": "TCP"}],
        }
        self.ns.cp.kubectl("apply", "-f", "-", input=json.dumps(endpoint_slice))


class Partition:
    """A TCP relay between one process and the API server that the test can cut: while cut,
    nothing passes in either direction and new connections hang (packets dropped, as in a
    network partition, not refused); when healed, the stalled connections are closed and new
    ones pass again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self._healed = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, name="partition", daemon=True).start()

    def kubeconfig(self, source: Path, target: Path) -> Path:
        config = json.loads(source.read_text())
        config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        target.write_text(json.dumps(config))
        target.chmod(0o600)
        return target

    def partition(self) -> None:
        self._healed.clear()
        self.cut.set()

    def heal(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self.cut.clear()
        self._healed.set()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self.heal()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self._conns.append(client)
        while self.cut.is_set() and not self._stop.is_set():
            self._healed.wait(0.5)  # a new connection during the partition: no answer
        if client.fileno() < 0:
            return
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self._lock:
            self._conns.append(upstream)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                while self.cut.is_set():  # held: the partition drops it
                    time.sleep(0.05)
                    if source.fileno() < 0:
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def tunnel_agent(name: str, **ports: int) -> dict[str, Any]:
    return {
        "apiVersion": "atlax.dev/v1alpha1",
        "kind": "TunnelAgent",
        "metadata": {"name": name},
        "spec": {"services": [{"name": s, "port": p} for s, p in ports.items()]},
    }


def port_open(ip: str, port: int) -> bool:
    """Something listens on ip:port. A relay resets a client of an agent that is offline at
    once, so the connect may already report that reset: still a listener."""
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex((ip, port)) in (0, errno.ECONNRESET)


def seconds_since(start: float) -> float:
    return time.monotonic() - start
