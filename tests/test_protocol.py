"""The sans-I/O core, peer against peer in memory: bytes in, events out, no sockets, no sleeps."""

from __future__ import annotations

import pytest

from atlax.protocol import (
    Connection,
    ConnectionEnd,
    ConnectionState,
    ConnectionTerminated,
    DataReceived,
    EndReason,
    ErrorCode,
    Event,
    GoAwayReceived,
    KeepaliveConfig,
    LocalProtocolError,
    PongReceived,
    RemoteProtocolError,
    Role,
    Settings,
    SettingsReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from atlax.protocol.decoder import FrameDecoder
from atlax.protocol.frames import (
    FrameType,
    encode_frame,
    encode_goaway_payload,
    encode_settings,
    encode_u32,
)
from atlax.protocol.state import ConnectionInput, next_state

WINDOW = 65_536


def pair(window: int = WINDOW, **kw: object) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, Settings(initial_window=window), **kw)  # type: ignore[arg-type]
    server = Connection(Role.SERVER, Settings(initial_window=window), **kw)  # type: ignore[arg-type]
    pump(client, server)
    return client, server


def pump(a: Connection, b: Connection, now: float = 0.0) -> tuple[list[Event], list[Event]]:
    """Deliver everything queued in both directions until quiet; return (a's, b's) events."""
    got_a: list[Event] = []
    got_b: list[Event] = []
    for _ in range(100):
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_a and not to_b:
            return got_a, got_b
        got_b += b.receive_data(to_b, now)
        got_a += a.receive_data(to_a, now)
    raise AssertionError("peers never went quiet")


