"""Kubernetes-style status conditions, kept pure so they are tested without an API server."""

from __future__ import annotations

from typing import Any

from atlax.isotime import iso_utc


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Return a new list with `type_` set; lastTransitionTime moves only when status changes."""
    value = "True" if status else "False"
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = (
        iso_utc() if old is None or old.get("status") != value else old.get("lastTransitionTime")
    )
    out.append(
        {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": since or iso_utc(),
        }
    )
    order = ["CertificateIssued", "PortsOpen", "Connected", "Ready"]
    return sorted(out, key=lambda c: order.index(c["type"]) if c["type"] in order else 99)


def condition_true(conditions: list[dict[str, Any]], type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True" for c in conditions)


def same_conditions(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Equal but for timestamps: used to skip status patches that would change nothing."""

    def strip(cs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in cs]

    return strip(a) == strip(b)
