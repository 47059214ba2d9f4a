"""The controller's handlers and the relay's sync called directly, to drive the interleavings
kopf and the sync's loop only allow by chance.

Real kube-apiserver + etcd, a real `atlax relay` process with its control socket; the handlers run
in this process as kopf would call them (a kopf.Body read from the API server, a kopf.Patch), the
sync one pass at a time (`RelaySync.step`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import kopf
import pytest
from atlax_operator import kube
from atlax_operator.handlers import ControllerConfig, ControllerState, Reconciler
from atlax_operator.locks import AgentLocks
from atlax_operator.reports import MemoryReports, ReportCache
from atlax_operator.sync import RelaySync, SyncConfig
from conftest import ROOT, free_port, pod_relay, start_relay_process, wait_until
from controlplane import ControlPlane
from cryptography import x509

from atlax import certs
from atlax.control.client import ControlClient, ControlSocketError


@dataclass
class Env:
    cp: ControlPlane
    namespace: str
    dir: Path
    control_socket: Path

    def config(self) -> ControllerConfig:
        return ControllerConfig(
            namespace=self.namespace,
            service_name="atlax-relay",
            relay_address="127.0.0.1:7443",
            relay_sans=("localhost", "127.0.0.1"),
            relay_tls_dir=self.dir / "tls",
        )

    def sync(self, reports: MemoryReports, control_socket: Path | None = None) -> RelaySync:
        config = SyncConfig(
            namespace=self.namespace,
            control_socket=control_socket or self.control_socket,
            service_name="atlax-relay",
            pod="relay-0",
            count_replicas=False,
        )
        return RelaySync(config, reports, ControlClient(config.control_socket, timeout=5))

    def get(self, *args: str) -> Any:
        result = self.cp.kubectl("get", *args, "-n", self.namespace, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def apply_agent(self, name: str, *ports: int, finalizer: bool = False) -> kopf.Body:
        metadata: dict[str, Any] = {"name": name, "namespace": self.namespace}
        if finalizer:  # as kopf adds it: deletion then only marks the object
            metadata["finalizers"] = ["atlax.dev/cleanup"]
        obj = {
            "apiVersion": "atlax.dev/v1alpha1",
            "kind": "TunnelAgent",
            "metadata": metadata,
            "spec": {"services": [{"name": f"s{port}", "port": port} for port in ports]},
        }
        self.cp.kubectl("apply", "-f", "-", input=json.dumps(obj))
        return self.body(name)

    def body(self, name: str) -> kopf.Body:
        return kopf.Body(self.get("tunnelagent", name))

    async def reconcile(self, reconciler: Reconciler, name: str) -> kopf.Patch:
        """What kopf does with the create handler: call it, then write the status it patched
        (the sync pushes an agent once status carries its key pins)."""
        patch = kopf.Patch()
        await reconciler.reconcile(self.body(name), patch)
        self.cp.kubectl(
            "patch",
            "tunnelagent",
            name,
            "-n",
            self.namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": dict(patch.status)}),
        )
        return patch

    def service_ports(self) -> set[int]:
        return {p["port"] for p in self.get("service", "atlax-relay")["spec"]["ports"]}


@pytest.fixture
def env(
    control_plane: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Env]:
    cp = control_plane
    namespace = f"handlers-{uuid.uuid4().hex[:8]}"
    cp.kubectl("apply", "-f", str(ROOT / "manifests" / "crd.yaml"))
    cp.kubectl("create", "namespace", namespace)
    cp.kubectl(
        "create", "service", "loadbalancer", "atlax-relay", "--tcp=7443:7443", "-n", namespace
    )
    monkeypatch.setenv("KUBECONFIG", str(cp.kubeconfig))
    kube.load_config()
    sock = tmp_path / "run" / "control.sock"
    config = pod_relay(tmp_path, free_port(), sock)
    relay = start_relay_process(
        config, tmp_path / "relay.log"
    )  # waits for the operator's TLS files
    try:
        yield Env(cp, namespace, tmp_path, sock)
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(15)
        agents = cp.kubectl("get", "tunnelagents", "-n", namespace, "-o", "name").stdout.split()
        for agent in agents:  # no operator runs here to remove its finalizer
            unblock = '{"metadata": {"finalizers": null}}'
            cp.kubectl("patch", agent, "-n", namespace, "--type=merge", "-p", unblock)
        cp.kubectl("delete", "namespace", namespace, "--wait=false")
        print((tmp_path / "relay.log").read_text()[-3000:])


@contextmanager
def kopf_posting() -> Iterator[asyncio.Queue[Any]]:
    """What kopf.operator() sets up for kopf.info/kopf.warn: the handlers' events land here."""
    from kopf._core.engines import posting

    queue: asyncio.Queue[Any] = asyncio.Queue()
    values: list[tuple[Any, Any]] = [
        (posting.settings_var, kopf.OperatorSettings()),
        (posting.event_queue_var, queue),
        (posting.event_queue_loop_var, asyncio.get_running_loop()),
    ]
    tokens = [(var, var.set(value)) for var, value in values]
    try:
        yield queue
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


