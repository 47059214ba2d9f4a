"""The control socket's client: what `atlax relayctl` and the operator speak to a relay with.

It imports nothing of the relay (nor Prometheus, nor the mux): a client needs only HTTP over a
Unix socket. The API itself is described in `atlax.control.server`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio

from ..http import ResponseError, request
from ..logs import describe


class ControlSocketError(Exception):
    """The control socket cannot be created or reached; the message names the path."""


class ControlClient:
    """Async client of the control API (used by `atlax relayctl` and the operator)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    async def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """One request with a JSON body (or none); the status and the decoded JSON answer."""
        body = b"" if payload is None else json.dumps(payload).encode()
        status, data = await self.call_raw(method, path, body)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            raise ControlSocketError(f"control socket {self.path} answered with non-JSON") from None

    async def call_raw(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """One request; the status and the answer's bytes as they came (GET /metrics)."""
        try:
            with anyio.fail_after(self.timeout):
                async with await anyio.connect_unix(self.path) as stream:
                    return await request(stream, method, path, body)
        except TimeoutError:
            raise ControlSocketError(
                f"control socket {self.path} did not answer in {self.timeout:g}s"
            ) from None
        except OSError as exc:
            raise ControlSocketError(
                f"cannot reach control socket {self.path}: {describe(exc)}"
            ) from None
        except ResponseError as exc:  # e.g. the relay stopped while answering
            raise ControlSocketError(f"control socket {self.path}: {exc}") from None

    async def cluster(self) -> dict[str, Any]:
        return await self._ok("GET", "/cluster")

    async def set_cluster(self, replicas: int) -> tuple[int, Any]:
        return await self.call("PUT", "/cluster", {"replicas": replicas})

    async def health(self) -> dict[str, Any]:
        return await self._ok("GET", "/healthz")

    async def agents(self) -> dict[str, Any]:
        return await self._ok("GET", "/agents")

    async def put_agent(
        self, name: str, services: list[dict[str, Any]], **extra: Any
    ) -> tuple[int, Any]:
        return await self.call("PUT", f"/agents/{name}", {"services": services, **extra})

    async def delete_agent(self, name: str) -> tuple[int, Any]:
        return await self.call("DELETE", f"/agents/{name}")

    async def _ok(self, method: str, path: str) -> dict[str, Any]:
        status, data = await self.call(method, path)
        if status != 200 or not isinstance(data, dict):
            raise ControlSocketError(f"{method} {path}: HTTP {status}: {data}")
        return data
