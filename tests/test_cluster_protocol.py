"""The cluster extension of the wire protocol (docs/protocol.md, "Relay instances"): its vectors,
read from that file, and its rules, on the sans-I/O core. No sockets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from atlax.protocol import (
    ClusterSizeChanged,
    Connection,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    Settings,
    StreamOpened,
    TunnelJoined,
)
from atlax.protocol.decoder import FrameDecoder
from atlax.protocol.frames import (
    FrameType,
    decode_settings,
    encode_frame,
    encode_settings,
    encode_u32,
)

SPEC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
INSTANCE = 0x2A5F01C3


def _block(name: str) -> list[list[str]]:
    match = re.search(rf"```{name}\n(.*?)```", SPEC.read_text(), re.S)
    assert match, f"no ```{name} block in {SPEC}"
    return [line.split() for line in match.group(1).splitlines() if line.strip()]


VECTORS = {row[0]: bytes.fromhex("".join(row[1:])) for row in _block("cluster-vectors")}
INVALID = {
    row[0]: (row[1], bytes.fromhex("".join(row[2:-1])), row[-1])
    for row in _block("cluster-invalid-vectors")
}
DEFAULT_SETTINGS = encode_settings(Settings())

RELAY_SETTINGS = Settings(instance_id=INSTANCE, cluster_size=3)
POOL_SETTINGS = Settings(tunnel_pool=True)

EXPECTED = {
    "settings-relay-instance": encode_settings(RELAY_SETTINGS),
    "settings-agent-pool": encode_settings(POOL_SETTINGS),
    "cluster-2": encode_frame(FrameType.CLUSTER, 0, 0, encode_u32(2)),
    "join-2a5f01c3": encode_frame(FrameType.JOIN, 0, 0, encode_u32(INSTANCE)),
}


def agent(pool: bool = True) -> Connection:
    """An agent that has received the SETTINGS of relay instance 2a5f01c3 (cluster of 3)."""
    conn = Connection(Role.CLIENT, POOL_SETTINGS if pool else Settings())
    conn.receive_data(VECTORS["settings-relay-instance"], now=0.0)
    conn.data_to_send()
    return conn


def relay(peer: bytes | None = None, join: bool = False) -> Connection:
    """Relay instance 2a5f01c3 that has received `peer` SETTINGS (a pool agent's by default)."""
    conn = Connection(Role.SERVER, RELAY_SETTINGS)
    conn.receive_data(VECTORS["settings-agent-pool"] if peer is None else peer, now=0.0)
    if join:
        conn.receive_data(VECTORS["join-2a5f01c3"], now=0.0)
    conn.data_to_send()
    return conn


RECEIVERS = {
    "agent": agent,
    "old-agent": lambda: agent(pool=False),
    "relay": relay,
    "joined-relay": lambda: relay(join=True),
    "relay-old-agent": lambda: relay(DEFAULT_SETTINGS),
    "new-agent": lambda: Connection(Role.CLIENT, POOL_SETTINGS),
    "new-relay": lambda: Connection(Role.SERVER, RELAY_SETTINGS),
}


def test_every_vector_is_checked() -> None:
    assert set(VECTORS) == set(EXPECTED)
    assert {receiver for receiver, _, _ in INVALID.values()} <= set(RECEIVERS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_encoding_matches_spec(name: str) -> None:
    assert EXPECTED[name] == VECTORS[name]


def test_the_settings_vectors_decode_to_what_they_say() -> None:
    relay_settings = decode_settings(VECTORS["settings-relay-instance"][12:])
    assert (relay_settings.instance_id, relay_settings.cluster_size) == (INSTANCE, 3)
    assert relay_settings.tunnel_pool is False
    pool = decode_settings(VECTORS["settings-agent-pool"][12:])
    assert pool.tunnel_pool is True and pool.instance_id == 0


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_vectors_raise_the_spec_error(name: str) -> None:
    receiver, data, code = INVALID[name]
    conn = RECEIVERS[receiver]()
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(data, now=0.0)
    assert info.value.error_code is ErrorCode[code]
    sent = list(FrameDecoder(1 << 24).feed(conn.data_to_send()))
    goaway = [f for f in sent if f.type is FrameType.GOAWAY]
    assert goaway and int.from_bytes(goaway[-1].payload[4:8], "big") == ErrorCode[code]


def test_an_extension_frame_without_the_extension_is_an_unknown_type() -> None:
    """What an old peer says, and what a new one says where the extension was not announced."""
    with pytest.raises(RemoteProtocolError, match="unknown frame type 0x7"):
        agent(pool=False).receive_data(VECTORS["cluster-2"], now=0.0)
    with pytest.raises(RemoteProtocolError, match="unknown frame type 0x8"):
        relay(DEFAULT_SETTINGS).receive_data(VECTORS["join-2a5f01c3"], now=0.0)


def test_a_pool_agent_joins_and_only_then_may_the_relay_open_streams() -> None:
    relay_side = Connection(Role.SERVER, RELAY_SETTINGS)
    agent_side = Connection(Role.CLIENT, POOL_SETTINGS)
    relay_side.receive_data(agent_side.data_to_send(), now=0.0)
    agent_side.receive_data(relay_side.data_to_send(), now=0.0)
    assert relay_side.cluster_extension and agent_side.cluster_extension
    assert relay_side.awaiting_join and not relay_side.can_open_stream
    with pytest.raises(LocalProtocolError):
        relay_side.open_stream("web")
    agent_side.join()
    assert agent_side.data_to_send() == VECTORS["join-2a5f01c3"]
    with pytest.raises(LocalProtocolError):
        agent_side.join()  # once
    # JOIN arriving in the same read as the agent's SETTINGS is fine too (see the next test).
    events = relay_side.receive_data(VECTORS["join-2a5f01c3"], now=0.0)
    assert events == [TunnelJoined(INSTANCE)]
    assert relay_side.joined and relay_side.can_open_stream
    stream_id = relay_side.open_stream("web")
    opened = agent_side.receive_data(relay_side.data_to_send(), now=0.0)
    assert opened == [StreamOpened(stream_id, "web", None)]


def test_settings_and_join_in_one_read_are_both_understood() -> None:
    relay_side = Connection(Role.SERVER, RELAY_SETTINGS)
    events = relay_side.receive_data(
        VECTORS["settings-agent-pool"] + VECTORS["join-2a5f01c3"], now=0.0
    )
    assert events[-1] == TunnelJoined(INSTANCE) and relay_side.can_open_stream


def test_cluster_announcements_reach_pool_agents_only() -> None:
    pool_relay = relay(join=True)
    assert pool_relay.announce_cluster(2) is True
    assert pool_relay.data_to_send() == VECTORS["cluster-2"]
    conn = agent()
    assert conn.receive_data(VECTORS["cluster-2"], now=0.0) == [ClusterSizeChanged(2)]
    old = relay(DEFAULT_SETTINGS)
    assert old.announce_cluster(2) is False and old.data_to_send() == b""
    assert old.cluster_size == 2  # remembered, though this agent is never told
    assert old.can_open_stream  # an old agent's tunnel carries streams from its SETTINGS on
    with pytest.raises(LocalProtocolError):
        old.announce_cluster(0)


def test_an_old_agent_ignores_the_relay_ids_and_an_old_relay_the_pool_setting() -> None:
    old_agent = agent(pool=False)
    assert old_agent.peer_settings is not None
    assert old_agent.peer_settings.instance_id == INSTANCE  # decoded, but no extension
    assert not old_agent.cluster_extension
    with pytest.raises(LocalProtocolError):
        old_agent.join()
    # A relay without an instance id (an old one) and a pool agent: no extension, no JOIN.
    pool_agent = Connection(Role.CLIENT, POOL_SETTINGS)
    pool_agent.receive_data(DEFAULT_SETTINGS, now=0.0)
    assert not pool_agent.cluster_extension
    plain_relay = Connection(Role.SERVER)
    plain_relay.receive_data(VECTORS["settings-agent-pool"], now=0.0)
    assert not plain_relay.awaiting_join and plain_relay.can_open_stream
