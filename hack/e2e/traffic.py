#!/usr/bin/env python3
"""Traffic for the end-to-end scenarios (standard library only; hack/e2e/scenario.sh runs it).

    traffic.py transfer HOST PORT --size 16777216     random bytes through a TCP echo, hash compared
    traffic.py http HOST PORT --count 100             POST /echo with random bodies, each compared
    traffic.py probe HOST PORT --status F --stop F    a steady echo client: one hashed exchange every
                                                      --interval s until the stop file appears;
                                                      writes its counts and outages to the status file
    traffic.py await F --timeout S                    wait until the probe saw an outage and then
                                                      --successes exchanges in a row
    traffic.py settle F --timeout S                   wait for --successes more exchanges in a row
                                                      (outage or not); print attempted, failed,
                                                      corrupted and the longest outage

Every exchange is bounded by timeouts; every command ends by itself. Failures are one line on
stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path


class TrafficError(Exception):
    pass


class CorruptedError(TrafficError):
    """Bytes came back that were not the ones sent (not merely fewer of them)."""


def echo(host: str, port: int, payload: bytes, timeout: float) -> float:
    """Send payload, half-close, read the echo to EOF; return seconds taken. Raises on mismatch."""
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        received = bytearray()
        errors: list[BaseException] = []

        def send() -> None:
            try:
                view = memoryview(payload)
                for i in range(0, len(view), 262144):
                    sock.sendall(view[i : i + 262144])
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            while chunk := sock.recv(262144):
                received += chunk
        finally:
            sender.join(timeout)
        if errors:
            raise TrafficError(f"sending failed: {errors[0]}")
    if hashlib.sha256(received).digest() != hashlib.sha256(payload).digest():
        count = len(received)
        if received != payload[:count]:
            raise CorruptedError(f"echo corrupted: sent {len(payload)} bytes, {count} came back differing")
        raise TrafficError(f"echo differs: sent {len(payload)} bytes, got {count} bytes back")
    return time.monotonic() - started


def cmd_transfer(args: argparse.Namespace) -> None:
    payload = os.urandom(args.size)
    seconds = echo(args.host, args.port, payload, args.timeout)
    digest = hashlib.sha256(payload).hexdigest()[:16]
    print(
        f"{args.size / 2**20:g} MiB echoed intact through {args.host}:{args.port} in "
        f"{seconds:.2f}s ({2 * args.size / seconds / 1e6:.1f} MB/s both ways, sha256 {digest}...)"
    )


def cmd_http(args: argparse.Namespace) -> None:
    started = time.monotonic()
    for i in range(args.count):
        body = os.urandom(args.size)
        conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
        try:
            conn.request("POST", "/echo", body=body)
            response = conn.getresponse()
            answer = response.read()
        except OSError as exc:
            raise TrafficError(f"request {i + 1}/{args.count} failed: {exc}") from None
        finally:
            conn.close()
        if response.status != 200 or answer != body:
            raise TrafficError(f"request {i + 1}/{args.count}: HTTP {response.status}, body differs")
    seconds = time.monotonic() - started
    print(
        f"{args.count} requests of {args.size} B through {args.host}:{args.port} came back intact "
        f"in {seconds:.2f}s"
    )


def cmd_probe(args: argparse.Namespace) -> None:
    status = Path(args.status)
    stop = Path(args.stop)
    deadline = time.monotonic() + args.max_seconds
    state: dict[str, object] = {
        "attempts": 0,
        "failures": 0,
        "corrupted": 0,
        "successes_in_a_row": 0,
        "outages": [],  # seconds from the first failed exchange to the next good one
        "last_error": None,
    }
    outage_started: float | None = None
    while not stop.exists() and time.monotonic() < deadline:
        begun = time.monotonic()
        try:
            echo(args.host, args.port, os.urandom(args.size), args.timeout)
        except (OSError, TrafficError) as exc:
            key = "corrupted" if isinstance(exc, CorruptedError) else "failures"
            state[key] = int(state[key]) + 1  # type: ignore[call-overload]
            state["successes_in_a_row"] = 0
            state["last_error"] = str(exc) or type(exc).__name__
            if outage_started is None:
                outage_started = begun
        else:
            state["successes_in_a_row"] = int(state["successes_in_a_row"]) + 1  # type: ignore[call-overload]
            if outage_started is not None:
                state["outages"].append(round(begun - outage_started, 2))  # type: ignore[attr-defined]
                outage_started = None
        state["attempts"] = int(state["attempts"]) + 1  # type: ignore[call-overload]
        state["in_outage_for"] = None if outage_started is None else round(time.monotonic() - outage_started, 2)
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(status)
        time.sleep(max(0.0, args.interval - (time.monotonic() - begun)))
    print(json.dumps(state))


def cmd_await(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.timeout
    state: dict[str, object] = {}
    while time.monotonic() < deadline:
        try:
            state = json.loads(Path(args.status).read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("outages") and int(state.get("successes_in_a_row", 0)) >= args.successes:  # type: ignore[call-overload]
            print(f"outage {max(state['outages']):.1f}s, then {state['successes_in_a_row']} good exchanges in a row")  # type: ignore[type-var]
            return
        time.sleep(0.2)
    raise TrafficError(f"traffic did not resume within {args.timeout:g}s: {json.dumps(state)}")


def cmd_settle(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.timeout
    state: dict[str, object] = {}
    start: int | None = None
    while time.monotonic() < deadline:
        try:
            state = json.loads(Path(args.status).read_text())
        except (OSError, ValueError):
            state = {}
        if state:
            attempts = int(state["attempts"])  # type: ignore[call-overload]
            start = attempts if start is None else start
            in_a_row = int(state["successes_in_a_row"])  # type: ignore[call-overload]
            if attempts - start >= args.successes and in_a_row >= args.successes:
                outages = state.get("outages") or [0.0]
                print(
                    f"{state['attempts']} connections attempted, {state['failures']} failed, "
                    f"{state['corrupted']} corrupted; outage {max(outages):.1f}s"  # type: ignore[type-var]
                )
                return
        time.sleep(0.2)
    raise TrafficError(f"traffic did not flow again within {args.timeout:g}s: {json.dumps(state)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("transfer", "http", "probe"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--timeout", type=float, default=60.0 if name == "transfer" else 5.0)
    subs = sub.choices
    subs["transfer"].add_argument("--size", type=int, default=16 * 2**20)
    subs["transfer"].set_defaults(func=cmd_transfer)
    subs["http"].add_argument("--count", type=int, default=100)
    subs["http"].add_argument("--size", type=int, default=1024)
    subs["http"].set_defaults(func=cmd_http)
    subs["probe"].add_argument("--size", type=int, default=1024)
    subs["probe"].add_argument("--interval", type=float, default=0.2)
    subs["probe"].add_argument("--status", required=True)
    subs["probe"].add_argument("--stop", required=True)
    subs["probe"].add_argument("--max-seconds", type=float, default=600.0)
    subs["probe"].set_defaults(func=cmd_probe, timeout=2.0)
    a = sub.add_parser("await")
    a.add_argument("status")
    a.add_argument("--timeout", type=float, default=120.0)
    a.add_argument("--successes", type=int, default=10)
    a.set_defaults(func=cmd_await)
    t = sub.add_parser("settle")
    t.add_argument("status")
    t.add_argument("--timeout", type=float, default=120.0)
    t.add_argument("--successes", type=int, default=10)
    t.set_defaults(func=cmd_settle)
    args = parser.parse_args()
    try:
        args.func(args)
    except (OSError, TrafficError) as exc:
        print(f"traffic.py {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
