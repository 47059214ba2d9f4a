"""A small HTTP/1.1 server and client on anyio streams, with h11 doing all the parsing.

Used for the relay's control socket (a Unix socket) and its metrics/health port. Requests are
answered one at a time per connection; bodies are capped so a bad client cannot exhaust memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc
import h11

log = logging.getLogger("atlax.http")

MAX_BODY = 1024 * 1024
REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, payload: Any) -> Response:
        return cls(status, (json.dumps(payload, indent=2) + "\n").encode())

    @classmethod
    def error(cls, status: int, message: str, **extra: Any) -> Response:
        return cls.json(status, {"error": message, **extra})


App = Callable[[Request], Awaitable[Response]]


async def serve_http_connection(stream: anyio.abc.ByteStream, app: App) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    async with stream:
        while True:
            try:
                with anyio.fail_after(REQUEST_TIMEOUT):
                    request = await _read_request(conn, stream)
            except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError):
                return
            except _HTTPError as exc:
                await _send(conn, stream, Response.error(exc.status, exc.message), close=True)
                return
            if request is None:
                return
            try:
                response = await app(request)
            except Exception:
                log.exception("internal error answering %s %s", request.method, request.path)
                response = Response.error(500, "internal error; see the relay log")
            if not await _send(conn, stream, response):
                return
            if conn.our_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _next_event(conn: h11.Connection, stream: anyio.abc.ByteStream) -> Any:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _HTTPError(exc.error_status_hint, f"bad request: {exc}") from None
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive(65536)
        except anyio.EndOfStream:
            data = b""
        conn.receive_data(data)


async def _read_request(conn: h11.Connection, stream: anyio.abc.ByteStream) -> Request | None:
    event = await _next_event(conn, stream)
    if isinstance(event, h11.ConnectionClosed):
        return None
    if not isinstance(event, h11.Request):
        raise _HTTPError(400, "bad request")
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
    body = bytearray()
    while True:
        part = await _next_event(conn, stream)
        if isinstance(part, h11.Data):
            body += part.data
            if len(body) > MAX_BODY:
                raise _HTTPError(413, f"request body larger than {MAX_BODY} bytes")
        elif isinstance(part, h11.EndOfMessage):
            break
        else:
            raise _HTTPError(400, "bad request body")
    target = event.target.decode("latin-1")
    return Request(event.method.decode("ascii"), target.split("?", 1)[0], headers, bytes(body))


async def _send(
    conn: h11.Connection, stream: anyio.abc.ByteStream, response: Response, close: bool = False
) -> bool:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        *response.headers,
    ]
    if close:
        headers.append(("connection", "close"))
    try:
        reason = HTTPStatus(response.status).phrase.encode()
        data = (
            conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
            or b""
        )
        data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send(data)
    except (h11.LocalProtocolError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return False
    return True


class ResponseError(Exception):
    """The server gave no complete, valid response (it closed or reset the connection first)."""


async def request(
    stream: anyio.abc.ByteStream,
    method: str,
    path: str,
    body: bytes = b"",
    host: str = "localhost",
) -> tuple[int, bytes]:
    """One request on a fresh connection (the caller opens and closes `stream`)."""
    conn = h11.Connection(h11.CLIENT)
    headers = [("host", host), ("content-length", str(len(body))), ("connection", "close")]
    if body:
        headers.append(("content-type", "application/json"))
    data = conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    status = 0
    payload = bytearray()
    closed = False
    try:
        await stream.send(data)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await stream.receive(65536))
                except anyio.EndOfStream:
                    closed = True
                    conn.receive_data(b"")
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                payload += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, bytes(payload)
    except anyio.BrokenResourceError:
        raise ResponseError("the connection was reset before the response was complete") from None
    except h11.RemoteProtocolError as exc:
        raise ResponseError(
            "the connection was closed before the response was complete"
            if closed
            else f"invalid HTTP response: {exc}"
        ) from None
