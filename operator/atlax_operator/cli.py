"""`atlax operator`: the Kubernetes operator, in one of its roles (or both, for a single relay).

- `atlax operator controller`: leader-elected (a Lease); certificates, the Service's ports, status.
- `atlax operator sync`: beside every relay; makes its relay hold what the TunnelAgents say.
- `atlax operator --control-socket PATH`: both in one process, for one relay (no election).

Outside a cluster with $KUBECONFIG, in a pod with its ServiceAccount.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the operator's modules need its extra: imported when a role runs
    from .election import Election
    from .handlers import ControllerConfig
    from .sync import RelaySync

log = logging.getLogger("atlax.operator")

RELAY_START_TIMEOUT = 120.0  # the chart's relay waits as long for its certificate


class OperatorError(Exception):
    """A start-up problem, as one line for the user."""


# -- options -------------------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _common(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument(
        "--namespace",
        required=required,
        help="namespace of the TunnelAgents, Secrets, Service and Leases",
    )
    p.add_argument(
        "--service-name",
        default="atlax-relay",
        help="the relay's LoadBalancer Service (default atlax-relay)",
    )


def _controller_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--relay-address",
        default="atlax-relay:7443",
        metavar="HOST:PORT",
        help="address agents dial, written into their Secrets",
    )
    p.add_argument(
        "--relay-san",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="subject alternative names of the relay certificate (repeatable; "
        "default: the host of --relay-address)",
    )
    p.add_argument(
        "--status-interval",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="how often live state is copied into status (default 10)",
    )
    p.add_argument(
        "--public-address",
        help="address shown in status when the Service has no load-balancer address",
    )


def register(sub: Any) -> None:
    p = sub.add_parser(
        "operator",
        help="run the Kubernetes operator for TunnelAgent resources",
        description="Without a ROLE: both roles in one process, for a single relay (the relay's "
        "control socket is --control-socket). Watch TunnelAgents in --namespace: mint each "
        "agent's certificate into Secret atlax-agent-NAME, open its ports on the relay and on the "
        "relay's Service, and report live state in status. With several relays, run the roles "
        "apart: one `controller` (two for high availability: they elect a leader) and one `sync` "
        "beside every relay. Uses $KUBECONFIG outside a cluster.",
    )
    _common(p, required=False)
    p.add_argument("--control-socket", type=Path, help="the relay's control socket")
    _controller_options(p)
    p.add_argument(
        "--relay-tls-dir",
        type=Path,
        help="write ca.crt, relay.crt, relay.key here for the relay container",
    )
    p.add_argument(
        "--certificates-only",
        action="store_true",
        help="prepare the CA and the relay certificate (written to --relay-tls-dir), then exit "
        "(the chart's init container, so that the relay starts with its certificate)",
    )
    p.set_defaults(func=run)
    roles = p.add_subparsers(dest="role", metavar="ROLE")

    c = roles.add_parser(
        "controller",
        help="the leader-elected controller: certificates, the Service's ports, status",
        description="Campaign for Lease --lease-name; while holding it, mint agent certificates "
        "into Secrets, the relay's certificate into Secret atlax-relay-tls (every relay pod "
        "mounts it), grant each TunnelAgent its ports on the relay Service, and write status from "
        "the relays' reports. A controller that cannot renew the Lease within --renew-deadline "
        "stops acting at once; on SIGTERM it releases the Lease.",
    )
    _common(c)
    _controller_options(c)
    c.add_argument("--lease-name", default="atlax-controller", help="the election's Lease")
    c.add_argument(
        "--identity",
        default=os.environ.get("POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}",
        help="this candidate's name in the Lease (default: $POD_NAME, else host_random)",
    )
    c.add_argument(
        "--lease-duration",
        type=_positive,
        default=15.0,
        metavar="SECONDS",
        help="how long a silent leader's Lease holds off the others (default 15)",
    )
    c.add_argument(
        "--renew-deadline",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="a leader that has not renewed for this long stops acting (default 10)",
    )
    c.add_argument(
        "--retry-period",
        type=_positive,
        default=2.0,
        metavar="SECONDS",
        help="how often the leader renews and the others look (default 2)",
    )
    c.set_defaults(func=run_controller)

    s = roles.add_parser(
        "sync",
        help="the sidecar of a relay pod: its relay holds what the TunnelAgents say",
        description="Watch TunnelAgents, the relay Service and its EndpointSlices (read only); "
        "through --control-socket, give the relay every agent whose ports the controller granted "
        "on the Service and revoke the others, tell it how many relay pods can take agents, and "
        "publish what it holds in Lease atlax-report-POD for the controller. With --health-port, "
        "/readyz says when the pod may take public connections.",
    )
    _common(s)
    s.add_argument(
        "--control-socket", type=Path, required=True, help="this pod's relay's control socket"
    )
    s.add_argument(
        "--pod-name",
        default=os.environ.get("POD_NAME") or socket.gethostname(),
        help="this relay pod's name (default: $POD_NAME, else the host name)",
    )
    s.add_argument(
        "--pod-uid",
        default=os.environ.get("POD_UID") or None,
        help="this pod's uid, to own its report Lease (default: $POD_UID)",
    )
    s.add_argument(
        "--interval",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="read the cluster and refresh the report at least this often (default 10)",
    )
    s.add_argument(
        "--health-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve GET /readyz (200 once the relay has its state and the tunnels of every "
        "connected agent, else 503) and /healthz on this port; 0: none (default)",
    )
    s.add_argument(
        "--join-grace",
        type=_positive,
        default=30.0,
        metavar="SECONDS",
        help="/readyz says 200 this long after the relay took its state even if a connected "
        "agent has not reached it (default 30)",
    )
    s.set_defaults(func=run_sync)

    u = sub.add_parser(
        "operator-uninstall",
        help="revoke every TunnelAgent and delete the CA (helm uninstall runs this)",
        description="Decommission Atlax in --namespace: delete every TunnelAgent (the running "
        "operator revokes each at the relay; their Secrets are garbage-collected), remove the "
        "operator's finalizer from any it did not handle within --timeout, then delete Secrets "
        "atlax-ca and atlax-relay-tls. The Helm chart runs this as its pre-delete hook.",
    )
    u.add_argument("--namespace", required=True, help="namespace of the TunnelAgents")
    u.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long the operator gets to revoke them (default 60)",
    )
    u.set_defaults(func=run_uninstall)


# -- running -------------------------------------------------------------------------------------


def _prepare() -> None:
    """The operator's libraries and the Kubernetes configuration, or one line saying why not."""
    try:
        import kopf  # noqa: F401

        from . import kube
    except ImportError as exc:
        raise OperatorError(
            f"the operator needs the 'operator' extra (pip install 'atlax[operator]'): {exc}"
        ) from None
    try:
        kube.load_config()
    except kube.KubernetesAccessError as exc:
        raise OperatorError(str(exc)) from None
    logging.getLogger("kopf").setLevel(logging.WARNING)


