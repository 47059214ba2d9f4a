"""The `atlax` command. Errors reach the user as one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from . import __version__
from .commands import (
    UsageError,
    cmd_agent,
    cmd_ca_init,
    cmd_cert_issue,
    cmd_demo,
    cmd_relay,
)
from .config import ConfigError
from .logs import describe
from .tls import CertificateError, TLSConfigError

# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlax",
        description="Atlax: a reverse TLS tunnel. A relay with a public address forwards TCP "
        "ports through one mutually authenticated TLS 1.3 connection to an agent behind NAT.",
    )
    parser.add_argument("--version", action="version", version=f"atlax {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ca = sub.add_parser("ca", help="manage the certificate authority", description="Manage the CA.")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    init = ca_sub.add_parser(
        "init",
        help="create a CA (ca.crt, ca.key)",
        description="Create a new CA: writes ca.crt and ca.key (mode 0600) into --dir.",
    )
    init.add_argument("--dir", required=True, help="directory to write ca.crt and ca.key into")
    init.add_argument("--name", default="Atlax CA", help="the CA's Common Name")
    init.add_argument(
        "--lifetime", default="3650d", help="validity, e.g. 3650d, 10y (default 3650d)"
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing CA")
    init.set_defaults(func=cmd_ca_init)

    cert = sub.add_parser(
        "cert", help="issue certificates", description="Issue certificates from the CA."
    )
    cert_sub = cert.add_subparsers(dest="cert_command", metavar="ACTION", required=True)
    issue = cert_sub.add_parser(
        "issue",
        help="issue an agent (client) or relay (server) certificate",
        description="Issue a certificate signed by the CA in --ca-dir. Writes NAME.crt and "
        "NAME.key (mode 0600) into --out-dir. For --client the Common Name NAME is the agent's "
        "identity; for --server give the relay's DNS names and IPs with --san.",
    )
    issue.add_argument("--ca-dir", required=True, help="directory holding ca.crt and ca.key")
    issue.add_argument(
        "--name", required=True, help="Common Name (the agent identity for --client)"
    )
    kind = issue.add_mutually_exclusive_group(required=True)
    kind.add_argument("--client", action="store_true", help="an agent certificate")
    kind.add_argument("--server", action="store_true", help="a relay certificate")
    issue.add_argument(
        "--san",
        action="append",
        metavar="NAME_OR_IP",
        help="subject alternative name (repeatable; --server only)",
    )
    issue.add_argument(
        "--lifetime", help="validity, e.g. 90d, 12h (default 90d client, 365d server)"
    )
    issue.add_argument(
        "--out-dir", required=True, help="directory to write NAME.crt and NAME.key into"
    )
    issue.set_defaults(func=cmd_cert_issue)

    relay = sub.add_parser(
        "relay",
        help="run the relay",
        description="Run the relay: accept agents over mutual TLS on [relay].listen and forward "
        "each configured public port to its agent's service. SIGTERM drains open streams.",
    )
    relay.add_argument("--config", required=True, help="relay.toml (see README)")
    relay.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="run N relay processes sharing every port (SO_REUSEPORT) under a supervisor that "
        "owns the control socket and metrics; default: `workers` in [relay], else 1",
    )
    relay.add_argument("--worker", help=argparse.SUPPRESS)  # what a supervisor tells a worker
    relay.add_argument(
        "--wait-for-tls",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for the CA/certificate/key files to appear (in a pod, the "
        "operator writes them); default 0",
    )
    relay.set_defaults(func=cmd_relay)

    agent = sub.add_parser(
        "agent",
        help="run an agent",
        description="Run an agent: dial the relay, keep the tunnel up, forward streams to the "
        "local services given here. Flags override --config values.",
    )
    agent.add_argument("--config", help="agent.toml (see README)")
    agent.add_argument("--relay", metavar="HOST:PORT", help="the relay's agent address")
    agent.add_argument("--ca", help="CA certificate that issued the relay's certificate")
    agent.add_argument("--cert", help="this agent's client certificate")
    agent.add_argument("--key", help="this agent's private key")
    agent.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT[/udp]",
        help="expose a local service under NAME, a UDP one with /udp (repeatable)",
    )
    agent.add_argument(
        "--server-name", help="relay host name to verify (default: the host of --relay)"
    )
    agent.add_argument(
        "--backoff-cap", type=float, help="longest wait between reconnects, seconds (default 30)"
    )
    agent.set_defaults(func=cmd_agent)

    demo = sub.add_parser(
        "demo",
        help="run a relay, an agent and a web service on this machine",
        description="The embedded default: a throwaway CA, a relay, an agent and a small HTTP "
        "service, all on 127.0.0.1. Prints the public URL and serves until Ctrl-C.",
    )
    demo.add_argument(
        "--public-port",
        type=int,
        default=8080,
        help="public port on 127.0.0.1 (default 8080; 0 = any free port)",
    )
    demo.add_argument(
        "--agent-port", type=int, default=0, help="agent (mTLS) port (default: any free port)"
    )
    demo.set_defaults(func=cmd_demo)

    _extend(sub)
    return parser


def _extend(sub: Any) -> None:
    """Commands that live in their own modules (control API client, operator)."""
    for module in ("atlax.relayctl", "atlax_operator.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError:
            continue
        mod.register(sub)


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError("must be between 1 and 64")
    return value


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"atlax: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the user's to fix, reported as one line.

    Looked up when needed, so that `atlax relayctl` never loads the relay: a relay error can
    only have been raised by a command that imported the relay.
    """
    from .control.client import ControlSocketError

    errors: list[type[BaseException]] = [
        ControlSocketError,
        UsageError,
        ConfigError,
        CertificateError,
        TLSConfigError,
    ]
    if "atlax.relay" in sys.modules:
        from .relay import PortConflictError

        errors.append(PortConflictError)
    if "atlax.supervisor.workers" in sys.modules:
        from .supervisor.workers import WorkerStartError

        errors.append(WorkerStartError)
    try:
        from atlax_operator.cli import OperatorError

        errors.append(OperatorError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    who = ""
    if getattr(args, "worker", None):  # a supervisor's worker: say which in every line
        try:
            who = f"worker {json.loads(args.worker)['index']} "
        except (ValueError, KeyError, TypeError):
            raise SystemExit("atlax: error: --worker is for the relay's supervisor only") from None
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s",
    )
    try:
        result: int = args.func(args)
        return result
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        leaves = list(_leaves(exc))
        users = user_errors()
        if not leaves or not all(isinstance(e, (*users, ValueError, OSError)) for e in leaves):
            raise  # a bug: keep the traceback
        fail("; ".join(dict.fromkeys(_user_message(e, users) for e in leaves)))


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _user_message(exc: BaseException, users: tuple[type[BaseException], ...]) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, users) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return describe(exc)


if __name__ == "__main__":
    sys.exit(main())