@asynccontextmanager
async def started_reconciler(
    config: ControllerConfig, reports: MemoryReports | None = None
) -> AsyncIterator[Reconciler]:
    """A Reconciler after its start-up (CA, relay certificate: the relay process starts on it)."""
    with kopf_posting():
        cache = ReportCache(reports or MemoryReports(), max_age=0)
        reconciler = Reconciler(ControllerState(config, cache))
        await reconciler.startup()
        yield reconciler


async def relay_agent(env: Env, name: str) -> dict[str, Any] | None:
    """The relay's own view of agent `name` (via its control socket), None if it does not know it."""
    listing = await ControlClient(env.control_socket, timeout=30).agents()  # a busy machine
    return next((a for a in listing["agents"] if a["name"] == name), None)


async def wait_for_relay(env: Env) -> None:
    async def up() -> bool:
        try:
            await ControlClient(env.control_socket, timeout=2).health()
        except ControlSocketError:
            return False
        return True

    with anyio.fail_after(60):
        while not await up():
            await anyio.sleep(0.1)


@asynccontextmanager
async def control_socket_gone_after_a_put(target: Path, path: Path) -> AsyncIterator[Path]:
    """Forwards the control API from `path` to the relay's socket `target` until it has forwarded
    one PUT and its answer, then stops listening and removes `path`: the relay as seen by a
    client when it goes away right after accepting a push (a restart, an OOM kill)."""
    listener = await anyio.create_unix_listener(path)

    async def forward(client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_unix(target) as upstream:
            first = await client.receive()
            if first.startswith(b"PUT "):
                path.unlink()  # this request is still answered; the next connect finds nothing
            await upstream.send(first)
            async with anyio.create_task_group() as pipes:

                async def to_relay() -> None:
                    async for chunk in client:
                        await upstream.send(chunk)

                pipes.start_soon(to_relay)
                async for chunk in upstream:  # the relay closes after its answer
                    await client.send(chunk)
                pipes.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, forward)
        yield path
        tg.cancel_scope.cancel()


def condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any]:
    return next(c for c in conditions if c["type"] == type_)


