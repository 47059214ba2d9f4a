"""The operator's two roles on a real API server: leader-elected controllers and a sync sidecar per
relay pod, each process under its own role's ServiceAccount token (tests/pods.py).

Until agents keep a tunnel to every relay instance (issue 14), a pool agent is played by one
`Agent` per relay pod, all with the certificate of the same TunnelAgent.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from conftest import echo_handler, free_port, running_agent, tcp_service, wait_for, wait_until
from controlplane import ControlPlane
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

from atlax.agent import Agent
from atlax.config import AgentSettings, HostPort

IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


@dataclass
class HA:
    ns: Namespace
    agent_port: int
    controllers: list[Controller]
    pods: list[RelayPod]

    def controller(self, identity: str) -> Controller:
        return next(c for c in self.controllers if c.identity == identity)

    def processes(self) -> list[Process]:
        return [c.process for c in self.controllers] + [
            p for pod in self.pods for p in pod.processes()
        ]

    def leader(self, timeout: float = 60) -> Controller:
        holder = wait_for(self.ns.lease_holder, timeout, "a controller to hold the Lease")
        return self.controller(str(holder))

    def served_everywhere(self, port: int) -> bool:
        return all(port_open(pod.ip, port) for pod in self.pods)

    def closed_everywhere(self, port: int) -> bool:
        return not any(port_open(pod.ip, port) for pod in self.pods)

    def agent_settings(self, name: str, pod: RelayPod) -> AgentSettings:
        """The agent's files from its Secret (all four keys), dialling `pod` directly."""
        data = self.ns.secret(f"atlax-agent-{name}")
        assert data is not None and set(data) == {"tls.crt", "tls.key", "ca.crt", "relay"}
        d = self.ns.dir / f"agent-{name}-{pod.name}"
        d.mkdir(exist_ok=True)
        for key in ("tls.crt", "tls.key", "ca.crt"):
            (d / key).write_bytes(data[key])
        (d / "tls.key").chmod(0o600)
        assert data["relay"].decode() == f"127.0.0.2:{self.agent_port}"
        return AgentSettings(
            relay=HostPort(pod.ip, pod.agent_port),
            ca=d / "ca.crt",
            cert=d / "tls.crt",
            key=d / "tls.key",
            server_name="localhost",
            backoff_initial=0.1,
            backoff_cap=1.0,
            keepalive_interval=1.0,
            keepalive_timeout=3.0,
        )


@pytest.fixture
def ha(control_plane: ControlPlane, tmp_path: Path) -> Iterator[HA]:
    ns = Namespace.create(control_plane, tmp_path)
    agent_port = free_port()
    relay_address = f"127.0.0.2:{agent_port}"  # what Secrets say; here each agent dials its pod
    controllers = [Controller(ns, name, relay_address) for name in ("controller-a", "controller-b")]
    pods = [RelayPod(ns, f"relay-{ip[-1]}", ip, agent_port) for ip in IPS]
    ha = HA(ns, agent_port, controllers, pods)
    try:
        with Kubelet(ns, pods):
            for pod in pods:
                pod.start()
            # Ready as the controller sees them: each pod's sidecar reports its relay ready.
            wait_for(lambda: ns.ready_reports() == {p.name for p in pods}, 60, "ready relays")
            yield ha
    finally:
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


@pytest.mark.k8s
def test_one_controller_acts_and_the_other_takes_over_when_it_is_killed(ha: HA) -> None:
    ns = ha.ns
    leader = ha.leader()
    follower = next(c for c in ha.controllers if c is not leader)
    before = free_port()
    ns.apply(tunnel_agent("before", web=before))
    wait_for(lambda: ns.condition("before", "PortsOpen").get("status") == "True", 60, "PortsOpen")
    assert ha.served_everywhere(before)
    # The follower campaigns and follows, nothing else: kopf never ran in it.
    lines = operator_lines(follower.process)
    assert lines and all(("campaigning" in line or "following" in line) for line in lines), lines
    assert any("leading" in line for line in operator_lines(leader.process))

    leader.process.stop(signal.SIGKILL)
    killed = time.monotonic()
    meanwhile = free_port()
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
    assert ha.served_everywhere(meanwhile)
    served = time.monotonic() - killed
    print(f"TunnelAgent created during the failover: ports open on all relays {served:.1f} s after")

    async def run() -> None:
        async with tcp_service(echo_handler) as echo:
            agent = Agent(ha.agent_settings("meanwhile", ha.pods[0]), {"web": echo})
            async with running_agent(agent):
                assert await _exchange_at(ha.pods[0].ip, meanwhile, b"served") == b"served"

    anyio.run(run)


