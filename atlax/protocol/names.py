"""The one rule for agent and service names, shared by the frame codec, the configuration files,
the control API and the certificate code.

An agent's name is the Common Name of its certificate and the key the relay knows it by: a DNS
name's characters (lowercase, digits, '-' and '.'), so it can also be a Kubernetes object's name.
A service's name travels in every OPEN frame: lowercase, digits, '-' and '_'. Both start and end
with a letter or digit and are at most 63 characters, as a DNS label is.
"""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 63
# Anchored forms for schema validators (pydantic, JSON schema, the CRD).
AGENT_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
SERVICE_PATTERN = r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$"
AGENT_RULE = (
    "1-63 characters of lowercase letters, digits, '-' and '.', "
    "starting and ending with a letter or digit"
)
SERVICE_RULE = (
    "1-63 characters of lowercase letters, digits, '-' and '_', "
    "starting and ending with a letter or digit"
)

_AGENT = re.compile(AGENT_PATTERN)
_SERVICE = re.compile(SERVICE_PATTERN)


def is_agent_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and _AGENT.fullmatch(name) is not None


def is_service_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and _SERVICE.fullmatch(name) is not None


def check_agent_name(name: str, what: str = "agent name") -> str:
    """`name` if it is a valid agent name; else ValueError naming the rule."""
    if not is_agent_name(name):
        raise ValueError(f"{what} {name!r} must be {AGENT_RULE}")
    return name


def check_service_name(name: str, what: str = "service name") -> str:
    """`name` if it is a valid service name; else ValueError naming the rule."""
    if not is_service_name(name):
        raise ValueError(f"{what} {name!r} must be {SERVICE_RULE}")
    return name
