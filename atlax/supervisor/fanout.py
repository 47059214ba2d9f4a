"""The supervisor's registry: one desired state, applied to every worker through its private
control socket (docs/high-availability.md, section 3).

`apply_agent` and `remove_agent` reach every ready worker at once and succeed only if all applied
the change; when one refuses, the workers that applied it are given the previous state back and
the refusal is raised, so nothing changed anywhere. A worker that is not ready (starting,
restarting) is skipped: `sync` gives it the whole desired state before it counts as ready. Reads
merge the workers' views of each agent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import anyio

from ..config import AgentSpec
from ..control.client import ControlClient, ControlSocketError
from ..control.server import RegistryUnavailableError
from ..relay.registry import PortConflictError

log = logging.getLogger("atlax.supervisor")

SUMMED = ("activeStreams", "streamsTotal", "bytesIn", "bytesOut")


class WorkerFailedError(RegistryUnavailableError):
    """A worker answered a change with something other than success or a port conflict (the
    control API answers 503 with this message; nothing was changed)."""


def merge_agent(views: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One agent as all workers see it: connected anywhere, counts summed, each worker's tunnel
    listed under `instances`."""
    first = views[0]
    merged = dict(first)
    merged["connected"] = any(v["connected"] for v in views)
    for key in SUMMED:
        merged[key] = sum(int(v.get(key) or 0) for v in views)
    since = [v["since"] for v in views if v.get("since")]
    beats = [v["lastHeartbeat"] for v in views if v.get("lastHeartbeat")]
    merged["since"] = min(since) if since else None  # ISO 8601 in UTC: text order is time order
    merged["lastHeartbeat"] = max(beats) if beats else None
    peers = [v["peer"] for v in views if v.get("peer")]
    merged["peer"] = peers[0] if peers else None
    pins = [v["pin"] for v in views if v.get("pin")]
    merged["pin"] = pins[0] if pins else None  # the key of a live tunnel (any worker's)
    rtts = [float(v["rttSeconds"]) for v in views if v.get("rttSeconds") is not None]
    merged["rttSeconds"] = sum(rtts) / len(rtts) if rtts else None
    merged["instances"] = [i for v in views for i in v.get("instances", [])]
    return merged