def _controller_config(args: argparse.Namespace, tls_dir: Path | None) -> ControllerConfig:
    from .handlers import ControllerConfig

    host, sep, port = args.relay_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OperatorError(f"--relay-address must be HOST:PORT, not {args.relay_address!r}")
    return ControllerConfig(
        namespace=args.namespace,
        service_name=args.service_name,
        relay_address=args.relay_address,
        relay_sans=tuple(args.relay_san or [host.strip("[]")]),
        relay_tls_dir=tls_dir,
        status_interval=args.status_interval,
        public_address=args.public_address,
    )


def run(args: argparse.Namespace) -> int:
    """Both roles, one relay."""
    missing = [
        f
        for f, v in (("--namespace", args.namespace), ("--control-socket", args.control_socket))
        if not v
    ]
    if missing:
        raise OperatorError(
            f"atlax operator needs {' and '.join(missing)} (or a role: "
            "atlax operator controller|sync --help)"
        )
    _prepare()
    config = _controller_config(args, args.relay_tls_dir)
    asyncio.run(_serve_both(config, args.control_socket, certificates_only=args.certificates_only))
    return 0


def run_uninstall(args: argparse.Namespace) -> int:
    if args.timeout < 0:
        raise OperatorError(f"--timeout must not be negative, not {args.timeout:g}")
    _prepare()
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from . import kube
    from .uninstall import uninstall

    try:
        asyncio.run(uninstall(args.namespace, args.timeout))
    except (ApiException, HTTPError) as exc:
        raise OperatorError(
            f"cannot uninstall in namespace {args.namespace!r}: {kube.describe(exc)}"
        ) from None
    return 0


