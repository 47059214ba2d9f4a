"""The agent's tunnel pool as decisions without I/O: which tunnels to keep, when to dial next.

The pool shell dials, reads the relay's SETTINGS and reports here; this class answers. Time is an
argument (`now`, as in the protocol core) and randomness an injected `random.Random`, so every
policy below is tested without sockets or sleeping (tests/test_pool_policy.py).

- Target: the newest advertisement of a cluster size (the SETTINGS of a tunnel, a CLUSTER frame),
  capped by `max_tunnels`. A relay that advertises no instance id is a cluster of one.
- A tunnel to an instance already held is a duplicate (closed before it carries a stream), unless
  the held one is retiring (certificate renewal: the new one replaces it, make before break). A new
  instance is joined while fewer than the target are held.
- Dial pace: while below the target, a short jittered delay that grows with the duplicates in a row
  (they are not failures; it doubles every `target` of them), up to 5 s, and after many in a row
  (the target is probably stale) one probe every `probe_interval`, as at the target. Only the
  duplicates of the current fill count: the probes of a whole pool do not (they are expected), and
  the count starts again whenever there is news: a newly joined instance, a larger target, a lost
  tunnel, a renewal.
  Within `fast_retry_window` of losing a healthy tunnel the pace stays short instead (its instance,
  or the one replacing it, must be found before public connections to it give up waiting).
- Failures: exponential backoff with full jitter, except that right after losing a tunnel that had
  been healthy, network failures (refused, timed out, reset) are retried at a short fixed pace for
  `fast_retry_window`: a relay that restarts comes back within seconds, and a backoff that grew
  during its downtime would leave it unused for most of the cap. A relay that refuses (TLS,
  identity, ENHANCE_YOUR_CALM) always gets the backoff.
- Staleness: holding more than the target, a tunnel whose instance still advertises a larger size
  than the target for `stale_grace` is dropped. A smaller size never drops one (an instance not yet
  told about a scale-up advertises the old count), and when all agree nothing is guessed.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field

# The key of a held tunnel: the relay's instance id, or None for a relay that sends none.
Instance = int | None

MAX_CLUSTER_SIZE = 65535
# The longest wait between dials while a relay that was up (or said it is going away) comes back.
RESTART_BACKOFF_CAP = 1.0


class Verdict(enum.Enum):
    JOIN = "join"  # a new instance: keep the tunnel (send JOIN)
    REPLACE = (
        "replace"  # replaces a retiring tunnel to the same instance (send JOIN, drain the old)
    )
    DUPLICATE = "duplicate"  # an instance already held, or one more than the target: close it


class Failure(enum.Enum):
    NETWORK = "network"  # refused, timed out, reset: the relay may be restarting
    REFUSED = "refused"  # TLS failure, identity refused, ENHANCE_YOUR_CALM: do not hammer it


@dataclass(frozen=True)
class PoolConfig:
    backoff_initial: float = 0.5
    backoff_cap: float = 30.0
    probe_interval: float = 30.0
    probe_jitter: float = 0.2  # each probe interval is +-20 %
    fast_retry_window: float = 120.0  # after losing a healthy tunnel
    fast_retry: tuple[float, float] = (0.2, RESTART_BACKOFF_CAP)  # between fast retries
    first_retry: float = 0.5  # the first dial after a loss: uniform 0 .. this
    fill: tuple[float, float] = (0.1, 0.3)  # below the target: the first delay (uniform) ...
    fill_growth: float = 2.0  # ... times this for each `target` duplicates in a row ...
    fill_cap: float = 5.0  # ... up to this ...
    fill_patience: int = 8  # ... for this many duplicates in a row per instance of the target;
    # beyond, the target is probably stale (a count nobody updated): one probe per probe_interval
    max_tunnels: int = 16
    stale_grace: float = 10.0
    healthy_after: float = 10.0  # a tunnel up this long counts as healthy when it ends


@dataclass
class _Held:
    size: int  # the cluster size this instance advertised last
    retiring: bool = False
    larger_since: float | None = None  # since when `size` exceeds the target


@dataclass
class TunnelPoolPolicy:
    config: PoolConfig = field(default_factory=PoolConfig)
    rng: random.Random = field(default_factory=random.Random)
    now: float = 0.0  # when the pool starts: the first dial is due at once

    def __post_init__(self) -> None:
        self._held: dict[Instance, _Held] = {}
        self._target = 1
        self._failures = 0  # failed dials in a row
        self._duplicates = 0  # duplicate dials in a row while filling (see `duplicate`)
        self._lost_at: float | None = None  # when a healthy tunnel was last lost
        self._next_dial = self.now

    # -- inspection --------------------------------------------------------------------------

    @property
    def target(self) -> int:
        return self._target

    @property
    def held(self) -> int:
        return len(self._held)

    def instances(self) -> list[Instance]:
        return list(self._held)

    def next_dial_at(self) -> float:
        return self._next_dial

    def next_check_at(self) -> float:
        """When `stale` may next have an answer (math.inf if no tunnel is a candidate)."""
        deadlines = [
            h.larger_since + self.config.stale_grace
            for h in self._held.values()
            if h.larger_since is not None
        ]
        return min(deadlines, default=math.inf)

    # -- what the shell reports --------------------------------------------------------------

    def verdict(self, instance: Instance, size: int | None, now: float) -> Verdict:
        """A dial reached a relay and its SETTINGS arrived: keep the tunnel or close it."""
        held = self._held.get(instance)
        if held is not None:
            return Verdict.REPLACE if held.retiring else Verdict.DUPLICATE
        if instance is None:  # a relay without instances: one tunnel, like before pools
            return Verdict.DUPLICATE if self._held else Verdict.JOIN
        self._set_target(size or 1, now)
        if len(self._held) < self._target:
            return Verdict.JOIN
        return Verdict.DUPLICATE

    def joined(self, instance: Instance, size: int | None, now: float) -> None:
        """The tunnel was kept (JOIN sent, or a relay without instances answered)."""
        self._held[instance] = _Held(size or 1)
        if instance is None:
            self._set_target(1, now)
        self._failures = 0
        self._duplicates = 0
        self._refresh(now)
        self._schedule(now)

    def duplicate(self, now: float) -> None:
        """The tunnel was closed as a duplicate (or one too many).

        Duplicates slow the fill only while nothing changes: a probe of a whole pool is expected
        to find a held instance and is not counted (a count that grew through hours of probing
        would slow the next fill to `probe_interval`); a join, a larger target, a loss and a
        renewal start the count again."""
        self._failures = 0
        if self._filling():
            self._duplicates += 1
        self._schedule(now)

    def dial_failed(self, failure: Failure, now: float) -> None:
        self._failures += 1
        c = self.config
        if failure is Failure.NETWORK and self._fast(now):
            self._next_dial = now + self._fast_delay()
        elif len(self._held) >= self._target and self._held:
            self._next_dial = now + self._probe_delay()  # a probe failed; the pool is whole
        else:
            ceiling = min(c.backoff_cap, c.backoff_initial * 2 ** (self._failures - 1))
            self._next_dial = now + self.rng.uniform(0, ceiling)

    def lost(
        self,
        instance: Instance,
        up_for: float,
        now: float,
        *,
        refused: bool = False,
        going_away: bool = False,
    ) -> None:
        """A held tunnel ended without the pool asking (reset, keepalive, the relay's GOAWAY).
        `refused`: the relay ended it with an error (revoked identity, flood): backoff.
        `going_away`: the relay said it is going away (GOAWAY NO_ERROR: a rollout, a deleted
        pod): it, or its successor, is back in seconds however briefly the tunnel was up."""
        if self._held.pop(instance, None) is None:
            return
        self._duplicates = 0  # an instance is missing now: the fill starts at its short pace
        if refused:
            self.dial_failed(Failure.REFUSED, now)
        elif going_away or up_for >= self.config.healthy_after or self._held:
            # Healthy a moment ago: it was up a while, or said it is going away, or the others
            # still are (one instance died; its successor is to be found before its clients
            # give up waiting). A lone tunnel that fell over at once is a failure instead.
            self._lost_at = now
            self._failures = 0
            soon = now + self.rng.uniform(0, self.config.first_retry)
            self._next_dial = min(max(self._next_dial, now), soon)
        else:  # it came up and fell over: a failure, unless a healthy loss is being retried
            self.dial_failed(Failure.NETWORK, now)
        self._refresh(now)

    def released(self, instance: Instance, now: float) -> None:
        """A held tunnel the pool itself closed (stale, replaced): not a loss."""
        self._held.pop(instance, None)
        self._refresh(now)
        self._schedule(now)

    def cluster(self, instance: Instance, size: int, now: float) -> None:
        """A CLUSTER frame on the tunnel to `instance`: the newest advertisement."""
        held = self._held.get(instance)
        if held is not None:
            held.size = size
        self._set_target(size, now)
        self._schedule(now)

    def retire_all(self, now: float) -> None:
        """Certificate files changed: every held tunnel is to be replaced, one dial at a time."""
        for held in self._held.values():
            held.retiring = True
        self._duplicates = 0
        self._next_dial = now

    def stale(self, now: float) -> list[Instance]:
        """Tunnels to drop now: only the surplus, only those advertising a larger size."""
        surplus = len(self._held) - self._target
        if surplus <= 0:
            return []
        due = [
            (h.larger_since, instance)
            for instance, h in self._held.items()
            if h.larger_since is not None and now - h.larger_since >= self.config.stale_grace
        ]
        return [instance for _, instance in sorted(due, key=lambda d: d[0])[:surplus]]

    # -- internals ---------------------------------------------------------------------------

    def _set_target(self, size: int, now: float) -> None:
        target = max(1, min(size, self.config.max_tunnels, MAX_CLUSTER_SIZE))
        if target > self._target:  # news (a scale-up): the duplicates so far say nothing of it
            self._duplicates = 0
        self._target = target
        self._refresh(now)

    def _refresh(self, now: float) -> None:
        for held in self._held.values():
            if held.size > self._target:
                if held.larger_since is None:
                    held.larger_since = now
            else:
                held.larger_since = None

    def _filling(self) -> bool:
        """Dialling for an instance the pool lacks (below the target, or renewing)."""
        return len(self._held) < self._target or any(h.retiring for h in self._held.values())

    def _schedule(self, now: float) -> None:
        c = self.config
        if self._filling():
            if self._fast(now):  # an instance was lost a moment ago: find its successor soon
                self._next_dial = now + self._fast_delay()
                return
            if self._duplicates >= c.fill_patience * self._target:
                self._next_dial = now + self._probe_delay()
                return
            first = self.rng.uniform(*c.fill)
            # Per instance of the target, like the patience: a random balancer needs about
            # `target` dials to reach the one instance missing, so a larger cluster is not
            # slowed sooner (1.25 per duplicate for every target left 2 % of fills of 6 from
            # 4 above a minute, behind a random balancer).
            grown = first * c.fill_growth ** (self._duplicates / self._target)
            self._next_dial = now + min(c.fill_cap, c.probe_interval, grown)
        elif None in self._held:
            self._next_dial = math.inf  # a relay without instances: nothing to probe for
        else:
            self._next_dial = now + self._probe_delay()

    def _fast(self, now: float) -> bool:
        return self._lost_at is not None and now - self._lost_at <= self.config.fast_retry_window

    def _fast_delay(self) -> float:
        """The fast pace, within the configured backoff cap (a user who set 0.5 s gets 0.5 s)."""
        low, high = self.config.fast_retry
        cap = self.config.backoff_cap
        return self.rng.uniform(min(low, cap), min(high, cap))

    def _probe_delay(self) -> float:
        c = self.config
        return c.probe_interval * self.rng.uniform(1 - c.probe_jitter, 1 + c.probe_jitter)
