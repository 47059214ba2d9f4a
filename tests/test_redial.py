"""The agent's way back to a replaced relay, on real sockets, real NAT rules and real processes.

In Kubernetes an agent dials a Service address that NAT rules (kube-proxy) send to the relay pod.
When the pod is replaced, a connect that started while the rules still named the dead pod keeps
retransmitting its SYN through the same conntrack entry, towards the dead pod, until it times out,
although the new pod already answers new connections. The test builds exactly that in a network
namespace of its own: a "service" address, a DNAT rule to a dead address (a link where every
packet vanishes), then the rule switched to the live relay while the agent's first SYN is
in flight.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    Pki,
    agent_settings,
    free_port,
    relay_settings,
    running_agent,
    running_relay,
    spec,
    wait_for,
    wait_until,
)

from atlax.agent import RESTART_BACKOFF_CAP, Agent
from atlax.relay import Relay

SERVICE_IP = "10.99.7.7"  # what the agent dials (a Service's address)
DEAD_POD = "10.99.8.2"  # behind a link where its packets vanish
LIVE_POD = "10.99.9.1"  # the new relay, on the namespace's lo
PORT = 7443

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("iptables") or not shutil.which("ip"),
    reason="needs root, ip and iptables to build a network namespace with NAT rules",
)


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"atlax-redial-{os.getpid()}"
    run("ip", "netns", "add", name)
    try:
        ns = ("ip", "netns", "exec", name)
        run(*ns, "ip", "link", "set", "lo", "up")
        run(*ns, "ip", "addr", "add", f"{LIVE_POD}/32", "dev", "lo")
        # A link to nowhere: frames to DEAD_POD go out with a MAC no one has and are dropped.
        run(*ns, "ip", "link", "add", "dead0", "type", "veth", "peer", "name", "dead1")
        run(*ns, "ip", "addr", "add", "10.99.8.1/24", "dev", "dead0")
        run(*ns, "ip", "link", "set", "dead0", "up")
        run(*ns, "ip", "link", "set", "dead1", "up")
        run(*ns, "ip", "neigh", "add", DEAD_POD, "lladdr", "02:00:00:00:99:02", "dev", "dead0")
        run(*ns, "ip", "route", "add", f"{SERVICE_IP}/32", "dev", "dead0")
        yield name
    finally:
        run("ip", "netns", "delete", name)


def nat(netns: str, action: str, target: str) -> None:
    """The Service rule, as kube-proxy writes it: SERVICE_IP:PORT -> target:PORT."""
    rule = ["-p", "tcp", "-d", SERVICE_IP, "--dport", str(PORT), "-j", "DNAT"]
    rule += ["--to-destination", f"{target}:{PORT}"]
    where = ["-A", "OUTPUT"] if action == "add" else ["-R", "OUTPUT", "1"]
    run("ip", "netns", "exec", netns, "iptables", "-t", "nat", *where, *rule)


def spawn(netns: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "atlax.cli", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@needs_netns
def test_a_connect_stuck_on_a_dead_pod_is_dialled_again(
    pki: Pki, netns: str, tmp_path: Path
) -> None:
    cert, key = pki.agent("home-nas")
    (tmp_path / "relay.toml").write_text(
        f'[relay]\nlisten = "{LIVE_POD}:{PORT}"\nca = "{pki.ca}"\ncert = "{pki.relay_crt}"\n'
        f'key = "{pki.relay_key}"\npublic_host = "127.0.0.1"\n\n'
        '[[agents]]\nname = "home-nas"\nservices = [{ name = "web", port = 8080 }]\n'
    )
    # The connect timeout is far longer than the test waits: only a new dial can get through.
    (tmp_path / "agent.toml").write_text(
        f'[agent]\nrelay = "{SERVICE_IP}:{PORT}"\nca = "{pki.ca}"\ncert = "{cert}"\nkey = "{key}"\n'
        'server_name = "localhost"\nconnect_timeout = 600\n\n'
        '[services]\nweb = "127.0.0.1:9"\n'
    )
    nat(netns, "add", DEAD_POD)
    relay = spawn(netns, tmp_path / "relay.log", "relay", "--config", str(tmp_path / "relay.toml"))
    agent = None
    try:
        wait_for(
            lambda: "listening for agents" in (tmp_path / "relay.log").read_text(), 30, "relay"
        )
        agent = spawn(
            netns, tmp_path / "agent.log", "agent", "--config", str(tmp_path / "agent.toml")
        )

        def syn_in_flight() -> bool:
            out = run("ip", "netns", "exec", netns, "ss", "-Htn", "state", "syn-sent")
            return f"{SERVICE_IP}:{PORT}" in out

        wait_for(syn_in_flight, 30, "the agent's first SYN, towards the dead pod")
        nat(netns, "replace", LIVE_POD)  # the new pod is ready; the first SYN keeps its old NAT
        wait_for(
            lambda: "tunnel up" in (tmp_path / "agent.log").read_text(),
            60,
            "the agent to reach the new relay",
        )
        # The first connect was still stuck when a second one got through.
        assert "connecting timed out" not in (tmp_path / "agent.log").read_text()
    finally:
        for proc in (agent, relay):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        print((tmp_path / "agent.log").read_text()[-2000:])


@pytest.mark.anyio
async def test_the_agent_retries_quickly_while_its_relay_restarts(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay that says it is going away (a rollout, a deleted pod) is back within seconds:
    while it restarts, every retry waits at most RESTART_BACKOFF_CAP instead of a backoff that
    grows towards backoff_cap (30 s by default) and keeps the agent away long after the new
    relay is ready."""
    caplog.set_level(logging.WARNING, logger="atlax.agent")
    settings = relay_settings(pki, drain_timeout=1.0)
    agent = Agent(agent_settings(pki, settings, backoff_initial=0.5, backoff_cap=30.0), {})
    failures = 10  # the old backoff stays within 1 s this often with probability < 1e-8
    async with running_agent(agent, wait=False):
        old = Relay(settings, [spec("home-nas", web=free_port())])
        async with running_relay(old):
            await wait_until(lambda: agent.session is not None, 10)
            await old.shutdown()
        await wait_until(lambda: len(_retries(caplog)) >= failures, 60, "retries")
        async with running_relay(Relay(settings, [spec("home-nas", web=free_port())])):
            await wait_until(lambda: agent.connects >= 2, 15, "the agent back")
    delays = _retries(caplog)
    assert all(delay <= RESTART_BACKOFF_CAP for delay in delays), delays


def _retries(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [
        float(m.group(1))
        for r in caplog.records
        if (m := re.search(r"retrying in ([0-9.]+)s$", r.getMessage()))
    ]
