"""The agent pool's decisions (atlax/pool_policy.py) on a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import math
import random

from atlax.agent.policy import (
    RESTART_BACKOFF_CAP,
    Failure,
    PoolConfig,
    TunnelPoolPolicy,
    Verdict,
)

A, B, C, D = 0x2A5F01C3, 0x11111111, 0x22222222, 0x33333333
CONFIG = PoolConfig()


def policy(now: float = 0.0, seed: int = 1) -> TunnelPoolPolicy:
    return TunnelPoolPolicy(CONFIG, random.Random(seed), now)


def join(p: TunnelPoolPolicy, instance: int | None, size: int | None, now: float) -> None:
    assert p.verdict(instance, size, now) is Verdict.JOIN
    p.joined(instance, size, now)


def delay(p: TunnelPoolPolicy, now: float) -> float:
    return p.next_dial_at() - now


def fill_pace(k: int, target: int) -> tuple[float, float]:
    """The bounds of the delay after k duplicates in a row below `target` (before the cap)."""
    growth = CONFIG.fill_growth ** (k / target)
    return CONFIG.fill[0] * growth, CONFIG.fill[1] * growth


def test_the_first_dial_is_due_at_once() -> None:
    assert policy(now=5.0).next_dial_at() == 5.0


def test_it_joins_distinct_instances_up_to_the_advertised_count() -> None:
    p = policy()
    join(p, A, 3, 0.0)
    assert p.target == 3 and 0.1 <= delay(p, 0.0) <= 0.3
    assert p.verdict(A, 3, 0.5) is Verdict.DUPLICATE
    p.duplicate(0.5)
    low, high = fill_pace(1, 3)  # one duplicate: the pace slows by 2^(1/3)
    assert low <= delay(p, 0.5) <= high
    join(p, B, 3, 1.0)
    join(p, C, 3, 1.5)
    assert sorted(p.instances()) == sorted([A, B, C])
    assert 24.0 <= delay(p, 1.5) <= 36.0  # whole: one probe every probe_interval +-20 %
    assert p.verdict(D, 3, 40.0) is Verdict.DUPLICATE  # a fourth is one too many
    p.duplicate(40.0)
    assert 24.0 <= delay(p, 40.0) <= 36.0


def test_duplicates_in_a_row_slow_the_pace_up_to_a_cap_then_to_probing() -> None:
    p = policy()
    join(p, A, 3, 0.0)
    delays = []
    for i in range(40):
        assert p.verdict(A, 3, float(i)) is Verdict.DUPLICATE
        p.duplicate(float(i))
        delays.append(delay(p, float(i)))
    c = CONFIG
    for k, d in enumerate(delays[:10]):
        low, high = fill_pace(k + 1, 3)
        assert low <= d <= high
    patience = c.fill_patience * 3  # duplicates in a row, for a target of 3
    assert all(d <= c.fill_cap for d in delays[: patience - 1])
    assert all(24.0 <= d <= 36.0 for d in delays[patience:])  # a stale target: probing pace
    join(p, B, 3, 100.0)  # a new instance resets the pace
    assert 0.1 <= delay(p, 100.0) <= 0.3


def test_a_relay_without_instances_is_a_cluster_of_one_and_never_probed() -> None:
    p = policy()
    join(p, None, None, 0.0)
    assert p.target == 1 and p.next_dial_at() == math.inf
    assert p.verdict(None, None, 1.0) is Verdict.DUPLICATE


def test_refusals_back_off_exponentially_with_full_jitter_up_to_the_cap() -> None:
    p = policy()
    ceilings = []
    for n in range(1, 12):
        p.dial_failed(Failure.REFUSED, 0.0)
        ceiling = min(CONFIG.backoff_cap, CONFIG.backoff_initial * 2 ** (n - 1))
        assert 0.0 <= delay(p, 0.0) <= ceiling
        ceilings.append(ceiling)
    assert ceilings[-1] == CONFIG.backoff_cap


def test_a_lost_healthy_tunnel_is_retried_at_a_short_pace_through_a_long_outage() -> None:
    """The relay restarts: refused for 60 s, yet every retry comes within 1 s of the last."""
    p = policy()
    join(p, A, 1, 0.0)
    p.lost(A, up_for=100.0, now=100.0)
    assert 0.0 <= delay(p, 100.0) <= CONFIG.first_retry
    now = p.next_dial_at()
    while now < 160.0:
        p.dial_failed(Failure.NETWORK, now)
        assert 0.2 <= delay(p, now) <= 1.0
        now = p.next_dial_at()
    join(p, D, 1, now)  # the restarted relay is a new instance
    assert p.instances() == [D]


def test_after_the_fast_window_and_for_refusals_the_backoff_returns() -> None:
    p = policy()
    join(p, A, 1, 0.0)
    p.lost(A, up_for=100.0, now=100.0)
    p.dial_failed(Failure.REFUSED, 100.5)  # the relay answers but refuses: not hammered
    assert 0.0 <= delay(p, 100.5) <= CONFIG.backoff_initial * 2
    upper = []
    for i in range(8):
        now = 100.0 + CONFIG.fast_retry_window + 1 + i
        p.dial_failed(Failure.NETWORK, now)
        upper.append(delay(p, now))
    assert max(upper) > 1.0  # growing again
    assert all(d <= CONFIG.backoff_cap for d in upper)


def test_a_tunnel_that_fell_over_at_once_counts_as_a_failure() -> None:
    p = policy()
    join(p, A, 1, 0.0)
    for _ in range(6):
        p.dial_failed(Failure.NETWORK, 1.0)
    p.lost(A, up_for=1.0, now=2.0)
    assert delay(p, 2.0) <= CONFIG.backoff_cap
    assert p.held == 0


def test_a_lost_instance_is_sought_at_the_fast_pace_even_among_duplicates() -> None:
    p = policy()
    for i, instance in enumerate((A, B, C)):
        join(p, instance, 3, float(i))
    p.lost(C, up_for=60.0, now=60.0)
    now = p.next_dial_at()
    for _ in range(15):  # the load balancer keeps answering with the two left
        assert p.verdict(A, 3, now) is Verdict.DUPLICATE
        p.duplicate(now)
        assert 0.2 <= delay(p, now) <= 1.0
        now = p.next_dial_at()
    join(p, D, 3, now)
    assert 24.0 <= delay(p, now) <= 36.0


def test_a_larger_count_raises_the_target_and_dials_soon() -> None:
    p = policy()
    join(p, A, 1, 0.0)
    assert delay(p, 0.0) >= 24.0
    p.cluster(A, 3, 5.0)
    assert p.target == 3 and delay(p, 5.0) <= 0.3
    # A probe that lands on a new instance advertising more joins it at once.
    q = policy()
    join(q, A, 1, 0.0)
    assert q.verdict(B, 2, 30.0) is Verdict.JOIN


def test_an_instance_still_advertising_more_is_dropped_after_the_grace() -> None:
    p = policy()
    for instance in (A, B, C):
        join(p, instance, 3, 0.0)
    p.cluster(A, 2, 10.0)  # the count shrank; C was not told (it left, or froze)
    p.cluster(B, 2, 10.5)
    assert p.target == 2
    assert p.stale(15.0) == []
    assert p.next_check_at() == 10.0 + CONFIG.stale_grace
    assert p.stale(20.0) == [C]
    p.released(C, 20.0)
    assert sorted(p.instances()) == sorted([A, B]) and p.stale(100.0) == []
    assert delay(p, 20.0) >= 24.0  # whole again: no dialling for a third


def test_a_smaller_advertisement_never_drops_a_tunnel() -> None:
    """Scale-up: A and B still advertise 2 while C (new) advertises 3: all three are kept."""
    p = policy()
    join(p, A, 2, 0.0)
    join(p, B, 2, 0.0)
    join(p, C, 3, 1.0)
    assert p.target == 3 and p.stale(1000.0) == []


def test_when_every_instance_agrees_on_fewer_nothing_is_guessed() -> None:
    p = policy()
    for instance in (A, B, C):
        join(p, instance, 3, 0.0)
    for instance in (A, B, C):
        p.cluster(instance, 2, 5.0)
    assert p.target == 2 and p.stale(1000.0) == [] and p.held == 3


def test_renewal_replaces_each_instance_one_dial_at_a_time() -> None:
    p = policy()
    join(p, A, 2, 0.0)
    join(p, B, 2, 0.0)
    p.retire_all(50.0)
    assert p.next_dial_at() == 50.0
    assert p.verdict(A, 2, 50.0) is Verdict.REPLACE
    p.joined(A, 2, 50.0)
    assert delay(p, 50.0) <= 0.3  # B still retires: keep dialling
    assert p.verdict(A, 2, 50.3) is Verdict.DUPLICATE  # A already has its new tunnel
    p.duplicate(50.3)
    assert p.verdict(B, 2, 51.0) is Verdict.REPLACE
    p.joined(B, 2, 51.0)
    assert delay(p, 51.0) >= 24.0 and p.held == 2


def test_the_target_is_capped_by_max_tunnels() -> None:
    p = policy()
    join(p, A, 1000, 0.0)
    assert p.target == CONFIG.max_tunnels


def test_a_relay_that_said_it_is_going_away_is_retried_fast_however_short_its_tunnel() -> None:
    """GOAWAY NO_ERROR (a rollout, a deleted pod): fast retries even for a tunnel up a moment."""
    p = policy()
    join(p, A, 1, 0.0)
    p.lost(A, up_for=0.5, now=1.0, going_away=True)
    now = p.next_dial_at()
    for _ in range(20):
        p.dial_failed(Failure.NETWORK, now)
        assert 0.2 <= delay(p, now) <= RESTART_BACKOFF_CAP
        now = p.next_dial_at()


def test_the_fast_pace_stays_within_a_smaller_backoff_cap() -> None:
    p = TunnelPoolPolicy(PoolConfig(backoff_cap=0.3), random.Random(3), 0.0)
    join(p, A, 1, 0.0)
    p.lost(A, up_for=100.0, now=100.0)
    for i in range(10):
        p.dial_failed(Failure.NETWORK, 100.0 + i)
        assert delay(p, 100.0 + i) <= 0.3


def test_an_instance_lost_while_others_serve_is_sought_fast_however_short_its_tunnel() -> None:
    """A worker killed a moment after the agent joined it: the others still serve, so the
    relay address works and the successor is sought at the fast pace, not the backoff."""
    p = policy()
    for instance in (A, B, C):
        join(p, instance, 3, 0.0)
    p.lost(C, up_for=0.01, now=1.0)
    now = p.next_dial_at()
    for _ in range(20):
        assert p.verdict(A, 3, now) is Verdict.DUPLICATE
        p.duplicate(now)
        assert 0.2 <= delay(p, now) <= RESTART_BACKOFF_CAP
        now = p.next_dial_at()


def steady(p: TunnelPoolPolicy, instances: tuple[int, ...], probes: int, now: float) -> float:
    """`probes` probe dials of a whole pool, each landing on one of `instances` (held)."""
    for i in range(probes):
        now = p.next_dial_at()
        assert p.verdict(instances[i % len(instances)], p.target, now) is Verdict.DUPLICATE
        p.duplicate(now)
        assert 24.0 <= delay(p, now) <= 36.0  # whole: probing pace
    return now


def fill_delays(p: TunnelPoolPolicy, held: int, dials: int, now: float) -> list[float]:
    """`dials` dials that each land on an instance already held: the delays after each."""
    delays = []
    for _ in range(dials):
        now = p.next_dial_at()
        assert p.verdict(held, p.target, now) is Verdict.DUPLICATE
        p.duplicate(now)
        delays.append(delay(p, now))
    return delays


def test_a_larger_count_after_a_long_steady_state_is_filled_at_the_fill_pace() -> None:
    """The finding behind kube-proxy: 2 instances held for hours (each probe a duplicate), then
    a CLUSTER frame says 4. The next dials come at the fill pace, not one per probe_interval."""
    p = policy()
    join(p, A, 2, 0.0)
    join(p, B, 2, 0.5)
    now = steady(p, (A, B), 100, 0.5)  # > 8 x 4 duplicate probes: ~50 minutes at the target
    p.cluster(A, 4, now + 1.0)
    p.cluster(B, 4, now + 1.1)
    assert p.target == 4 and 0.1 <= delay(p, now + 1.1) <= 0.3
    c = CONFIG
    delays = fill_delays(p, A, 10, now + 1.1)
    for k, d in enumerate(delays):  # duplicates of this fill only: counted from the start
        low, high = fill_pace(k + 1, 4)
        assert low <= d <= min(high, c.fill_cap)
    now = p.next_dial_at()
    join(p, C, 4, now)
    join(p, D, 4, now + 0.2)
    assert p.held == 4 and 24.0 <= delay(p, now + 0.2) <= 36.0


def test_a_target_raised_while_a_stale_count_is_probed_starts_a_new_bounded_fill() -> None:
    """3 advertised, 2 exist: after 8 x 3 duplicates the agent probes (a stale count must not
    make it hammer the load balancer). A count of 4 is news: the fill pace again, and again
    probing after 8 x 4 duplicates."""
    p = policy()
    join(p, A, 3, 0.0)
    join(p, B, 3, 0.2)
    delays = fill_delays(p, A, 30, 0.2)
    assert all(24.0 <= d <= 36.0 for d in delays[CONFIG.fill_patience * 3 :])
    now = p.next_dial_at()
    p.cluster(A, 4, now)
    assert 0.1 <= delay(p, now) <= 0.3
    delays = fill_delays(p, B, 40, now)
    patience = CONFIG.fill_patience * 4
    assert all(d <= CONFIG.fill_cap for d in delays[: patience - 1])
    assert all(24.0 <= d <= 36.0 for d in delays[patience:])
    now = p.next_dial_at()
    p.cluster(B, 4, now)  # the same count again is no news: still probing
    assert delay(p, now) >= 24.0


def test_a_lost_tunnel_starts_the_fill_at_its_short_pace_after_a_long_steady_state() -> None:
    """A pool of 2 probed for hours; the relay ends B's tunnel with an error (backoff), and the
    dials that follow land on A: they come at the fill pace, not one per probe_interval."""
    p = policy()
    join(p, A, 2, 0.0)
    join(p, B, 2, 0.5)
    now = steady(p, (A, B), 100, 0.5)
    p.lost(B, up_for=now, now=now + 1.0, refused=True)
    assert delay(p, now + 1.0) <= CONFIG.backoff_initial  # the refusal: its backoff
    delays = fill_delays(p, A, 5, now + 1.0)
    for k, d in enumerate(delays):
        low, high = fill_pace(k + 1, 2)
        assert low <= d <= high