async def _exchange_at(ip: str, port: int, payload: bytes) -> bytes:
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


@pytest.mark.k8s
def test_a_tunnel_agent_is_served_by_every_relay_and_revoked_on_all(ha: HA) -> None:
    ns = ha.ns
    ha.leader()
    port = free_port()
    ns.apply(tunnel_agent("home-nas", web=port))
    wait_for(lambda: ns.condition("home-nas", "PortsOpen").get("status") == "True", 60, "PortsOpen")
    assert ha.served_everywhere(port)
    assert (
        ns.condition("home-nas", "PortsOpen")["message"] == f"ports web:{port} open on all 3 relays"
    )
    owner_uid = ns.get("tunnelagent", "home-nas")["metadata"]["uid"]

    async def run() -> None:
        async with tcp_service(echo_handler) as echo, AsyncExitStack() as stack:
            agents, stacks = [], []
            for pod in ha.pods:  # a pool agent: one tunnel to each relay
                agent = Agent(ha.agent_settings("home-nas", pod), {"web": echo})
                one = await stack.enter_async_context(AsyncExitStack())
                await one.enter_async_context(running_agent(agent))
                agents.append(agent)
                stacks.append(one)
            for pod in ha.pods:
                payload = f"through {pod.name}".encode() * 1000
                assert await _exchange_at(pod.ip, port, payload) == payload
            status = await anyio.to_thread.run_sync(
                lambda: wait_for(
                    lambda: (s := ns.status("home-nas")).get("tunnels") == "3/3" and s,
                    30,
                    "status 3/3",
                )
            )
            assert status["connectedInstances"] == 3 and status["relayInstances"] == 3
            connected = ns.condition("home-nas", "Connected")
            assert (connected["status"], connected["reason"]) == ("True", "TunnelUp")
            assert ns.condition("home-nas", "Ready")["status"] == "True"
            table = ns.cp.kubectl("get", "tunnelagents", "-n", ns.name).stdout.splitlines()
            assert table[0].split()[:4] == ["NAME", "READY", "CONNECTED", "PORTS"]
            assert table[1].split()[:4] == ["home-nas", "True", "3/3", f"web:{port}"]

            await stacks[2].aclose()  # the tunnel to relay-4 goes: 2/3, Partial, not Ready
            await anyio.to_thread.run_sync(
                lambda: wait_for(
                    lambda: ns.condition("home-nas", "Connected").get("reason") == "Partial",
                    30,
                    "Connected: Partial",
                )
            )
            status = ns.status("home-nas")
            assert (status["connectedInstances"], status["relayInstances"]) == (2, 3)
            assert status["tunnels"] == "2/3" and status["connected"] is True
            assert ns.condition("home-nas", "Ready")["status"] == "False"
            assert ns.condition("home-nas", "Connected")["message"] == (
                "tunnels to 2 of 3 relay instances"
            )
            late = Agent(ha.agent_settings("home-nas", ha.pods[2]), {"web": echo})
            await stack.enter_async_context(running_agent(late, wait=False))

            await anyio.to_thread.run_sync(
                lambda: ns.cp.kubectl(
                    "delete", "tunnelagent", "home-nas", "-n", ns.name, "--timeout=60s"
                )
            )
            # The finalizer goes only once every relay has revoked the agent.
            assert ha.closed_everywhere(port)
            for agent in [*agents[:2], late]:
                await wait_until(lambda a=agent: "not configured" in (a.last_error or ""), 15)

    anyio.run(run)
    # The agent's Secret goes with its TunnelAgent through the garbage collector (none runs on
    # this bare API server): it is owned by the TunnelAgent that was deleted.
    secret = ns.get("secret", "atlax-agent-home-nas")
    assert secret is None or secret["metadata"]["ownerReferences"][0]["uid"] == owner_uid
    service = ns.get("service", SERVICE)
    assert [p["port"] for p in service["spec"]["ports"]] == [7443]
    events = ns.get("events")["items"]
    reasons = [e["reason"] for e in events if e["involvedObject"]["name"] == "home-nas"]
    assert reasons.count("Connected") == 1 and reasons.count("PartiallyConnected") == 1, reasons


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