def run_controller(args: argparse.Namespace) -> int:
    from .election import Election

    try:
        election = Election(
            args.identity, args.lease_duration, args.renew_deadline, args.retry_period
        )
    except ValueError as exc:
        raise OperatorError(str(exc)) from None
    _prepare()
    config = _controller_config(args, None)
    asyncio.run(_serve_controller(config, args.lease_name, election))
    return 0


def run_sync(args: argparse.Namespace) -> int:
    _prepare()
    from .reports import LeaseReports
    from .sync import RelaySync, SyncConfig

    config = SyncConfig(
        namespace=args.namespace,
        control_socket=args.control_socket,
        service_name=args.service_name,
        pod=args.pod_name,
        interval=args.interval,
        join_grace=args.join_grace,
    )
    reports = LeaseReports(
        args.namespace,
        args.service_name,
        pod=args.pod_name,
        pod_uid=args.pod_uid,
        ttl=3 * args.interval,
    )
    asyncio.run(_serve_sync(RelaySync(config, reports), args.health_port))
    return 0


async def _check(namespace: str) -> None:
    from kubernetes.client.exceptions import ApiException

    from . import GROUP, PLURAL, VERSION, kube

    try:
        await kube.check_access(namespace, GROUP, VERSION, PLURAL)
    except kube.KubernetesAccessError as exc:
        raise OperatorError(str(exc)) from None
    except ApiException as exc:  # pragma: no cover - check_access maps what it expects
        raise OperatorError(kube.describe(exc)) from None


