"""The supervisor's process half (atlax/workers.py) with real child processes standing in for
relay workers: started and synced, restarted with a new instance id after SIGKILL, stopped with
SIGTERM (and killed when they do not drain in time). The relay workers themselves are tested with
the supervisor in tests/test_relay_workers.py."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import anyio
import pytest

from atlax.relay.instance import new_instance_id
from atlax.supervisor.workers import Worker, WorkerSet, WorkerStartError

pytestmark = pytest.mark.anyio

# Stand-ins for relay workers: they install their SIGTERM handling, then say so with a file
# named after their pid in the directory given as argv[1] (what a relay's control socket
# answering is to the real sync), then idle.
DRAINS = "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))"
STUBBORN = "signal.signal(signal.SIGTERM, signal.SIG_IGN)"
BODY = (
    "import os, signal, sys, time, pathlib\n{setup}\n"
    "pathlib.Path(sys.argv[1], str(os.getpid())).touch()\n"
    "while True: time.sleep(0.05)\n"
)


def command(setup: str, directory: Path):  # type: ignore[no-untyped-def]
    def argv(worker: Worker) -> list[str]:
        return [sys.executable, "-c", BODY.format(setup=setup), str(directory)]

    return argv


class Syncs:
    """The sync callback: waits until the stand-in is up, records the call, may fail."""

    def __init__(self, directory: Path, fail_first: int = 0) -> None:
        self.directory = directory
        self.calls: list[tuple[int, int, int | None]] = []
        self.fail_first = fail_first

    async def __call__(self, worker: Worker) -> None:
        await wait_until(lambda: (self.directory / str(worker.pid)).exists())
        self.calls.append((worker.index, worker.instance, worker.pid))
        if len(self.calls) <= self.fail_first:
            raise RuntimeError("control socket not answering")


async def wait_until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_instance_ids_are_nonzero_and_distinct() -> None:
    taken: set[int] = set()
    for _ in range(200):
        taken.add(new_instance_id(taken))
    assert len(taken) == 200 and 0 not in taken and max(taken) < 2**32


async def test_every_worker_is_started_and_synced_before_run_reports(tmp_path: Path) -> None:
    syncs = Syncs(tmp_path)
    workers = WorkerSet(3, tmp_path, command(DRAINS, tmp_path), syncs)
    async with anyio.create_task_group() as tg:
        await tg.start(workers.run)
        assert [w.ready for w in workers.workers] == [True, True, True]
        assert sorted(index for index, _, _ in syncs.calls) == [0, 1, 2]
        assert len({w.instance for w in workers.workers}) == 3
        assert all(alive(w.pid) for w in workers.workers)
        assert await workers.stop(kill_after=10) is True
    assert all(w.process is not None and w.process.returncode == 0 for w in workers.workers)


async def test_a_killed_worker_is_restarted_as_a_new_instance_and_synced_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atlax.workers")
    syncs = Syncs(tmp_path)
    workers = WorkerSet(2, tmp_path, command(DRAINS, tmp_path), syncs, restart_initial=0.1)
    async with anyio.create_task_group() as tg:
        await tg.start(workers.run)
        victim = workers.workers[1]
        old_pid, old_instance = victim.pid, victim.instance
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        await wait_until(lambda: victim.ready and victim.pid != old_pid)
        assert victim.instance != old_instance and victim.restarts == 1
        assert workers.restarts_total == 1
        assert syncs.calls[-1] == (1, victim.instance, victim.pid)
        assert workers.workers[0].restarts == 0  # the other one was left alone
        await workers.stop(kill_after=10)
    assert f"worker 1 (instance {old_instance:08x}) exited (signal SIGKILL)" in caplog.text
    assert "restarting in 0.1s" in caplog.text


async def test_a_worker_that_cannot_be_synced_is_killed_and_started_again(tmp_path: Path) -> None:
    syncs = Syncs(tmp_path, fail_first=1)
    workers = WorkerSet(1, tmp_path, command(DRAINS, tmp_path), syncs, restart_initial=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(workers.run)
        await wait_until(lambda: workers.workers[0].ready)
        assert len(syncs.calls) == 2 and syncs.calls[0][2] != syncs.calls[1][2]
        assert not alive(syncs.calls[0][2])
        await workers.stop(kill_after=10)


async def test_stop_kills_a_worker_that_does_not_drain_in_time(tmp_path: Path) -> None:
    workers = WorkerSet(1, tmp_path, command(STUBBORN, tmp_path), Syncs(tmp_path))
    async with anyio.create_task_group() as tg:
        await tg.start(workers.run)
        pid = workers.workers[0].pid
        assert await workers.stop(kill_after=0.5) is False
    assert not alive(pid)
    process = workers.workers[0].process
    assert process is not None and process.returncode == -signal.SIGKILL


async def test_a_stop_during_the_restart_backoff_ends_at_once(tmp_path: Path) -> None:
    workers = WorkerSet(
        1, tmp_path, command(DRAINS, tmp_path), Syncs(tmp_path), restart_initial=30.0
    )
    async with anyio.create_task_group() as tg:
        await tg.start(workers.run)
        pid = workers.workers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: not workers.workers[0].ready)
        with anyio.fail_after(10):
            await workers.stop(kill_after=5)
    assert workers.workers[0].restarts == 0


async def test_a_worker_that_fails_at_its_first_start_ends_the_set(tmp_path: Path) -> None:
    """A worker that exits with an error before it was ever ready (a public port of relay.toml
    taken, a bad certificate) would fail the same way every time: `run` ends with an error that
    names it, at once (the sync no longer waits out its timeout for a dead process), instead of
    restarting it forever."""

    def failing(worker: Worker) -> list[str]:
        return [sys.executable, "-c", "import sys; sys.exit(1)"]

    workers = WorkerSet(2, tmp_path, failing, Syncs(tmp_path), sync_timeout=120)
    with anyio.fail_after(60), pytest.raises(WorkerStartError) as failed:
        await workers.run()
    assert "exited (status 1) before it was ready" in str(failed.value)
    assert all(w.restarts == 0 for w in workers.workers)
