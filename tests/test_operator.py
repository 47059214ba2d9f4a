"""The operator on a real kube-apiserver + etcd, with a real relay, agent and service.

Relay and operator run as processes (`atlax relay`, `atlax operator`), the agent from the files of
the Secret the operator minted. No mocked Kubernetes API.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import (
    ROOT,
    echo_handler,
    exchange,
    free_port,
    pod_relay,
    running_agent,
    start_relay_process,
    tcp_service,
    wait_for,
    wait_until,
)
from controlplane import ControlPlane

from atlax import certs
from atlax.addresses import HostPort
from atlax.agent import Agent
from atlax.config import AgentSettings
from atlax.control.client import ControlClient, ControlSocketError

NS = "default"


def kubectl_json(cp: ControlPlane, *args: str) -> Any:
    return json.loads(cp.kubectl(*args, "-o", "json").stdout)


def apply(cp: ControlPlane, obj: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=json.dumps(obj))


def tunnel_agent(name: str, **ports: int) -> dict[str, Any]:
    return {
        "apiVersion": "atlax.dev/v1alpha1",
        "kind": "TunnelAgent",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"services": [{"name": s, "port": p} for s, p in ports.items()]},
    }


@dataclass
class Stack:
    cp: ControlPlane
    dir: Path
    relay_port: int
    socket: Path
    relay: subprocess.Popen[str]
    operator: subprocess.Popen[str]

    def start_relay(self) -> None:
        self.relay = start_relay_process(self.dir / "relay.toml", self.dir / "relay.log")

    def status(self, name: str) -> dict[str, Any]:
        result = self.cp.kubectl("get", "tunnelagent", name, "-n", NS, "-o", "json", check=False)
        return json.loads(result.stdout).get("status", {}) if result.returncode == 0 else {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def agent_files(self, name: str) -> tuple[AgentSettings, dict[str, bytes]]:
        secret = kubectl_json(self.cp, "get", "secret", f"atlax-agent-{name}", "-n", NS)
        data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
        d = self.dir / f"agent-{name}"
        d.mkdir(exist_ok=True)
        for key in ("tls.crt", "tls.key", "ca.crt"):
            (d / key).write_bytes(data[key])
        (d / "tls.key").chmod(0o600)
        host, port = data["relay"].decode().rsplit(":", 1)
        settings = AgentSettings(
            relay=HostPort(host, int(port)),
            ca=d / "ca.crt",
            cert=d / "tls.crt",
            key=d / "tls.key",
            server_name="localhost",
            backoff_initial=0.1,
            backoff_cap=1.0,
            keepalive_interval=1.0,
            keepalive_timeout=3.0,
        )
        return settings, data


@pytest.fixture
def stack(control_plane: ControlPlane, tmp_path: Path) -> Iterator[Stack]:
    cp = control_plane
    cp.kubectl("apply", "-f", str(ROOT / "manifests" / "crd.yaml"))
    wait_for(
        lambda: cp.kubectl("get", "tunnelagents", check=False).returncode == 0,
        30,
        "the CRD to be served",
    )
    cp.kubectl("delete", "service", "atlax-relay", "-n", NS, "--ignore-not-found")
    cp.kubectl("create", "service", "loadbalancer", "atlax-relay", "--tcp=7443:7443", "-n", NS)
    relay_port = free_port()
    sock = tmp_path / "run" / "control.sock"
    pod_relay(tmp_path, relay_port, sock, "keepalive_interval = 1.0\nkeepalive_timeout = 3.0\n")
    env_kc = {"KUBECONFIG": str(cp.kubeconfig), "PATH": "/usr/bin:/bin"}
    operator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atlax.cli",
            "operator",
            "--namespace",
            NS,
            "--control-socket",
            str(sock),
            "--service-name",
            "atlax-relay",
            "--relay-address",
            f"127.0.0.1:{relay_port}",
            "--relay-san",
            "localhost",
            "--relay-san",
            "127.0.0.1",
            "--relay-tls-dir",
            str(tmp_path / "tls"),
            "--status-interval",
            "1",
        ],
        stdout=(tmp_path / "operator.log").open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        env=env_kc,
    )
    s = Stack(cp, tmp_path, relay_port, sock, None, operator)  # type: ignore[arg-type]
    s.start_relay()
    try:
        yield s
    finally:
        for name in ("home-nas", "first", "second"):
            cp.kubectl(
                "delete", "tunnelagent", name, "-n", NS, "--ignore-not-found", "--wait=false"
            )
        wait_for(
            lambda: not kubectl_json(cp, "get", "tunnelagents", "-n", NS)["items"],
            30,
            "TunnelAgents to be gone",
        )
        for proc in (s.operator, s.relay):
            proc.send_signal(signal.SIGTERM)
        for proc in (s.operator, s.relay):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        print((tmp_path / "operator.log").read_text()[-3000:])


def relay_agents(stack: Stack) -> list[dict[str, Any]]:
    """The agents as the relay's control socket reports them ([] while the relay is down).

    A relay that is down refuses at once; one that is up gets time to answer on a busy machine
    (a 3 s bound read a slow answer as "no agents", and the test's last checks failed on it)."""

    async def ask() -> dict[str, Any]:
        return await ControlClient(stack.socket, timeout=30).agents()

    try:
        agents: list[dict[str, Any]] = anyio.run(ask)["agents"]
    except ControlSocketError:
        return []
    return agents


def relay_holders(stack: Stack) -> dict[int, str]:
    """port -> agent, as the relay's control socket reports it ({} while the relay is down)."""
    return {s["port"]: a["name"] for a in relay_agents(stack) for s in a["services"]}


def service_ports(cp: ControlPlane) -> set[int]:
    return {
        p["port"]
        for p in kubectl_json(cp, "get", "service", "atlax-relay", "-n", NS)["spec"]["ports"]
    }


def relay_hostnames(stack: Stack) -> dict[str, str]:
    """hostname -> agent, as the relay's control socket reports it ({} while the relay is down)."""
    return {
        h: a["name"]
        for a in relay_agents(stack)
        for s in a["services"]
        for h in s.get("hostnames", [])
    }


def service_owners(cp: ControlPlane) -> dict[str, str]:
    svc = kubectl_json(cp, "get", "service", "atlax-relay", "-n", NS)
    owners: dict[str, str] = json.loads(svc["metadata"]["annotations"].get("atlax.dev/ports", "{}"))
    return owners


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.k8s
def test_tunnel_agent_end_to_end(stack: Stack) -> None:
    cp = stack.cp
    web = free_port()
    example = (ROOT / "manifests" / "examples" / "home-nas.yaml").read_text()
    smb = free_port()
    cp.kubectl(
        "apply",
        "-n",
        NS,
        "-f",
        "-",
        input=example.replace("port: 445", f"port: {smb}").replace("port: 8080", f"port: {web}"),
    )
    wait_for(
        lambda: stack.condition("home-nas", "PortsOpen").get("status") == "True", 60, "PortsOpen"
    )
    settings, data = stack.agent_files("home-nas")
    # The Secret: CN = the TunnelAgent's name, issued by the CA in Secret atlax-ca.
    cert = certs.load_certificates(settings.cert)[0]
    assert certs.common_name(cert) == "home-nas"
    ca = kubectl_json(cp, "get", "secret", "atlax-ca", "-n", NS)
    certs.verify_issued_by(cert, certs.load_certificates(settings.ca)[0])
    assert base64.b64decode(ca["data"]["tls.crt"]) == data["ca.crt"]
    secret = kubectl_json(cp, "get", "secret", "atlax-agent-home-nas", "-n", NS)
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "TunnelAgent"
    assert _port_open(web) and _port_open(smb)
    assert service_ports(cp) == {7443, web, smb}

    async def run() -> None:
        async with tcp_service(echo_handler) as echo:
            agent = Agent(settings, {"web": echo, "smb": echo})
            async with running_agent(agent):
                assert await exchange(web, b"GET / through the relay") == b"GET / through the relay"
                await anyio.to_thread.run_sync(
                    lambda: wait_for(
                        lambda: stack.condition("home-nas", "Ready").get("status") == "True",
                        30,
                        "Ready",
                    )
                )
                status = stack.status("home-nas")
                assert status["connected"] is True
                assert status["bytesIn"] >= 23 and status["bytesOut"] >= 23
                table = cp.kubectl("get", "tunnelagents", "-n", NS).stdout
                assert table.splitlines()[0].split() == [
                    "NAME",
                    "READY",
                    "CONNECTED",
                    "PORTS",
                    "AGE",
                ]
                assert table.splitlines()[1].split()[:3] == ["home-nas", "True", "1/1"]
                await anyio.to_thread.run_sync(
                    lambda: cp.kubectl(
                        "delete", "tunnelagent", "home-nas", "-n", NS, "--timeout=50s"
                    )
                )
                assert not _port_open(web)
                await wait_until(lambda: agent.session is None, 10)
                await wait_until(lambda: "not configured" in (agent.last_error or ""), 15)

    anyio.run(run)
    # The Secret is owned by the TunnelAgent: a real cluster's garbage collector deletes it with
    # its owner (hack/cluster-e2e.sh sees that happen); this bare API server has no collector.
    owner = secret["metadata"]["ownerReferences"][0]
    assert (owner["name"], owner["controller"]) == ("home-nas", True)
    assert service_ports(cp) == {7443}
    assert service_owners(cp) == {}


@pytest.mark.k8s
def test_an_operator_started_before_its_relay_waits_without_errors(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """As in the pod: TunnelAgents exist, the operator starts, and the relay comes up only once
    the operator has written its certificate. A start is not an error: no ERROR in the log."""
    cp = control_plane
    cp.kubectl("apply", "-f", str(ROOT / "manifests" / "crd.yaml"))
    ns = "atlax-start"
    cp.kubectl("create", "namespace", ns, check=False)
    cp.kubectl("create", "service", "loadbalancer", "atlax-relay", "--tcp=7443:7443", "-n", ns)
    wait_for(
        lambda: cp.kubectl("get", "tunnelagents", "-n", ns, check=False).returncode == 0, 30, "CRD"
    )
    agent = tunnel_agent("home-nas", web=free_port())
    agent["metadata"]["namespace"] = ns
    apply(cp, agent)
    relay_port = free_port()
    sock = tmp_path / "run" / "control.sock"
    config = pod_relay(tmp_path, relay_port, sock)
    log = tmp_path / "operator.log"
    operator = subprocess.Popen(
        [
            *(sys.executable, "-m", "atlax.cli", "operator", "--namespace", ns),
            *("--control-socket", str(sock), "--relay-address", f"127.0.0.1:{relay_port}"),
            *("--relay-san", "127.0.0.1", "--relay-tls-dir", str(tmp_path / "tls")),
            *("--status-interval", "1"),
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={"KUBECONFIG": str(cp.kubeconfig), "PATH": "/usr/bin:/bin"},
    )
    relay = None
    try:
        wait_for(lambda: "waiting for the relay" in log.read_text(), 60, "the operator to wait")
        relay = start_relay_process(config, tmp_path / "relay.log")

        def ports_open() -> bool:
            out = cp.kubectl("get", "tunnelagent", "home-nas", "-n", ns, "-o", "json").stdout
            conditions = json.loads(out).get("status", {}).get("conditions", [])
            return any(c["type"] == "PortsOpen" and c["status"] == "True" for c in conditions)

        wait_for(ports_open, 60, "PortsOpen")
        cp.kubectl("delete", "tunnelagent", "home-nas", "-n", ns, "--timeout=60s")
    finally:
        for proc in (operator, relay):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
        for proc in (operator, relay):
            if proc is not None:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    text = log.read_text()
    assert "relay is up" in text
    assert " ERROR " not in text and "Traceback" not in text, text[-3000:]


@pytest.mark.k8s
def test_port_conflict_between_two_tunnel_agents(stack: Stack) -> None:
    cp = stack.cp
    port = free_port()
    apply(cp, tunnel_agent("first", web=port))
    wait_for(
        lambda: stack.condition("first", "PortsOpen").get("status") == "True", 60, "first PortsOpen"
    )
    apply(cp, tunnel_agent("second", files=port))
    cond = wait_for(
        lambda: (c := stack.condition("second", "PortsOpen")).get("status") == "False" and c,
        60,
        "second's conflict",
    )
    assert cond["reason"] == "PortConflict"
    assert f"port {port} is already used by" in cond["message"] and "first" in cond["message"]
    assert stack.condition("second", "Ready")["status"] == "False"

    # A restarted relay remembers nothing: whoever asked first would get the port. The Service's
    # ownership annotation must keep it with `first` however the timers interleave.
    stack.relay.kill()
    stack.relay.wait(5)
    stack.start_relay()
    wait_for(lambda: relay_holders(stack).get(port) == "first", 30, "first back at the relay")
    time.sleep(3)  # three status ticks of `second` retrying its conflict
    assert relay_holders(stack).get(port) == "first"
    assert stack.condition("second", "PortsOpen")["reason"] == "PortConflict"
    warnings = [
        e
        for e in kubectl_json(cp, "get", "events", "-n", NS)["items"]
        if e["involvedObject"]["name"] == "second" and e["reason"] == "PortConflict"
    ]
    assert 1 <= len(warnings) <= 2, warnings  # on transitions, not on every retry

    cp.kubectl("delete", "tunnelagent", "first", "-n", NS, "--timeout=50s")
    wait_for(
        lambda: stack.condition("second", "PortsOpen").get("status") == "True",
        60,
        "second takes the port",
    )
    assert _port_open(port)
    assert relay_holders(stack).get(port) == "second"
    assert service_owners(cp) == {str(port): f"{NS}/second"}


def routed_agent(name: str, port: int, *hostnames: str, **udp: int) -> dict[str, Any]:
    services: list[dict[str, Any]] = [
        {"name": "site", "port": port, "route": "tls", "hostnames": list(hostnames)}
    ]
    services += [{"name": s, "port": p, "protocol": "udp"} for s, p in udp.items()]
    return {
        "apiVersion": "atlax.dev/v1alpha1",
        "kind": "TunnelAgent",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"services": services},
    }


@pytest.mark.k8s
def test_hostnames_shared_between_tunnel_agents_survive_a_relay_restart(stack: Stack) -> None:
    """Two TunnelAgents share one port by hostname; a third that claims a taken hostname gets
    PortsOpen=False naming the owner, before and after a relay restart; UDP ports reach the
    Service as UDP."""
    cp = stack.cp
    port, dns = free_port(), free_port()
    apply(cp, routed_agent("first", port, "nas.example.com"))
    apply(cp, routed_agent("second", port, "*.office.example.com", dns=dns))
    for name in ("first", "second"):
        wait_for(
            lambda n=name: stack.condition(n, "PortsOpen").get("status") == "True",  # type: ignore[misc]
            60,
            f"{name} PortsOpen",
        )
    svc = kubectl_json(cp, "get", "service", "atlax-relay", "-n", NS)
    assert sorted((p["port"], p["protocol"]) for p in svc["spec"]["ports"]) == sorted(
        [(7443, "TCP"), (port, "TCP"), (dns, "UDP")]
    )
    shared = json.loads(svc["metadata"]["annotations"]["atlax.dev/hostnames"])
    assert shared == {
        str(port): {
            "route": "tls",
            "hostnames": {"nas.example.com": f"{NS}/first", "*.office.example.com": f"{NS}/second"},
        }
    }
    assert json.loads(svc["metadata"]["annotations"]["atlax.dev/ports"]) == {
        f"{dns}/udp": f"{NS}/second"
    }

    apply(cp, routed_agent("home-nas", port, "nas.example.com"))
    cond = wait_for(
        lambda: (c := stack.condition("home-nas", "PortsOpen")).get("status") == "False" and c,
        60,
        "home-nas's conflict",
    )
    assert cond["reason"] == "PortConflict"
    assert cond["message"] == (
        f"hostname 'nas.example.com' on port {port} is already used by TunnelAgent {NS}/first"
    )

    stack.relay.kill()  # the restarted relay remembers no hostname: the Service's annotation does
    stack.relay.wait(5)
    stack.start_relay()
    wait_for(
        lambda: (
            relay_hostnames(stack) == {"nas.example.com": "first", "*.office.example.com": "second"}
        ),
        30,
        "both owners back at the relay",
    )
    time.sleep(3)  # three status ticks of home-nas retrying its conflict
    assert relay_hostnames(stack).get("nas.example.com") == "first"
    assert stack.condition("home-nas", "PortsOpen")["reason"] == "PortConflict"

    cp.kubectl("delete", "tunnelagent", "first", "-n", NS, "--timeout=30s")
    wait_for(
        lambda: stack.condition("home-nas", "PortsOpen").get("status") == "True",
        60,
        "home-nas takes the hostname",
    )
    assert relay_hostnames(stack) == {
        "nas.example.com": "home-nas",
        "*.office.example.com": "second",
    }


@pytest.mark.k8s
def test_relay_restart_is_repaired(stack: Stack) -> None:
    cp = stack.cp
    port = free_port()
    apply(cp, tunnel_agent("home-nas", web=port))
    wait_for(
        lambda: stack.condition("home-nas", "PortsOpen").get("status") == "True", 60, "PortsOpen"
    )
    settings, _ = stack.agent_files("home-nas")

    async def run() -> None:
        async with tcp_service(echo_handler) as echo:
            agent = Agent(settings, {"web": echo})
            async with running_agent(agent):
                assert await exchange(port, b"before") == b"before"
                stack.relay.kill()  # kill -9: the relay comes back with no agents at all
                stack.relay.wait(5)
                await wait_until(lambda: agent.session is None, 10)
                stack.start_relay()
                # Re-pushed and the agent back, in the relay's own words: the agent's session is
                # also set, for a moment, by a connection the relay is about to refuse (the relay
                # sends SETTINGS before it checks the identity), which is what made this flaky.
                await anyio.to_thread.run_sync(
                    lambda: wait_for(
                        lambda: any(a["connected"] for a in relay_agents(stack)),
                        30,
                        "the relay to serve home-nas again",
                    )
                )
                assert await exchange(port, b"after") == b"after"
                # The operator told the restarted relay that its state is complete: ready.
                await anyio.to_thread.run_sync(
                    lambda: wait_for(lambda: relay_synced(stack), 30, "the relay to be synced")
                )

    anyio.run(run)


def relay_synced(stack: Stack) -> bool:
    async def ask() -> bool:
        return bool((await ControlClient(stack.socket, timeout=3).cluster())["synced"])

    try:
        return anyio.run(ask)
    except ControlSocketError:
        return False


@pytest.mark.k8s
def test_delete_while_a_timer_tick_waits_on_the_relay(stack: Stack) -> None:
    """The relay stalls (SIGSTOP) while a status tick asks it for its agents, and the TunnelAgent
    is deleted meanwhile: the tick and the delete handler (which retries while the relay does not
    answer) both finish once it resumes, the finalizer goes, the port closes."""
    cp = stack.cp
    port = free_port()
    apply(cp, tunnel_agent("home-nas", web=port))
    wait_for(
        lambda: stack.condition("home-nas", "PortsOpen").get("status") == "True", 60, "PortsOpen"
    )
    stack.relay.send_signal(signal.SIGSTOP)
    try:
        time.sleep(3)  # the 1 s status timer is now stuck in a call to the stopped relay
        cp.kubectl("delete", "tunnelagent", "home-nas", "-n", NS, "--wait=false")
        time.sleep(2)  # delete comes in while the tick is still waiting
    finally:
        stack.relay.send_signal(signal.SIGCONT)
    wait_for(
        lambda: not kubectl_json(cp, "get", "tunnelagents", "-n", NS)["items"],
        30,
        "the TunnelAgent to be gone",
    )
    wait_for(lambda: not _port_open(port), 10, "the port to close")
    assert relay_holders(stack) == {}


@pytest.mark.k8s
@pytest.mark.parametrize(
    ("services", "message"),
    [
        ([{"name": "web", "port": 0}], "should be greater than or equal to 1"),
        ([{"name": "web", "port": 70000}], "should be less than or equal to 65535"),
        ([{"name": "web", "port": 1}, {"name": "web", "port": 2}], "Duplicate value"),
        ([{"name": "a", "port": 1}, {"name": "b", "port": 1}], "needs route (the same on each)"),
        (
            [
                {"name": "a", "port": 1, "route": "tls", "hostnames": ["a.example"]},
                {"name": "b", "port": 1, "route": "http", "hostnames": ["b.example"]},
            ],
            "needs route (the same on each)",
        ),
        (
            [
                {"name": "a", "port": 1, "route": "tls", "hostnames": ["a.example"]},
                {"name": "b", "port": 1, "route": "tls", "hostnames": ["a.example"]},
            ],
            "a hostname may be claimed once per port",
        ),
        ([{"name": "a", "port": 1, "route": "tls"}], "route needs the hostnames it serves"),
        ([{"name": "a", "port": 1, "hostnames": ["a.example"]}], "hostnames need route"),
        (
            [{"name": "a", "port": 1, "protocol": "udp", "route": "tls", "hostnames": ["a.b"]}],
            "a UDP service cannot have route",
        ),
        ([{"name": "a", "port": 1, "route": "tls", "hostnames": ["A.example"]}], "should match"),
        ([{"name": "a", "port": 1, "protocol": "sctp"}], "Unsupported value"),
        ([{"name": "a", "port": 1, "allowedSourceRanges": ["nope"]}], "must be a CIDR"),
        ([], "should have at least 1 items"),
    ],
)
def test_invalid_specs_are_rejected_by_the_api_server(
    control_plane: ControlPlane, services: list[dict[str, Any]], message: str
) -> None:
    control_plane.kubectl("apply", "-f", str(ROOT / "manifests" / "crd.yaml"))
    wait_for(
        lambda: control_plane.kubectl("get", "tunnelagents", check=False).returncode == 0,
        30,
        "the CRD",
    )
    obj = {
        "apiVersion": "atlax.dev/v1alpha1",
        "kind": "TunnelAgent",
        "metadata": {"name": "bad"},
        "spec": {"services": services},
    }
    result = control_plane.kubectl("apply", "-f", "-", input=json.dumps(obj), check=False)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.k8s
def test_certificate_renewal_reaches_the_agent_without_a_restart(stack: Stack) -> None:
    """A 30 s certificate is re-issued after two thirds of it; the agent reconnects with it."""
    cp = stack.cp
    port = free_port()
    obj = tunnel_agent("home-nas", web=port)
    obj["spec"]["certificateLifetime"] = "30s"
    apply(cp, obj)
    wait_for(
        lambda: stack.condition("home-nas", "PortsOpen").get("status") == "True", 60, "PortsOpen"
    )
    settings, first = stack.agent_files("home-nas")

    async def run() -> None:
        async with tcp_service(echo_handler) as echo:
            agent = Agent(settings, {"web": echo}, cert_check_interval=0.5)
            async with running_agent(agent):
                assert await exchange(port, b"old cert") == b"old cert"

                def renewed() -> bool:
                    secret = kubectl_json(cp, "get", "secret", "atlax-agent-home-nas", "-n", NS)
                    return base64.b64decode(secret["data"]["tls.crt"]) != first["tls.crt"]

                await anyio.to_thread.run_sync(
                    lambda: wait_for(renewed, 40, "the certificate to be renewed")
                )
                stack.agent_files("home-nas")  # what kubelet does for a mounted Secret
                await wait_until(lambda: agent.connects >= 2, 10)
                assert await exchange(port, b"new cert") == b"new cert"

    anyio.run(run)


@pytest.mark.k8s
def test_service_ports_overwritten_by_someone_else_are_restored(stack: Stack) -> None:
    """E.g. `helm upgrade` rewrites the Service's port list: the status timer puts ports back."""
    cp = stack.cp
    port = free_port()
    apply(cp, tunnel_agent("home-nas", web=port))
    wait_for(
        lambda: stack.condition("home-nas", "PortsOpen").get("status") == "True", 60, "PortsOpen"
    )

    wait_for(lambda: port in service_ports(cp), 30, "the port on the Service")
    patch = {
        "spec": {
            "ports": [{"name": "7443-7443", "port": 7443, "targetPort": 7443, "protocol": "TCP"}]
        }
    }
    # The patch's own answer shows the overwrite: a second read can already see the repair.
    overwritten = kubectl_json(
        cp, "patch", "service", "atlax-relay", "-n", NS, "--type=merge", "-p", json.dumps(patch)
    )
    assert [p["port"] for p in overwritten["spec"]["ports"]] == [7443]
    wait_for(lambda: port in service_ports(cp), 30, "the operator to restore the port")


@pytest.mark.k8s
def test_spec_update_moves_the_ports(stack: Stack) -> None:
    """Changing a service's port closes the old one (relay and Service) and opens the new one."""
    cp = stack.cp
    old, new = free_port(), free_port()
    apply(cp, tunnel_agent("home-nas", web=old))
    wait_for(lambda: _port_open(old) and old in service_ports(cp), 60, "the first port")
    apply(cp, tunnel_agent("home-nas", web=new))
    wait_for(lambda: service_ports(cp) == {7443, new}, 30, "the Service to follow the spec")
    wait_for(lambda: _port_open(new) and not _port_open(old), 30, "the relay to follow the spec")
    assert relay_holders(stack) == {new: "home-nas"}
    status = wait_for(
        lambda: (s := stack.status("home-nas")).get("observedGeneration") == 2 and s,
        30,
        "status of generation 2",
    )
    assert status["ports"] == f"web:{new}"
    assert service_owners(cp) == {str(new): f"{NS}/home-nas"}


@pytest.mark.parametrize(
    ("kubeconfig", "expected"),
    [
        ("unreachable", "cannot reach the Kubernetes API at https://127.0.0.1:1"),
        ("missing", "cannot load the Kubernetes configuration KUBECONFIG="),
    ],
)
def test_operator_start_up_errors_are_one_line(
    tmp_path: Path, kubeconfig: str, expected: str
) -> None:
    path = tmp_path / "kubeconfig"
    if kubeconfig == "unreachable":
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
    result = subprocess.run(
        [
            *(sys.executable, "-m", "atlax.cli", "operator"),
            *("--namespace", NS, "--control-socket", str(tmp_path / "control.sock")),
        ],
        env={"KUBECONFIG": str(path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"atlax: error: {expected}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
