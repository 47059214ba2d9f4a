"""python -m atlax.bench.fill [--probe-interval 3] [--steady-probes 40] [--cycles 3] [--simulate N]

How long the agent's pool takes to fill when the relay count grows after a steady state, behind
a load balancer that picks at random (kube-proxy's choice, HAProxy `balance random`). Four relay
processes on 127.0.0.2-5 (the same ports on each, like four hosts or 2 pods x 2 workers), their
state pushed through their control sockets as the sync sidecar does, HAProxy on 127.0.0.1 with
health checks on /readyz; one agent dialling HAProxy. Each cycle:

1. two relays serve, counting 2; the agent holds both and probes `--steady-probes` times (each
   probe a duplicate), `--probe-interval` apart;
2. the other two start counting 4 (HAProxy holds them in maintenance), the first two are told 4
   (a CLUSTER frame on the agent's tunnels: in Kubernetes the syncs change the count within a
   second of a new pod's relay being ready, long before a probe finds it), then HAProxy sends to
   all four: measured, from then until every relay reports the agent;
3. the first two are told 2 again, HAProxy stops sending to the others, the agent drops its
   tunnels to them (they still count 4: the stale rule), and they stop.

Nothing is asserted: it measures. The default probe interval (30 s) would take 20 minutes of steady
state per cycle to reach what 40 probes of 3 s reach; the pace the old policy fell to is that
interval, so the old figures scale with it.

`--simulate N` runs the same sequence N times on the pure policy (atlax/agent/policy.py) with the
default configuration and a fake clock (each dial reaches a random instance after 50 ms), for the
tail that a few real cycles cannot show: 2 -> 4 and 4 -> 6 instances.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio

from ..agent.policy import PoolConfig, TunnelPoolPolicy, Verdict
from ..control.client import ControlClient, ControlSocketError
from .haproxy import FRONTEND_HOST, HAPROXY, Frontend, HAProxy, HAProxyError, Server, shared_port
from .harness import LIMITED, BenchError, Lab, bench_pki

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
AGENT = "bench"


class FillLab:
    def __init__(self, lab: Lab, probe_interval: float) -> None:
        if not Path(HAPROXY).exists():
            raise BenchError("haproxy is missing: apt-get install haproxy (or hack/test-deps)")
        self.lab, self.dir, self.probe_interval = lab, lab.dir, probe_interval
        ports = [shared_port((FRONTEND_HOST, *HOSTS)) for _ in range(3)]
        self.agent_port, self.public_port, self.metrics_port = ports
        self.pki = bench_pki(self.dir / "pki")
        self.relays: list[subprocess.Popen[bytes] | None] = [None] * len(HOSTS)
        self.haproxy = HAProxy(
            self.dir,
            [Frontend("agent", self.agent_port, "random")],
            [Server(f"r{i + 1}", h, self.metrics_port) for i, h in enumerate(HOSTS)],
        )

    def control(self, i: int) -> ControlClient:
        return ControlClient(self.dir / f"relay-{i + 1}.sock", timeout=5)

    def start_relay(self, i: int, replicas: int) -> None:
        host, pki = HOSTS[i], self.pki
        config = self.dir / f"relay-{i + 1}.toml"
        config.write_text(
            f'[relay]\nlisten = "{host}:{self.agent_port}"\nca = "{pki / "ca.crt"}"\n'
            f'cert = "{pki / "relay.crt"}"\nkey = "{pki / "relay.key"}"\npublic_host = "{host}"\n'
            f'metrics = "{host}:{self.metrics_port}"\ncontrol_socket = "{self.control(i).path}"\n'
            f"replicas = {replicas}\ndrain_timeout = 2.0\n"
        )
        argv = [sys.executable, "-c", LIMITED, "relay", "--config", str(config)]
        self.relays[i] = self.lab.spawn(f"relay-{i + 1}", argv)
        anyio.run(self._push, i, replicas)

    async def _push(self, i: int, replicas: int) -> None:
        """What the sync sidecar does: the agent's services, then the cluster (ready after)."""
        client = self.control(i)
        with anyio.fail_after(30):
            while True:
                try:
                    await client.health()
                    break
                except ControlSocketError:  # not listening yet
                    await anyio.sleep(0.05)
            service = [{"name": "echo", "port": self.public_port}]
            status, body = await client.put_agent(AGENT, service)
            if status != 200:
                raise BenchError(f"relay {i + 1}: PUT /agents/{AGENT}: {status} {body}")
        await self.set_replicas(i, replicas)

    async def set_replicas(self, i: int, replicas: int) -> None:
        status, body = await self.control(i).set_cluster(replicas)
        if status != 200:
            raise BenchError(f"relay {i + 1}: PUT /cluster: {status} {body}")

    def stop_relay(self, i: int) -> None:
        relay = self.relays[i]
        assert relay is not None
        relay.send_signal(signal.SIGTERM)
        relay.wait(30)
        self.relays[i] = None

    def start_agent(self) -> None:
        pki = self.pki
        config = self.dir / "agent.toml"
        config.write_text(
            f'[agent]\nrelay = "localhost:{self.agent_port}"\nca = "{pki / "ca.crt"}"\n'
            f'cert = "{pki / "bench.crt"}"\nkey = "{pki / "bench.key"}"\n'
            f"probe_interval = {self.probe_interval}\n"
            '[services]\necho = "127.0.0.1:9"\n'  # no traffic here: only the tunnels count
        )
        self.lab.spawn("agent", [sys.executable, "-c", LIMITED, "agent", "--config", str(config)])

    def connected(self, i: int) -> bool:
        try:
            url = f"http://{HOSTS[i]}:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return False
        match = re.search(r"^atlax_agents_connected ([0-9.e+]+)$", text, re.M)
        return bool(match and float(match.group(1)) >= 1)

    def wait(self, want: list[bool], timeout: float) -> float | None:
        """Until relay i reports the agent exactly when want[i]: seconds taken, None if not."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if [self.connected(i) for i in range(len(HOSTS))] == want:
                return time.monotonic() - start
            time.sleep(0.05)
        return None

    def probes(self) -> int:
        """Connections HAProxy sent to the agent port so far (every dial of the agent)."""
        stats = self.haproxy.stats()
        return sum(int(row["stot"] or 0) for (fe, _), row in stats.items() if fe == "agent")


def run(probe_interval: float, steady_probes: int, cycles: int, log: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="atlax-fill-") as tmp, Lab(Path(tmp)) as lab:
        fill = FillLab(lab, probe_interval)
        try:
            fill.start_relay(0, 2)
            fill.start_relay(1, 2)
            fill.haproxy.start()
            for name in ("r1", "r2"):
                fill.haproxy.wait_status(name, "UP")
            for name in ("r3", "r4"):
                fill.haproxy.mark_down(name)
        except (HAProxyError, AssertionError) as exc:
            raise BenchError(f"haproxy: {exc}") from None
        try:
            fill.start_agent()
            if fill.wait([True, True, False, False], 60) is None:
                raise BenchError(f"the agent did not reach both relays in 60 s; logs in {tmp}")
            results = []
            for n in range(cycles):
                log(f"cycle {n + 1}/{cycles}: steady at 2 for {steady_probes} probes ...")
                before = fill.probes()
                deadline = time.monotonic() + steady_probes * probe_interval * 2 + 60
                while fill.probes() - before < steady_probes:
                    if time.monotonic() > deadline:
                        raise BenchError("the agent stopped probing; logs in " + tmp)
                    time.sleep(0.2)
                for i in (2, 3):  # ready, but not sent to yet
                    fill.start_relay(i, 4)
                for i in (0, 1):  # the count first, as a sync does within a second
                    anyio.run(fill.set_replicas, i, 4)
                dials = fill.probes()
                for name in ("r3", "r4"):
                    fill.haproxy.mark_up(name)
                seconds = fill.wait([True] * 4, 600)
                dials = fill.probes() - dials
                log(f"  2 -> 4: {'not filled in 600 s' if seconds is None else f'{seconds:.1f} s'}")
                results.append({"seconds": seconds, "dials": dials})
                for i in (0, 1):
                    anyio.run(fill.set_replicas, i, 2)
                for name in ("r3", "r4"):
                    fill.haproxy.mark_down(name)
                if fill.wait([True, True, False, False], 60) is None:
                    raise BenchError(
                        "the agent kept the tunnels to the stale relays; logs in " + tmp
                    )
                for i in (2, 3):
                    fill.stop_relay(i)
        finally:
            fill.haproxy.stop()
    filled = [r["seconds"] for r in results if r["seconds"] is not None]
    return {
        "probe_interval": probe_interval,
        "steady_probes": steady_probes,
        "fill_seconds": [r["seconds"] for r in results],
        "fill_dials": [r["dials"] for r in results],
        "median_seconds": statistics.median(filled) if filled else None,
    }


def simulated_fill(rng: random.Random, before: int, after: int, steady: int) -> float:
    """One cycle on the pure policy: seconds from the larger count to a full pool."""
    handshake = 0.05
    policy = TunnelPoolPolicy(PoolConfig(), random.Random(rng.random()), 0.0)
    size, now = before, 0.0

    def dial() -> None:
        nonlocal now
        now = max(now, policy.next_dial_at()) + handshake
        instance = rng.randrange(size)  # the balancer's random choice
        if policy.verdict(instance, size, now) is Verdict.JOIN:
            policy.joined(instance, size, now)
        else:
            policy.duplicate(now)

    while policy.held < before:
        dial()
    for _ in range(steady):
        dial()
    size, now = after, now + rng.uniform(0, policy.config.probe_interval)
    start = now
    for instance in range(before):
        policy.cluster(instance, after, now)
    while policy.held < after:
        dial()
    return now - start


def simulate(runs: int, steady_probes: int) -> dict[str, Any]:
    rng = random.Random(7)
    out: dict[str, Any] = {"runs": runs, "steady_probes": steady_probes}
    for before, after in ((2, 4), (4, 6)):
        times = sorted(simulated_fill(rng, before, after, steady_probes) for _ in range(runs))
        out[f"{before}->{after}"] = {
            "p50": round(times[runs // 2], 1),
            "p90": round(times[runs * 9 // 10], 1),
            "p99": round(times[runs * 99 // 100], 1),
            "over_60s": sum(t > 60 for t in times) / runs,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atlax.bench.fill", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("--probe-interval", type=float, default=3.0, help="the agent's (s)")
    parser.add_argument(
        "--steady-probes", type=int, default=40, help="probes at 2 before each growth"
    )
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument(
        "--simulate", type=int, metavar="N", help="N cycles on the pure policy instead"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.simulate:
            results = simulate(args.simulate, args.steady_probes)
        else:
            results = run(args.probe_interval, args.steady_probes, args.cycles, log)
    except BenchError as exc:
        print(f"atlax.bench.fill: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