def merge_agents(per_worker: Iterable[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every agent any worker knows, merged, by name."""
    views: dict[str, list[dict[str, Any]]] = {}
    for agents in per_worker:
        for agent in agents:
            views.setdefault(agent["name"], []).append(agent)
    return [merge_agent(views[name]) for name in sorted(views)]


class FanOutRegistry:
    """The control API's registry for a supervisor: `clients()` are the ready workers' control
    clients at the time of the call."""

    def __init__(
        self, clients: Callable[[], list[ControlClient]], agents: Iterable[AgentSpec] = ()
    ) -> None:
        self._clients = clients
        self.desired: dict[str, AgentSpec] = {a.name: a for a in agents}
        self._lock = anyio.Lock()

    # -- reading -----------------------------------------------------------------------------

    async def agents(self) -> list[dict[str, Any]]:
        answers = await _each(self._clients(), "GET", "/agents", None)
        return merge_agents(
            data.get("agents", []) for status, data in answers if status == 200 and data
        )

    async def agent(self, name: str) -> dict[str, Any] | None:
        answers = await _each(self._clients(), "GET", f"/agents/{name}", None)
        views = [data for status, data in answers if status == 200 and isinstance(data, dict)]
        if not views:
            return None
        return merge_agent(views)

    # -- changing ----------------------------------------------------------------------------

    async def apply_agent(self, spec: AgentSpec) -> bool:
        async with self._lock:
            previous = self.desired.get(spec.name)
            await self._everywhere(
                "PUT", f"/agents/{spec.name}", _body(spec), undo=_undo(spec.name, previous)
            )
            self.desired[spec.name] = spec
            return previous != spec

    async def remove_agent(self, name: str) -> bool:
        async with self._lock:
            if name not in self.desired:
                return False
            # A worker that answers 404 never had it: as good as removed. There is no undo: a
            # revocation that reached some workers must not be handed back. If one failed, the
            # desired state keeps the agent so that the client's retry reaches it again.
            clients = self._clients()
            answers = await _each(clients, "DELETE", f"/agents/{name}", None)
            failed = [
                (c, a) for c, a in zip(clients, answers, strict=True) if a[0] not in (200, 404)
            ]
            if failed:
                client, (status, data) = failed[0]
                raise WorkerFailedError(
                    f"DELETE /agents/{name} failed on {client.path}: HTTP {status}: "
                    f"{_error(data)}; retry to revoke it there too"
                )
            del self.desired[name]
            return True

    async def sync(self, client: ControlClient, cluster: dict[str, Any] | None) -> None:
        """Give one (new) worker the whole desired state, then its cluster if known (which makes
        it listen for agents)."""
        async with self._lock:  # no change may slip in between
            for spec in list(self.desired.values()):
                status, data = await client.call("PUT", f"/agents/{spec.name}", _body(spec))
                if status != 200:
                    raise WorkerFailedError(
                        f"PUT /agents/{spec.name}: HTTP {status}: {_error(data)}"
                    )
            if cluster is not None:
                status, data = await client.call("PUT", "/cluster", cluster)
                if status != 200:
                    raise WorkerFailedError(f"PUT /cluster: HTTP {status}: {_error(data)}")

    async def set_cluster(self, cluster: dict[str, Any]) -> None:
        """PUT /cluster on every ready worker; raises if one did not take it."""
        async with self._lock:
            clients = self._clients()
            for client, (status, data) in zip(
                clients, await _each(clients, "PUT", "/cluster", cluster), strict=True
            ):
                if status != 200:
                    raise WorkerFailedError(
                        f"PUT /cluster on {client.path}: HTTP {status}: {_error(data)}"
                    )

    async def _everywhere(
        self, method: str, path: str, body: Any, undo: tuple[str, str, Any]
    ) -> None:
        clients = self._clients()
        answers = await _each(clients, method, path, body)
        applied = [c for c, (status, _) in zip(clients, answers, strict=True) if status == 200]
        failed = [(c, a) for c, a in zip(clients, answers, strict=True) if a[0] != 200]
        if not failed:
            return
        undo_method, undo_path, undo_body = undo
        for client, (status, _) in zip(
            applied, await _each(applied, undo_method, undo_path, undo_body), strict=True
        ):
            if status not in (200, 404):
                log.error("could not undo %s %s on %s: HTTP %s", method, path, client.path, status)
        client, (status, data) = failed[0]
        if status == 409 and isinstance(data, dict) and "port" in data:
            raise PortConflictError(int(data["port"]), _error(data))
        raise WorkerFailedError(
            f"{method} {path} failed on a worker: HTTP {status}: {_error(data)}"
        )


def _body(spec: AgentSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", exclude_none=True, exclude={"name"})


def _undo(name: str, previous: AgentSpec | None) -> tuple[str, str, Any]:
    if previous is None:
        return "DELETE", f"/agents/{name}", None
    return "PUT", f"/agents/{name}", _body(previous)


def _error(data: Any) -> str:
    if isinstance(data, dict) and "error" in data:
        return str(data["error"])
    return str(data)


async def _each(
    clients: Sequence[ControlClient], method: str, path: str, body: Any
) -> list[tuple[int, Any]]:
    """The same call on every client at once; a client that cannot be reached answers 503."""
    answers: list[tuple[int, Any]] = [(0, None)] * len(clients)

    async def one(i: int, client: ControlClient) -> None:
        try:
            answers[i] = await client.call(method, path, body)
        except ControlSocketError as exc:
            answers[i] = (503, {"error": str(exc)})

    async with anyio.create_task_group() as tg:
        for i, client in enumerate(clients):
            tg.start_soon(one, i, client)
    return answers
