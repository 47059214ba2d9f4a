"""The control socket's server: a declarative JSON API over HTTP/1.1 on a Unix socket.

    PUT    /agents/{name}   desired services and ports of one agent (idempotent, all or nothing)
    DELETE /agents/{name}   close its ports, drop its tunnel, refuse its identity (revocation)
    GET    /agents          live state of every agent
    GET    /agents/{name}   live state of one agent, with the relay instances holding its tunnel
    GET    /cluster         this relay's instance id(s), workers, replicas, cluster size, synced
    PUT    /cluster         {"replicas": N}: the relays behind the load balancer; pushed last, it
                            marks the control state applied (the relay is ready from then on)
    GET    /healthz         liveness, with this relay process's id
    GET    /metrics         Prometheus text (only where the server is given an exposition: the
                            private socket of a worker, which its supervisor scrapes)

The socket file is created with mode 0660 in a directory of mode 0750 or tighter (created so, or
tightened; one others may write to and that is not the relay's is refused): only the relay's own
pod (which shares a directory inside an emptyDir) can reach it. `relay_id` changes on every
relay start, so a client can tell that a relay came back empty and must be told its state again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import stat
import uuid
from collections.abc import Awaitable, Callable
from inspect import isawaitable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc

from ..config import AgentSpec, ConfigError, parse_agent_spec
from ..http import Request, Response, serve_http_connection
from ..logs import describe
from ..net import accept_loop
from ..relay.registry import PortConflictError, PortNotPermittedError
from .client import ControlSocketError

log = logging.getLogger("atlax.control")

_AGENT_PATH = re.compile(r"/agents/([^/]+)")


T = TypeVar("T")
MAX_REPLICAS = 4096


async def _resolve(value: T | Awaitable[T]) -> T:
    """A registry answers reads at once (a relay) or after asking others (a supervisor)."""
    if isawaitable(value):
        return await value
    return value


class RegistryUnavailableError(Exception):
    """The registry could not apply a change now (a supervisor's worker failed it); nothing was
    changed. Answered with 503 and the message."""


class Registry(Protocol):
    """What the control API reads and changes: the relay's `AgentRegistry`, or anything that
    answers the same way (a supervisor fanning out to relay workers, whose reads are awaited)."""

    def agents(self) -> list[dict[str, Any]] | Awaitable[list[dict[str, Any]]]: ...

    def agent(self, name: str) -> dict[str, Any] | Awaitable[dict[str, Any] | None] | None: ...

    async def apply_agent(self, spec: AgentSpec) -> bool:
        """All the agent's ports open or none; raises `PortConflictError` naming the port."""
        ...

    async def remove_agent(self, name: str) -> bool: ...


class Cluster(Protocol):
    """The relay instance(s) behind this socket: `atlax.relay.Instance`, or a supervisor's."""

    def snapshot(self) -> dict[str, Any] | Awaitable[dict[str, Any]]: ...

    async def set_cluster(self, replicas: int) -> dict[str, Any]:
        """The relays behind the load balancer; the control state counts as applied."""
        ...


Exposition = Callable[[], bytes | Awaitable[bytes]]


class ControlServer:
    def __init__(
        self,
        registry: Registry,
        path: Path,
        *,
        cluster: Cluster | None = None,
        metrics: Exposition | None = None,
    ) -> None:
        self.registry = registry
        self.path = path
        self.cluster = cluster
        self.metrics = metrics
        self.relay_id = uuid.uuid4().hex

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await self._listen()
        log.info("control socket listening on %s", self.path)
        try:
            task_status.started()
            await accept_loop(listener, self._handle)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            try:
                self.path.unlink()
            except OSError:
                pass

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        await serve_http_connection(stream, self.app)

    async def _listen(self) -> anyio.abc.SocketListener:
        path = self.path
        _private_directory(path.parent)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ControlSocketError(
                    f"{path} exists and is not a socket; remove it or choose another path"
                )
            if _socket_answers(path):
                raise ControlSocketError(
                    f"another relay is already serving the control socket {path}"
                )
            path.unlink()  # a stale socket left by a relay that died
        old_umask = os.umask(0o117)  # the socket is born 0660: no window where others may connect
        try:
            listener = await anyio.create_unix_listener(path)
        except OSError as exc:
            raise ControlSocketError(f"cannot listen on {path}: {describe(exc)}") from None
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o660)
        return listener

    async def app(self, req: Request) -> Response:
        if req.path == "/healthz":
            if req.method != "GET":
                return _method_not_allowed("GET")
            return Response.json(200, {"status": "ok", "relayId": self.relay_id})
        if req.path == "/agents":
            if req.method != "GET":
                return _method_not_allowed("GET")
            agents = await _resolve(self.registry.agents())
            return Response.json(200, {"relayId": self.relay_id, "agents": agents})
        if req.path == "/cluster" and self.cluster is not None:
            if req.method == "GET":
                return Response.json(200, await _resolve(self.cluster.snapshot()))
            if req.method == "PUT":
                return await self._put_cluster(self.cluster, req.body)
            return _method_not_allowed("GET, PUT")
        if req.path == "/metrics" and self.metrics is not None:
            if req.method != "GET":
                return _method_not_allowed("GET")
            body = await _resolve(self.metrics())
            return Response(200, body, "text/plain; version=0.0.4; charset=utf-8")
        match = _AGENT_PATH.fullmatch(req.path)
        if match is None:
            return Response.error(404, f"no such endpoint: {req.path}")
        name = match.group(1)
        if req.method == "GET":
            state = await _resolve(self.registry.agent(name))
            if state is None:
                return Response.error(404, f"agent {name!r} is not configured")
            return Response.json(200, state)
        if req.method == "PUT":
            return await self._put(name, req.body)
        if req.method == "DELETE":
            try:
                removed = await self.registry.remove_agent(name)
            except RegistryUnavailableError as exc:
                return Response.error(503, str(exc))
            if not removed:
                return Response.error(404, f"agent {name!r} is not configured")
            return Response.json(200, {"deleted": name})
        return _method_not_allowed("GET, PUT, DELETE")

    async def _put(self, name: str, body: bytes) -> Response:
        try:
            data = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            return Response.error(400, f"request body is not JSON: {exc}")
        except RecursionError:
            return Response.error(400, "request body is nested too deeply")
        if not isinstance(data, dict):
            return Response.error(
                400, 'request body must be a JSON object like {"services": [...]}'
            )
        if "name" in data and data["name"] != name:
            return Response.error(
                400, f"body names agent {data['name']!r} but the path names {name!r}"
            )
        try:
            spec = parse_agent_spec({**data, "name": name}, source=f"PUT /agents/{name}")
        except ConfigError as exc:
            return Response.error(400, str(exc))
        try:
            changed = await self.registry.apply_agent(spec)
        except PortNotPermittedError as exc:
            return Response.error(403, str(exc), port=exc.port)
        except PortConflictError as exc:
            return Response.error(409, str(exc), port=exc.port)
        except RegistryUnavailableError as exc:
            return Response.error(503, str(exc))
        agent = await _resolve(self.registry.agent(name))
        return Response.json(200, {"changed": changed, "agent": agent})

    async def _put_cluster(self, cluster: Cluster, body: bytes) -> Response:
        try:
            data = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            return Response.error(400, f"request body is not JSON: {exc}")
        replicas = data.get("replicas") if isinstance(data, dict) else None
        if (
            not isinstance(data, dict)
            or set(data) != {"replicas"}
            or not isinstance(replicas, int)
            or isinstance(replicas, bool)
            or not 1 <= replicas <= MAX_REPLICAS
        ):
            return Response.error(
                400,
                f'request body must be {{"replicas": N}} with N a whole number 1..{MAX_REPLICAS}',
            )
        try:
            return Response.json(200, await cluster.set_cluster(replicas))
        except RegistryUnavailableError as exc:
            return Response.error(503, str(exc))


def _method_not_allowed(allowed: str) -> Response:
    return Response(405, b'{"error": "method not allowed"}\n', headers=[("allow", allowed)])


def _private_directory(directory: Path) -> None:
    """The socket's directory: created 0750, or an existing one that others cannot use to
    replace the socket. One of ours is tightened; one that others may write to and that is not
    ours to fix is refused."""
    try:
        directory.mkdir(mode=0o750, parents=True)
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlSocketError(f"cannot create {directory}: {describe(exc)}") from None
    info = directory.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise ControlSocketError(f"{directory} is not a directory; the control socket needs one")
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o027:  # no group write, nothing for others
        return
    if info.st_uid == os.geteuid():
        tight = mode & ~0o027
        os.chmod(directory, tight)
        log.warning("control socket directory %s had mode %04o; now %04o", directory, mode, tight)
        return
    if mode & 0o002 and not mode & stat.S_ISVTX:
        raise ControlSocketError(
            f"control socket directory {directory} is writable by other users (mode {mode:04o}) "
            "and not ours to fix: use a directory only the relay's user can write (the relay "
            "creates a missing one with mode 0750)"
        )


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError as exc:
            return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
        return True
