"""High availability behind a real load balancer: three relay processes on 127.0.0.2-4 behind
HAProxy (tests/cluster.py), one agent, hashed payloads. What the README's "High availability and
scaling" promises, each with its failure: convergence, a relay killed mid-stream, a rolling
restart under load, a cluster that shrinks."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
from pathlib import Path

import anyio
import pytest
from cluster import AGENT, RelayCluster
from conftest import (
    Pki,
    agent_settings,
    echo_handler,
    exchange,
    running_agent,
    tcp_service,
    wait_until,
)

from atlax.agent import Agent
from atlax.bench.cluster import RolloutResult, client_at_rate
from atlax.control.client import ControlClient

pytestmark = pytest.mark.anyio

STREAMS = '{agent="home-nas",service="web"}'


async def echoes(port: int, count: int, concurrency: int = 30) -> list[str]:
    """`count` connections through the load balancer, each echoing random bytes; what failed."""
    failures: list[str] = []
    limit = anyio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limit:
            payload = os.urandom(1024 + i * 97 % 65536)
            try:
                with anyio.fail_after(60):
                    got = await exchange(port, payload)
            except (OSError, anyio.BrokenResourceError, TimeoutError) as exc:
                failures.append(f"{i}: {type(exc).__name__} {exc}")
                return
            if hashlib.sha256(got).digest() != hashlib.sha256(payload).digest():
                failures.append(f"{i}: {len(got)} of {len(payload)} bytes back, or others")

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    return failures


async def converged(agent: Agent, count: int = 3) -> None:
    """The agent holds `count` tunnels (bounded wait: no timing is asserted)."""
    await wait_until(lambda: len(agent.tunnels) == count, 60, f"{count} tunnels")


async def test_the_agent_reaches_every_instance_and_connections_spread(
    pki: Pki, tmp_path: Path
) -> None:
    async with RelayCluster(tmp_path, pki) as cluster, tcp_service(echo_handler) as echo:
        agent = Agent(agent_settings(pki, cluster.agent_port), {"web": echo})
        async with running_agent(agent):
            await converged(agent)
            held = {f"{i:08x}" for i in agent.tunnels if i is not None}
            for relay in cluster.relays:
                ids = await relay.cluster()
                assert ids["size"] == 3 and ids["instance"] in held
                status, view = await ControlClient(relay.control).call("GET", f"/agents/{AGENT}")
                assert status == 200
                await wait_until(lambda v=view: bool(v["instances"]), 1, "instances")
                assert [i["instance"] for i in view["instances"]] == [ids["instance"]]
            assert await echoes(cluster.web_port, 300) == []
            counts = [relay.metric("atlax_streams_total", STREAMS) for relay in cluster.relays]
            assert sum(counts) == 300 and all(c > 0 for c in counts), counts


async def test_a_relay_killed_during_100_streams(pki: Pki, tmp_path: Path) -> None:
    """SIGKILL of r2 while 100 streams are open: the ones on r1 and r3 finish intact, only r2's
    fail; once HAProxy has marked r2 down every new connection succeeds; the agent joins r2's
    successor when it is back."""
    async with RelayCluster(tmp_path, pki) as cluster, tcp_service(echo_handler) as echo:
        agent = Agent(agent_settings(pki, cluster.agent_port), {"web": echo})
        async with running_agent(agent):
            await converged(agent)
            r2 = cluster.relays[1]
            started, go = anyio.Event(), anyio.Event()
            opened = 0
            intact: list[int] = []
            broken: list[str] = []

            async def stream(i: int) -> None:
                nonlocal opened
                first, rest = os.urandom(65536), os.urandom(256 * 1024 + i)
                received = bytearray()
                try:
                    with anyio.fail_after(90):
                        async with await anyio.connect_tcp("127.0.0.1", cluster.web_port) as c:
                            await c.send(first)
                            while len(received) < len(first):
                                received += await c.receive()
                            opened += 1
                            if opened == 100:
                                started.set()
                            await go.wait()
                            await c.send(rest)
                            await c.send_eof()
                            while True:
                                received += await c.receive()
                except anyio.EndOfStream:
                    pass
                except (OSError, anyio.BrokenResourceError) as exc:
                    broken.append(f"{i}: {type(exc).__name__}")
                    return
                sent = first + rest
                if bytes(received) == sent:
                    intact.append(i)
                elif sent.startswith(bytes(received)):
                    broken.append(f"{i}: closed after {len(received)} bytes")
                else:
                    raise AssertionError(f"stream {i}: bytes came back that were not sent")

            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(stream, i)
                with anyio.fail_after(60):
                    await started.wait()
                on_r2 = int(r2.metric("atlax_streams_open", f'{{agent="{AGENT}"}}'))
                r2.signal(signal.SIGKILL)
                await anyio.to_thread.run_sync(r2.wait_exit)
                go.set()
            assert len(broken) == on_r2 and len(intact) == 100 - on_r2, (on_r2, broken)
            await cluster.wait_status(r2, "DOWN")
            assert await echoes(cluster.web_port, 60) == []
            lost = set(agent.tunnels)
            await cluster.restart(r2)
            await wait_until(
                lambda: len(agent.tunnels) == 3 and set(agent.tunnels) != lost, 60, "r2 rejoined"
            )
            assert await echoes(cluster.web_port, 60) == []


async def test_a_rolling_restart_under_load_fails_nothing(pki: Pki, tmp_path: Path) -> None:
    """Each relay in turn gets SIGTERM and is started again while a client opens 20 connections
    a second, each echoing 4 KiB of random bytes: zero failed, zero corrupted."""
    async with RelayCluster(tmp_path, pki) as cluster, tcp_service(echo_handler) as echo:
        agent = Agent(agent_settings(pki, cluster.agent_port), {"web": echo})
        async with running_agent(agent):
            await converged(agent)
            result, stop = RolloutResult(), threading.Event()
            client = threading.Thread(
                target=client_at_rate, args=(cluster.web_port, 20.0, stop, result)
            )
            client.start()
            try:
                await anyio.sleep(2)
                for relay in cluster.relays:
                    relay.signal(signal.SIGTERM)
                    assert await anyio.to_thread.run_sync(relay.wait_exit) == 0
                    await cluster.restart(relay)
                    await converged(agent)
                    await anyio.sleep(1)
            finally:
                stop.set()
                await anyio.to_thread.run_sync(client.join)
            assert result.attempted > 100
            assert (result.failed, result.corrupted) == (0, 0), result.failures[:10]


async def test_a_shrinking_cluster_drops_the_stale_tunnel(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """r3 freezes (SIGSTOP: its tunnel stays open but nothing answers) and r1, r2 are told the
    cluster has two relays: the agent drops the tunnel to r3, which still counts three, after
    its grace and long before its keepalive would notice, and stops dialling for a third."""
    caplog.set_level(logging.INFO, logger="atlax.agent")
    async with RelayCluster(tmp_path, pki) as cluster, tcp_service(echo_handler) as echo:
        settings = agent_settings(
            pki, cluster.agent_port, keepalive_interval=30.0, keepalive_timeout=120.0
        )
        agent = Agent(settings, {"web": echo})
        async with running_agent(agent):
            await converged(agent)
            r1, r2, r3 = cluster.relays
            frozen = int(str((await r3.cluster())["instance"]), 16)
            assert frozen in agent.tunnels
            r3.signal(signal.SIGSTOP)
            try:
                await cluster.wait_status(r3, "DOWN")
                await r1.set_replicas(2)
                await r2.set_replicas(2)
                await wait_until(lambda: frozen not in agent.tunnels, 60, "the stale tunnel gone")
                assert len(agent.tunnels) == 2
                assert agent.policy is not None and agent.policy.target == 2
                assert f"dropping the tunnel to instance {frozen:08x}" in caplog.text
                assert await echoes(cluster.web_port, 30) == []
            finally:
                r3.signal(signal.SIGCONT)
