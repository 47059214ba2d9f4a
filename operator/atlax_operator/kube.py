"""The few Kubernetes API calls the operator makes, with the `kubernetes` client (run in threads).

Least privilege: Secrets in the operator's namespace (its CA, the relay's certificate, one per
agent), and get/update of one Service (the relay's), whose ports it shares with other owners
through the `atlax.dev/ports` annotation.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

PORTS_ANNOTATION = "atlax.dev/ports"
T = TypeVar("T")


def load_config() -> None:
    """KUBECONFIG (or ~/.kube/config) when present, else the in-cluster ServiceAccount."""
    try:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_incluster_config()  # type: ignore[no-untyped-call]


async def call(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await anyio.to_thread.run_sync(lambda: func(*args, **kwargs))


def core() -> client.CoreV1Api:
    return client.CoreV1Api()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(data: str | None) -> bytes:
    return base64.b64decode(data or "")


async def read_secret(namespace: str, name: str) -> dict[str, bytes] | None:
    try:
        secret: Any = await call(core().read_namespaced_secret, name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return {k: unb64(v) for k, v in (secret.data or {}).items()}


async def create_secret(
    namespace: str,
    name: str,
    data: dict[str, bytes],
    *,
    owner: dict[str, Any] | None = None,
    type_: str = "kubernetes.io/tls",
    labels: dict[str, str] | None = None,
) -> bool:
    """Create; False if it already exists (someone else won the race)."""
    body = _secret_body(name, data, owner, type_, labels)
    try:
        await call(core().create_namespaced_secret, namespace, body)
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise
    return True


async def put_secret(
    namespace: str,
    name: str,
    data: dict[str, bytes],
    *,
    owner: dict[str, Any] | None = None,
    type_: str = "kubernetes.io/tls",
    labels: dict[str, str] | None = None,
) -> None:
    body = _secret_body(name, data, owner, type_, labels)
    if not await create_secret(namespace, name, data, owner=owner, type_=type_, labels=labels):
        await call(core().replace_namespaced_secret, name, namespace, body)


async def delete_secret(namespace: str, name: str) -> None:
    try:
        await call(core().delete_namespaced_secret, name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise


def _secret_body(
    name: str,
    data: dict[str, bytes],
    owner: dict[str, Any] | None,
    type_: str,
    labels: dict[str, str] | None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {"app.kubernetes.io/managed-by": "atlax-operator", **(labels or {})},
    }
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": type_,
        "metadata": metadata,
        "data": {k: b64(v) for k, v in data.items()},
    }


class PortTakenError(Exception):
    def __init__(self, port: int, owner: str) -> None:
        super().__init__(f"port {port} is already used by TunnelAgent {owner}")
        self.port = port
        self.owner = owner


async def sync_service_ports(
    namespace: str, service: str, owner: str, ports: set[int]
) -> str | None:
    """Make `owner`'s ports on the Service exactly `ports`; return the public address if known.

    Optimistic concurrency: read, modify, replace with the read resourceVersion; retry on 409.
    """
    for _ in range(10):
        svc: Any = await call(core().read_namespaced_service, service, namespace)
        annotations = dict(svc.metadata.annotations or {})
        owned: dict[str, str] = json.loads(annotations.get(PORTS_ANNOTATION, "{}"))
        for port in ports:
            holder = owned.get(str(port))
            if holder is not None and holder != owner:
                raise PortTakenError(port, holder)
        unmanaged = {p.port for p in svc.spec.ports or [] if str(p.port) not in owned}
        for port in ports:
            if port in unmanaged:
                raise PortTakenError(port, f"(the Service's own port {port})")
        mine_before = {int(p) for p, o in owned.items() if o == owner}
        wanted_owned = {p: o for p, o in owned.items() if o != owner}
        wanted_owned.update({str(p): owner for p in ports})
        kept = [p for p in svc.spec.ports or [] if p.port not in mine_before - ports]
        present = {p.port for p in kept}
        kept += [
            client.V1ServicePort(name=f"p{port}", port=port, target_port=port, protocol="TCP")
            for port in sorted(ports - present)
        ]
        if wanted_owned != owned or len(kept) != len(svc.spec.ports or []) or ports - present:
            annotations[PORTS_ANNOTATION] = json.dumps(wanted_owned, sort_keys=True)
            svc.metadata.annotations = annotations
            svc.spec.ports = kept
            try:
                svc = await call(core().replace_namespaced_service, service, namespace, svc)
            except ApiException as exc:
                if exc.status == 409:
                    continue
                raise
        ingress = (
            (svc.status.load_balancer.ingress or [])
            if svc.status and svc.status.load_balancer
            else []
        )
        if ingress:
            return str(ingress[0].ip or ingress[0].hostname)
        return None
    raise RuntimeError(f"Service {namespace}/{service} kept changing; giving up for now")


async def remove_service_ports(namespace: str, service: str, owner: str) -> None:
    for _ in range(10):
        try:
            svc: Any = await call(core().read_namespaced_service, service, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        annotations = dict(svc.metadata.annotations or {})
        owned: dict[str, str] = json.loads(annotations.get(PORTS_ANNOTATION, "{}"))
        mine = {int(p) for p, o in owned.items() if o == owner}
        if not mine:
            return
        annotations[PORTS_ANNOTATION] = json.dumps(
            {p: o for p, o in owned.items() if o != owner}, sort_keys=True
        )
        svc.metadata.annotations = annotations
        remaining = [p for p in svc.spec.ports or [] if p.port not in mine]
        if (
            not remaining
        ):  # a Service needs at least one port; the chart's agent port is always there
            return
        svc.spec.ports = remaining
        try:
            await call(core().replace_namespaced_service, service, namespace, svc)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