def data_of(events: list[Event], stream_id: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


def test_handshake_exchanges_settings() -> None:
    client = Connection(Role.CLIENT, Settings(initial_window=4096, max_frame_size=32768))
    server = Connection(Role.SERVER)
    assert not client.ready
    got_client, got_server = pump(client, server)
    assert got_server == [SettingsReceived(Settings(initial_window=4096, max_frame_size=32768))]
    assert got_client == [SettingsReceived(Settings())]
    assert client.ready and server.ready


def test_stream_ids_follow_roles() -> None:
    client, server = pair()
    assert [server.open_stream("web") for _ in range(3)] == [2, 4, 6]
    assert [client.open_stream("web") for _ in range(2)] == [1, 3]


def test_open_data_and_half_close_both_ways() -> None:
    client, server = pair()
    sid = server.open_stream("web")
    server.send_data(sid, b"GET / HTTP/1.0\r\n\r\n", end_stream=True)
    got_client, _ = pump(client, server)
    assert got_client[0] == StreamOpened(sid, "web", None)
    assert data_of(got_client, sid) == b"GET / HTTP/1.0\r\n\r\n"
    assert got_client[-1] == StreamEnded(sid)
    # The server's direction is closed, the client's is still open (TCP half-close).
    client.send_data(sid, b"reply")
    client.end_stream(sid)
    _, got_server = pump(client, server)
    assert data_of(got_server, sid) == b"reply"
    assert got_server[-1] == StreamEnded(sid)
    assert client.open_streams == 0 and server.open_streams == 0


def test_data_is_split_at_the_peers_max_frame_size() -> None:
    client = Connection(Role.CLIENT, Settings(initial_window=1 << 20, max_frame_size=16384))
    server = Connection(Role.SERVER, Settings(initial_window=1 << 20))
    pump(client, server)
    sid = server.open_stream("web")
    payload = bytes(range(256)) * 200  # 51200 bytes -> 4 frames
    server.send_data(sid, payload)
    got, _ = pump(client, server)
    chunks = [e for e in got if isinstance(e, DataReceived)]
    assert [len(c.data) for c in chunks] == [16384, 16384, 16384, 2048]
    assert data_of(got, sid) == payload


def test_sender_may_not_exceed_its_credit() -> None:
    client, server = pair()
    sid = server.open_stream("web")
    assert server.send_window(sid) == WINDOW
    server.send_data(sid, b"x" * WINDOW)
    assert server.send_window(sid) == 0
    with pytest.raises(LocalProtocolError):
        server.send_data(sid, b"x")


def test_window_update_after_half_the_window_is_consumed() -> None:
    client, server = pair()
    sid = server.open_stream("web")
    server.send_data(sid, b"x" * WINDOW)
    pump(client, server)
    client.acknowledge_received_data(sid, WINDOW // 2 - 1)
    _, got = pump(client, server)
    assert got == []  # not yet half: no update
    client.acknowledge_received_data(sid, 1)
    _, got = pump(client, server)
    assert got == [WindowUpdated(sid, WINDOW // 2)]
    assert server.send_window(sid) == WINDOW // 2


def test_a_stalled_stream_never_blocks_another() -> None:
    """Stream A's reader never consumes; stream B still moves 50 MB. A's buffer stays <= window."""
    client, server = pair()
    stalled, busy = server.open_stream("a"), server.open_stream("b")
    pump(client, server)
    buffered_a = 0
    moved = 0
    chunk = b"\xab" * 16384
    while moved < 50 * 1024 * 1024:
        if server.send_window(stalled):
            server.send_data(stalled, chunk[: server.send_window(stalled)])
        n = min(server.send_window(busy), len(chunk))
        assert n > 0, "the busy stream ran out of credit"
        server.send_data(busy, chunk[:n])
        got, _ = pump(client, server)
        buffered_a += len(data_of(got, stalled))
        received_b = len(data_of(got, busy))
        client.acknowledge_received_data(busy, received_b)
        moved += received_b
        pump(client, server)
        assert buffered_a <= WINDOW
        assert client.buffered_receive(stalled) <= WINDOW
    assert buffered_a == WINDOW


def _raw_server_to_client(*frames: bytes) -> Connection:
    client = Connection(Role.CLIENT, Settings(initial_window=WINDOW))
    client.receive_data(encode_settings(Settings()) + b"".join(frames), now=0.0)
    return client


def _open(stream_id: int, service: str = "web") -> bytes:
    name = service.encode()
    return encode_frame(FrameType.OPEN, 0, stream_id, bytes([len(name)]) + name)


def test_data_beyond_the_window_is_a_flow_control_error() -> None:
    client = _raw_server_to_client(_open(2))
    with pytest.raises(RemoteProtocolError) as info:
        for _ in range(5):
            client.receive_data(encode_frame(FrameType.DATA, 0, 2, b"x" * 16384), now=0.0)
    assert info.value.error_code is ErrorCode.FLOW_CONTROL_ERROR


def test_window_update_overflow_is_a_flow_control_error() -> None:
    client = _raw_server_to_client(_open(2))
    with pytest.raises(RemoteProtocolError) as info:
        client.receive_data(encode_frame(FrameType.WINDOW_UPDATE, 0, 2, encode_u32(2**31 - 1)), 0)
    assert info.value.error_code is ErrorCode.FLOW_CONTROL_ERROR


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (encode_frame(FrameType.DATA, 0, 4, b"x"), ErrorCode.PROTOCOL_ERROR),  # never opened
        (encode_frame(FrameType.RESET, 0, 8, encode_u32(0)), ErrorCode.PROTOCOL_ERROR),
        (_open(1), ErrorCode.PROTOCOL_ERROR),  # the client's own parity
        (_open(2), ErrorCode.PROTOCOL_ERROR),  # not above the last id
        (encode_settings(Settings()), ErrorCode.PROTOCOL_ERROR),  # second SETTINGS
        (encode_frame(FrameType.OPEN, 0, 4, b"\x03WEB"), ErrorCode.PROTOCOL_ERROR),  # bad name
        (encode_frame(FrameType.OPEN, 0, 4, b"\x05we"), ErrorCode.PROTOCOL_ERROR),  # truncated
    ],
)
def test_malformed_frames_close_the_connection(frame: bytes, code: ErrorCode) -> None:
    client = _raw_server_to_client(_open(2))
    with pytest.raises(RemoteProtocolError) as info:
        client.receive_data(frame, now=0.0)
    assert info.value.error_code is code
    # Once failed, the connection ignores further input instead of raising again.
    assert client.receive_data(b"more garbage", now=0.0) == []


def test_a_bad_header_read_into_the_decoders_buffer_queues_goaway() -> None:
    """The zero-copy read path fails like receive_data: typed error, GOAWAY queued, closed."""
    client = _raw_server_to_client(_open(2))
    client.data_to_send()
    oversized = encode_frame(FrameType.DATA, 0, 2, b"")[:4] + (2**24).to_bytes(4, "big") + bytes(4)
    buffer = client.get_buffer()
    buffer[: len(oversized)] = oversized
    with pytest.raises(RemoteProtocolError) as info:
        client.buffer_updated(len(oversized), now=0.0)
    assert info.value.error_code is ErrorCode.FRAME_SIZE_ERROR
    sent = list(FrameDecoder().feed(client.data_to_send()))
    assert [f.type for f in sent] == [FrameType.GOAWAY]
    assert int.from_bytes(sent[0].payload[4:8], "big") == ErrorCode.FRAME_SIZE_ERROR
    assert client.buffer_updated(0, now=0.0) == []


def test_data_after_fin_and_on_closed_streams_is_stream_closed() -> None:
    client = _raw_server_to_client(_open(2), encode_frame(FrameType.DATA, 1, 2, b""))
    with pytest.raises(RemoteProtocolError) as info:
        client.receive_data(encode_frame(FrameType.DATA, 0, 2, b"late"), now=0.0)
    assert info.value.error_code is ErrorCode.STREAM_CLOSED


def test_first_frame_must_be_settings() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(RemoteProtocolError, match="first frame must be SETTINGS"):
        client.receive_data(encode_frame(FrameType.PING, 0, 0, b"12345678"), now=0.0)


def test_settings_out_of_range_are_rejected() -> None:
    client = Connection(Role.CLIENT)
    bad = encode_frame(FrameType.SETTINGS, 0, 0, b"\x00\x02" + encode_u32(10))
    with pytest.raises(RemoteProtocolError, match="MAX_FRAME_SIZE"):
        client.receive_data(bad, now=0.0)


def test_frames_for_a_stream_we_reset_are_ignored() -> None:
    client, server = pair()
    sid = server.open_stream("web")
    pump(client, server)
    client.send_data(sid, b"in flight")
    server.reset_stream(sid, ErrorCode.CANCEL)
    got_client, got_server = pump(client, server)
    assert got_server == []  # the in-flight DATA was dropped, not an error
    assert got_client == [StreamReset(sid, ErrorCode.CANCEL, remote=True)]
    assert client.open_streams == 0 and server.open_streams == 0


def test_max_streams_refuses_only_the_extra_stream() -> None:
    client = Connection(Role.CLIENT, Settings(max_streams=2))
    server = Connection(Role.SERVER)
    pump(client, server)
    ids = [server.open_stream("web") for _ in range(2)]
    assert not server.can_open_stream  # the server respects the limit it was told
    extra = encode_frame(FrameType.OPEN, 0, 6, b"\x03web")  # a peer that ignores it
    events = client.receive_data(server.data_to_send() + extra, now=0.0)
    opened = [e.stream_id for e in events if isinstance(e, StreamOpened)]
    assert opened == ids
    assert events[-1] == StreamReset(6, ErrorCode.REFUSED_STREAM, remote=False)
    sent = list(FrameDecoder().feed(client.data_to_send()))
    assert [(f.type, f.stream_id, f.payload) for f in sent] == [
        (FrameType.RESET, 6, encode_u32(ErrorCode.REFUSED_STREAM))
    ]
    assert client.ready


def test_goaway_refuses_streams_above_the_last_id() -> None:
    client, server = pair()
    first = server.open_stream("web")
    pump(client, server)
    second = server.open_stream("web")
    client.close(ErrorCode.NO_ERROR, "draining")  # the client has processed only `first`
    got_client, got_server = pump(client, server)
    assert GoAwayReceived(first, ErrorCode.NO_ERROR, "draining") in got_server
    assert StreamReset(second, ErrorCode.REFUSED_STREAM, remote=True) in got_server
    assert not server.can_open_stream
    assert got_client == []  # the OPEN for `second` arrived after the GOAWAY and was ignored
    # The stream below the last id still works.
    server.send_data(first, b"still here", end_stream=True)
    got_client, _ = pump(client, server)
    assert data_of(got_client, first) == b"still here"


def test_keepalive_pings_when_idle_and_measures_rtt() -> None:
    ka = KeepaliveConfig(interval=5.0, timeout=15.0)
    client = Connection(Role.CLIENT, keepalive=ka, now=100.0)
    server = Connection(Role.SERVER, now=100.0)
    pump(client, server, now=100.0)
    assert client.get_timer() == 105.0
    assert client.handle_timer(104.9) == []
    assert client.data_to_send() == b""
    assert client.handle_timer(105.0) == []
    server.receive_data(client.data_to_send(), now=105.0)
    events = client.receive_data(server.data_to_send(), now=105.25)
    assert events == [PongReceived(0.25)]
    assert client.last_rtt == 0.25
    assert client.get_timer() == 110.25


def test_keepalive_declares_a_silent_peer_dead_at_the_timeout() -> None:
    ka = KeepaliveConfig(interval=5.0, timeout=15.0)
    client = Connection(Role.CLIENT, keepalive=ka, now=0.0)
    server = Connection(Role.SERVER, now=0.0)
    pump(client, server, now=0.0)
    now = 0.0
    terminated: list[Event] = []
    for _ in range(100):  # the server has gone silent: never deliver to it
        timer = client.get_timer()
        assert timer is not None
        now = timer
        terminated = client.handle_timer(now)
        if terminated:
            break
    assert now == 15.0
    assert terminated == [
        ConnectionTerminated(ErrorCode.KEEPALIVE_TIMEOUT, "nothing received from the peer for 15s")
    ]
    assert client.get_timer() is None


def test_ping_flood_is_refused() -> None:
    client = _raw_server_to_client()
    ping = encode_frame(FrameType.PING, 0, 0, b"12345678")
    with pytest.raises(RemoteProtocolError) as info:
        client.receive_data(ping * 101, now=1.0)
    assert info.value.error_code is ErrorCode.ENHANCE_YOUR_CALM


def test_pings_spread_over_time_are_fine() -> None:
    client = _raw_server_to_client()
    ping = encode_frame(FrameType.PING, 0, 0, b"12345678")
    for second in range(5):
        client.receive_data(ping * 100, now=float(second + 1))
    assert client.ready


def test_closed_connection_refuses_local_actions() -> None:
    client, server = pair()
    client.close(ErrorCode.PROTOCOL_ERROR, "bye")
    with pytest.raises(LocalProtocolError):
        client.open_stream("web")
    got, _ = pump(server, client)
    assert got == [GoAwayReceived(0, ErrorCode.PROTOCOL_ERROR, "bye")]


# -- lifecycle: the state table and why a connection ended ---------------------------------------


def test_the_lifecycle_follows_the_state_table() -> None:
    client = Connection(Role.CLIENT, Settings(initial_window=WINDOW))
    server = Connection(Role.SERVER, Settings(initial_window=WINDOW))
    assert client.state is ConnectionState.AWAITING_SETTINGS
    pump(client, server)
    assert client.state is server.state is ConnectionState.OPEN
    sid = server.open_stream("web")
    pump(client, server)
    client.close(ErrorCode.NO_ERROR, "certificate renewed")
    pump(client, server)
    assert client.state is ConnectionState.DRAINING_LOCAL
    assert server.state is ConnectionState.DRAINING_REMOTE
    assert client.ready and server.ready and not server.can_open_stream
    server.send_data(sid, b"bye", end_stream=True)
    client.end_stream(sid)
    pump(client, server)
    assert client.state is server.state is ConnectionState.CLOSED
    assert client.end == ConnectionEnd(
        EndReason.LOCAL_CLOSE, ErrorCode.NO_ERROR, "certificate renewed"
    )
    assert server.end == ConnectionEnd(
        EndReason.PEER_GOAWAY, ErrorCode.NO_ERROR, "certificate renewed"
    )
    assert client.end.clean and server.end.clean


def test_a_drain_with_no_streams_closes_at_once() -> None:
    client, server = pair()
    server.close()
    assert server.state is ConnectionState.CLOSED
    pump(client, server)
    assert client.state is ConnectionState.CLOSED
    assert client.end is not None and client.end.reason is EndReason.PEER_GOAWAY


def test_a_goaway_the_other_way_while_draining_keeps_who_started_it() -> None:
    client, server = pair()
    sid = server.open_stream("web")
    pump(client, server)
    server.close(ErrorCode.NO_ERROR, "relay shutting down")
    client.close(ErrorCode.NO_ERROR, "agent leaving too")
    pump(client, server)
    assert server.state is ConnectionState.DRAINING_LOCAL
    assert client.state is ConnectionState.DRAINING_LOCAL
    server.reset_stream(sid)
    pump(client, server)
    assert server.end is not None and server.end.reason is EndReason.LOCAL_CLOSE
    assert client.end is not None and client.end.reason is EndReason.LOCAL_CLOSE


def test_an_error_after_a_graceful_goaway_is_the_reason() -> None:
    client, server = pair()
    server.open_stream("web")
    pump(client, server)
    server.close(ErrorCode.NO_ERROR, "replaced by a newer tunnel")
    server.close(ErrorCode.REPLACED, "drain timeout")
    assert server.state is ConnectionState.CLOSED
    assert server.end == ConnectionEnd(EndReason.LOCAL_CLOSE, ErrorCode.REPLACED, "drain timeout")
    got, _ = pump(client, server)
    assert got[-1] == GoAwayReceived(0, ErrorCode.REPLACED, "drain timeout")
    assert client.end == ConnectionEnd(EndReason.PEER_GOAWAY, ErrorCode.REPLACED, "drain timeout")
    assert str(client.end) == "peer sent GOAWAY (REPLACED): drain timeout"


def test_the_transport_ending_names_why() -> None:
    client, server = pair()
    client.connection_lost(EndReason.PEER_CLOSED)
    assert client.state is ConnectionState.CLOSED
    assert client.end == ConnectionEnd(EndReason.PEER_CLOSED)
    assert str(client.end) == "the peer closed the connection"
    # While draining, an orderly end of the transport is the drain's end ...
    sid = server.open_stream("web")
    server.close()
    server.connection_lost(EndReason.PEER_CLOSED)
    assert server.end is not None and server.end.reason is EndReason.LOCAL_CLOSE
    assert server.end.clean
    # ... but a transport failure is not.
    other_client, other = pair()
    other.open_stream("web")
    other.close()
    other.connection_lost(EndReason.TRANSPORT_LOST, "connection reset by peer")
    assert other.end == ConnectionEnd(
        EndReason.TRANSPORT_LOST, ErrorCode.NO_ERROR, "connection reset by peer"
    )
    assert str(other.end) == "connection lost: connection reset by peer"
    assert sid == 2


def test_a_protocol_error_is_the_reason_and_nothing_after_it_is_processed() -> None:
    client = _raw_server_to_client(_open(2))
    with pytest.raises(RemoteProtocolError):
        client.receive_data(encode_frame(FrameType.DATA, 0, 4, b"x"), now=0.0)
    assert client.state is ConnectionState.CLOSED
    assert client.end == ConnectionEnd(
        EndReason.PROTOCOL_ERROR, ErrorCode.PROTOCOL_ERROR, "DATA for stream 4, never opened"
    )


def test_frames_after_an_error_goaway_in_the_same_read_are_not_processed() -> None:
    client = _raw_server_to_client(_open(2))
    goaway = encode_frame(
        FrameType.GOAWAY, 0, 0, encode_goaway_payload(0, ErrorCode.UNAUTHORIZED, "no")
    )
    events = client.receive_data(goaway + encode_frame(FrameType.DATA, 0, 2, b"late"), now=0.0)
    assert events == [GoAwayReceived(0, ErrorCode.UNAUTHORIZED, "no")]
    assert client.state is ConnectionState.CLOSED


def test_a_transition_the_table_lacks_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="no transition from closed on settings received"):
        next_state(ConnectionState.CLOSED, ConnectionInput.SETTINGS_RECEIVED)
    assert next_state(ConnectionState.CLOSED, ConnectionInput.ENDED) is ConnectionState.CLOSED


def test_late_frames_for_a_stream_reset_long_ago_are_ignored() -> None:
    """Ids only grow, so any id at or below the last one opened that is no longer live is over.
    Only 4,096 reset ids used to be remembered: late DATA for an older one tore down the tunnel."""
    client, server = pair()
    first = server.open_stream("web")
    server.reset_stream(first)
    for _ in range(5_000):
        server.reset_stream(server.open_stream("web"))
    pump(client, server)
    late = encode_frame(FrameType.DATA, 0, first, b"in flight since long ago")
    assert server.receive_data(late, now=0.0) == []
    update = encode_frame(FrameType.WINDOW_UPDATE, 0, first, encode_u32(100))
    assert server.receive_data(update, now=0.0) == []
    assert server.state is ConnectionState.OPEN
    with pytest.raises(RemoteProtocolError, match="never opened"):  # ids not yet used still fail
        server.receive_data(encode_frame(FrameType.DATA, 0, 2 * 6000, b"x"), now=0.0)


def test_a_keepalive_timer_handled_late_waits_for_input_before_declaring_the_peer_dead() -> None:
    """The event loop was blocked past the timeout: the peer's PING may wait unread in the
    socket. The verdict waits a moment (one pass of the loop reads the socket first)."""
    ka = KeepaliveConfig(interval=1.0, timeout=3.0)
    client = Connection(Role.CLIENT, keepalive=ka, now=0.0)
    server = Connection(Role.SERVER, now=0.0)
    pump(client, server, now=0.0)
    assert client.get_timer() == 1.0
    assert client.handle_timer(10.0) == []  # 9 s late: not yet
    assert [f.type for f in FrameDecoder().feed(client.data_to_send())] == [FrameType.PING]
    assert client.get_timer() == pytest.approx(10.1)
    server.ping(10.0)
    client.receive_data(server.data_to_send(), now=10.05)  # what waited in the socket
    assert client.handle_timer(10.1) == []
    assert client.state is ConnectionState.OPEN
    # Really silent: declared dead at the next, on-time, check.
    assert client.handle_timer(20.0) == []
    assert client.handle_timer(client.get_timer() or 0.0) == [
        ConnectionTerminated(ErrorCode.KEEPALIVE_TIMEOUT, "nothing received from the peer for 3s")
    ]
