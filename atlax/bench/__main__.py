"""python -m atlax.bench [--quick] [--json FILE] [--png FILE]

Runs Atlax, `ssh -R` and the direct path side by side on 127.0.0.1, metric by metric (each metric
measured on every path before the next metric), prints a table with the ratio Atlax / ssh -R,
and writes JSON and a PNG chart of the ratios. Throughput and round trips are measured in
rounds that take turns between the paths, so a slow second of a shared machine does not land
on one path only. The chart needs matplotlib (`pip install 'atlax[bench]'`, part of `dev`);
without it the run still prints the table and writes the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cluster import ClusterLab
from .haproxy import HAPROXY
from .harness import SNI_NAME, BenchError, Lab, Ports, raise_fd_limit
from .measure import (
    client_hello,
    connect_ms,
    hello_connect_ms,
    idle_streams_rss,
    percentile,
    rtt_samples,
    stalled_neighbour_ratio,
    throughput,
    udp_rtt_samples,
)

# name: (unit, better) where better is "higher" or "lower"
METRICS: dict[str, tuple[str, str]] = {
    "throughput_1": ("MB/s", "higher"),
    "throughput_100": ("MB/s", "higher"),
    "rtt_p50_us": ("µs", "lower"),
    "rtt_p99_us": ("µs", "lower"),
    "connect_p50_ms": ("ms", "lower"),
    "connect_p99_ms": ("ms", "lower"),
    "hello_connect_p50_ms": ("ms", "lower"),
    "hello_connect_p99_ms": ("ms", "lower"),
    "sni_connect_p50_ms": ("ms", "lower"),
    "sni_connect_p99_ms": ("ms", "lower"),
    "udp_rtt_p50_us": ("µs", "lower"),
    "udp_rtt_p99_us": ("µs", "lower"),
    "idle_10k_rss_mb": ("MB", "lower"),
    "stalled_neighbour_ratio": ("ratio", "higher"),
    # High availability (docs/high-availability.md): atlax only.
    "throughput_100_workers_2": ("MB/s", "higher"),
    "convergence_ms": ("ms", "lower"),
    "rollout_failed": ("conns", "lower"),
}

ROUNDS = 4  # throughput and round trips: each path's share is split into this many turns
ROLLOUT_RATE = 20.0  # connections a second during the rolling restart

SIZES = {
    # bytes for throughput_1, bytes for throughput_100, RTT samples, connect samples, idle streams
    "full": (1 << 30, 1 << 30, 5000, 500, 10_000),
    "quick": (32 << 20, 32 << 20, 200, 30, 300),
}


def run(quick: bool, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    one, hundred, rtt_n, connect_n, idle_n = SIZES["quick" if quick else "full"]
    raise_fd_limit()
    results: dict[str, dict[str, Any]] = {
        name: {"atlax": None, "ssh_r": None, "direct": None, "unit": unit}
        for name, (unit, _) in METRICS.items()
    }
    with (
        tempfile.TemporaryDirectory(prefix="atlax-bench-") as tmp,
        Lab(Path(tmp)) as lab,
        contextlib.ExitStack() as stack,
    ):
        service = lab.services()
        paths: dict[str, Ports] = {"direct": service}
        log("starting Atlax relay + agent ...")
        paths["atlax"] = lab.atlax(service)
        log("starting sshd + ssh -R ...")
        paths["ssh_r"] = lab.ssh(service)
        log("starting a second Atlax relay with --workers 2 + agent ...")
        lab2 = stack.enter_context(Lab(Path(tmp) / "workers-2"))
        paths["atlax_w2"] = lab2.atlax(service, workers=2)
        order = ["atlax", "ssh_r", "direct"]
        for path in [*order, "atlax_w2"]:  # warm up every path once
            throughput(paths[path].sink, 8 << 20)
        for name, size, streams in (("throughput_1", one, 1), ("throughput_100", hundred, 100)):
            log(f"throughput, {streams} stream(s), {size >> 20} MiB in {ROUNDS} turns ...")
            turns = [*order, "atlax_w2"] if streams == 100 else order
            seconds = dict.fromkeys(turns, 0.0)
            for _ in range(ROUNDS):
                for path in turns:
                    share = size // ROUNDS
                    seconds[path] += share / 1e6 / throughput(paths[path].sink, share, streams)
            for path in order:
                results[name][path] = size / 1e6 / seconds[path]
            if "atlax_w2" in seconds:
                results["throughput_100_workers_2"]["atlax"] = size / 1e6 / seconds["atlax_w2"]
        stack.close()  # the --workers 2 relay is done: no background load on what follows
        log(f"64-byte round trips x{rtt_n} in {ROUNDS} turns ...")
        samples: dict[str, list[float]] = {path: [] for path in order}
        for _ in range(ROUNDS):
            for path in order:
                samples[path] += rtt_samples(paths[path].echo, rtt_n // ROUNDS)
        for path in order:
            results["rtt_p50_us"][path] = percentile(samples[path], 50)
            results["rtt_p99_us"][path] = percentile(samples[path], 99)
        log(f"connect to first byte x{connect_n} ...")
        for path in order:
            p50, p99 = connect_ms(paths[path].echo, connect_n)
            results["connect_p50_ms"][path], results["connect_p99_ms"][path] = p50, p99
        log(f"ClientHello to first byte x{connect_n}: dedicated ports, and Atlax's SNI port ...")
        hello = client_hello(SNI_NAME)
        for path in order:
            p50, p99 = hello_connect_ms(paths[path].echo, hello, connect_n)
            results["hello_connect_p50_ms"][path], results["hello_connect_p99_ms"][path] = p50, p99
        sni = paths["atlax"].sni
        assert sni is not None
        p50, p99 = hello_connect_ms(sni, hello, connect_n)
        results["sni_connect_p50_ms"]["atlax"], results["sni_connect_p99_ms"]["atlax"] = p50, p99
        log(f"64-byte UDP datagram round trips x{rtt_n} in {ROUNDS} turns (ssh -R has no UDP) ...")
        udp_samples: dict[str, list[float]] = {"atlax": [], "direct": []}
        for _ in range(ROUNDS):
            for path in udp_samples:
                port = paths[path].udp
                assert port is not None
                udp_samples[path] += udp_rtt_samples(port, rtt_n // ROUNDS)
        for path, values in udp_samples.items():
            results["udp_rtt_p50_us"][path] = percentile(values, 50)
            results["udp_rtt_p99_us"][path] = percentile(values, 99)
        log("one stream beside a stalled neighbour ...")
        source = paths["atlax"].source
        assert source is not None
        results["stalled_neighbour_ratio"]["atlax"] = stalled_neighbour_ratio(
            paths["atlax"].sink, source, one // 2
        )
        high_availability(results, Path(tmp) / "cluster", quick, log)
        log(f"relay memory with {idle_n} idle streams ...")
        hold = paths["atlax"].hold
        assert hold is not None
        # Last: tearing down thousands of streams would disturb anything measured after it.
        # --quick opens fewer idle streams: the figure then only proves the measurement works.
        results["idle_10k_rss_mb"]["atlax"] = idle_streams_rss(lab, hold, idle_n)
    return results


def high_availability(
    results: dict[str, dict[str, Any]], directory: Path, quick: bool, log: Callable[[str], None]
) -> None:
    """convergence_ms and rollout_failed on three relays behind HAProxy (None without it)."""
    if not Path(HAPROXY).exists():
        log("haproxy is missing (apt-get install haproxy): no convergence_ms, rollout_failed")
        return
    directory.mkdir()
    with Lab(directory) as lab:
        cluster = ClusterLab(lab, balance="random")
        try:
            log("starting 3 relays behind HAProxy (balance random on the agent port) ...")
            cluster.start()
            runs = 1 if quick else 5
            log(f"convergence: agent start -> a tunnel to each of 3 instances, x{runs} ...")
            times = [cluster.convergence_ms() for _ in range(runs)]
            reached = [t for t in times if t is not None]
            results["convergence_ms"]["atlax"] = statistics.median(reached) if reached else None
            log(f"rolling restart of 3 relays at {ROLLOUT_RATE:g} connections/s ...")
            rollout = cluster.rollout(ROLLOUT_RATE, settle=1.0 if quick else 2.0)
            results["rollout_failed"]["atlax"] = rollout.failed + rollout.corrupted
            results["rollout_failed"]["attempted"] = rollout.attempted
        finally:
            cluster.stop()


def ratio(name: str, row: dict[str, Any]) -> float | None:
    if row["atlax"] is None or row["ssh_r"] in (None, 0):
        return None
    return float(row["atlax"]) / float(row["ssh_r"])


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{'metric':<26}{'atlax':>12}{'ssh -R':>12}{'direct':>12}  {'unit':<6}{'atlax/ssh -R':>14}"
    ]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:,.2f}" if v < 100 else f"{v:,.0f}"

    for name, row in results.items():
        r = ratio(name, row)
        better = METRICS[name][1]
        note = (
            ""
            if r is None
            else f"{r:.2f}x ({'higher' if better == 'higher' else 'lower'} is better)"
        )
        lines.append(
            f"{name:<26}{fmt(row['atlax']):>12}{fmt(row['ssh_r']):>12}{fmt(row['direct']):>12}  {row['unit']:<6}{note:>14}"
        )
    one, two = results["throughput_100"]["atlax"], results["throughput_100_workers_2"]["atlax"]
    if one and two:
        lines.append(f"relay --workers 2 / --workers 1, 100 streams: {two / one:.2f}x")
    if results["rollout_failed"].get("attempted"):
        row = results["rollout_failed"]
        lines.append(
            f"rolling restart: {row['atlax']:.0f} of {row['attempted']} connections failed"
        )
    return "\n".join(lines)


def chart(results: dict[str, dict[str, Any]], path: Path) -> bool:
    """Bar chart of the ratios; False if matplotlib (the `bench` extra) is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if ratio(n, results[n]) is not None]
    values = [ratio(n, results[n]) or 0.0 for n in names]
    colors = []
    for n, v in zip(names, values, strict=True):
        good = v >= 1.0 if METRICS[n][1] == "higher" else v <= 1.0
        colors.append("#2e7d32" if good else "#c62828")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.barh(names, values, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("Atlax / ssh -R  (throughput: higher is better; latency: lower is better)")
    ax.set_title("Atlax vs ssh -R, same machine, same run")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atlax.bench", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: seconds, proves it works"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--png", type=Path, help="bar chart of the ratios (default: next to --json)"
    )
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        results = run(args.quick, log)
    except BenchError as exc:
        print(f"atlax.bench: error: {exc}", file=sys.stderr)
        return 1
    report(results, args.quick, args.json, args.png, log)
    return 0


def report(
    results: dict[str, dict[str, Any]],
    quick: bool,
    json_path: Path | None,
    png: Path | None,
    log: Callable[[str], None],
) -> None:
    """The table on stdout, then the JSON and the chart (next to the JSON unless given)."""
    print(table(results))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"quick": quick, "metrics": results}, indent=2) + "\n")
        log(f"wrote {json_path}")
    png = png or (json_path.with_suffix(".png") if json_path else None)
    if png:
        if chart(results, png):
            log(f"wrote {png}")
        else:
            log(
                f"no chart: matplotlib is not installed (pip install 'atlax[bench]'); {png} skipped"
            )


if __name__ == "__main__":
    sys.exit(main())
