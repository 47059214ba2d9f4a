"""The heap trimmer: trims once after a burst followed by quiet, never during traffic."""

from __future__ import annotations

from atlax.heap import HeapTrimmer, _libc_malloc_trim


def test_trims_once_a_burst_is_followed_by_quiet() -> None:
    moved = [0]
    trims: list[int] = []
    trimmer = HeapTrimmer(lambda: moved[0], lambda: trims.append(moved[0]), burst=100, quiet=10)
    for step in (50, 60, 60):  # traffic: 170 bytes moved, never quiet
        moved[0] += step
        assert not trimmer.tick()
    moved[0] += 5  # quiet after the burst: trim
    assert trimmer.tick()
    assert trims == [175]
    for _ in range(3):  # still quiet, nothing new to give back
        assert not trimmer.tick()
    moved[0] += 50  # a small burst is not worth a trim
    trimmer.tick()
    assert not trimmer.tick()
    assert trimmer.trims == 1


def test_glibc_malloc_trim_is_found_and_runs() -> None:
    trim = _libc_malloc_trim()
    assert trim is not None  # this machine runs glibc; elsewhere the trimmer does nothing
    trim()