@pytest.mark.k8s
def test_the_sync_survives_the_relay_going_away_after_a_push(env: Env) -> None:
    """The sync pushes an agent, the relay accepts the PUT and is gone before the sync reads the
    result back: its report says the relay is not reachable, and the pass ends normally (the
    second read of the relay's agents was not guarded when the operator pushed itself)."""
    port = free_port()
    env.apply_agent("gone-after-put", port)

    async def run() -> None:
        reports = MemoryReports()
        async with started_reconciler(env.config(), reports) as reconciler:
            await wait_for_relay(env)
            await env.reconcile(reconciler, "gone-after-put")  # grants the port on the Service
            proxy = env.dir / "proxy.sock"
            async with control_socket_gone_after_a_put(env.control_socket, proxy):
                report = await env.sync(reports, proxy).step()
            assert not report.ready
            assert report.error is not None
            assert report.error.startswith("cannot reach control socket")
            patch = kopf.Patch()
            await reconciler.observe(env.body("gone-after-put"), patch)
            conditions = patch.status["conditions"]
            assert condition(conditions, "PortsOpen")["reason"] == "RelayUnavailable"
            connected = condition(conditions, "Connected")
            assert connected["status"] == "False"
            assert connected["message"].startswith("relay not reachable: cannot reach control")
            assert patch.status["connected"] is False and patch.status["tunnels"] == "0/0"
        live = await relay_agent(env, "gone-after-put")  # the PUT did reach the relay
        assert live is not None and [s["port"] for s in live["services"]] == [port]

    anyio.run(run)


