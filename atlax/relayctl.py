"""`atlax relayctl`: the command-line client of the relay's control socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio

from .control.client import ControlClient, ControlSocketError

DEFAULT_SOCKET = "/run/atlax/control.sock"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "relayctl",
        help="talk to a running relay through its control socket",
        description="Query and change a running relay through its control socket (HTTP/JSON on a "
        "Unix socket; `curl --unix-socket PATH http://relay/agents` works too).",
    )
    p.add_argument(
        "--socket",
        default=os.environ.get("ATLAX_CONTROL_SOCKET", DEFAULT_SOCKET),
        help=f"control socket path (default $ATLAX_CONTROL_SOCKET or {DEFAULT_SOCKET})",
    )
    actions = p.add_subparsers(dest="relayctl_command", metavar="ACTION", required=True)
    actions.add_parser("health", help="is the relay alive", description="GET /healthz")
    actions.add_parser("list", help="all agents and their live state", description="GET /agents")
    get = actions.add_parser(
        "get",
        help="one agent's live state",
        description="GET /agents/NAME: the agent's state as JSON, with `instances`: one entry "
        "per relay instance that holds a tunnel of this agent.",
    )
    get.add_argument("name")
    cluster = actions.add_parser(
        "cluster",
        help="the relay instances: ids, workers, replicas, cluster size",
        description="GET /cluster; with --replicas, PUT /cluster: tell the relay how many relays "
        "serve behind its load balancer (the cluster size is its workers times that). A control "
        "client sends it after its agents: the relay counts as ready from then on.",
    )
    cluster.add_argument("--replicas", type=int, metavar="N", help="set the replicas")
    put = actions.add_parser(
        "put",
        help="set an agent's services and public ports",
        description="PUT /agents/NAME: all ports open or none (HTTP 409 names the port in use).",
    )
    put.add_argument("name")
    put.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME=PORT[/udp|/tls=HOSTS|/http=HOSTS]",
        help="service NAME on public PORT (repeatable): a UDP port with /udp; a port shared by "
        "hostname with /tls=nas.example.com,*.home.example.com (TLS SNI) or /http=... (Host)",
    )
    put.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="sha256:HEX",
        help="a key the agent may present (repeatable; `atlax cert issue` prints it). With "
        "pins, any other key of the same name is refused",
    )
    put.add_argument(
        "--json", dest="json_file", help="the request body from a JSON file ('-' = stdin)"
    )
    delete = actions.add_parser(
        "delete", help="remove an agent and revoke its identity", description="DELETE /agents/NAME"
    )
    delete.add_argument("name")
    p.set_defaults(func=run)


def _services(items: list[str]) -> list[dict[str, Any]]:
    services = []
    for item in items:
        name, sep, rest = item.partition("=")
        port, _, kind = rest.partition("/")
        kind, _, hosts = kind.partition("=")
        hostnames = [h for h in hosts.split(",") if h]
        if (
            not sep
            or not name
            or not port.isdigit()
            or kind not in ("", "tcp", "udp", "tls", "http")
            or (kind in ("tls", "http")) != bool(hostnames)
        ):
            raise ValueError(
                f"--service {item!r}: expected NAME=PORT, NAME=PORT/udp or "
                "NAME=PORT/tls=HOST,HOST (or /http=...), e.g. web=8080"
            )
        service: dict[str, Any] = {"name": name, "port": int(port)}
        if kind == "udp":
            service["protocol"] = "udp"
        elif hostnames:
            service.update(route=kind, hostnames=hostnames)
        services.append(service)
    return services


def run(args: argparse.Namespace) -> int:
    client = ControlClient(Path(args.socket))
    command = args.relayctl_command
    if command == "put":
        if args.json_file:
            try:
                text = (
                    sys.stdin.read() if args.json_file == "-" else Path(args.json_file).read_text()
                )
            except OSError as exc:
                raise ValueError(f"cannot read {args.json_file}: {exc.strerror}") from None
            try:
                body = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"{args.json_file}: not JSON: {exc}") from None
        else:
            body = {"services": _services(args.service)}
            if args.pin:
                body["pins"] = args.pin
        method, path, payload = "PUT", f"/agents/{args.name}", body
    elif command == "delete":
        method, path, payload = "DELETE", f"/agents/{args.name}", None
    elif command == "get":
        method, path, payload = "GET", f"/agents/{args.name}", None
    elif command == "list":
        method, path, payload = "GET", "/agents", None
    elif command == "cluster":
        if args.replicas is None:
            method, path, payload = "GET", "/cluster", None
        else:
            method, path, payload = "PUT", "/cluster", {"replicas": args.replicas}
    else:
        method, path, payload = "GET", "/healthz", None

    async def call() -> tuple[int, Any]:
        return await client.call(method, path, payload)

    async def size() -> int | None:
        status, cluster = await client.call("GET", "/cluster")
        return cluster.get("size") if status == 200 and isinstance(cluster, dict) else None

    status, data = anyio.run(call)
    if status >= 400:
        message = data.get("error") if isinstance(data, dict) else data
        raise ControlSocketError(f"{method} {path}: HTTP {status}: {message}")
    if command == "list" and isinstance(data, dict):
        _print_table(data.get("agents", []), anyio.run(size))
    else:
        print(json.dumps(data, indent=2))
    return 0


def _print_table(agents: list[dict[str, Any]], size: int | None) -> None:
    """One line per agent; INSTANCES: the relay instances holding its tunnel, of how many."""
    rows = [
        (
            "NAME",
            "CONNECTED",
            "INSTANCES",
            "PORTS",
            "STREAMS",
            "BYTES IN",
            "BYTES OUT",
            "LAST HEARTBEAT",
        )
    ]
    for a in agents:
        ports = ",".join(_port_text(s) for s in a.get("services", []))
        held = str(len(a.get("instances", [])))
        rows.append(
            (
                a["name"],
                "yes" if a["connected"] else "no",
                held if size is None else f"{held}/{size}",
                ports or "-",
                str(a["activeStreams"]),
                str(a["bytesIn"]),
                str(a["bytesOut"]),
                a.get("lastHeartbeat") or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _port_text(service: dict[str, Any]) -> str:
    text = f"{service['name']}:{service['port']}"
    if service.get("protocol") == "udp":
        return text + "/udp"
    if service.get("route"):
        return text + f"/{service['route']}={'+'.join(service.get('hostnames', []))}"
    return text
