"""Frames that change nothing, counted by the core: a flood is ENHANCE_YOUR_CALM, the late frames
of many streams that just ended are not."""

from __future__ import annotations

import pytest

from atlax.protocol import Connection, ErrorCode, RemoteProtocolError, Role, Settings
from atlax.protocol.decoder import FrameDecoder
from atlax.protocol.frames import FrameType, encode_frame, encode_u32
from atlax.protocol.ignored import IGNORED_FRAMES_PER_SECOND


def connected(streams: int = 0) -> tuple[Connection, Connection, list[int]]:
    """A relay-side connection with `streams` streams it opened, all reset by it since."""
    agent = Connection(Role.CLIENT, Settings(max_streams=100_000))
    relay = Connection(Role.SERVER)
    relay.receive_data(agent.data_to_send(), 0.0)
    agent.receive_data(relay.data_to_send(), 0.0)
    ids = [relay.open_stream("web") for _ in range(streams)]
    for stream_id in ids:
        relay.reset_stream(stream_id)
    agent.receive_data(relay.data_to_send(), 0.0)
    return agent, relay, ids


def goaway_code(relay: Connection) -> int:
    frames = FrameDecoder(1 << 20).feed(relay.data_to_send())
    goaways = [f for f in frames if f.type is FrameType.GOAWAY]
    assert goaways, "no GOAWAY queued"
    return int.from_bytes(goaways[-1].payload[4:8], "big")


def window_update(stream_id: int) -> bytes:
    return encode_frame(FrameType.WINDOW_UPDATE, 0, stream_id, encode_u32(1))


def test_a_flood_of_window_updates_for_a_closed_stream_is_enhance_your_calm() -> None:
    _, relay, [stream_id] = connected(1)
    relay.data_to_send()
    flood = window_update(stream_id) * (IGNORED_FRAMES_PER_SECOND + 100)
    with pytest.raises(RemoteProtocolError) as info:
        relay.receive_data(flood, 0.5)
    assert info.value.error_code is ErrorCode.ENHANCE_YOUR_CALM
    assert goaway_code(relay) == ErrorCode.ENHANCE_YOUR_CALM
    assert relay.receive_data(window_update(stream_id), 0.6) == []  # closed from then on


@pytest.mark.parametrize(
    "frame",
    [
        lambda sid: encode_frame(FrameType.RESET, 0, sid, encode_u32(ErrorCode.CANCEL)),
        lambda sid: encode_frame(FrameType.DATA, 0, sid, b"late"),
        lambda sid: encode_frame(FrameType.PING, 0x2, 0, b"unasked!"),
    ],
    ids=["reset", "data", "unsolicited-pong"],
)
def test_other_frames_that_change_nothing_count_too(frame: object) -> None:
    _, relay, [stream_id] = connected(1)
    flood = frame(stream_id) * (IGNORED_FRAMES_PER_SECOND + 100)  # type: ignore[operator]
    with pytest.raises(RemoteProtocolError) as info:
        relay.receive_data(flood, 0.5)
    assert info.value.error_code is ErrorCode.ENHANCE_YOUR_CALM


def test_late_frames_of_many_streams_that_just_ended_are_allowed() -> None:
    """3,000 streams reset at once: each may still have a WINDOW_UPDATE, a RESET and some DATA
    in flight (9,000 ignored frames in the same second): that is traffic, not a flood."""
    _, relay, ids = connected(3000)
    late = b"".join(
        window_update(s)
        + encode_frame(FrameType.RESET, 0, s, encode_u32(ErrorCode.CANCEL))
        + encode_frame(FrameType.DATA, 0, s, b"in flight")
        for s in ids
    )
    assert relay.receive_data(late, 0.2) == []
    assert relay.ready


def test_a_steady_trickle_under_the_rate_is_never_a_flood() -> None:
    _, relay, [stream_id] = connected(1)
    per_second = window_update(stream_id) * (IGNORED_FRAMES_PER_SECOND // 2)
    for second in range(20):
        assert relay.receive_data(per_second, 0.5 + second) == []
    assert relay.ready
