"""What a reader answers besides a result: "need more bytes", or why they cannot be routed."""

from __future__ import annotations

import enum
from typing import Final


class NeedData:
    """More bytes are needed before anything can be said (h11's NEED_DATA)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class SniffFailure(enum.StrEnum):
    """Why the first bytes of a connection cannot be routed; the values are metric labels."""

    NOT_TLS = "not_tls"  # the first bytes are not a TLS handshake record
    NOT_HTTP = "not_http"  # the first bytes are not an HTTP/1.x request line
    MALFORMED = "malformed"  # it started like one, then broke a rule of its RFC
    TOO_LARGE = "too_large"  # still incomplete at the reader's size bound


class SniffError(Exception):
    """The bytes read so far can never be routed; the message is one line for a log."""

    def __init__(self, failure: SniffFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
