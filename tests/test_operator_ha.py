"""The operator's two roles on a real API server: leader-elected controllers and a sync sidecar per
relay pod, each process under its own role's ServiceAccount token (tests/pods.py), the relay pods
behind a real HAProxy (the Service's load balancer), and a pool agent with its Secret's four keys
dialling the load balancer like any agent.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from conftest import echo_handler, free_port, running_agent, tcp_service, wait_for, wait_until
from controlplane import ControlPlane
from haproxy import FRONTEND_HOST, Frontend, HAProxy, Server, shared_port
from pods import (
    LEASE_DURATION,
    RENEW_DEADLINE,
    RETRY_PERIOD,
    SERVICE,
    Controller,
    Kubelet,
    Namespace,
    Partition,
    Process,
    RelayPod,
    port_open,
    tunnel_agent,
)

from atlax.addresses import HostPort
from atlax.agent import Agent
from atlax.bench.cluster import RolloutResult, client_at_rate
from atlax.config import AgentSettings
from atlax.control.client import ControlClient

# Three relay pods and a fourth address for the pod a rollout surges.
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
PRE_STOP = 1.0  # the chart's preStop delay, scaled down: the load balancer has let go by then


def slot(ip: str) -> str:
    return f"s{ip.rsplit('.', 1)[1]}"


@dataclass
class HA:
    ns: Namespace
    agent_port: int
    web_port: int  # a public port with a frontend on the load balancer
    metrics_port: int
    controllers: list[Controller]
    pods: list[RelayPod]  # live relay pods (the Kubelet watches this list)
    lb: HAProxy
    stopped: list[RelayPod] = field(default_factory=list)
    started: int = 0

    @property
    def relay_address(self) -> str:
        return f"{FRONTEND_HOST}:{self.agent_port}"

    def controller(self, identity: str) -> Controller:
        return next(c for c in self.controllers if c.identity == identity)

    def processes(self) -> list[Process]:
        return [c.process for c in self.controllers] + [
            p for pod in [*self.stopped, *self.pods] for p in pod.processes()
        ]

    def leader(self, timeout: float = 60) -> Controller:
        holder = wait_for(self.ns.lease_holder, timeout, "a controller to hold the Lease")
        return self.controller(str(holder))

    def served_everywhere(self, port: int) -> bool:
        return all(port_open(pod.ip, port) for pod in self.pods)

    def closed_everywhere(self, port: int) -> bool:
        return not any(port_open(pod.ip, port) for pod in self.pods)

    def start_pod(self) -> RelayPod:
        """A new relay pod on a free address (its HAProxy server comes back from maintenance)."""
        used = {pod.ip for pod in self.pods}
        ip = next(h for h in HOSTS if h not in used)
        self.started += 1
        pod = RelayPod(self.ns, f"relay-{self.started}", ip, self.agent_port, self.metrics_port)
        self.pods.append(pod)
        pod.start()
        self.lb.mark_up(slot(ip))
        return pod

    def wait_ready(self, pod: RelayPod) -> None:
        """Ready as Kubernetes and the load balancer see it: /readyz, HAProxy UP, and the
        sidecar's report."""
        wait_for(pod.ready, 60, f"{pod.name} /readyz")
        self.lb.wait_status(slot(pod.ip), "UP", 30)
        wait_for(lambda: pod.name in self.ns.ready_reports(), 60, f"{pod.name}'s report")

    def terminate(self, pod: RelayPod) -> None:
        """What deleting a pod does: out of the endpoints and the load balancer at once, the
        preStop delay, then SIGTERM to both containers (the relay drains)."""
        pod.terminating = True
        self.lb.mark_down(slot(pod.ip))
        time.sleep(PRE_STOP)
        pod.stop(signal.SIGTERM)
        self.pods.remove(pod)
        self.stopped.append(pod)

    def agent_settings(self, name: str) -> AgentSettings:
        """The agent's files from its Secret (all four keys): it dials what `relay` says."""
        data = self.ns.secret(f"atlax-agent-{name}")
        assert data is not None and set(data) == {"tls.crt", "tls.key", "ca.crt", "relay"}
        d = self.ns.dir / f"agent-{name}"
        d.mkdir(exist_ok=True)
        for key in ("tls.crt", "tls.key", "ca.crt"):
            (d / key).write_bytes(data[key])
        (d / "tls.key").chmod(0o600)
        assert data["relay"].decode() == self.relay_address
        host, port = data["relay"].decode().rsplit(":", 1)
        return AgentSettings(
            relay=HostPort(host, int(port)),
            ca=d / "ca.crt",
            cert=d / "tls.crt",
            key=d / "tls.key",
            server_name="localhost",
            backoff_initial=0.1,
            backoff_cap=1.0,
            connect_timeout=10.0,
            keepalive_interval=1.0,
            keepalive_timeout=5.0,
        )


