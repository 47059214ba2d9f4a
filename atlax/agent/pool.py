"""The agent: a pool of tunnels, one to every relay instance behind the relay address.

The agent dials the one relay address (a load balancer picks the instance), keeps each tunnel
that reaches an instance it does not hold yet, closes duplicates, re-probes for new instances, and
re-dials a lost tunnel while the others keep serving; `TunnelPoolPolicy` decides when and which
(docs/high-availability.md). Streams arrive on any tunnel and are served alike. A relay that
advertises no instance id (an older relay) is one instance: the agent then keeps one tunnel, as
agents always did.

Certificates are read from disk on every dial. When the files change, every tunnel is replaced
make-before-break: a new tunnel to an instance is kept first, then the old one to it is drained
(for at most `drain_timeout`), so connections keep being served through a renewal. A new tunnel
that fails (say the relay does not accept the new key yet) leaves the old one serving.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.abc

from ..addresses import HostPort, ServiceTarget
from ..config import AgentSettings
from ..mux import MuxSession
from ..protocol import ErrorCode
from ..tls import file_fingerprint
from .policy import Instance, PoolConfig, TunnelPoolPolicy, Verdict
from .services import Services
from .tunnel import DialFailed, Tunnel, describe_end, going_away, refused

log = logging.getLogger("atlax.agent")


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        services: Mapping[str, HostPort | ServiceTarget],  # a HostPort is a TCP service
        *,
        cert_check_interval: float | None = None,  # settings.cert_check_interval if None
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._services = Services(services, settings.service_connect_timeout)
        self.services = self._services.targets  # by name; tests may change them
        self.cert_check_interval = cert_check_interval or settings.cert_check_interval
        self._rng = rng or random.Random()
        self.policy: TunnelPoolPolicy | None = None  # made when `run` starts (its clock)
        self.tunnels: dict[Instance, Tunnel] = {}  # the kept ones, by instance
        self.connected = anyio.Event()  # set while a tunnel is up, replaced when none is
        self.connects = 0  # tunnels kept, ever
        self.last_error: str | None = None
        self._wake = anyio.Event()
        self._released: set[Tunnel] = set()  # closed by the pool itself: not losses

    # -- inspection --------------------------------------------------------------------------

    @property
    def session(self) -> MuxSession | None:
        """The newest kept tunnel's session, or None when no tunnel is up."""
        live = list(self.tunnels.values())
        return max(live, key=lambda t: t.up_at).session if live else None

    def snapshot(self) -> list[dict[str, Any]]:
        """The kept tunnels: instance, peer, since when, streams."""
        return [
            {
                "instance": None if t.instance is None else f"{t.instance:08x}",
                "peer": t.peer,
                "clusterSize": t.size,
                "activeStreams": t.session.active_streams,
            }
            for t in self.tunnels.values()
        ]

    # -- the pool ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a tunnel to every relay instance, forever (until cancelled)."""
        s = self.settings
        config = PoolConfig(
            backoff_initial=s.backoff_initial,
            backoff_cap=s.backoff_cap,
            probe_interval=s.probe_interval,
            max_tunnels=s.max_tunnels,
        )
        policy = self.policy = TunnelPoolPolicy(config, self._rng, anyio.current_time())
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_certificates, policy)
            while True:
                now = anyio.current_time()
                for instance in policy.stale(now):
                    self._drop_stale(policy, instance, now)
                if now >= policy.next_dial_at():
                    await self._dial(policy, tg)
                    continue
                wake = min(policy.next_dial_at(), policy.next_check_at())
                with anyio.move_on_after(max(0.0, wake - now)):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def _dial(self, policy: TunnelPoolPolicy, tg: anyio.abc.TaskGroup) -> None:
        s = self.settings
        tunnel = Tunnel(s, self._services)
        try:
            await tunnel.dial()
        except DialFailed as exc:
            now = anyio.current_time()
            policy.dial_failed(exc.failure, now)
            self.last_error = str(exc)
            delay = max(0.0, policy.next_dial_at() - now)
            log.warning("tunnel to %s down: %s; retrying in %.1fs", s.relay, exc, delay)
            with anyio.CancelScope(shield=True):
                await tunnel.session.run()  # the transport, if one was opened, is closed
            return
        now = anyio.current_time()
        verdict = policy.verdict(tunnel.instance, tunnel.size, now)
        if verdict is Verdict.DUPLICATE:
            log.debug("dial reached %s again: closed the duplicate", tunnel.name)
            policy.duplicate(now)
            await tunnel.close_duplicate()
            return
        old = self.tunnels.get(tunnel.instance)
        tunnel.join()
        tunnel.up_at = now
        self.tunnels[tunnel.instance] = tunnel
        self.connects += 1
        policy.joined(tunnel.instance, tunnel.size, now)
        tunnel.session.on_cluster = lambda size: self._on_cluster(policy, tunnel, size)
        tg.start_soon(self._serve, policy, tunnel)
        self.connected.set()
        where = f"{tunnel.name} at {s.relay}" if tunnel.instance is not None else str(s.relay)
        log.info("tunnel up to %s (%d of %d)", where, len(self.tunnels), policy.target)
        if old is not None:  # make before break: the new tunnel is up, drain the old one
            log.info("replaced the tunnel to %s (certificate files changed)", tunnel.name)
            self._released.add(old)
            tg.start_soon(self._drain, old)

    async def _serve(self, policy: TunnelPoolPolicy, tunnel: Tunnel) -> None:
        """Run a kept tunnel until it ends; the pool learns why as soon as it has ended (the
        transport's last goodbye is left to finish in the background)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(tunnel.session.run)
            try:
                await tunnel.session.wait_closed()
            finally:
                self._ended(policy, tunnel)

    async def _drain(self, tunnel: Tunnel) -> None:
        """A tunnel replaced by a renewal finishes its open streams, for at most drain_timeout."""
        grace = self.settings.drain_timeout
        tunnel.session.close(ErrorCode.NO_ERROR, "agent certificate renewed")
        with anyio.move_on_after(grace):
            await tunnel.session.wait_closed()
            return
        log.info(
            "the replaced tunnel to %s still had streams after %gs: closing them",
            tunnel.name,
            grace,
        )
        tunnel.session.close(ErrorCode.CANCEL, f"not drained within {grace:g}s of a renewal")

    def _ended(self, policy: TunnelPoolPolicy, tunnel: Tunnel) -> None:
        released = tunnel in self._released
        self._released.discard(tunnel)
        if self.tunnels.get(tunnel.instance) is tunnel:
            now = anyio.current_time()
            end = tunnel.session.end
            if not released:
                reason = describe_end(end)
                self.last_error = reason  # before the tunnel is gone: whoever saw it go reads it
                policy.lost(
                    tunnel.instance,
                    now - tunnel.up_at,
                    now,
                    refused=refused(end),
                    going_away=going_away(end),
                )
                log.warning("tunnel to %s ended: %s", tunnel.name, reason)
            del self.tunnels[tunnel.instance]
        if not self.tunnels:
            self.connected = anyio.Event()
        self._wake.set()

    def _on_cluster(self, policy: TunnelPoolPolicy, tunnel: Tunnel, size: int) -> None:
        tunnel.size = size
        log.info("%s says the cluster has %d instances", tunnel.name, size)
        policy.cluster(tunnel.instance, size, anyio.current_time())
        self._wake.set()

    def _drop_stale(self, policy: TunnelPoolPolicy, instance: Instance, now: float) -> None:
        tunnel = self.tunnels.pop(instance, None)
        policy.released(instance, now)
        if tunnel is None:
            return
        log.info(
            "dropping the tunnel to %s: it still counts %s instances, the others %d",
            tunnel.name,
            tunnel.size,
            policy.target,
        )
        self._released.add(tunnel)
        tunnel.session.close(ErrorCode.NO_ERROR, "the cluster no longer counts this instance")
        if not self.tunnels:
            self.connected = anyio.Event()

    async def _watch_certificates(self, policy: TunnelPoolPolicy) -> None:
        s = self.settings
        while True:
            await anyio.sleep(self.cert_check_interval)
            current = file_fingerprint(s.cert, s.key, s.ca)
            stale = [t for t in self.tunnels.values() if t.fingerprint != current]
            if stale and not any(t.retiring for t in stale):
                log.info("certificate files changed on disk; replacing every tunnel with them")
                for tunnel in stale:
                    tunnel.retiring = True
                policy.retire_all(anyio.current_time())
                self._wake.set()
