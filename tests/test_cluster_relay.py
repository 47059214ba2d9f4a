"""One relay instance's side of high availability, in-process on 127.0.0.1: clients held for their
agent (agent_wait), a pool tunnel that carries streams only once joined and a duplicate that never
does, an instance of several that listens on a port only once the agent joined it, a new cluster
size reaching the agent, and old peers on either side."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from conftest import (
    Pki,
    agent_settings,
    echo_handler,
    exchange,
    free_port,
    receive_reset,
    relay_settings,
    running_agent,
    running_relay,
    spec,
    tcp_service,
    wait_until,
)

from atlax.addresses import HostPort
from atlax.agent import TUNNEL_SETTINGS, Agent
from atlax.agent.services import Services
from atlax.metrics import RelayMetrics
from atlax.mux import MuxSession, TunnelClosedError
from atlax.protocol import ErrorCode, Role, Settings
from atlax.relay import Relay
from atlax.relay import ports as relay_ports
from atlax.tls import agent_context, relay_context

pytestmark = pytest.mark.anyio


def sample(metrics: RelayMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def raw_tunnel(
    pki: Pki, relay: Relay, echo: HostPort, *, pool: bool = True
) -> AsyncIterator[MuxSession]:
    """A tunnel made by hand: a pool agent's SETTINGS (or an old agent's), no JOIN sent."""
    settings = TUNNEL_SETTINGS if pool else dataclasses.replace(TUNNEL_SETTINGS, tunnel_pool=False)
    session = MuxSession(Role.CLIENT, settings=settings, handler=Services({"web": echo}, 5).serve)
    crt, key = pki.agent("home-nas")
    loop = asyncio.get_running_loop()
    await loop.create_connection(
        lambda: session,
        "127.0.0.1",
        relay.settings.listen.port,
        ssl=agent_context(pki.ca, crt, key),
        server_hostname="localhost",
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(session.run)
        await session.wait_ready()
        try:
            yield session
        finally:
            session.close(ErrorCode.NO_ERROR, "test over")
            tg.cancel_scope.cancel()


async def test_a_client_waits_for_its_agent_and_is_then_served(pki: Pki) -> None:
    port = free_port()
    metrics = RelayMetrics()
    settings = relay_settings(pki, agent_wait=20.0)
    relay = Relay(settings, [spec("home-nas", web=port)], observer=metrics)
    async with tcp_service(echo_handler) as echo, running_relay(relay):
        async with await anyio.connect_tcp("127.0.0.1", port) as client:
            await client.send(b"sent before the agent came")  # waits in the kernel, unread
            async with running_agent(Agent(agent_settings(pki, settings), {"web": echo})):
                with anyio.fail_after(20):
                    assert await client.receive() == b"sent before the agent came"
    assert sample(metrics, "atlax_connections_waited_total", port=str(port), outcome="served") == 1


async def test_a_client_whose_agent_never_comes_is_refused_after_agent_wait(pki: Pki) -> None:
    port = free_port()
    metrics = RelayMetrics()
    relay = Relay(
        relay_settings(pki, agent_wait=0.3), [spec("home-nas", web=port)], observer=metrics
    )
    async with running_relay(relay):
        async with await anyio.connect_tcp("127.0.0.1", port) as client:
            await receive_reset(client, timeout=10)
    labels = {"port": str(port)}
    assert sample(metrics, "atlax_connections_waited_total", **labels, outcome="refused") == 1
    assert sample(metrics, "atlax_connections_refused_total", **labels, reason="agent_offline") == 1


async def test_waiting_clients_count_against_the_port_limit(pki: Pki) -> None:
    port = free_port()
    metrics = RelayMetrics()
    relay = Relay(
        relay_settings(pki, agent_wait=30.0, max_connections_per_port=1),
        [spec("home-nas", web=port)],
        observer=metrics,
    )
    async with running_relay(relay):
        async with await anyio.connect_tcp("127.0.0.1", port) as held:
            async with await anyio.connect_tcp("127.0.0.1", port) as second:
                await receive_reset(second, timeout=10)  # at once: the port is full of waiters
            await held.send(b"still waiting")
    labels = {"port": str(port), "reason": "port_limit"}
    assert sample(metrics, "atlax_connections_refused_total", **labels) == 1


async def test_a_pool_tunnel_serves_only_once_joined_and_a_duplicate_never(pki: Pki) -> None:
    port = free_port()
    settings = relay_settings(pki, agent_wait=20.0)
    relay = Relay(settings, [spec("home-nas", web=port)])
    async with tcp_service(echo_handler) as echo, running_relay(relay):
        async with raw_tunnel(pki, relay, echo) as first:
            peer = first.peer_settings
            assert peer is not None and peer.instance_id == relay.instance.id
            assert peer.cluster_size == 1
            await anyio.sleep(0.2)
            assert relay.registry.agent("home-nas")["connected"] is False  # type: ignore[index]
            async with await anyio.connect_tcp("127.0.0.1", port) as client:
                await client.send(b"held until JOIN")
                first.join_cluster()
                with anyio.fail_after(20):
                    assert await client.receive() == b"held until JOIN"
            async with raw_tunnel(pki, relay, echo) as duplicate:
                duplicate.close(
                    ErrorCode.NO_ERROR, f"duplicate tunnel to instance {relay.instance.name}"
                )
                await duplicate.wait_closed()
            view = relay.registry.agent("home-nas")
            assert view is not None and view["connected"]
            assert [i["instance"] for i in view["instances"]] == [relay.instance.name]
            assert relay.registry.get("home-nas").session is not None  # type: ignore[union-attr]
            assert await exchange(port, b"the first tunnel still serves") == (
                b"the first tunnel still serves"
            )


@pytest.mark.parametrize("refusal", ["unknown identity", "key not pinned"])
async def test_a_refused_agent_never_sees_its_tunnel_up(pki: Pki, refusal: str) -> None:
    """The relay sends its SETTINGS (which tell an agent its tunnel is up, with the instance to
    JOIN) only once admission accepted the certificate: a refused agent reads SETTINGS and GOAWAY
    together, so neither a hand-made tunnel nor the agent's pool ever counts the tunnel up, and
    the pool backs off as from any refusal."""
    port = free_port()
    agents = [spec("someone-else", web=port)]
    if refusal == "key not pinned":
        agents = [spec("home-nas", web=port).model_copy(update={"pins": ("sha256:" + "0" * 64,)})]
    relay = Relay(relay_settings(pki), agents)
    async with tcp_service(echo_handler) as echo, running_relay(relay):
        crt, key = pki.agent("home-nas")
        for _ in range(3):
            session = MuxSession(Role.CLIENT, settings=TUNNEL_SETTINGS)
            await asyncio.get_running_loop().create_connection(
                lambda session=session: session,
                "127.0.0.1",
                relay.settings.listen.port,
                ssl=agent_context(pki.ca, crt, key),
                server_hostname="localhost",
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(session.run)
                with pytest.raises(TunnelClosedError, match="UNAUTHORIZED"):
                    await session.wait_ready()
            assert session.peer_settings is not None  # they came, with the GOAWAY
        agent = Agent(agent_settings(pki, relay.settings), {"web": echo})
        async with running_agent(agent, wait=False):
            await wait_until(lambda: "UNAUTHORIZED" in (agent.last_error or ""), 20)
            await anyio.sleep(1.5)  # a few more dials (backoff_cap 0.5 s)
            assert agent.connects == 0 and not agent.tunnels and not agent.connected.is_set()


async def test_an_old_agent_is_served_from_its_settings_on(pki: Pki) -> None:
    port = free_port()
    relay = Relay(relay_settings(pki), [spec("home-nas", web=port)])
    async with tcp_service(echo_handler) as echo, running_relay(relay):
        async with raw_tunnel(pki, relay, echo, pool=False):
            await wait_until(lambda: bool(relay.registry.agent("home-nas")["connected"]), 10)  # type: ignore[index]
            assert await exchange(port, b"no JOIN needed") == b"no JOIN needed"


async def test_an_instance_of_several_listens_once_the_agent_joined(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    settings = relay_settings(pki, replicas=3)
    relay = Relay(settings, [spec("home-nas", web=port)])
    async with tcp_service(echo_handler) as echo, running_relay(relay):
        with pytest.raises(OSError):  # refused: a load balancer tries another instance
            await anyio.connect_tcp("127.0.0.1", port)
        async with running_agent(Agent(agent_settings(pki, settings), {"web": echo})):
            await wait_until(lambda: bool(relay.registry.agent("home-nas")["connected"]), 10)  # type: ignore[index]
            assert await exchange(port, b"listening now") == b"listening now"
    # Without an agent it listens after the grace, and refuses as a single relay would.
    monkeypatch.setattr(relay_ports, "LISTEN_GRACE", 0.2)
    other = free_port()
    lonely = Relay(relay_settings(pki, replicas=3, agent_wait=0), [spec("home-nas", web=other)])
    async with running_relay(lonely):

        async def connects() -> bool:
            try:
                client = await anyio.connect_tcp("127.0.0.1", other)
            except OSError:
                return False
            async with client:
                await receive_reset(client)
            return True

        with anyio.fail_after(10):
            while not await connects():
                await anyio.sleep(0.05)


async def test_a_new_cluster_size_reaches_the_agent(pki: Pki) -> None:
    port = free_port()
    settings = relay_settings(pki)
    relay = Relay(settings, [spec("home-nas", web=port)])
    async with tcp_service(echo_handler) as echo, running_relay(relay):
        agent = Agent(agent_settings(pki, settings), {"web": echo})
        async with running_agent(agent):
            assert agent.policy is not None and agent.policy.target == 1
            (tunnel,) = agent.tunnels.values()
            assert tunnel.instance == relay.instance.id and tunnel.size == 1
            snapshot = await relay.instance.set_cluster(4)
            assert snapshot["size"] == 4 and snapshot["synced"] is True
            await wait_until(lambda: agent.policy is not None and agent.policy.target == 4, 10)
            assert tunnel.size == 4
            # The agent looks for the three others (here it only finds this one again).
            assert len(agent.tunnels) == 1


async def test_the_agent_keeps_one_tunnel_to_a_relay_without_instances(pki: Pki) -> None:
    """An older relay sends no INSTANCE_ID: one tunnel, no JOIN, no probing, streams served."""
    accepted: list[MuxSession] = []
    served = anyio.Event()

    async def service(stream: anyio.abc.SocketStream) -> None:
        served.set()  # the agent connected the relay's stream to its service
        await stream.aclose()

    def old_relay() -> MuxSession:
        session = MuxSession(Role.SERVER, settings=Settings(max_streams=0))
        accepted.append(session)
        return session

    loop = asyncio.get_running_loop()
    context = relay_context(pki.ca, pki.relay_crt, pki.relay_key)
    server = await loop.create_server(old_relay, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        async with tcp_service(service) as target:
            agent = Agent(agent_settings(pki, port), {"web": target})
            async with running_agent(agent):
                assert list(agent.tunnels) == [None]
                assert agent.policy is not None and agent.policy.next_dial_at() == float("inf")
                (session,) = accepted
                await session.wait_ready()
                session.open_stream_now("web")  # no JOIN came, none is needed
                with anyio.fail_after(10):
                    await served.wait()
                assert len(accepted) == 1
    finally:
        server.close()