@pytest.fixture
def ha(control_plane: ControlPlane, tmp_path: Path) -> Iterator[HA]:
    ns = Namespace.create(control_plane, tmp_path)
    hosts = (FRONTEND_HOST, *HOSTS)
    agent_port, web_port, metrics_port = (shared_port(hosts) for _ in range(3))
    lb = HAProxy(
        tmp_path,
        [Frontend("agent", agent_port, "leastconn"), Frontend("web", web_port)],
        [Server(slot(ip), ip, metrics_port) for ip in HOSTS],
    )
    relay_address = f"{FRONTEND_HOST}:{agent_port}"
    controllers = [Controller(ns, name, relay_address) for name in ("controller-a", "controller-b")]
    ha = HA(ns, agent_port, web_port, metrics_port, controllers, [], lb)
    try:
        lb.start()
        for ip in HOSTS:
            lb.mark_down(slot(ip))  # no pod there yet
        with Kubelet(ns, ha.pods, agent_port):
            for _ in range(3):
                ha.start_pod()
            for pod in list(ha.pods):
                ha.wait_ready(pod)
            yield ha
    finally:
        lb.stop()
        for process in ha.processes():
            process.stop()
        for process in ha.processes():
            print(f"--- {process.name}\n{process.text()[-2500:]}")
        ns.cleanup()
    operator = "\n".join(p.text() for p in ha.processes() if not p.name.endswith("/relay"))
    assert "Forbidden" not in operator and "(403)" not in operator, "a role lacks a permission"
    assert "Traceback" not in operator


def operator_lines(process: Process) -> list[str]:
    return [line for line in process.text().splitlines() if " atlax.operator: " in line]


def exchange_at(ip: str, port: int, payload: bytes) -> bytes:
    async def run() -> bytes:
        async with await anyio.connect_tcp(ip, port) as conn:
            await conn.send(payload)
            await conn.send_eof()
            received = bytearray()
            try:
                while True:
                    received.extend(await conn.receive())
            except anyio.EndOfStream:
                pass
            return bytes(received)

    return anyio.run(run)