@pytest.mark.k8s
def test_a_relay_that_hangs_up_while_answering_is_unreachable_in_status(env: Env) -> None:
    """The relay dies (kill -9, OOM) while it answers the sync's request: the pass ends normally
    and status says why. The client raised anyio's BrokenResourceError there, which ended the
    sync's loop: no pass, so no repair, after the relay came back."""
    body = env.apply_agent("hangup", free_port())
    hangup = env.dir / "hangup.sock"

    async def run() -> None:
        listener = await anyio.create_unix_listener(hangup)

        async def read_then_close(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await stream.receive()

        reports = MemoryReports()
        async with (
            anyio.create_task_group() as tg,
            started_reconciler(env.config(), reports) as reconciler,
        ):
            tg.start_soon(listener.serve, read_then_close)
            report = await env.sync(reports, hangup).step()
            patch = kopf.Patch()
            await reconciler.observe(body, patch)
            tg.cancel_scope.cancel()
        assert not report.ready
        connected = condition(patch.status["conditions"], "Connected")
        assert connected["status"] == "False"
        assert connected["message"] == (
            f"relay not reachable: control socket {hangup}: "
            "the connection was closed before the response was complete"
        )

    anyio.run(run)


@pytest.mark.k8s
def test_the_sync_gives_the_relay_exactly_what_is_granted(env: Env) -> None:
    """Level-triggered, one pass at a time: an agent is pushed once the controller granted its
    ports on the Service; a spec change keeps the old ports until the new ones are granted; an
    agent at the relay that nothing grants is revoked; a restarted relay gets everything again."""
    old, new = free_port(), free_port()

    async def run() -> None:
        reports = MemoryReports()
        async with started_reconciler(env.config(), reports) as reconciler:
            await wait_for_relay(env)
            sync = env.sync(reports)
            env.apply_agent("mover", old)
            report = await sync.step()
            assert report.ready and "mover" not in report.agents  # not granted yet
            await env.reconcile(reconciler, "mover")
            report = await sync.step()
            assert report.agents["mover"].ports == ((f"s{old}", old, "tcp", "", ()),)

            env.apply_agent("mover", new)  # the controller has not granted `new` yet
            report = await sync.step()
            assert report.agents["mover"].ports == ((f"s{old}", old, "tcp", "", ()),)
            await env.reconcile(reconciler, "mover")
            report = await sync.step()
            assert report.agents["mover"].ports == ((f"s{new}", new, "tcp", "", ()),)

            # Someone put an agent on the relay that no TunnelAgent describes: revoked.
            client = ControlClient(env.control_socket)
            status, _ = await client.put_agent("stray", [{"name": "web", "port": free_port()}])
            assert status == 200
            report = await sync.step(read_api=False)
            assert set(report.agents) == {"mover"}
            assert await relay_agent(env, "stray") is None

            patch = kopf.Patch()
            await reconciler.observe(env.body("mover"), patch)
            assert condition(patch.status["conditions"], "PortsOpen")["reason"] == "Open"
            assert patch.status["tunnels"] == "0/1"

    anyio.run(run)


@pytest.mark.k8s
def test_a_timer_tick_waiting_for_a_delete_does_not_bring_the_agent_back(env: Env) -> None:
    """The TunnelAgent is deleted while its timer tick waits for the agent's lock: once `delete`
    has taken its ports back and deleted its Secret, the tick must not grant or mint them again
    (it did: the relay opened the port of a deleted TunnelAgent, and its Secret came back). The
    lock is dropped once nobody uses it. The delete waits until no ready relay holds the agent."""
    port = free_port()
    env.apply_agent("gone", port, finalizer=True)

    async def run() -> None:
        reports = MemoryReports()
        async with started_reconciler(env.config(), reports) as reconciler:
            await wait_for_relay(env)
            sync = env.sync(reports)
            patch = await env.reconcile(reconciler, "gone")
            ports = condition(patch.status["conditions"], "PortsOpen")
            assert (ports["reason"], ports["message"]) == (
                "RelayUnavailable",
                "no relay is ready yet",
            )
            report = await sync.step()
            assert "gone" in report.agents and port in env.service_ports()
            secret = env.get("secret", "atlax-agent-gone")
            owner = secret["metadata"]["ownerReferences"]
            body = env.body("gone")
            assert owner == [
                {
                    "apiVersion": "atlax.dev/v1alpha1",
                    "kind": "TunnelAgent",
                    "name": "gone",
                    "uid": body["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
            cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
            renewal = datetime.fromisoformat(patch.status["certificateRenewalTime"])
            assert timedelta(0) < renewal - certs.renewal_time(cert) <= timedelta(seconds=1)

            env.cp.kubectl("delete", "tunnelagent", "gone", "-n", env.namespace, "--wait=false")
            marked = env.body("gone")  # what kopf's live body shows by now
            assert marked["metadata"].get("deletionTimestamp")
            done = anyio.Event()

            async def delete() -> None:
                await reconciler.delete(marked)  # takes the lock at once
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(delete)
                tg.start_soon(reconciler.observe, marked, kopf.Patch())
                await wait_until(lambda: reconciler.locks.users("gone") == 2, 10)
                # The relay still holds it: the delete waits for the sync to revoke it.
                await anyio.sleep(1.5)
                assert not done.is_set()
                report = await sync.step()
                assert "gone" not in report.agents
            assert reconciler.locks.users("gone") == 0

        assert await relay_agent(env, "gone") is None
        # The Secret is the garbage collector's to delete (the owner reference above; this bare
        # API server runs none): the tick must not have minted it again.
        left = env.get("secret", "atlax-agent-gone")
        assert left is None or left["data"]["tls.crt"] == secret["data"]["tls.crt"]
        assert port not in env.service_ports()

    anyio.run(run)


def test_agent_locks_stay_while_a_coroutine_waits() -> None:
    """A holds, B waits; A ends (as `delete` does); C comes while B holds: C must wait for B.
    Popping the lock after A (the old `delete`) gave C a fresh lock beside B's."""
    locks = AgentLocks()
    inside: list[str] = []
    overlaps: list[tuple[str, ...]] = []

    async def work(who: str, started: anyio.Event, release: anyio.Event) -> None:
        async with locks.hold("home-nas"):
            inside.append(who)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            started.set()
            await release.wait()
            inside.remove(who)

    async def run() -> None:
        events = {who: (anyio.Event(), anyio.Event()) for who in "ABC"}
        async with anyio.create_task_group() as tg:
            tg.start_soon(work, "A", *events["A"])
            await events["A"][0].wait()
            tg.start_soon(work, "B", *events["B"])
            await wait_until(lambda: locks.users("home-nas") == 2, 5)
            events["A"][1].set()
            await events["B"][0].wait()
            tg.start_soon(work, "C", *events["C"])
            await wait_until(lambda: locks.users("home-nas") == 2, 5)
            assert inside == ["B"]  # C waits
            events["B"][1].set()
            await events["C"][0].wait()
            events["C"][1].set()
        assert overlaps == []
        assert locks.users("home-nas") == 0

    anyio.run(run)
