"""Measures one path with blocking sockets: throughput, round trips, connect times, idle-stream
memory and a stalled neighbour's cost, each over a port a `Lab` has started."""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time

from .harness import BenchError, Lab

BLOCK = memoryview(os.urandom(1 << 20))


def _send_all(port: int, size: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        left = size
        while left:
            n = min(left, len(BLOCK))
            sock.sendall(BLOCK[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 8:
            part = sock.recv(8 - len(reply))
            if not part:
                break
            reply += part
        if int.from_bytes(reply, "big") != size:
            raise BenchError(
                f"sink on port {port} counted {int.from_bytes(reply or b'0', 'big')} of {size} bytes"
            )


def throughput(port: int, total: int, streams: int = 1) -> float:
    """MB/s (10^6) moving `total` bytes over `streams` parallel connections."""
    per = total // streams
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _send_all(port, per)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise BenchError(str(errors[0]))
    return per * streams / elapsed / 1e6


def rtt_samples(port: int, count: int) -> list[float]:
    """Round trips (µs) of a 64-byte message through an echo, on one connection."""
    samples = []
    message = b"m" * 64
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(message)
            got = 0
            while got < 64:
                got += len(sock.recv(64 - got))
            samples.append((time.perf_counter() - start) * 1e6)
    return samples


def connect_ms(port: int, count: int) -> tuple[float, float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise BenchError("echo answered nothing")
            samples.append((time.perf_counter() - start) * 1e3)
    return percentile(samples, 50), percentile(samples, 99)


def client_hello(server_name: str) -> bytes:
    """The ClientHello Python's ssl sends for `server_name` (the bytes only; no handshake)."""
    import ssl

    context = ssl.create_default_context()
    tls = context.wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=server_name
    )
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def hello_connect_ms(port: int, hello: bytes, count: int) -> tuple[float, float]:
    """Connect, send a ClientHello, get its first byte back from the echo: p50, p99 (ms)."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(hello)
            if sock.recv(1) != hello[:1]:
                raise BenchError("the echo behind the shared port answered nothing")
            samples.append((time.perf_counter() - start) * 1e3)
    return percentile(samples, 50), percentile(samples, 99)


def udp_rtt_samples(port: int, count: int) -> list[float]:
    """Round trips (µs) of a 64-byte datagram through a UDP echo, from one client address; a
    datagram lost (no answer within a second) is counted as one second."""
    samples = []
    message = b"d" * 64
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        sock.connect(("127.0.0.1", port))
        for _ in range(count):
            start = time.perf_counter()
            sock.send(message)
            try:
                while sock.recv(128) != message:
                    pass
            except TimeoutError:
                pass
            samples.append((time.perf_counter() - start) * 1e6)
    return samples


def percentile(samples: list[float], pct: int) -> float:
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def idle_streams_rss(lab: Lab, port: int, count: int) -> float:
    """Relay RSS (MB) while `count` idle streams are open on its one tunnel."""
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port)))
        deadline = time.monotonic() + 60
        while lab.relay_open_streams() < count:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"only {lab.relay_open_streams():.0f} of {count} idle streams opened"
                )
            time.sleep(0.2)
        return lab.relay_rss_mb()
    finally:
        for sock in socks:
            sock.close()


def stalled_neighbour_ratio(sink: int, source: int, size: int) -> float:
    """Throughput of a stream while another on the same tunnel is stalled, over the same
    stream's throughput without it (the mean of one run before and one after)."""
    before = throughput(sink, size)
    with socket.create_connection(("127.0.0.1", source)) as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        stalled.recv(65536)  # it flows ... and then its reader stops for good
        time.sleep(0.5)  # let the stalled stream fill its window
        beside = throughput(sink, size)
    after = throughput(sink, size)
    return beside / ((before + after) / 2)