@pytest.mark.k8s
def test_one_controller_acts_and_the_other_takes_over_when_it_is_killed(ha: HA) -> None:
    ns = ha.ns
    leader = ha.leader()
    follower = next(c for c in ha.controllers if c is not leader)
    before = shared_port(HOSTS)
    ns.apply(tunnel_agent("before", web=before))
    wait_for(lambda: ns.condition("before", "PortsOpen").get("status") == "True", 60, "PortsOpen")
    # Each relay listens once the agent joined it, or after a grace period without it.
    wait_for(lambda: ha.served_everywhere(before), 30, "the port on every relay")
    # The follower campaigns and follows, nothing else: kopf never ran in it.
    lines = operator_lines(follower.process)
    assert lines and all(("campaigning" in line or "following" in line) for line in lines), lines
    assert any("leading" in line for line in operator_lines(leader.process))

    leader.process.stop(signal.SIGKILL)
    killed = time.monotonic()
    meanwhile = shared_port(HOSTS)
    ns.apply(tunnel_agent("meanwhile", web=meanwhile))  # no controller acts on it yet
    wait_for(
        lambda: ns.lease_holder() == follower.identity,
        LEASE_DURATION * 3 + 10,
        "the follower to take the Lease",
    )
    failover = time.monotonic() - killed
    print(
        f"leader failover: {failover:.1f} s after SIGKILL "
        f"(lease duration {LEASE_DURATION:g} s, retry period {RETRY_PERIOD:g} s)"
    )
    # The follower takes the Lease once it has seen no renewal for the lease duration, looking
    # when that runs out; it saw the last renewal at most a retry period after it was made.
    assert failover < LEASE_DURATION + 2 * RETRY_PERIOD + 3, failover
    wait_for(
        lambda: ns.condition("meanwhile", "PortsOpen").get("status") == "True",
        60,
        "the TunnelAgent created meanwhile to be served",
    )
    served = time.monotonic() - killed
    print(f"TunnelAgent created during the failover: ports open on all relays {served:.1f} s after")

    async def run() -> None:
        async with tcp_service(echo_handler) as echo:
            agent = Agent(ha.agent_settings("meanwhile"), {"web": echo})
            async with running_agent(agent):
                await wait_until(lambda: len(agent.tunnels) == 3, 60, "3 tunnels")
                for pod in ha.pods:
                    payload = f"served by {pod.name}".encode()
                    got = await anyio.to_thread.run_sync(exchange_at, pod.ip, meanwhile, payload)
                    assert got == payload

    anyio.run(run)


def transitions(ns: Namespace, agent: str) -> list[str]:
    """The agent's connection events, oldest first."""
    events = [
        e
        for e in ns.get("events")["items"]
        if e["involvedObject"]["name"] == agent
        and e["reason"] in ("Connected", "PartiallyConnected", "Disconnected")
    ]
    events.sort(key=lambda e: e.get("eventTime") or e["firstTimestamp"] or "")
    return [e["reason"] for e in events]


@pytest.mark.k8s
def test_a_pool_agent_converges_to_every_relay_and_is_revoked_on_all(ha: HA) -> None:
    """The agent, with its Secret's four keys, dials the load balancer and holds a tunnel to
    every relay: 3/3 in status and in the CONNECTED column. A fourth relay that the load
    balancer does not send to yet makes it 3/4, Partial; once it does, 4/4. Deleting the
    TunnelAgent closes its port and refuses its identity on every relay."""
    ns = ha.ns
    ha.leader()
    port = ha.web_port
    ns.apply(tunnel_agent("home-nas", web=port))
    wait_for(lambda: ns.condition("home-nas", "PortsOpen").get("status") == "True", 60, "PortsOpen")
    assert (
        ns.condition("home-nas", "PortsOpen")["message"] == f"ports web:{port} open on all 3 relays"
    )
    owner_uid = ns.get("tunnelagent", "home-nas")["metadata"]["uid"]

    def status_reads(tunnels: str) -> dict[str, object]:
        return wait_for(
            lambda: (s := ns.status("home-nas")).get("tunnels") == tunnels and s,
            60,
            f"status {tunnels}",
        )

    async def run() -> None:
        async with tcp_service(echo_handler) as echo:
            agent = Agent(ha.agent_settings("home-nas"), {"web": echo})
            async with running_agent(agent):
                await wait_until(lambda: len(agent.tunnels) == 3, 60, "3 tunnels")
                status = await anyio.to_thread.run_sync(status_reads, "3/3")
                assert status["connectedInstances"] == 3 and status["relayInstances"] == 3
                connected = ns.condition("home-nas", "Connected")
                assert (connected["status"], connected["reason"]) == ("True", "TunnelUp")
                assert ns.condition("home-nas", "Ready")["status"] == "True"
                table = ns.cp.kubectl("get", "tunnelagents", "-n", ns.name).stdout.splitlines()
                assert table[0].split()[:4] == ["NAME", "READY", "CONNECTED", "PORTS"]
                assert table[1].split()[:4] == ["home-nas", "True", "3/3", f"web:{port}"]
                for pod in ha.pods:
                    payload = f"through {pod.name}".encode() * 1000
                    got = await anyio.to_thread.run_sync(exchange_at, pod.ip, port, payload)
                    assert got == payload

                # A fourth relay, ready, that the load balancer does not send to yet.
                fourth = await anyio.to_thread.run_sync(ha.start_pod)
                ha.lb.mark_down(slot(fourth.ip))
                await anyio.to_thread.run_sync(
                    lambda: wait_for(
                        lambda: fourth.name in ns.ready_reports(), 60, "the fourth relay ready"
                    )
                )
                status = await anyio.to_thread.run_sync(status_reads, "3/4")
                assert (status["connectedInstances"], status["relayInstances"]) == (3, 4)
                connected = ns.condition("home-nas", "Connected")
                assert (connected["status"], connected["reason"]) == ("False", "Partial")
                assert connected["message"] == "tunnels to 3 of 4 relay instances"
                assert ns.condition("home-nas", "Ready")["status"] == "False"

                ha.lb.mark_up(slot(fourth.ip))  # the agent finds it through the load balancer
                await wait_until(lambda: len(agent.tunnels) == 4, 60, "4 tunnels")
                await anyio.to_thread.run_sync(status_reads, "4/4")

                await anyio.to_thread.run_sync(
                    lambda: ns.cp.kubectl(
                        "delete", "tunnelagent", "home-nas", "-n", ns.name, "--timeout=60s"
                    )
                )
                # The finalizer goes only once every relay has revoked the agent.
                assert ha.closed_everywhere(port)
                await wait_until(lambda: "not configured" in (agent.last_error or ""), 30)

    anyio.run(run)
    # The agent's Secret goes with its TunnelAgent through the garbage collector (none runs on
    # this bare API server): it is owned by the TunnelAgent that was deleted.
    secret = ns.get("secret", "atlax-agent-home-nas")
    assert secret is None or secret["metadata"]["ownerReferences"][0]["uid"] == owner_uid
    service = ns.get("service", SERVICE)
    assert [p["port"] for p in service["spec"]["ports"]] == [7443]
    reasons = transitions(ns, "home-nas")
    assert "Connected" in reasons and "PartiallyConnected" in reasons, reasons
    # Events on transitions only: never the same one twice in a row.
    assert all(a != b for a, b in itertools.pairwise(reasons)), reasons


