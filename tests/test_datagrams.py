"""Datagram streams in the core: records kept whole across any framing, a sender that drops."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlax.protocol import Connection, DataReceived, RemoteProtocolError, Role, Settings
from atlax.protocol.datagrams import (
    MAX_DATAGRAM,
    DatagramDecoder,
    DatagramQueue,
    encode_datagram,
)
from atlax.protocol.frames import decode_open_payload, encode_open_payload

DATAGRAMS = st.lists(st.binary(max_size=300), max_size=20)


@given(DATAGRAMS, st.data())
def test_boundaries_survive_any_split(datagrams: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_datagram(d) for d in datagrams)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = DatagramDecoder()
    out: list[bytes] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += decoder.feed(stream[a:b])
    assert out == datagrams
    assert decoder.pending == 0
    decoder.end()


@given(DATAGRAMS.filter(bool), st.data())
def test_a_fin_inside_a_record_is_an_error(datagrams: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_datagram(d) for d in datagrams)
    ends = {0}
    for d in datagrams:
        ends.add(max(ends) + 2 + len(d))
    cut = data.draw(st.integers(0, len(stream)).filter(lambda c: c not in ends))
    decoder = DatagramDecoder()
    decoder.feed(stream[:cut])
    with pytest.raises(RemoteProtocolError, match="inside a record"):
        decoder.end()


def test_largest_and_empty_datagrams() -> None:
    big = os.urandom(MAX_DATAGRAM)
    assert DatagramDecoder().feed(encode_datagram(big) + encode_datagram(b"")) == [big, b""]
    with pytest.raises(ValueError, match="larger than 65535"):
        encode_datagram(bytes(MAX_DATAGRAM + 1))


def test_the_queue_sends_whole_records_in_order_and_drops_the_newest() -> None:
    queue = DatagramQueue(max_record=1 << 20, limit=3)
    assert [queue.push(d) for d in (b"a", b"bb", b"ccc", b"dddd")] == [True, True, True, False]
    assert queue.dropped == 1
    assert queue.take(4) == encode_datagram(b"a")  # "bb" needs 4 bytes of the 1 left
    assert queue.take(0) == b""
    assert queue.take(100) == encode_datagram(b"bb") + encode_datagram(b"ccc")
    assert len(queue) == 0


def test_a_datagram_larger_than_the_peers_window_is_dropped_not_queued() -> None:
    queue = DatagramQueue(max_record=1024)
    assert not queue.push(bytes(1023))
    assert queue.push(bytes(1022))
    assert queue.dropped == 1 and queue.take(1024) == encode_datagram(bytes(1022))


def test_open_options() -> None:
    assert decode_open_payload(encode_open_payload("dns", datagram=True)).datagram
    assert not decode_open_payload(encode_open_payload("dns")).datagram
    with pytest.raises(ValueError, match="PROXY protocol"):
        encode_open_payload("dns", proxy_protocol=2, datagram=True)


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=200),
    window=st.integers(1024, 20_000),
    acknowledge_every=st.integers(1, 10),
)
def test_a_flow_between_two_connections_drops_but_never_reorders_or_corrupts(
    sizes: list[int], window: int, acknowledge_every: int
) -> None:
    """Random datagrams from relay to agent through two real core connections, the agent
    acknowledging only now and then: every datagram arrives intact and in order, or is counted
    dropped at the sender; the sender never holds more than its queue."""
    relay = Connection(Role.SERVER, Settings(initial_window=window))
    agent = Connection(Role.CLIENT, Settings(initial_window=window, datagrams=True))
    agent.receive_data(relay.data_to_send(), now=0.0)
    relay.receive_data(agent.data_to_send(), now=0.0)
    stream_id = relay.open_stream("dns", datagram=True)
    queue = DatagramQueue(max_record=window, limit=8)
    decoder = DatagramDecoder()
    sent = [os.urandom(size) for size in sizes]
    received: list[bytes] = []
    unacknowledged = 0

    def pump() -> None:
        nonlocal unacknowledged
        records = queue.take(relay.send_window(stream_id))
        if records:
            relay.send_data(stream_id, records)
        for event in agent.receive_data(relay.data_to_send(), now=0.0):
            if isinstance(event, DataReceived):
                received.extend(decoder.feed(event.data))
                unacknowledged += len(event.data)

    for i, datagram in enumerate(sent):
        queue.push(datagram)
        pump()
        assert len(queue) <= 8
        if i % acknowledge_every == 0 and unacknowledged:
            agent.acknowledge_received_data(stream_id, unacknowledged)
            unacknowledged = 0
            relay.receive_data(agent.data_to_send(), now=0.0)
            pump()
    if unacknowledged:
        agent.acknowledge_received_data(stream_id, unacknowledged)
        relay.receive_data(agent.data_to_send(), now=0.0)
    pump()
    digests = [hashlib.sha256(d).digest() for d in sent]
    got = [hashlib.sha256(d).digest() for d in received]
    assert len(received) + queue.dropped + len(queue) == len(sent)
    it = iter(digests)
    assert all(any(g == d for d in it) for g in got)  # a subsequence: in order, none altered
    assert decoder.pending == 0
