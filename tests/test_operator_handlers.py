"""The operator's handlers called directly, to drive the interleavings kopf only allows by chance.

Real kube-apiserver + etcd, a real `atlax relay` process with its control socket; the handlers run
in this process as kopf would call them (a kopf.Body read from the API server, a kopf.Patch).
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
from atlax_operator.handlers import OperatorConfig, OperatorState, Reconciler
from atlax_operator.locks import AgentLocks
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

    def config(self, control_socket: Path | None = None) -> OperatorConfig:
        return OperatorConfig(
            namespace=self.namespace,
            control_socket=control_socket or self.control_socket,
            service_name="atlax-relay",
            relay_address="127.0.0.1:7443",
            relay_sans=("localhost", "127.0.0.1"),
            relay_tls_dir=self.dir / "tls",
        )

    def get(self, *args: str) -> Any:
        result = self.cp.kubectl("get", *args, "-n", self.namespace, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def apply_agent(self, name: str, port: int, finalizer: bool = False) -> kopf.Body:
        metadata: dict[str, Any] = {"name": name, "namespace": self.namespace}
        if finalizer:  # as kopf adds it: deletion then only marks the object
            metadata["finalizers"] = ["atlax.dev/cleanup"]
        obj = {
            "apiVersion": "atlax.dev/v1alpha1",
            "kind": "TunnelAgent",
            "metadata": metadata,
            "spec": {"services": [{"name": "web", "port": port}]},
        }
        self.cp.kubectl("apply", "-f", "-", input=json.dumps(obj))
        return self.body(name)

    def body(self, name: str) -> kopf.Body:
        return kopf.Body(self.get("tunnelagent", name))

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
async def started_reconciler(config: OperatorConfig) -> AsyncIterator[Reconciler]:
    """A Reconciler after its start-up (CA, relay certificate: the relay process starts on it)."""
    with kopf_posting():
        reconciler = Reconciler(OperatorState(config))
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
def test_timer_survives_the_relay_going_away_after_a_reconcile(env: Env) -> None:
    """The timer re-pushes an agent, the relay accepts the PUT and is gone before the timer reads
    the result back: status says the relay is unreachable instead of the timer failing with a
    traceback (the second read of the relay's agents was not guarded)."""
    port = free_port()
    body = env.apply_agent("timer", port)

    async def run() -> None:
        async with started_reconciler(env.config()):  # the relay starts on the files it writes
            await wait_for_relay(env)
        proxy = env.dir / "proxy.sock"
        async with (
            control_socket_gone_after_a_put(env.control_socket, proxy),
            started_reconciler(env.config(proxy)) as reconciler,
        ):
            patch = kopf.Patch()
            await reconciler.observe(body, patch)
        conditions = patch.status["conditions"]
        assert condition(conditions, "PortsOpen")["status"] == "True"
        connected = condition(conditions, "Connected")
        assert connected["status"] == "False"
        assert connected["message"].startswith("relay not reachable: cannot reach control socket")
        assert condition(conditions, "Ready")["status"] == "False"
        assert patch.status["connected"] is False
        live = await relay_agent(env, "timer")  # the PUT did reach the relay
        assert live is not None and [s["port"] for s in live["services"]] == [port]

    anyio.run(run)


@pytest.mark.k8s
def test_a_relay_that_hangs_up_while_answering_is_unreachable_in_status(env: Env) -> None:
    """The relay dies (kill -9, OOM) while it answers the tick's request: the tick ends normally
    and status says why. The client raised h11's RemoteProtocolError there, which kopf answered
    with its 60 s back-off: no tick, so no repair, for a minute after the relay came back."""
    body = env.apply_agent("hangup", free_port())
    hangup = env.dir / "hangup.sock"

    async def run() -> None:
        listener = await anyio.create_unix_listener(hangup)

        async def read_then_close(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await stream.receive()

        async with (
            anyio.create_task_group() as tg,
            started_reconciler(env.config(hangup)) as reconciler,
        ):
            tg.start_soon(listener.serve, read_then_close)
            patch = kopf.Patch()
            await reconciler.observe(body, patch)
            tg.cancel_scope.cancel()
        connected = condition(patch.status["conditions"], "Connected")
        assert connected["status"] == "False"
        assert connected["message"] == (
            f"relay not reachable: control socket {hangup}: "
            "the connection was closed before the response was complete"
        )

    anyio.run(run)


@pytest.mark.k8s
def test_a_timer_tick_waiting_for_a_delete_does_not_bring_the_agent_back(env: Env) -> None:
    """The TunnelAgent is deleted while its timer tick waits for the agent's lock: once `delete`
    has revoked the agent, the tick must not push it again (it did: the relay opened the port of
    a deleted TunnelAgent, and its Secret came back). The lock is dropped once nobody uses it."""
    port = free_port()
    env.apply_agent("gone", port, finalizer=True)

    async def run() -> None:
        async with started_reconciler(env.config()) as reconciler:
            await wait_for_relay(env)
            patch = kopf.Patch()
            await reconciler.reconcile(env.body("gone"), patch)
            assert condition(patch.status["conditions"], "PortsOpen")["status"] == "True"
            assert await relay_agent(env, "gone") is not None and port in env.service_ports()
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
            async with anyio.create_task_group() as tg, reconciler.locks.hold("gone"):
                # Both queue behind the test's hold, delete first (the lock is first come, first
                # served): a delete that is quicker than a poll no longer escapes the check.
                tg.start_soon(reconciler.delete, marked, 0)
                await wait_until(lambda: reconciler.locks.users("gone") == 2, 10)
                tg.start_soon(reconciler.observe, marked, kopf.Patch())
                await wait_until(lambda: reconciler.locks.users("gone") == 3, 10)
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