@pytest.mark.k8s
def test_a_rollout_under_load_fails_nothing(ha: HA) -> None:
    """A rollout as the chart's Deployment does it (maxSurge 1, maxUnavailable 0): a fourth pod
    is started and waited for until ready (which its sync says only once the agent's tunnel
    reached it), then an old one is deleted (out of the endpoints and
    the load balancer, the preStop delay, SIGTERM), three times, while a client opens 20
    connections a second through the load balancer, each echoing 4 KiB of random bytes: zero
    failed, zero corrupted; the agent ends with a tunnel to each new relay and status says 3/3."""
    ns = ha.ns
    ha.leader()
    port = ha.web_port
    ns.apply(tunnel_agent("home-nas", web=port))
    wait_for(lambda: ns.condition("home-nas", "PortsOpen").get("status") == "True", 60, "PortsOpen")
    old = list(ha.pods)

    async def run() -> RolloutResult:
        async with tcp_service(echo_handler) as echo:
            agent = Agent(ha.agent_settings("home-nas"), {"web": echo})
            async with running_agent(agent):
                await wait_until(lambda: len(agent.tunnels) == 3, 60, "3 tunnels")
                result, stop = RolloutResult(), threading.Event()
                client = threading.Thread(target=client_at_rate, args=(port, 20.0, stop, result))
                started = time.monotonic()
                client.start()
                try:
                    await anyio.sleep(2)
                    for pod in old:
                        new = await anyio.to_thread.run_sync(ha.start_pod)
                        await anyio.to_thread.run_sync(ha.wait_ready, new)
                        # Ready (its sync's /readyz) only once the agent's tunnel reached it:
                        # no public connection waits there for the agent, none is refused.
                        status, view = await ControlClient(new.socket, timeout=10).call(
                            "GET", "/agents/home-nas"
                        )
                        assert status == 200 and view["instances"], view
                        await wait_until(lambda: len(agent.tunnels) == 4, 60, "4 tunnels")
                        await anyio.to_thread.run_sync(ha.terminate, pod)
                        await wait_until(lambda: len(agent.tunnels) == 3, 60, "3 tunnels")
                        await anyio.sleep(1)
                finally:
                    stop.set()
                    await anyio.to_thread.run_sync(client.join)
                result.seconds = time.monotonic() - started
                await anyio.to_thread.run_sync(
                    lambda: wait_for(
                        lambda: ns.status("home-nas").get("tunnels") == "3/3", 60, "status 3/3"
                    )
                )
                return result

    result = anyio.run(run)
    print(
        f"rollout of 3 relay pods under load: {result.attempted} connections attempted, "
        f"{result.failed} failed, {result.corrupted} corrupted in {result.seconds:.1f} s"
    )
    assert result.attempted > 100
    assert (result.failed, result.corrupted) == (0, 0), result.failures[:10]
    assert not set(ha.pods) & set(old)
    for pod in old:  # each drained and exited by itself
        assert all(p.proc.returncode == 0 for p in pod.processes()), pod.name


