"""Give the heap that a burst of traffic grew back to the operating system once it is over.

glibc's allocator keeps freed memory for reuse, so a relay that moved a few hundred MB through
many streams would hold that peak for good. `malloc_trim` returns free pages; it is only
called when the relay has gone quiet after moving a lot, so it never competes with traffic.
Where there is no glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger("atlax.heap")

# Trim after at least this many bytes moved since the last trim ...
BURST = 64 << 20
# ... once fewer than this many moved in the last interval.
QUIET = 1 << 20
INTERVAL = 2.0


def _libc_malloc_trim() -> Callable[[], object] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class HeapTrimmer:
    """Call `tick()` every INTERVAL seconds; it trims once a burst is followed by quiet."""

    def __init__(
        self,
        moved: Callable[[], int],
        trim: Callable[[], object] | None = None,
        *,
        burst: int = BURST,
        quiet: int = QUIET,
    ) -> None:
        self._moved = moved
        self._trim = trim if trim is not None else _libc_malloc_trim()
        self._burst = burst
        self._quiet = quiet
        self._last = self._trimmed_at = moved()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def tick(self) -> bool:
        total = self._moved()
        recent, self._last = total - self._last, total
        if self._trim is None or total - self._trimmed_at < self._burst or recent >= self._quiet:
            return False
        self._trim()
        self._trimmed_at = total
        self.trims += 1
        log.debug("returned free heap to the OS after %d MB moved", (total >> 20))
        return True
