"""The supervisor's fan-out registry (atlax/supervisor.py) against real relays and their control
sockets, in-process: one relay per loopback address stands in for one worker (the workers of a
real supervisor share ports with SO_REUSEPORT; here different addresses keep them apart)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from conftest import Pki, relay_settings, spec

from atlax.control.client import ControlClient
from atlax.demo import free_port
from atlax.relay import PortConflictError
from atlax.relay_main import RelayMain
from atlax.supervisor.fanout import FanOutRegistry, WorkerFailedError, merge_agent, merge_agents

pytestmark = pytest.mark.anyio

HOSTS = ("127.0.0.2", "127.0.0.3")


def listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) == 0


@asynccontextmanager
async def workers(pki: Pki, tmp_path: Path) -> AsyncIterator[FanOutRegistry]:
    paths = [tmp_path / "run" / f"worker-{i}.sock" for i in range(len(HOSTS))]
    relays = [
        RelayMain(relay_settings(pki, public_host=host, control_socket=path))
        for host, path in zip(HOSTS, paths, strict=True)
    ]
    async with anyio.create_task_group() as tg:
        for relay in relays:
            await tg.start(relay.serve)
        try:
            yield FanOutRegistry(lambda: [ControlClient(p) for p in paths])
        finally:
            tg.cancel_scope.cancel()


def free_everywhere() -> int:
    while True:
        port = free_port(HOSTS[0])
        with socket.socket() as probe:
            try:
                probe.bind((HOSTS[1], port))
            except OSError:
                continue
        return port


async def test_a_change_reaches_every_worker_and_reads_merge(pki: Pki, tmp_path: Path) -> None:
    port = free_everywhere()
    async with workers(pki, tmp_path) as registry:
        assert await registry.apply_agent(spec("home-nas", web=port)) is True
        assert all(listening(host, port) for host in HOSTS)
        assert await registry.apply_agent(spec("home-nas", web=port)) is False
        agent = await registry.agent("home-nas")
        assert agent is not None and agent["services"] == [{"name": "web", "port": port}]
        assert [a["name"] for a in await registry.agents()] == ["home-nas"]
        assert await registry.remove_agent("home-nas") is True
        assert not any(listening(host, port) for host in HOSTS)
        assert await registry.agent("home-nas") is None
        assert await registry.remove_agent("home-nas") is False


async def test_a_refusal_on_one_worker_is_undone_on_the_others(pki: Pki, tmp_path: Path) -> None:
    first, second = free_everywhere(), free_everywhere()
    async with workers(pki, tmp_path) as registry:
        await registry.apply_agent(spec("home-nas", web=first))
        with socket.socket() as squatter:  # another program holds `second` on one worker's host
            squatter.bind((HOSTS[1], second))
            squatter.listen()
            with pytest.raises(PortConflictError) as info:
                await registry.apply_agent(spec("home-nas", web=second))
            assert info.value.port == second
            # The worker that had applied it was given the previous spec back.
            assert listening(HOSTS[0], first) and not listening(HOSTS[0], second)
            assert registry.desired["home-nas"] == spec("home-nas", web=first)
            # A new agent refused on one worker is removed again from the other.
            with pytest.raises(PortConflictError):
                await registry.apply_agent(spec("office", smb=second))
            assert await registry.agent("office") is None
            assert "office" not in registry.desired


async def test_a_worker_that_cannot_be_reached_fails_the_change_everywhere(
    pki: Pki, tmp_path: Path
) -> None:
    """A worker that does not answer (it is dying) fails the change: the one that applied it
    gets it undone, and the control API answers 503 with the reason (WorkerFailedError); a
    revocation is not undone, but stays desired so that a retry reaches every worker."""
    port = free_everywhere()
    async with workers(pki, tmp_path):
        live = ControlClient(tmp_path / "run" / "worker-0.sock")
        dead = ControlClient(tmp_path / "run" / "gone.sock", timeout=2)
        broken = FanOutRegistry(lambda: [live, dead])
        with pytest.raises(WorkerFailedError, match=r"gone\.sock"):
            await broken.apply_agent(spec("home-nas", web=port))
        assert not listening(HOSTS[0], port)
        assert "home-nas" not in broken.desired
        # A revocation that fails on one worker keeps the agent desired: a retry reaches it.
        both = FanOutRegistry(lambda: [live])
        await both.apply_agent(spec("home-nas", web=port))
        both_then_dead = FanOutRegistry(lambda: [live, dead], both.desired.values())
        with pytest.raises(WorkerFailedError, match="retry"):
            await both_then_dead.remove_agent("home-nas")
        assert "home-nas" in both_then_dead.desired
        assert not listening(HOSTS[0], port)  # revoked where it could be


def view(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "home-nas",
        "connected": False,
        "since": None,
        "lastHeartbeat": None,
        "peer": None,
        "activeStreams": 0,
        "streamsTotal": 0,
        "bytesIn": 0,
        "bytesOut": 0,
        "rttSeconds": None,
        "services": [{"name": "web", "port": 8080}],
        "instances": [],
    }
    base.update(fields)
    return base


def test_views_merge_into_one_agent() -> None:
    one = view(
        connected=True,
        since="2026-11-25T10:00:05Z",
        lastHeartbeat="2026-11-25T10:05:00Z",
        peer="203.0.113.7:50000",
        activeStreams=2,
        streamsTotal=10,
        bytesIn=100,
        bytesOut=1000,
        rttSeconds=0.002,
        instances=[{"instance": "2a5f01c3", "connected": True, "activeStreams": 2}],
    )
    two = view(
        connected=True,
        since="2026-11-25T10:00:01Z",
        lastHeartbeat="2026-11-25T10:05:02Z",
        peer="203.0.113.7:50001",
        activeStreams=1,
        streamsTotal=5,
        bytesIn=1,
        bytesOut=2,
        rttSeconds=0.004,
        instances=[{"instance": "11111111", "connected": True, "activeStreams": 1}],
    )
    merged = merge_agent([one, two, view()])
    assert merged["connected"] is True
    assert (merged["activeStreams"], merged["streamsTotal"]) == (3, 15)
    assert (merged["bytesIn"], merged["bytesOut"]) == (101, 1002)
    assert merged["since"] == "2026-11-25T10:00:01Z"
    assert merged["lastHeartbeat"] == "2026-11-25T10:05:02Z"
    assert abs(merged["rttSeconds"] - 0.003) < 1e-12
    assert [i["instance"] for i in merged["instances"]] == ["2a5f01c3", "11111111"]
    assert merge_agent([view(), view()])["connected"] is False
    pin = "sha256:" + "ab" * 32  # the key of a live tunnel, though the first worker has none
    assert merge_agent([view(pin=None), view(connected=True, pin=pin)])["pin"] == pin


def test_agents_merge_by_name() -> None:
    merged = merge_agents([[view(name="b"), view(name="a")], [view(name="a", streamsTotal=3)]])
    assert [(a["name"], a["streamsTotal"]) for a in merged] == [("a", 3), ("b", 0)]
