"""Timestamps as the APIs write them: ISO 8601 in UTC to the second, `2025-01-31T12:00:00Z`.

The control API's agent states and the operator's Kubernetes status both use this one form.
"""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(when: float | datetime | None = None) -> str:
    """`when` (a Unix time or an aware datetime; default now) as `YYYY-MM-DDTHH:MM:SSZ`."""
    if when is None:
        moment = datetime.now(UTC)
    elif isinstance(when, datetime):
        moment = when.astimezone(UTC)
    else:
        moment = datetime.fromtimestamp(when, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
