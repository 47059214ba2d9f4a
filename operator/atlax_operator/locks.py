"""One lock per TunnelAgent, so its handlers and its timer never push to the relay at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class AgentLocks:
    """A lock per name, kept exactly while a coroutine holds or waits for it.

    Dropping a lock while another coroutine waits on it (as `delete` once did) lets the next
    caller create a fresh lock beside it: two coroutines would then work on one agent at once.
    Counting users instead drops the lock only when nobody needs it, so names never pile up.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name) or (asyncio.Lock(), 0)
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    def users(self, name: str) -> int:
        """Coroutines holding or waiting for `name`'s lock (0: it has none now)."""
        return self._locks.get(name, (None, 0))[1]
