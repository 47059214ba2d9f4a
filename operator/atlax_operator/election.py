"""Leader election on a coordination.k8s.io/v1 Lease, as a pure state machine: no I/O, no clock.

The rules are client-go's (k8s.io/client-go/tools/leaderelection):
- A candidate takes the Lease when nobody holds it, or when the record it shows has not changed for
  `lease_duration` seconds *of the candidate's own clock*: the holder's timestamps are written by
  another machine's clock and are never compared with ours.
- The holder renews every `retry_period`. When it has not renewed for `renew_deadline` seconds
  (less than `lease_duration`) it stops acting at once: it can no longer be sure it holds the Lease,
  and nobody can take the Lease before `lease_duration - renew_deadline` seconds later.
- Every write carries the resourceVersion it read: of two candidates writing at once the API server
  keeps one and answers the other 409 Conflict.
- A holder that stops on purpose (SIGTERM) releases the Lease: no holder, so the next candidate
  takes it at its next try instead of waiting out the duration.

`Election.observe(record, now, wall)` is given the Lease as just read and answers the record to
write, or None (somebody else holds it); `written(record, now)` is told that a write succeeded.
`now` is monotonic seconds, `wall` the UTC time written into the record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime


@dataclass(frozen=True)
class LeaseRecord:
    """What a Lease says about its holder (`spec`), and the resourceVersion it was read at."""

    holder: str = ""  # "" = nobody (never held, or released)
    duration: int = 0  # leaseDurationSeconds
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    transitions: int = 0
    version: str | None = None  # None: the Lease does not exist yet (write = create)

    def same_claim(self, other: LeaseRecord) -> bool:
        """The same holder's same renewal (the resourceVersion aside)."""
        return replace(self, version=None) == replace(other, version=None)


class Election:
    def __init__(
        self, identity: str, lease_duration: float, renew_deadline: float, retry_period: float
    ) -> None:
        if not identity:
            raise ValueError("the election identity must not be empty")
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError(
                "leader election needs 0 < retry period < renew deadline < lease duration, not "
                f"{retry_period:g} < {renew_deadline:g} < {lease_duration:g}"
            )
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._observed: LeaseRecord | None = None
        self._observed_at = -math.inf  # when the observed record last changed, by our clock
        self._renewed_at: float | None = None  # our last successful write as the holder

    # -- questions ---------------------------------------------------------------------------

    def leading(self, now: float) -> bool:
        """True while our last renewal is younger than the renew deadline."""
        return self._renewed_at is not None and now - self._renewed_at < self.renew_deadline

    def leading_for(self, now: float) -> float:
        """Seconds left before the renew deadline (0 when not leading)."""
        if self._renewed_at is None:
            return 0.0
        return max(0.0, self._renewed_at + self.renew_deadline - now)

    @property
    def holder(self) -> str:
        """The holder as last observed ("" if none, or nothing read yet)."""
        return self._observed.holder if self._observed is not None else ""

    def expires_in(self, now: float) -> float:
        """Seconds until the observed holder's claim runs out by our clock (0: it has)."""
        if self._observed is None or not self._observed.holder:
            return 0.0
        return max(0.0, self._observed_at + self.lease_duration - now)

    # -- transitions -------------------------------------------------------------------------

    def observe(self, record: LeaseRecord | None, now: float, wall: datetime) -> LeaseRecord | None:
        """The Lease as just read (None: it does not exist). Returns the record to write (with the
        read resourceVersion), or None when another holder's claim is still valid."""
        if record is None:
            return LeaseRecord(self.identity, self._seconds(), wall, wall, 0, None)
        if self._observed is None or not record.same_claim(self._observed):
            self._observed_at = now
        self._observed = record
        mine = record.holder == self.identity
        if not mine:
            self._renewed_at = None  # someone else wrote it: whatever we thought, we do not lead
            if record.holder and now < self._observed_at + self.lease_duration:
                return None
        return LeaseRecord(
            holder=self.identity,
            duration=self._seconds(),
            acquire_time=record.acquire_time if mine else wall,
            renew_time=wall,
            transitions=record.transitions if mine else record.transitions + 1,
            version=record.version,
        )

    def written(self, record: LeaseRecord, now: float) -> None:
        """Our write of `record` (with its new resourceVersion) succeeded at `now`."""
        self._observed, self._observed_at = record, now
        self._renewed_at = now if record.holder == self.identity else None

    def release(self, wall: datetime) -> LeaseRecord | None:
        """The record that gives the Lease up (None unless we hold it): no holder, so the next
        candidate takes it at once."""
        if self._observed is None or self._observed.holder != self.identity:
            return None
        self._renewed_at = None
        # Written with the version we last saw: if someone took the Lease since, it fails (409).
        self._observed = replace(self._observed, holder="", duration=1, renew_time=wall)
        return self._observed

    def _seconds(self) -> int:
        return max(1, math.ceil(self.lease_duration))
