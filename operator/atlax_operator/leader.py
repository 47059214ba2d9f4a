"""The controller's leader election: the `Election` rules applied to a real Lease.

`LeaderElector.run(lead)` campaigns, runs `lead()` while this process holds the Lease and cancels
it the moment it does not (its renewals failed for the renew deadline, or another holder shows up),
then campaigns again. Every Kubernetes call that `lead` makes through `kube.call` is fenced: it
does not start once the Lease is no longer certainly ours. On cancellation (SIGTERM) the Lease is
released, so that another controller takes over at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import urllib3
from kubernetes.client.exceptions import ApiException

from . import kube
from .election import Election, LeaseRecord

log = logging.getLogger("atlax.operator")


class NotLeading(Exception):
    """A controller call after this process stopped holding the Lease (it is stepping down)."""


class LeaderElector:
    def __init__(self, namespace: str, name: str, election: Election) -> None:
        self.namespace = namespace
        self.name = name
        self.election = election
        self._api = kube.coordination(retries=False)
        self._failing = False  # log API trouble once per streak

    @property
    def lease(self) -> str:
        return f"{self.namespace}/{self.name}"

    def leading(self) -> bool:
        return self.election.leading(time.monotonic())

    def check(self) -> None:
        """The fence: raise unless this process certainly holds the Lease now."""
        if not self.leading():
            raise NotLeading(f"this controller no longer holds Lease {self.lease}")

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        try:
            while True:
                await self._campaign()
                await self._lead(lead)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._release()

    # -- following ---------------------------------------------------------------------------

    async def _campaign(self) -> None:
        me, told = self.election.identity, None
        log.info("controller %s: campaigning for Lease %s", me, self.lease)
        while not await self._try():
            holder = self.election.holder
            if holder and holder not in (told, me):
                log.info("controller %s: following, Lease %s is held by %s", me, self.lease, holder)
                told = holder
            # Look again after a retry period, or right when the holder's claim runs out.
            expiry = self.election.expires_in(time.monotonic())
            retry = self.election.retry_period
            await anyio.sleep(expiry + 0.05 if 0 < expiry < retry else retry)

    # -- leading -----------------------------------------------------------------------------

    async def _lead(self, lead: Callable[[], Awaitable[None]]) -> None:
        log.info("controller %s: leading (Lease %s)", self.election.identity, self.lease)
        async with anyio.create_task_group() as tg:

            async def act() -> None:
                try:
                    await self._act(lead)
                except NotLeading:  # the fence noticed first (the renewals were starved too)
                    tg.cancel_scope.cancel()

            tg.start_soon(act)
            await self._renew_until_lost()
            tg.cancel_scope.cancel()
        log.warning(
            "controller %s: lost Lease %s (%s); stopped acting",
            self.election.identity,
            self.lease,
            f"now held by {self.election.holder}"
            if self.election.holder not in ("", self.election.identity)
            else f"not renewed for {self.election.renew_deadline:g}s",
        )

    async def _act(self, lead: Callable[[], Awaitable[None]]) -> None:
        kube.fence.set(self.check)  # this task's context, inherited by every task it starts
        await lead()
        raise RuntimeError("the leader's work ended by itself")

    async def _renew_until_lost(self) -> None:
        election = self.election
        while True:
            await anyio.sleep(election.retry_period)
            if not election.leading(time.monotonic()):
                return  # the sleep itself overran the deadline (a frozen or starved process)
            # A renewal that has not answered by the deadline is as good as failed.
            with anyio.move_on_after(election.leading_for(time.monotonic())):
                await self._try()
            if not election.leading(time.monotonic()):
                return

    # -- one try -----------------------------------------------------------------------------

    async def _try(self) -> bool:
        """Read the Lease, write ours if the election says so; True if we hold it now."""
        timeout = max(1.0, self.election.renew_deadline / 2)
        try:
            lease = await kube.read_lease(self.namespace, self.name, timeout, self._api)
            sent_at = time.monotonic()
            want = self.election.observe(
                None if lease is None else _record(lease), sent_at, datetime.now(UTC)
            )
            if want is None:
                self._failing = False
                return False
            written = await kube.write_lease(
                self.namespace,
                self._body(want),
                create=want.version is None,
                request_timeout=timeout,
                api=self._api,
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            if not self._failing:
                log.warning("cannot read or write Lease %s: %s", self.lease, kube.describe(exc))
                self._failing = True
            return False
        self._failing = False
        if written is None:
            return False  # another candidate wrote first (409)
        # The time before the write was sent: the renewal happened no earlier, so the deadline
        # counted from it runs out no later than the one the others count from their reads.
        self.election.written(_record(written), sent_at)
        return self.election.leading(time.monotonic())

    async def _release(self) -> None:
        want = self.election.release(datetime.now(UTC))
        if want is None:
            return
        try:
            if await kube.write_lease(
                self.namespace, self._body(want), create=False, request_timeout=3, api=self._api
            ):
                log.info("controller %s: released Lease %s", self.election.identity, self.lease)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("cannot release Lease %s: %s", self.lease, kube.describe(exc))

    def _body(self, record: LeaseRecord) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if record.version is not None:
            metadata["resourceVersion"] = record.version  # optimistic concurrency
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": record.holder or None,
                "leaseDurationSeconds": record.duration,
                "acquireTime": _micro(record.acquire_time),
                "renewTime": _micro(record.renew_time),
                "leaseTransitions": record.transitions,
            },
        }


def _micro(when: datetime | None) -> str | None:
    """MicroTime as the API server parses it (always six fraction digits)."""
    return None if when is None else when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _record(lease: Any) -> LeaseRecord:
    spec = lease.spec
    return LeaseRecord(
        holder=(spec.holder_identity or "") if spec else "",
        duration=(spec.lease_duration_seconds or 0) if spec else 0,
        acquire_time=spec.acquire_time if spec else None,
        renew_time=spec.renew_time if spec else None,
        transitions=(spec.lease_transitions or 0) if spec else 0,
        version=lease.metadata.resource_version,
    )
