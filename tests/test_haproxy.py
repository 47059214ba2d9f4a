"""The HAProxy fixture (tests/haproxy.py) against plain TCP servers on 127.0.0.2-4.

What the high-availability tests rely on, proved with a real HAProxy: connections spread over every
server, a server marked down by hand or by its failing /readyz gets no new connection and comes
back when marked up, and a connection to a server whose port just closed is redispatched to another
one instead of failing.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from haproxy import SERVER_HOSTS, Frontend, HAProxy, Server, shared_port


class NameServer(socketserver.ThreadingTCPServer):
    """Answers every connection with its own name, then closes it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name

        class Handler(socketserver.BaseRequestHandler):
            def handle(inner) -> None:
                inner.request.sendall(name.encode())

        super().__init__((host, port), Handler)


class Readyz(ThreadingHTTPServer):
    """GET /readyz: 200 while `ready`, else 503 (a relay's metrics port, as HAProxy sees it)."""

    daemon_threads = True

    def __init__(self, host: str) -> None:
        self.ready = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(inner) -> None:
                code = 200 if server.ready and inner.path == "/readyz" else 503
                inner.send_response(code)
                inner.send_header("content-length", "0")
                inner.end_headers()

            def log_message(inner, *args: object) -> None:
                pass

        super().__init__((host, 0), Handler)


def _serve(server: socketserver.BaseServer) -> None:
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[HAProxy, dict[str, NameServer], dict[str, Readyz]]]:
    port = shared_port()
    names = {f"r{i + 1}": host for i, host in enumerate(SERVER_HOSTS)}
    backends = {name: NameServer(name, host, port) for name, host in names.items()}
    probes = {name: Readyz(host) for name, host in names.items()}
    for server in (*backends.values(), *probes.values()):
        _serve(server)
    servers = [Server(n, h, probes[n].server_address[1]) for n, h in names.items()]
    lb = HAProxy(tmp_path, [Frontend("web", port)], servers)
    try:
        with lb:
            for name in names:
                lb.wait_status(name, "UP")
            yield lb, backends, probes
    finally:
        for server in (*backends.values(), *probes.values()):
            server.shutdown()
            server.server_close()


def _names(lb: HAProxy, count: int) -> Counter[str]:
    """Who answered each of `count` connections through the load balancer."""
    port = lb.frontends[0].port
    seen: Counter[str] = Counter()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            seen[sock.recv(16).decode()] += 1
    return seen


def test_connections_spread_over_every_server(cluster: tuple[HAProxy, dict, dict]) -> None:
    lb, _, _ = cluster
    seen = _names(lb, 30)
    assert set(seen) == {"r1", "r2", "r3"} and sum(seen.values()) == 30, seen
    assert lb.sessions_total("r1", "web") == seen["r1"]


def test_a_server_marked_down_gets_no_connection_until_marked_up(
    cluster: tuple[HAProxy, dict, dict],
) -> None:
    lb, _, _ = cluster
    lb.mark_down("r2")
    lb.wait_status("r2", "MAINT")
    seen = _names(lb, 30)
    assert set(seen) == {"r1", "r3"} and sum(seen.values()) == 30, seen
    lb.mark_up("r2")
    lb.wait_status("r2", "UP")
    assert "r2" in _names(lb, 30)


def test_a_failing_readyz_takes_the_server_out_and_back(
    cluster: tuple[HAProxy, dict, dict],
) -> None:
    lb, _, probes = cluster
    probes["r3"].ready = False
    lb.wait_status("r3", "DOWN")
    seen = _names(lb, 30)
    assert set(seen) == {"r1", "r2"} and sum(seen.values()) == 30, seen
    probes["r3"].ready = True
    lb.wait_status("r3", "UP")
    assert "r3" in _names(lb, 30)


def test_a_closed_port_is_redispatched_before_any_check_notices(
    cluster: tuple[HAProxy, dict, dict],
) -> None:
    """r1's port closes while its /readyz still says 200: no connection fails, none reaches r1."""
    lb, backends, _ = cluster
    backends["r1"].shutdown()
    backends["r1"].server_close()
    seen = _names(lb, 30)
    assert set(seen) <= {"r2", "r3"} and sum(seen.values()) == 30, seen
    assert lb.status("r1") == "UP"  # the HTTP check on /readyz knows nothing of the port
    assert int(lb.stats()["web", "r1"]["wredis"]) > 0  # they were sent to r1 and redispatched