def _logged_at(process: Process, text: str) -> float | None:
    """The time (epoch seconds) of the first log line of `process` containing `text`."""
    from datetime import datetime

    for line in process.text().splitlines():
        if text in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


@pytest.mark.k8s
def test_a_partitioned_leader_stops_acting_before_the_other_takes_over(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The leader's traffic to the API server is dropped (a network partition, not a crash): it
    stops acting once it has not renewed for the renew deadline, before the other controller may
    take the Lease (after the lease duration); when the partition heals, it follows."""
    ns = Namespace.create(control_plane, tmp_path)
    host, port = control_plane.server.removeprefix("https://").rsplit(":", 1)
    partition = Partition((host, int(port)))
    kubeconfig = partition.kubeconfig(ns.kubeconfigs["controller"], tmp_path / "a.kubeconfig")
    a = Controller(ns, "controller-a", "127.0.0.2:7443", kubeconfig)
    controllers = [a]
    try:
        wait_for(lambda: ns.lease_holder() == "controller-a", 60, "controller-a to lead")
        b = Controller(ns, "controller-b", "127.0.0.2:7443")
        controllers.append(b)
        wait_for(lambda: _logged_at(b.process, "following") is not None, 60, "b to follow")
        ns.apply(tunnel_agent("before", web=free_port()))
        wait_for(lambda: ns.secret("atlax-agent-before") is not None, 60, "a to serve")

        cut = time.time()
        partition.partition()
        wait_for(lambda: ns.lease_holder() == "controller-b", LEASE_DURATION * 3, "b to lead")
        stopped = wait_for(lambda: _logged_at(a.process, "stopped acting"), 30, "a's log")
        took_over = wait_for(lambda: _logged_at(b.process, "leading (Lease"), 30, "b's log")
        assert isinstance(stopped, float) and isinstance(took_over, float)
        print(
            f"partitioned leader stopped acting {stopped - cut:.1f} s after the cut "
            f"(renew deadline {RENEW_DEADLINE:g} s); the other led {took_over - cut:.1f} s after "
            f"(lease duration {LEASE_DURATION:g} s)"
        )
        assert stopped < took_over  # never two leaders acting at once
        assert stopped - cut < RENEW_DEADLINE + 2 * RETRY_PERIOD + 3

        ns.apply(tunnel_agent("during", web=free_port()))  # the new leader acts on it
        wait_for(lambda: ns.secret("atlax-agent-during") is not None, 60, "b to serve")

        partition.heal()
        wait_for(
            lambda: "is held by controller-b" in a.process.text(), 60, "a to follow b after healing"
        )
        time.sleep(2 * RETRY_PERIOD)
        assert ns.lease_holder() == "controller-b"
        assert a.process.text().count("leading (Lease") == 1
    finally:
        for c in controllers:
            c.process.stop()
        partition.close()
        for c in controllers:
            print(f"--- {c.identity}\n{c.process.text()[-3000:]}")
        ns.cleanup()
    assert a.process.text().count("controller-a: released Lease") == 0
