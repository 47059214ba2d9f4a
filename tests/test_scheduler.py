"""The read scheduler alone: pure bookkeeping, driven by fake readers."""

from __future__ import annotations

from atlax.mux import READ_CREDIT, RECENT_PAUSES, ReadScheduler


class FakeReader:
    """A stream as the scheduler sees it: credit, a backlog, input waiting, and a socket that
    reads or not as it is told."""

    def __init__(self, scheduler: ReadScheduler[FakeReader], name: str) -> None:
        self.scheduler = scheduler
        self.name = name
        self.window = 1 << 30
        self.backlogged = False
        self.input = False
        self.reading = True
        self.visits = 0

    def update_reading(self, read: bool = False) -> None:
        self.visits += 1
        self.reading = self.scheduler.wants(self, self.window, self.backlogged, read)

    def has_input(self) -> bool:
        return self.input

    def read(self) -> None:
        assert self.reading, f"{self.name} read while stopped"
        self.update_reading(read=True)

    def __repr__(self) -> str:
        return self.name


def readers(n: int) -> tuple[ReadScheduler[FakeReader], list[FakeReader]]:
    scheduler: ReadScheduler[FakeReader] = ReadScheduler()
    streams = [FakeReader(scheduler, f"s{i}") for i in range(n)]
    for stream in streams:
        stream.update_reading()  # connected: may read at any moment
    return scheduler, streams


def test_a_stream_reads_only_with_a_reads_worth_of_credit_and_no_backlog() -> None:
    scheduler, [s] = readers(1)
    s.window = READ_CREDIT - 1
    s.update_reading()
    assert not s.reading
    s.window = READ_CREDIT
    s.update_reading()
    assert s.reading
    s.backlogged = True
    s.update_reading()
    assert not s.reading


def test_the_read_credit_is_half_a_small_peer_window() -> None:
    scheduler, [s] = readers(1)
    scheduler.set_peer_window(4096)
    assert scheduler.read_credit == 2048
    scheduler.set_peer_window(1 << 30)
    assert scheduler.read_credit == READ_CREDIT


def test_a_pause_stops_every_stream_that_may_read_and_resume_restarts_them() -> None:
    scheduler, streams = readers(4)
    streams[0].read()
    for s in streams[1:]:
        s.input = True  # bytes wait in their sockets: they only lost the race for the tunnel
    scheduler.pause()
    assert [s.reading for s in streams] == [False] * 4
    scheduler.resume()
    assert [s.reading for s in streams] == [True] * 4
    scheduler.pause()  # those resumed may read at once: the next pause stops them again
    assert [s.reading for s in streams] == [False] * 4


def test_a_stream_asking_while_paused_waits_for_the_resume() -> None:
    scheduler, [s] = readers(1)
    s.window = 0
    s.update_reading()  # stopped for credit
    scheduler.pause()
    assert not s.reading
    s.window = 1 << 30
    s.update_reading()  # credit came while the tunnel is full
    assert not s.reading
    scheduler.resume()
    assert s.reading


def test_idle_streams_are_let_go_and_not_visited_again() -> None:
    scheduler, streams = readers(100)
    busy, idle = streams[0], streams[1:]
    for _ in range(RECENT_PAUSES + 2):
        scheduler.pause()
        scheduler.resume()
        busy.read()
    visits = [s.visits for s in idle]
    for _ in range(50):
        scheduler.pause()
        scheduler.resume()
        busy.read()
    assert [s.visits for s in idle] == visits  # not visited any more
    assert all(s.reading for s in idle)  # and still reading
    assert scheduler.tracked == 1


def test_a_starved_stream_with_input_stays_tracked() -> None:
    scheduler, [busy, starved] = readers(2)
    starved.input = True
    for _ in range(RECENT_PAUSES * 3):
        scheduler.pause()
        assert not starved.reading
        scheduler.resume()
        busy.read()
    scheduler.pause()
    assert not starved.reading


def test_a_let_go_stream_is_tracked_again_from_its_next_read() -> None:
    scheduler, [busy, idle] = readers(2)
    for _ in range(RECENT_PAUSES + 2):
        scheduler.pause()
        scheduler.resume()
        busy.read()
    scheduler.pause()
    assert idle.reading
    idle.read()  # it reads while the tunnel is full: once, then it waits like the others
    assert not idle.reading
    scheduler.resume()
    assert idle.reading
    scheduler.pause()
    assert not idle.reading


def test_a_forgotten_stream_is_never_visited() -> None:
    scheduler, [s] = readers(1)
    scheduler.forget(s)
    scheduler.pause()
    scheduler.resume()
    assert s.visits == 1
    assert scheduler.tracked == 0
