"""Sockets, the relay's way: listen, accept, close, reset, keepalive, and how to name an address.

Everything here is about one socket at a time and knows nothing of tunnels or agents: the relay's
agent port and public ports, its metrics port and control socket, and the mux's spliced streams
all open, accept and close their sockets through these helpers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
from anyio import BrokenResourceError, ClosedResourceError

from .logs import describe
from .protocol import Origin

log = logging.getLogger("atlax.net")

# SO_LINGER on with a zero timeout: close() sends a TCP RST instead of a FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)

Handler = Callable[[Any], Coroutine[Any, Any, None]]


async def listen_sockets(
    host: str, port: int, *, udp: bool = False, reuse_port: bool = False, listen: bool = True
) -> list[socket.socket]:
    """Non-blocking listening sockets for `host` (every address it resolves to) and `port`;
    bound UDP sockets with `udp`.

    Port 0 picks a free port for the first address and uses the same one for the others.
    `reuse_port`: SO_REUSEPORT, so the worker processes of one relay share the port (the kernel
    spreads new connections over their listeners); only sockets that all set it can share.
    `listen=False`: bound (the port is taken) but not accepting yet; `start_listening` later.
    """
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    infos = await anyio.getaddrinfo(
        host or None, port, type=kind, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
    )
    sockets: list[socket.socket] = []
    seen: set[Any] = set()
    try:
        for family, _, proto, _, address in infos:
            if address in seen:
                continue
            seen.add(address)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if not udp:  # for UDP it would let a second process bind the same port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            if listen and not udp:
                start_listening(sock)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        # The errno's own subclass (PermissionError, ...), with the address in its text: a
        # user reading "Address already in use" needs to know which of the relay's ports.
        where = format_address((host, port)) + ("/udp" if udp else "")
        raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
    return sockets


def start_listening(sock: socket.socket) -> None:
    sock.listen(65535)  # the kernel caps it at net.core.somaxconn


def close_listener(sock: socket.socket) -> None:
    """Close a listening socket; a task waiting in `accept_sockets` on it returns."""
    if sock.fileno() != -1:
        anyio.notify_closing(sock)
        sock.close()


async def accept_sockets(sock: socket.socket, handler: Handler) -> None:
    """Accept raw connections until the socket is closed, handing each to `handler` in turn.

    The handler runs inline (it must not block for long): public connections are joined to
    their stream at once, agents are handed to a task of their own.
    """
    while True:
        try:
            await anyio.wait_readable(sock)
        except (ClosedResourceError, OSError, ValueError):
            return
        for _ in range(1024):  # drain a burst of connections per wake-up
            try:
                client, _ = sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if sock.fileno() == -1:
                    return
                log.warning("accept failed: %s", describe(exc))  # EMFILE and friends
                await anyio.sleep(0.1)
                break
            client.setblocking(False)
            try:
                await handler(client)
            except Exception:
                log.exception("internal error handling a connection; closed it")
                client.close()


async def accept_queued_then_close(sock: socket.socket, handler: Handler) -> None:
    """Hand over every connection already queued on a listening socket, then close it.

    A listener that is simply closed resets the connections the kernel accepted for it and no
    one took yet; a load balancer that sent them there cannot retry them elsewhere. Nothing is
    awaited between the last empty `accept` and the close, so none can slip in between.
    """
    while sock.fileno() != -1:
        try:
            client, _ = sock.accept()
        except OSError:  # BlockingIOError: the queue is empty
            close_listener(sock)
            return
        client.setblocking(False)
        try:
            await handler(client)
        except Exception:
            log.exception("internal error handling a connection; closed it")
            client.close()


async def accept_loop(listener: anyio.abc.SocketListener, handler: Handler) -> None:
    """Accept until the listener is closed, each connection in a task of its own; handlers
    already running are left to finish."""
    async with anyio.create_task_group() as tg:
        while True:
            try:
                client = await listener.accept()
            except (ClosedResourceError, BrokenResourceError):
                return
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", describe(exc))
                await anyio.sleep(0.1)
                continue
            tg.start_soon(_contained, handler, client)


async def _contained(handler: Handler, client: anyio.abc.SocketStream) -> None:
    """One connection's bug must never take the server down with it: log it, drop only that."""
    try:
        await handler(client)
    except Exception:
        log.exception("internal error handling a connection; closed it")
        with anyio.CancelScope(shield=True):
            await client.aclose()


def reset_on_close(sock: Any) -> None:
    """Make the socket's close send a TCP RST, so the peer sees a failure, not a clean EOF."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except (OSError, ValueError):  # already closed (uvloop raises ValueError for fd -1)
        pass


def close_with_reset(sock: socket.socket) -> None:
    """Close at once with a TCP RST."""
    reset_on_close(sock)
    sock.close()


def abort_transport(transport: asyncio.Transport) -> None:
    """Close a transport at once with a TCP RST."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        reset_on_close(sock)
    transport.abort()


def set_keepalive(sock: socket.socket) -> None:
    """TCP keepalive: a peer that vanishes without FIN or RST is reaped after about 2 minutes."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    except (OSError, AttributeError):
        pass


def local_address(sock: socket.socket) -> tuple[str, int]:
    """The (host, port) a socket is bound to."""
    address = sock.getsockname()
    return str(address[0]), int(address[1])


def peer_address(sock: socket.socket) -> str:
    """The peer of a connected socket as `host:port` (`[v6]:port`), for log lines."""
    try:
        return format_address(sock.getpeername())
    except OSError:
        return "unknown peer"


def format_address(address: Any) -> str:
    """`host:port`, or `[host]:port` for IPv6; anything else as its text."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def origin_of(client: socket.socket) -> Origin | None:
    """Who connected to whom on an accepted TCP socket (the PROXY protocol's addresses)."""
    try:
        src = client.getpeername()
        dst = client.getsockname()
        src_ip = ipaddress.ip_address(src[0])
        dst_ip = ipaddress.ip_address(dst[0])
        if src_ip.version != dst_ip.version:
            return None
        return Origin(src_ip, int(src[1]), dst_ip, int(dst[1]))
    except (OSError, ValueError, TypeError, IndexError):
        return None
