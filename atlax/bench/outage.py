"""python -m atlax.bench.outage [--down 2 10 60] [--signal KILL] [--json FILE]

How long a relay restart keeps public connections from being served, with real processes: a relay,
an agent with its default reconnect settings, and an echo service on 127.0.0.1. For each downtime,
the relay is stopped, left down that long and started again with the same configuration; a client
probes the public port every 20 ms. Before each stop the tunnel has been up for `--settle` seconds
(longer than the agent's 10 s for a healthy tunnel), as a relay that had served a while. Printed per run: how long the relay took to listen again, the
outage from its return to the first connection served (the figure that reconnect behaviour
decides), and the agent's reconnect delays from its log. Nothing is asserted: it measures.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import BenchError, Lab

PROBE_INTERVAL = 0.02
GIVE_UP = 300.0  # seconds after the restart


def probe(port: int) -> str:
    """`served` (the echo came back), `refused` (nothing listens) or `reset` (the relay is up but
    closed the connection: its agent is not connected yet)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.settimeout(2)
            sock.sendall(b"x")
            return "served" if sock.recv(1) == b"x" else "reset"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "reset"


def one_outage(
    lab: Lab, port: int, down: float, sig: signal.Signals, settle: float
) -> dict[str, Any]:
    time.sleep(settle)
    agent_log = lab.dir / "agent.log"
    offset = agent_log.stat().st_size
    killed = time.monotonic()
    lab.kill_relay(sig)
    time.sleep(max(0.0, down - (time.monotonic() - killed)))
    lab.restart_relay()
    started = time.monotonic()
    returned: float | None = None
    while time.monotonic() - started < GIVE_UP:
        if lab.relay is not None and lab.relay.poll() is not None:
            log = (lab.dir / "relay.log").read_text(errors="replace").strip().splitlines()
            raise BenchError(f"the relay did not start again: {log[-1] if log else 'no log'}")
        tried = time.monotonic()
        result = probe(port)  # a client the relay holds for its agent returns when served
        now = time.monotonic()
        if result != "refused" and returned is None:
            returned = tried
        if result == "served":
            assert returned is not None
            with agent_log.open("rb") as handle:
                handle.seek(offset)
                text = handle.read().decode(errors="replace")
            delays = [float(d) for d in re.findall(r"retrying in ([0-9.]+)s", text)]
            return {
                "down_s": down,
                "signal": sig.name,
                "relay_listening_after_s": returned - started,
                "outage_after_return_s": now - returned,
                "outage_total_s": now - killed,
                "agent_retry_delays_s": delays,
            }
        time.sleep(PROBE_INTERVAL)
    raise BenchError(f"no connection served within {GIVE_UP:g}s of the relay's restart")


def run(downs: list[float], sig: signal.Signals, settle: float, log: Any) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="atlax-outage-") as tmp, Lab(Path(tmp)) as lab:
        service = lab.services()
        log("starting Atlax relay + agent ...")
        public = lab.atlax(service)
        for down in downs:
            log(f"relay down for {down:g}s ({sig.name}) ...")
            results.append(one_outage(lab, public.echo, down, sig, settle))
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'relay down':>10}  {'listening after':>15}  {'outage after return':>19}  agent retries"
    ]
    for r in results:
        delays = ", ".join(f"{d:g}" for d in r["agent_retry_delays_s"]) or "-"
        lines.append(
            f"{r['down_s']:>9g}s  {r['relay_listening_after_s']:>14.2f}s  "
            f"{r['outage_after_return_s']:>18.2f}s  {delays}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atlax.bench.outage", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument(
        "--down",
        type=float,
        nargs="+",
        default=[2.0, 10.0, 60.0],
        metavar="SECONDS",
        help="downtimes to measure, in order (default: 2 10 60)",
    )
    parser.add_argument(
        "--signal",
        default="KILL",
        choices=["KILL", "TERM"],
        help="how the relay is stopped: KILL (a crash) or TERM (a drain); default KILL",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="how long the tunnel is up before each stop (default 15)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        results = run(args.down, signal.Signals[f"SIG{args.signal}"], args.settle, log)
    except BenchError as exc:
        print(f"atlax.bench.outage: error: {exc}", file=sys.stderr)
        return 1
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
