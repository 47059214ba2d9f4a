"""What Atlax writes into its logs and error messages: one line per event, never a flood.

`describe` turns an exception into the one line a user reads (the relay, the agent and the
operator all name failures through it); `RateLimitedLog` keeps an attacker's flood of refused
connections from becoming a flood of log lines.
"""

from __future__ import annotations

import logging
import ssl
import time


def describe(exc: BaseException, *, peer: str = "peer", during: str = "") -> str:
    """One line saying what went wrong, for a log or an error message (never a traceback).

    `peer` names whose certificate a verification failure rejected ("client", "relay");
    `during` says what a connection that closed without a word was doing ("during the
    handshake"): asyncio reports such a close as a `ConnectionResetError()` with no text.
    """
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(sorted({describe(e, peer=peer, during=during) for e in exc.exceptions}))
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{peer} certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {getattr(exc, 'reason', None) or exc}"
    if isinstance(exc, (ConnectionError, EOFError)) and not getattr(exc, "strerror", None):
        return f"connection closed {during}".rstrip()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RateLimitedLog:
    """Log a repeated event at most once per `interval` per key, saying how many were skipped."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last, skipped = self._last.get(key, (float("-inf"), 0))
        if now - last < self.interval:
            self._last[key] = (last, skipped + 1)
            return
        suffix = f" ({skipped} more like this since the last message)" if skipped else ""
        self.logger.warning(message + suffix, *args, stacklevel=2)
        self._last[key] = (now, 0)
