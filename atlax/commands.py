"""What each `atlax` subcommand does (ca, cert, relay, agent, demo), given its parsed flags."""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .addresses import parse_host_port
from .config import (
    AgentConfig,
    AgentSettings,
    ConfigError,
    load_agent_config,
    load_relay_config,
    parse_service_mapping,
)
from .logs import describe
from .tls import agent_context

if TYPE_CHECKING:
    from .relay_main import RelayMain

log = logging.getLogger("atlax")


class UsageError(Exception):
    """Bad command-line input that argparse itself cannot catch."""


# -- commands ------------------------------------------------------------------------------------


def cmd_ca_init(args: argparse.Namespace) -> int:
    from . import certs  # cryptography costs ~8 MB: only the commands that mint load it

    ca = certs.create_ca(args.name, certs.parse_lifetime(args.lifetime))
    crt, key = certs.write_ca(ca, Path(args.dir), overwrite=args.force)
    print(f"wrote {crt} and {key}")
    return 0


def cmd_cert_issue(args: argparse.Namespace) -> int:
    from . import certs

    ca = certs.load_ca(Path(args.ca_dir))
    if args.server:
        lifetime = certs.parse_lifetime(args.lifetime or "365d")
        pair = certs.issue_server_certificate(ca, args.name, args.san or [args.name], lifetime)
    else:
        if args.san:
            raise UsageError("--san applies to --server certificates only")
        lifetime = certs.parse_lifetime(args.lifetime or "90d")
        pair = certs.issue_client_certificate(ca, args.name, lifetime)
    crt, key = certs.write_pair(pair, Path(args.out_dir), args.name)
    print(f"wrote {crt} and {key} (valid until {pair.not_valid_after:%Y-%m-%d %H:%M} UTC)")
    if args.client:
        print(f"key pin: {certs.key_pin(pair.cert)}")
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    config = load_relay_config(Path(args.config))
    if config.relay.control_socket is not None and config.agents:
        raise ConfigError(
            f"{args.config}: [[agents]] cannot be combined with control_socket; "
            "with a control socket, agents come from the control API only"
        )
    workers = config.relay.workers if args.workers is None else args.workers
    # --workers wins over the file, in what the relay counts and advertises (cluster size) too.
    config = config.model_copy(
        update={"relay": config.relay.model_copy(update={"workers": workers})}
    )
    if args.worker:  # started by a supervisor (not in --help)
        from .relay_main import RelayMain, WorkerSpec, die_with_supervisor

        spec = WorkerSpec.from_json(args.worker)
        die_with_supervisor(spec.supervisor)
        worker = RelayMain(config.relay, config.agents, tls_wait=args.wait_for_tls, worker=spec)
        return _run(_serve_relay, worker)
    if workers > 1:
        from .supervisor.main import Supervisor

        supervisor = Supervisor(
            config,
            Path(args.config).resolve(),
            workers,
            tls_wait=args.wait_for_tls,
            log_level=args.log_level,
        )
        return _run(_supervise, supervisor)
    from .relay_main import RelayMain

    relay = RelayMain(config.relay, config.agents, tls_wait=args.wait_for_tls)
    return _run(_serve_relay, relay)


async def _supervise(supervisor: Any) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.serve)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                clean = await supervisor.shutdown()
                tg.cancel_scope.cancel()
                if not clean:
                    raise SystemExit(1)
                return


async def _serve_relay(relay: RelayMain) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(relay.serve)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                await relay.shutdown()
                tg.cancel_scope.cancel()
                return


def cmd_agent(args: argparse.Namespace) -> int:
    from .agent import Agent

    config = _agent_config(args)
    if not config.services:
        raise UsageError(
            "the agent exposes no service: give --service NAME=HOST:PORT[/udp] or [services]"
        )
    # Unusable files are a mistake to report now, not a network fault to retry forever.
    agent_context(config.agent.ca, config.agent.cert, config.agent.key)
    agent = Agent(config.agent, config.services)
    for name, target in sorted(config.services.items()):
        log.info("exposing service %r -> %s", name, target)
    return _run(_until_signal, agent.run)


def _agent_config(args: argparse.Namespace) -> AgentConfig:
    flags = {"relay": args.relay, "ca": args.ca, "cert": args.cert, "key": args.key}
    if args.config:
        config = load_agent_config(Path(args.config))
        updates: dict[str, Any] = {}
        if args.relay:
            updates["relay"] = parse_host_port(args.relay)
        for key in ("ca", "cert", "key"):
            if flags[key]:
                updates[key] = Path(flags[key]).resolve()
        if args.server_name:
            updates["server_name"] = args.server_name
        if args.backoff_cap is not None:
            updates["backoff_cap"] = args.backoff_cap
        services = dict(config.services)
        services.update(parse_service_mapping(s) for s in args.service)
        return AgentConfig(agent=config.agent.model_copy(update=updates), services=services)
    missing = [f"--{k}" for k, v in flags.items() if not v]
    if missing:
        raise UsageError(f"give --config FILE, or all of {', '.join(missing)}")
    try:
        settings = AgentSettings(
            relay=parse_host_port(args.relay),
            ca=Path(args.ca).resolve(),
            cert=Path(args.cert).resolve(),
            key=Path(args.key).resolve(),
            server_name=args.server_name,
            **({"backoff_cap": args.backoff_cap} if args.backoff_cap is not None else {}),
        )
    except ValueError as exc:
        raise UsageError(describe(exc)) from None
    services = dict(parse_service_mapping(s) for s in args.service)
    return AgentConfig(agent=settings, services=services)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    def ready(url: str) -> None:
        print(f"Atlax demo is up. Public URL: {url}", flush=True)
        print(f"Try: curl {url}    (Ctrl-C to stop)", flush=True)

    from .relay import PortConflictError

    async def main() -> None:
        try:
            await run_demo(args.public_port, args.agent_port, ready)
        except* PortConflictError as group:
            hint = "pick another with --public-port (0 = any free port)"
            raise UsageError(f"{group.exceptions[0]}; {hint}") from None

    return _run(_until_signal, main)


async def _until_signal(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(main)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                tg.cancel_scope.cancel()
                return


def _run(func: Callable[..., Awaitable[None]], *args: Any) -> int:
    options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        options["use_uvloop"] = True
    except ImportError:
        pass
    anyio.run(func, *args, backend="asyncio", backend_options=options)
    return 0
