"""The mux shell over a fake transport and a fake clock: deterministic, no sockets, no sleeping.

The peer at the other end of the tunnel is a real protocol core (`Connection`); the tunnel's
transport and each stream's socket are `FakeTransport`s whose "kernel" takes what a test allows.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import anyio
import pytest
from fakes import FakeClock, FakeTransport, Link, feed, frames
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlax.bench import hop
from atlax.mux import (
    READ_CREDIT,
    RECENT_PAUSES,
    TUNNEL_HIGH_WATER,
    MuxStream,
    StreamObserver,
    StreamState,
)
from atlax.protocol import (
    ConnectionState,
    DataReceived,
    EndReason,
    ErrorCode,
    KeepaliveConfig,
    Role,
    Settings,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from atlax.protocol.frames import FrameType, encode_frame


class Recorder(StreamObserver):
    __slots__ = ("ended", "n_received", "n_sent")

    def __init__(self) -> None:
        self.n_sent = self.n_received = 0
        self.ended: list[bool] = []

    def sent(self, n: int) -> None:
        self.n_sent += n

    def received(self, n: int) -> None:
        self.n_received += n

    def closed(self, ok: bool) -> None:
        self.ended.append(ok)


def relay_link(**kw: object) -> Link:
    """A relay-side session (opens streams) with its agent-side peer core, handshake done."""
    link = Link(Role.SERVER, **kw)  # type: ignore[arg-type]
    link.pump()
    assert link.session.ready
    return link


def joined(link: Link, service: str = "web") -> tuple[MuxStream, FakeTransport, Recorder]:
    """A stream the session opened, joined to a fake socket."""
    stream = link.session.open_stream_now(service)
    recorder = Recorder()
    stream.observer = recorder
    sock = FakeTransport(stream)
    stream.connection_made(sock)  # type: ignore[arg-type]
    return stream, sock, recorder


def resets(data: bytes) -> list[tuple[int, int]]:
    return [
        (f.stream_id, int.from_bytes(f.payload, "big"))
        for f in frames(data)
        if f.type is FrameType.RESET
    ]


def goaway(data: bytes) -> tuple[int, str] | None:
    found = [f for f in frames(data) if f.type is FrameType.GOAWAY]
    if not found:
        return None
    payload = bytes(found[-1].payload)
    return int.from_bytes(payload[4:8], "big"), payload[8:].decode()


# -- streams -------------------------------------------------------------------------------------


def test_a_stream_moves_bytes_both_ways_and_ends_cleanly_after_both_eofs() -> None:
    link = relay_link()
    stream, sock, recorder = joined(link)
    got = link.pump()
    assert got == [StreamOpened(stream.stream_id, "web", None)]
    stream.data_received(b"GET / HTTP/1.0\r\n\r\n")
    assert link.pump() == [DataReceived(stream.stream_id, b"GET / HTTP/1.0\r\n\r\n")]
    link.peer.send_data(stream.stream_id, b"HTTP/1.0 200 OK\r\n\r\nhello", end_stream=True)
    link.pump()
    assert bytes(sock.sent) == b"HTTP/1.0 200 OK\r\n\r\nhello" and sock.eof_written
    assert stream.state is StreamState.REMOTE_EOF
    assert stream.eof_received() is True  # the client half-closes too
    assert link.pump() == [StreamEnded(stream.stream_id)]
    assert stream.state is StreamState.CLOSING and sock.closing and not sock.aborted
    assert link.session.active_streams == 0 and link.peer.open_streams == 0
    stream.connection_lost(None)
    assert stream.state is StreamState.CLOSED
    assert recorder.ended == [True]
    assert (recorder.n_sent, recorder.n_received) == (18, 24)


def test_bytes_that_arrive_before_the_socket_connects_wait_with_the_fin() -> None:
    link = Link(Role.CLIENT, handler=_never_called)  # accepted; handlers start in run()
    link.pump()
    sid = link.peer.open_stream("web")
    link.peer.send_data(sid, b"early", end_stream=True)
    link.pump()
    [stream] = link.session.streams
    assert stream.state is StreamState.CONNECTING and stream.buffered == 5
    sock = FakeTransport(stream)
    stream.connection_made(sock)  # type: ignore[arg-type]
    assert bytes(sock.sent) == b"early" and sock.eof_written
    assert stream.state is StreamState.REMOTE_EOF


async def _never_called(stream: MuxStream) -> None:
    raise AssertionError("no handler runs without run()")


def test_a_reset_from_the_peer_aborts_the_socket() -> None:
    link = relay_link()
    stream, sock, recorder = joined(link)
    link.pump()
    link.peer.reset_stream(stream.stream_id, ErrorCode.CONNECT_FAILED)
    link.pump()
    assert stream.state is StreamState.CLOSED and sock.aborted
    assert recorder.ended == [False]
    assert link.session.active_streams == 0


def test_a_socket_lost_mid_stream_resets_the_stream_with_cancel() -> None:
    link = relay_link()
    stream, sock, recorder = joined(link)
    link.pump()
    stream.connection_lost(ConnectionResetError())
    assert link.pump() == [StreamReset(stream.stream_id, ErrorCode.CANCEL, remote=True)]
    assert recorder.ended == [False] and link.session.active_streams == 0


def test_a_reset_before_the_socket_connects_sends_its_code_and_aborts_the_late_socket() -> None:
    link = relay_link()
    stream = link.session.open_stream_now("web")
    stream.reset(ErrorCode.CONNECT_FAILED)
    sent = link.transport.take()
    assert resets(sent) == [(stream.stream_id, ErrorCode.CONNECT_FAILED)]
    sock = FakeTransport(stream)
    stream.connection_made(sock)  # type: ignore[arg-type]
    assert sock.aborted and stream.state is StreamState.CLOSED


def test_streams_the_peer_opens_without_a_handler_are_refused() -> None:
    link = Link(Role.CLIENT)
    link.pump()
    sid = link.peer.open_stream("web")
    got = link.pump()
    assert got == [StreamReset(sid, ErrorCode.REFUSED_STREAM, remote=True)]
    assert link.session.active_streams == 0


# -- flow control --------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1024, 65_536, 262_144, 655_360, 1 << 20])
def test_credit_returns_for_bytes_the_socket_buffered_below_its_high_water_mark(
    window: int,
) -> None:
    """The receiving side credits the peer only for bytes its socket's transport handed to the
    kernel. Bytes that stay in the transport's buffer below its high-water mark used to be
    credited never (no pause, so no resume_writing): with the default 256 KiB window the
    sender could be left with less than a read's worth of credit for good. Now the socket's
    transport reports every time its buffer empties."""
    link = Link(Role.CLIENT, settings=Settings(initial_window=window), handler=_never_called)
    link.pump()
    sid = link.peer.open_stream("web")
    link.pump()
    [stream] = link.session.streams
    sock = FakeTransport(stream)
    stream.connection_made(sock)  # type: ignore[arg-type]
    read_credit = min(READ_CREDIT, window // 2)
    # The sender spends its credit down to just under a read's worth ...
    total = window - read_credit + 1
    # ... and the socket takes part of it at once, the rest (under 64 KiB) later.
    sock.room = total - min(60 * 1024, total // 3)
    link.peer.send_data(sid, bytes(total))
    link.pump()
    assert 0 < sock.get_write_buffer_size() <= 60 * 1024  # below asyncio's high-water mark
    sock.room = None
    sock.drain()
    link.pump()
    assert bytes(sock.sent) == bytes(total)
    assert link.peer.send_window(sid) >= read_credit, "the sender was left without credit"


def test_a_full_tunnel_stops_every_reader_and_resume_wakes_them_all() -> None:
    link = relay_link(peer_settings=Settings(initial_window=1 << 24))
    pairs = [joined(link) for _ in range(3)]
    link.pump()
    link.transport.room = 0  # the network stops taking bytes
    first, first_sock, _ = pairs[0]
    while not link.transport.paused:
        first.data_received(bytes(READ_CREDIT))
    assert link.transport.get_write_buffer_size() <= TUNNEL_HIGH_WATER + READ_CREDIT
    assert [sock.reading for _, sock, _ in pairs] == [False, False, False]
    link.transport.room = None
    link.transport.drain()
    assert [sock.reading for _, sock, _ in pairs] == [True, True, True]


def test_streams_stopped_by_a_full_tunnel_end_with_the_session() -> None:
    link = relay_link(peer_settings=Settings(initial_window=1 << 24))
    pairs = [joined(link) for _ in range(2)]
    link.pump()
    link.transport.room = 0
    while not link.transport.paused:
        pairs[0][0].data_received(bytes(READ_CREDIT))
    assert not any(sock.reading for _, sock, _ in pairs)
    link.session.connection_lost(ConnectionResetError())
    assert all(sock.aborted for _, sock, _ in pairs)
    assert [rec.ended for _, _, rec in pairs] == [[False], [False]]
    assert link.session.end is not None and link.session.end.reason is EndReason.TRANSPORT_LOST


def test_a_stream_starved_for_many_pauses_is_still_stopped_at_the_next_one() -> None:
    """A stream that keeps losing the race for the tunnel (its socket has input, but the others
    fill the tunnel before its read comes round) must be stopped at every pause: untracked, it
    would add one read to the full tunnel. It used to be dropped after RECENT_PAUSES pauses."""
    link = relay_link(peer_settings=Settings(initial_window=1 << 30))
    left, right = socket.socketpair()
    with left, right:
        right.send(b"waiting")  # input the starved stream has not read yet
        starved = link.session.open_stream_now("web")
        starved_sock = FakeTransport(starved, sock=left)
        starved.connection_made(starved_sock)  # type: ignore[arg-type]
        busy, _, _ = joined(link)
        link.pump()
        for _ in range(RECENT_PAUSES + 3):
            link.session.pause_writing()
            assert not starved_sock.reading
            link.session.resume_writing()
            assert starved_sock.reading
            busy.data_received(b"x")  # only the busy stream gets a read in
        link.session.pause_writing()
        assert not starved_sock.reading


def test_an_idle_stream_is_let_go_after_a_few_pauses() -> None:
    """Thousands of idle streams must not be visited at every pause: one that read long ago
    and has no input waiting stops being tracked (it still reads, and is tracked again once
    it does)."""
    link = relay_link(peer_settings=Settings(initial_window=1 << 30))
    idle, idle_sock, _ = joined(link)  # no socket behind it: no input waiting
    busy, _, _ = joined(link)
    link.pump()
    for _ in range(RECENT_PAUSES + 1):
        link.session.pause_writing()
        link.session.resume_writing()
        busy.data_received(b"x")
    link.session.pause_writing()
    assert idle_sock.reading  # no longer visited
    link.session.resume_writing()
    idle.data_received(b"back")
    link.session.pause_writing()
    assert not idle_sock.reading  # tracked again from its read on


# -- lifecycle and end reasons -------------------------------------------------------------------


def test_graceful_close_lets_streams_finish_then_ends_clean() -> None:
    link = relay_link()
    stream, sock, _ = joined(link)
    link.pump()
    link.session.close(ErrorCode.NO_ERROR, "relay shutting down")
    assert link.session.conn.state is ConnectionState.DRAINING_LOCAL
    assert link.session.ready and not link.session.can_open_stream
    assert goaway(link.transport.sent) == (ErrorCode.NO_ERROR, "relay shutting down")
    link.pump()
    stream.data_received(b"still served")
    assert link.pump() == [DataReceived(stream.stream_id, b"still served")]
    link.peer.end_stream(stream.stream_id)
    link.pump()
    stream.eof_received()
    link.pump()
    assert link.session.conn.state is ConnectionState.CLOSED
    assert link.transport.closing and not link.transport.aborted
    end = link.session.end
    assert end is not None and end.reason is EndReason.LOCAL_CLOSE and end.clean
    assert str(end) == "closed locally (NO_ERROR): relay shutting down"


def test_an_error_goaway_from_the_peer_ends_the_session_with_its_code_and_message() -> None:
    link = relay_link()
    stream, sock, _ = joined(link)
    link.pump()
    link.peer.close(ErrorCode.UNAUTHORIZED, "identity 'x' is not configured")
    link.pump()
    end = link.session.end
    assert end is not None and end.reason is EndReason.PEER_GOAWAY
    assert (end.code, end.detail) == (ErrorCode.UNAUTHORIZED, "identity 'x' is not configured")
    assert not end.clean
    assert sock.aborted and link.transport.closing


def test_a_protocol_error_from_the_peer_sends_goaway_and_names_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = relay_link()
    stream, sock, _ = joined(link)
    link.pump()
    link.transport.take()
    with caplog.at_level(logging.WARNING, logger="atlax.mux"):
        feed(link.session, encode_frame(FrameType.DATA, 0, 999, b"x"))
    assert goaway(link.transport.sent) == (
        ErrorCode.PROTOCOL_ERROR,
        "DATA for stream 999, never opened",
    )
    end = link.session.end
    assert end is not None and end.reason is EndReason.PROTOCOL_ERROR
    assert sock.aborted and link.transport.closing
    assert (
        "tunnel: protocol error from the peer (PROTOCOL_ERROR): DATA for stream 999, never opened"
        in caplog.text
    )


def test_a_textless_connection_reset_is_named() -> None:
    """asyncio reports a reset as ConnectionResetError() with no text: the reason used to be
    'connection lost: ' with nothing after it."""
    link = relay_link()
    link.session.connection_lost(ConnectionResetError())
    end = link.session.end
    assert end is not None and end.reason is EndReason.TRANSPORT_LOST
    assert str(end) == "connection lost: connection closed"
    other = relay_link()
    other.session.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    assert str(other.session.end) == "connection lost: Connection reset by peer"


def test_the_peer_closing_without_goaway_is_named() -> None:
    link = relay_link()
    link.session.eof_received()
    end = link.session.end
    assert end is not None and end.reason is EndReason.PEER_CLOSED
    assert str(end) == "the peer closed the connection"


# -- keepalive on a fake clock -------------------------------------------------------------------


def test_keepalive_pings_measures_the_round_trip_and_declares_a_silent_peer_dead() -> None:
    clock = FakeClock(100.0)
    rtts: list[float] = []
    link = relay_link(clock=clock, keepalive=KeepaliveConfig(interval=5.0, timeout=15.0))
    link.session.on_pong = rtts.append
    stream, sock, _ = joined(link)
    link.pump()
    clock.advance(4.9)
    assert link.transport.take() == b""
    clock.advance(0.1)
    assert [f.type for f in frames(bytes(link.transport.sent))] == [FrameType.PING]
    link.peer.receive_data(link.transport.take(), now=clock())
    clock.advance(0.25)
    feed(link.session, link.peer.data_to_send())  # the PONG
    assert rtts == [0.25] and link.session.rtt == 0.25
    # From now on the peer says nothing: PINGs every 5 s, dead 15 s after the PONG.
    clock.advance(14.9)
    assert link.session.end is None
    clock.advance(0.1)
    end = link.session.end
    assert end is not None and end.reason is EndReason.KEEPALIVE_TIMEOUT
    assert str(end) == "nothing received from the peer for 15s"
    assert goaway(bytes(link.transport.sent)) == (
        ErrorCode.KEEPALIVE_TIMEOUT,
        "nothing received from the peer for 15s",
    )
    assert sock.aborted and link.transport.closing
    assert clock.next_timer is None  # the timer is gone with the session


def test_a_stalled_event_loop_does_not_declare_a_live_peer_dead() -> None:
    """The loop was busy for longer than the timeout while the peer's PINGs waited unread in
    the socket. A timer that fires that late must let the loop read first: both ends of the
    1 GiB test used to drop the tunnel like this under load."""
    clock = FakeClock()
    ka = KeepaliveConfig(interval=1.0, timeout=3.0)
    link = relay_link(clock=clock, keepalive=ka)
    clock.stall(10.0)
    clock.advance(0)  # the late timer: a PING goes out, the verdict waits
    assert link.session.end is None
    link.peer.ping(clock())  # what waited in the socket is read now
    feed(link.session, link.peer.data_to_send())
    clock.advance(0.5)
    assert link.session.end is None
    # A peer that is really gone is still declared dead, only a moment later.
    clock.stall(10.0)
    clock.advance(0)
    assert link.session.end is None
    clock.advance(0.2)
    end = link.session.end
    assert end is not None and end.reason is EndReason.KEEPALIVE_TIMEOUT


# -- handlers (need run(): a real event loop, still a fake transport) ----------------------------


@pytest.mark.anyio
async def test_handlers_that_fail_or_forget_their_stream_reset_it() -> None:
    async def handler(stream: MuxStream) -> None:
        if stream.service == "boom":
            raise RuntimeError("handler bug")
        # "forget": neither joined to a socket nor reset

    link = Link(Role.CLIENT, handler=handler)
    link.pump()
    boom = link.peer.open_stream("boom")
    forgot = link.peer.open_stream("forget")
    async with anyio.create_task_group() as tg:
        tg.start_soon(link.session.run)
        link.pump()
        with anyio.fail_after(5):
            while link.session.active_streams:
                await anyio.sleep(0.01)
        got = link.pump()
        assert StreamReset(boom, ErrorCode.INTERNAL_ERROR, remote=True) in got
        assert StreamReset(forgot, ErrorCode.CANCEL, remote=True) in got
        link.session.close()
    assert link.session.end is not None and link.session.end.clean


# -- any input -----------------------------------------------------------------------------------


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_whatever_the_peer_sends_the_session_stays_up_or_ends_with_goaway(
    chunks: list[bytes],
) -> None:
    link = relay_link()
    stream, sock, _ = joined(link)
    link.pump()
    link.transport.take()
    for chunk in chunks:
        feed(link.session, chunk)
    end = link.session.end
    if end is None:
        assert link.session.ready and not link.transport.closing
    else:
        assert end.reason is EndReason.PROTOCOL_ERROR
        assert link.transport.closing and sock.aborted
        sent = goaway(bytes(link.transport.sent))
        assert sent is not None and sent[0] == end.code


def test_window_updates_reach_a_stream_waiting_for_credit() -> None:
    link = relay_link(peer_settings=Settings(initial_window=1024))
    stream, sock, _ = joined(link)
    link.pump()
    stream.data_received(bytes(3000))  # 1024 go out, the rest waits for credit
    got = link.pump()
    assert sum(len(e.data) for e in got if isinstance(e, DataReceived)) == 1024
    assert not sock.reading
    link.peer.acknowledge_received_data(stream.stream_id, 1024)
    got = link.pump()
    assert sum(len(e.data) for e in got if isinstance(e, DataReceived)) == 1024
    assert WindowUpdated not in map(type, got)
    stream.eof_received()  # the FIN waits behind the rest
    link.peer.acknowledge_received_data(stream.stream_id, 1024)
    got = link.pump()
    assert sum(len(e.data) for e in got if isinstance(e, DataReceived)) == 952
    assert got[-1] == StreamEnded(stream.stream_id)


def test_the_hop_benchmark_echoes_every_byte() -> None:
    """`python -m atlax.bench.hop` runs (its figure is printed, never asserted)."""
    samples = asyncio.run(hop.measure(rounds=2000, size=100))
    assert len(samples) == 2000