async def _certificates(reconciler: Any, namespace: str) -> None:
    """The CA and the relay's certificate, before anything else (errors as one line)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    from . import kube

    try:
        await reconciler.startup()
    except (kube.KubernetesAccessError, ApiException, urllib3.exceptions.HTTPError) as exc:
        raise OperatorError(
            f"cannot prepare the CA and relay certificate in namespace {namespace!r}: "
            f"{kube.describe(exc)}"
        ) from None


async def _kopf(registry: Any, namespace: str) -> None:
    import kopf

    await kopf.operator(
        registry=registry, standalone=True, namespaces=[namespace], clusterwide=False
    )


async def _serve_both(
    config: ControllerConfig, control_socket: Path, *, certificates_only: bool = False
) -> None:
    """`atlax operator`: the controller (no election) and the sync of the one relay; the report
    goes from one to the other in memory. Runs until a signal (kopf's). The relay starts once
    the certificate written here is there: kopf starts once the relay answers (or after
    RELAY_START_TIMEOUT), so that a normal start is not reported as a failure."""
    from .handlers import build_registry
    from .reports import MemoryReports, ReportCache
    from .sync import RelaySync, SyncConfig

    memory = MemoryReports()
    registry, reconciler = build_registry(config, ReportCache(memory, max_age=0))
    sync = RelaySync(
        SyncConfig(
            namespace=config.namespace,
            control_socket=control_socket,
            service_name=config.service_name,
            pod=socket.gethostname(),
            count_replicas=False,
            interval=config.status_interval,
        ),
        memory,
    )
    await _check(config.namespace)
    await _certificates(reconciler, config.namespace)
    if certificates_only:
        where = f" in {config.relay_tls_dir}" if config.relay_tls_dir else ""
        log.info("the CA and the relay certificate are ready%s", where)
        return
    async with asyncio.TaskGroup() as tg:
        helpers = [tg.create_task(reconciler.keep_relay_certificate()), tg.create_task(sync.run())]
        await _wait_for_relay(sync, control_socket)
        try:
            await _kopf(registry, config.namespace)
        finally:
            for task in helpers:
                task.cancel()


async def _wait_for_relay(sync: RelaySync, control_socket: Path) -> None:
    if not sync.relay_ready.is_set():
        log.info("waiting for the relay's control socket %s", control_socket)
    try:
        async with asyncio.timeout(RELAY_START_TIMEOUT):
            await sync.relay_ready.wait()
    except TimeoutError:
        log.warning(
            "the relay does not answer after %gs; starting anyway, TunnelAgents are retried "
            "until it does",
            RELAY_START_TIMEOUT,
        )
        return
    log.info("relay is up (relay id %s)", sync.relay_id)


async def _serve_controller(config: ControllerConfig, lease: str, election: Election) -> None:
    """Campaign; while leading: certificates, kopf, the relay certificate's renewals. SIGTERM
    (ours while following, kopf's while it runs) releases the Lease and ends the process."""
    from .handlers import build_registry
    from .leader import LeaderElector
    from .reports import LeaseReports, ReportCache

    reports = ReportCache(
        LeaseReports(config.namespace, config.service_name), max_age=config.status_interval / 2
    )
    registry, reconciler = build_registry(config, reports)
    await _check(config.namespace)
    stopping = asyncio.Event()
    install = _signals(stopping.set)

    async def lead() -> None:
        await _certificates(reconciler, config.namespace)
        try:
            async with asyncio.TaskGroup() as tg:
                keeper = tg.create_task(reconciler.keep_relay_certificate())
                try:
                    await _kopf(registry, config.namespace)
                finally:
                    keeper.cancel()
        finally:
            install()  # kopf leaves its own signal handlers behind
        stopping.set()  # kopf returns by itself only when it got SIGTERM or SIGINT
        await asyncio.Event().wait()

    elector = LeaderElector(config.namespace, lease, election)
    async with asyncio.TaskGroup() as tg:
        campaign = tg.create_task(elector.run(lead))
        await stopping.wait()
        campaign.cancel()  # releases the Lease if held


async def _serve_sync(sync: RelaySync, health_port: int = 0) -> None:
    await _check(sync.config.namespace)
    stopping = asyncio.Event()
    _signals(stopping.set)
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(sync.run())]
        if health_port:
            tasks.append(tg.create_task(_serve_health(sync, health_port)))
        await stopping.wait()
        for task in tasks:
            task.cancel()  # the sync's last report: this relay is not ready any more


async def _serve_health(sync: RelaySync, port: int) -> None:
    """/readyz: the sync's serving readiness (the pod's readiness probe); /healthz: it runs."""
    import anyio

    from atlax.http import Request, Response, serve_http_connection

    async def app(request: Request) -> Response:
        if request.path == "/healthz":
            return Response.json(200, {"status": "ok"})
        if request.path == "/readyz":
            ready, why = sync.serving
            return Response.json(200 if ready else 503, {"ready": ready, "detail": why})
        return Response.error(404, f"no such endpoint: {request.path}")

    listener = await anyio.create_tcp_listener(local_port=port, reuse_port=False)
    log.info("readiness on port %d (/readyz)", port)
    await listener.serve(lambda stream: serve_http_connection(stream, app))


def _signals(stop: Callable[[], None]) -> Callable[[], None]:
    """Install SIGTERM/SIGINT handlers calling `stop`; returns the installer, to run again."""
    loop = asyncio.get_running_loop()

    def install() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop)

    install()
    return install
