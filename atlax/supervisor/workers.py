"""Worker processes of `atlax relay --workers N`: start them, restart the ones that die, stop them.

This is the process half of the supervisor (docs/high-availability.md, section 3); what a worker
is told (the desired agents, the cluster size) is the caller's `sync` callback, run after every
start and before the worker counts as ready. A worker that exits while the set is not stopping is
logged and started again after a backoff (0.5 s doubling to 30 s, back to 0.5 s once a worker stayed
up 60 s), as a new instance: a new id, its control socket at the same private path. Stopping
forwards SIGTERM to every worker (each drains: GOAWAY, open streams finish within its drain
timeout) and waits; a worker still running `kill_after` seconds later is killed.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from ..relay.instance import new_instance_id

log = logging.getLogger("atlax.workers")

RESTART_INITIAL = 0.5
RESTART_CAP = 30.0
STABLE_AFTER = 60.0  # a worker up this long resets the restart backoff


@dataclass(eq=False)
class Worker:
    """One worker slot: its process comes and goes, the slot (index, control path) stays."""

    index: int
    control: Path
    instance: int = 0
    process: anyio.abc.Process | None = None
    started_at: float = 0.0
    ready: bool = False
    was_ready: bool = False  # ever, in this slot
    restarts: int = 0
    backoff: float = RESTART_INITIAL
    exited: anyio.Event = field(default_factory=anyio.Event)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def name(self) -> str:
        return f"worker {self.index} (instance {self.instance:08x})"


class WorkerStartError(Exception):
    """A worker exited with an error before it was ever ready: its configuration cannot work
    (a public port taken, a certificate it cannot load), and starting it again would not help."""


Command = Callable[[Worker], list[str]]
Sync = Callable[[Worker], Awaitable[None]]


class WorkerSet:
    def __init__(
        self,
        count: int,
        runtime_dir: Path,
        command: Command,
        sync: Sync,
        *,
        sync_timeout: float = 30.0,
        restart_initial: float = RESTART_INITIAL,
        restart_cap: float = RESTART_CAP,
        stable_after: float = STABLE_AFTER,
    ) -> None:
        self.workers = [Worker(i, runtime_dir / f"worker-{i}.sock") for i in range(count)]
        self.command = command
        self.sync = sync
        self.sync_timeout = sync_timeout
        self.restart_initial = restart_initial
        self.restart_cap = restart_cap
        self.stable_after = stable_after
        for worker in self.workers:
            worker.backoff = restart_initial
        self.stopping = False
        self._stopped = anyio.Event()
        self.restarts_total = 0
        self.changed = anyio.Event()  # set (and replaced) whenever a worker becomes (un)ready

    def ready(self) -> list[Worker]:
        return [w for w in self.workers if w.ready]

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start every worker, report started once all are synced, keep them running until
        `stop()`; returns when every worker has exited."""
        try:
            async with anyio.create_task_group() as tg:
                started = [anyio.Event() for _ in self.workers]
                for worker, event in zip(self.workers, started, strict=True):
                    tg.start_soon(self._keep, worker, event)
                for event in started:
                    await event.wait()
                task_status.started()
        except Exception as exc:  # a WorkerStartError: the others go too (they drain)
            for worker in self.workers:
                _signal(worker, signal.SIGTERM)
            failed = exc.subgroup(WorkerStartError) if isinstance(exc, ExceptionGroup) else None
            if failed is not None and isinstance(failed.exceptions[0], WorkerStartError):
                raise failed.exceptions[0] from None  # one line, not one per worker
            raise

    async def stop(self, kill_after: float) -> bool:
        """SIGTERM to every worker, wait for all; True if none had to be killed."""
        self.stopping = True
        self._stopped.set()
        for worker in self.workers:
            _signal(worker, signal.SIGTERM)
        clean = True
        with anyio.move_on_after(kill_after):
            for worker in self.workers:
                await _wait_exit(worker)
            return True
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                log.error("%s did not finish draining in %gs; killing it", worker.name, kill_after)
                _signal(worker, signal.SIGKILL)
                clean = False
        for worker in self.workers:
            await _wait_exit(worker)
        return clean

    # -- one slot ----------------------------------------------------------------------------

    async def _keep(self, worker: Worker, first: anyio.Event) -> None:
        """Run the slot's worker, again and again, until the set stops."""
        while not self.stopping:
            await self._start(worker)
            first.set()
            assert worker.process is not None
            code = await worker.process.wait()
            worker.exited.set()
            self._set_ready(worker, False)
            if self.stopping:
                log.info("%s exited (%s)", worker.name, _status(code))
                return
            if code > 0 and worker.restarts == 0 and not worker.was_ready:
                raise WorkerStartError(
                    f"relay {worker.name} exited ({_status(code)}) before it was ready "
                    "(its error is above); not starting it again"
                )
            up = anyio.current_time() - worker.started_at
            if up >= self.stable_after:
                worker.backoff = self.restart_initial
            delay = worker.backoff
            worker.backoff = min(self.restart_cap, worker.backoff * 2)
            log.error(
                "%s exited (%s) after %.1fs; restarting in %gs",
                worker.name,
                _status(code),
                up,
                delay,
            )
            with anyio.move_on_after(delay):
                await self._stopped.wait()  # a stop during the backoff ends the slot at once
            if self.stopping:
                return
            worker.restarts += 1
            self.restarts_total += 1

    async def _start(self, worker: Worker) -> None:
        taken = {w.instance for w in self.workers if w is not worker}
        worker.instance = new_instance_id(taken)
        worker.exited = anyio.Event()
        worker.process = await anyio.open_process(
            self.command(worker), stdin=None, stdout=None, stderr=None
        )
        worker.started_at = anyio.current_time()
        log.info("%s started, pid %d", worker.name, worker.process.pid)
        try:
            with anyio.fail_after(self.sync_timeout):
                await self._sync_while_running(worker)
        except Exception as exc:  # the worker never became usable: kill it, the loop restarts it
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            log.error("%s could not be given its state (%s); killing it", worker.name, reason)
            _signal(worker, signal.SIGKILL)
            return
        if worker.process.returncode is None and not self.stopping:
            self._set_ready(worker, True)
            log.info("%s ready", worker.name)

    async def _sync_while_running(self, worker: Worker) -> None:
        """The sync, given up as soon as the worker's process has exited (the caller's loop
        then sees its exit status)."""
        process = worker.process
        assert process is not None
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                await process.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await self.sync(worker)
            tg.cancel_scope.cancel()

    def _set_ready(self, worker: Worker, ready: bool) -> None:
        worker.was_ready = worker.was_ready or ready
        if worker.ready != ready:
            worker.ready = ready
            self.changed.set()
            self.changed = anyio.Event()


def _signal(worker: Worker, signum: signal.Signals) -> None:
    process = worker.process
    if process is not None and process.returncode is None:
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass


async def _wait_exit(worker: Worker) -> None:
    if worker.process is not None and worker.process.returncode is None:
        await worker.exited.wait()


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
