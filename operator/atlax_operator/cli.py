"""`atlax operator`: the kopf operator (outside a cluster with KUBECONFIG, in a pod in-cluster)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .handlers import OperatorConfig

log = logging.getLogger("atlax.operator")


class OperatorError(Exception):
    """A start-up problem, as one line for the user."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "operator",
        help="run the Kubernetes operator for TunnelAgent resources",
        description="Watch TunnelAgents in --namespace: mint each agent's certificate into "
        "Secret atlax-agent-NAME, open its ports on the relay through the control socket and on "
        "the relay's Service, and report live state in status. Uses $KUBECONFIG outside a cluster.",
    )
    p.add_argument(
        "--namespace", required=True, help="namespace of the TunnelAgents, Secrets and Service"
    )
    p.add_argument("--control-socket", required=True, type=Path, help="the relay's control socket")
    p.add_argument(
        "--service-name",
        default="atlax-relay",
        help="the relay's LoadBalancer Service (default atlax-relay)",
    )
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
        "--relay-tls-dir",
        type=Path,
        help="write ca.crt, relay.crt, relay.key here for the relay container",
    )
    p.add_argument(
        "--status-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how often live state is copied into status (default 10)",
    )
    p.add_argument(
        "--public-address",
        help="address shown in status when the Service has no load-balancer address",
    )
    p.add_argument(
        "--certificates-only",
        action="store_true",
        help="prepare the CA and the relay certificate (written to --relay-tls-dir), then exit "
        "(the chart's init container, so that the relay starts with its certificate)",
    )
    p.set_defaults(func=run)

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


def run(args: argparse.Namespace) -> int:
    try:
        import kopf  # noqa: F401

        from . import kube
        from .handlers import OperatorConfig, build_registry
    except ImportError as exc:
        raise OperatorError(
            f"the operator needs the 'operator' extra (pip install 'atlax[operator]'): {exc}"
        ) from None
    if args.status_interval <= 0:
        raise OperatorError(f"--status-interval must be positive, not {args.status_interval:g}")
    host, sep, port = args.relay_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OperatorError(f"--relay-address must be HOST:PORT, not {args.relay_address!r}")
    try:
        kube.load_config()
    except kube.KubernetesAccessError as exc:
        raise OperatorError(str(exc)) from None
    config = OperatorConfig(
        namespace=args.namespace,
        control_socket=args.control_socket,
        service_name=args.service_name,
        relay_address=args.relay_address,
        relay_sans=tuple(args.relay_san or [host.strip("[]")]),
        relay_tls_dir=args.relay_tls_dir,
        status_interval=args.status_interval,
        public_address=args.public_address,
    )
    logging.getLogger("kopf").setLevel(logging.WARNING)
    asyncio.run(_serve(config, build_registry, certificates_only=args.certificates_only))
    return 0


def run_uninstall(args: argparse.Namespace) -> int:
    try:
        from . import kube
        from .uninstall import uninstall
    except ImportError as exc:
        raise OperatorError(
            f"the operator needs the 'operator' extra (pip install 'atlax[operator]'): {exc}"
        ) from None
    if args.timeout < 0:
        raise OperatorError(f"--timeout must not be negative, not {args.timeout:g}")
    try:
        kube.load_config()
    except kube.KubernetesAccessError as exc:
        raise OperatorError(str(exc)) from None
    try:
        asyncio.run(uninstall(args.namespace, args.timeout))
    except Exception as exc:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        if isinstance(exc, (ApiException, HTTPError)):
            raise OperatorError(
                f"cannot uninstall in namespace {args.namespace!r}: {kube.describe(exc)}"
            ) from None
        raise
    return 0


async def _serve(
    config: OperatorConfig, build_registry: Any, *, certificates_only: bool = False
) -> None:
    """Check the API and prepare certificates (errors as one line), then run kopf until a signal."""
    import kopf
    import urllib3
    from kubernetes.client.exceptions import ApiException

    from . import GROUP, PLURAL, VERSION, kube

    registry, reconciler = build_registry(config)
    try:
        await kube.check_access(config.namespace, GROUP, VERSION, PLURAL)
        await reconciler.startup()
    except kube.KubernetesAccessError as exc:
        raise OperatorError(str(exc)) from None
    except (ApiException, urllib3.exceptions.HTTPError) as exc:
        raise OperatorError(
            f"cannot prepare the CA and relay certificate in namespace {config.namespace!r}: "
            f"{kube.describe(exc)}"
        ) from None
    if certificates_only:
        where = f" in {config.relay_tls_dir}" if config.relay_tls_dir else ""
        log.info("the CA and the relay certificate are ready%s", where)
        return
    await reconciler.wait_for_relay()
    async with asyncio.TaskGroup() as tg:
        keeper = tg.create_task(reconciler.keep_relay_certificate())
        syncer = tg.create_task(reconciler.keep_relay_synced())
        try:
            await kopf.operator(
                registry=registry,
                standalone=True,
                namespaces=[config.namespace],
                clusterwide=False,
            )
        finally:
            keeper.cancel()
            syncer.cancel()
