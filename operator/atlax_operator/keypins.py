"""Which keys the relay accepts for an agent: the pins the operator pushes (pure, no API calls).

The current certificate's key, and after a renewal the replaced one's too, until the relay has
seen the agent's tunnel with the new key (it has moved) or the replaced certificate expires,
whichever comes first. Both live in the TunnelAgent's status (`keyPins`,
`previousCertificateNotAfter`), so an operator restart in the middle keeps the overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from atlax import certs

from .pki import AgentCertificate


@dataclass(frozen=True)
class KeyPins:
    pins: tuple[str, ...]  # current key first
    previous_until: datetime | None = None  # when the replaced certificate expires


def key_pins(
    status: dict[str, Any], issued: AgentCertificate, *, agent_moved: bool = False
) -> KeyPins:
    """The pins to push now, from the Secret's certificate and what status carries."""
    current = certs.key_pin(issued.cert)
    previous, until = None, None
    if issued.replaced is not None:
        previous, until = certs.key_pin(issued.replaced), issued.replaced.not_valid_after_utc
    else:
        known = list(status.get("keyPins", []))
        until = _parse_iso(status.get("previousCertificateNotAfter"))
        if len(known) == 2 and known[0] == current:
            previous = known[1]
    if previous is None or agent_moved or until is None or until <= datetime.now(UTC):
        return KeyPins((current,))
    return KeyPins((current, previous), until)


def moved_to_current_key(status: dict[str, Any], live: dict[str, Any] | None) -> bool:
    """The relay reports the agent's live tunnel with the current key while the previous one is
    still pinned: it may be unpinned."""
    pins = list(status.get("keyPins", []))
    return len(pins) == 2 and live is not None and live.get("pin") == pins[0]


def previous_expired(status: dict[str, Any]) -> bool:
    """The previous key is still pinned, but its certificate has expired."""
    until = _parse_iso(status.get("previousCertificateNotAfter"))
    return len(status.get("keyPins", [])) == 2 and (until is None or until <= datetime.now(UTC))


def _parse_iso(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
