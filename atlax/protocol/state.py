"""The connection's lifecycle: its states, what moves it from one to the next, and why it ended.

Everything that changes `Connection.state` lives in `TRANSITIONS`, as h11's `_state.py` and h2's
`H2ConnectionStateMachine` keep theirs: (state, input) -> next state, in one table. A pair that
is not in the table is a bug in the caller, not something the peer can cause.

    AWAITING_SETTINGS --SETTINGS_RECEIVED--> OPEN
    AWAITING_SETTINGS, OPEN --GOAWAY_SENT--> DRAINING_LOCAL
    OPEN --GOAWAY_RECEIVED--> DRAINING_REMOTE
    DRAINING_* --DRAINED--> CLOSED          (the last stream ended)
    any --ENDED--> CLOSED                   (an error GOAWAY either way, a protocol error,
                                             a keepalive timeout, the transport gone)

A drain remembers who started it: a GOAWAY the other way while draining changes nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import ErrorCode, LocalProtocolError, error_name


class ConnectionState(enum.Enum):
    AWAITING_SETTINGS = "awaiting settings"  # the peer's SETTINGS have not arrived yet
    OPEN = "open"
    DRAINING_LOCAL = "draining local"  # this side sent GOAWAY: streams finish, none start
    DRAINING_REMOTE = "draining remote"  # the peer sent GOAWAY: streams finish, none start
    CLOSED = "closed"


class ConnectionInput(enum.Enum):
    SETTINGS_RECEIVED = "settings received"
    GOAWAY_SENT = "goaway sent"  # with NO_ERROR
    GOAWAY_RECEIVED = "goaway received"  # with NO_ERROR
    DRAINED = "drained"  # no stream is left while draining
    ENDED = "ended"  # at once: an error GOAWAY either way, a protocol error, a keepalive
    # timeout, the transport gone


_S = ConnectionState
_I = ConnectionInput

TRANSITIONS: dict[tuple[ConnectionState, ConnectionInput], ConnectionState] = {
    (_S.AWAITING_SETTINGS, _I.SETTINGS_RECEIVED): _S.OPEN,
    (_S.AWAITING_SETTINGS, _I.GOAWAY_SENT): _S.DRAINING_LOCAL,
    (_S.OPEN, _I.GOAWAY_SENT): _S.DRAINING_LOCAL,
    (_S.OPEN, _I.GOAWAY_RECEIVED): _S.DRAINING_REMOTE,
    (_S.DRAINING_LOCAL, _I.SETTINGS_RECEIVED): _S.DRAINING_LOCAL,
    (_S.DRAINING_LOCAL, _I.GOAWAY_SENT): _S.DRAINING_LOCAL,
    (_S.DRAINING_LOCAL, _I.GOAWAY_RECEIVED): _S.DRAINING_LOCAL,
    (_S.DRAINING_LOCAL, _I.DRAINED): _S.CLOSED,
    (_S.DRAINING_REMOTE, _I.GOAWAY_SENT): _S.DRAINING_REMOTE,
    (_S.DRAINING_REMOTE, _I.GOAWAY_RECEIVED): _S.DRAINING_REMOTE,
    (_S.DRAINING_REMOTE, _I.DRAINED): _S.CLOSED,
    **{(state, _I.ENDED): _S.CLOSED for state in ConnectionState},
}

DRAINING = frozenset({_S.DRAINING_LOCAL, _S.DRAINING_REMOTE})


def next_state(state: ConnectionState, event: ConnectionInput) -> ConnectionState:
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise LocalProtocolError(f"no transition from {state.value} on {event.value}") from None


class EndReason(enum.Enum):
    """Why a connection ended; the values are metric labels."""

    LOCAL_CLOSE = "local_close"  # this side sent GOAWAY (`code` says why)
    PEER_GOAWAY = "peer_goaway"  # the peer sent GOAWAY (`code` and its message say why)
    KEEPALIVE_TIMEOUT = "keepalive_timeout"  # nothing received for the keepalive timeout
    PROTOCOL_ERROR = "protocol_error"  # the peer broke a rule; GOAWAY with the code was sent
    PEER_CLOSED = "peer_closed"  # the transport ended cleanly without a GOAWAY
    TRANSPORT_LOST = "transport_lost"  # the transport failed (reset, broken pipe, ...)
    CANCELLED = "cancelled"  # this side's owner stopped it without a GOAWAY


@dataclass(frozen=True, slots=True)
class ConnectionEnd:
    """Why a connection ended: the reason, the protocol error code, and a detail for people."""

    reason: EndReason
    code: int = ErrorCode.NO_ERROR
    detail: str = ""

    @property
    def clean(self) -> bool:
        """A graceful GOAWAY(NO_ERROR) by either side, its streams finished."""
        return self.code == ErrorCode.NO_ERROR and self.reason in _GOAWAYS

    def __str__(self) -> str:
        reason = self.reason
        if reason is EndReason.LOCAL_CLOSE or reason is EndReason.PEER_GOAWAY:
            who = "closed locally" if reason is EndReason.LOCAL_CLOSE else "peer sent GOAWAY"
            text = f"{who} ({error_name(self.code)})"
            return f"{text}: {self.detail}" if self.detail else text
        if reason is EndReason.KEEPALIVE_TIMEOUT:
            return self.detail
        if reason is EndReason.PROTOCOL_ERROR:
            return f"protocol error from the peer ({error_name(self.code)}): {self.detail}"
        return f"{_TEXT[reason]}: {self.detail}" if self.detail else _TEXT[reason]


def outlasting(current: ConnectionEnd | None, new: ConnectionEnd) -> ConnectionEnd:
    """Which reason a connection keeps: the first, unless a failure follows a graceful GOAWAY
    (a drain that ends in a reset did not end cleanly)."""
    if current is None or (current.clean and not new.clean):
        return new
    return current


_GOAWAYS = frozenset({EndReason.LOCAL_CLOSE, EndReason.PEER_GOAWAY})
_TEXT = {
    EndReason.PEER_CLOSED: "the peer closed the connection",
    EndReason.TRANSPORT_LOST: "connection lost",
    EndReason.CANCELLED: "cancelled",
}
