"""The few Kubernetes API calls the operator makes, with the `kubernetes` client (run in threads).

Least privilege: Secrets in the operator's namespace (its CA, the relay's certificate, one per
agent), and get/update of one Service (the relay's), whose ports it shares with other owners
through the `atlax.dev/ports` annotation.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread
import kopf
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from atlax import logs

PORTS_ANNOTATION = "atlax.dev/ports"
T = TypeVar("T")


class KubernetesAccessError(Exception):
    """The API server is unreachable or refuses us: one line for the user."""


def load_config() -> None:
    """$KUBECONFIG when set, else the in-cluster ServiceAccount, else ~/.kube/config."""
    path = os.environ.get("KUBECONFIG")
    try:
        if path:  # passed on: the client reads $KUBECONFIG once, when it is imported
            config.load_kube_config(config_file=path)  # type: ignore[no-untyped-call]
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        else:
            config.load_kube_config()  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as exc:
        where = f"KUBECONFIG={path}" if path else "~/.kube/config (and not in a pod)"
        raise KubernetesAccessError(
            f"cannot load the Kubernetes configuration {where}: {exc}"
        ) from None


def describe(exc: BaseException) -> str:
    """One line for an API failure, naming what to fix where we can tell."""
    if isinstance(exc, ApiException):
        reason = _api_message(exc)
        if exc.status == 401:
            return f"the API server rejected our credentials (401): {reason}"
        if exc.status == 403:
            return f"forbidden (403), check the operator's RBAC Role: {reason}"
        return f"{exc.status} {exc.reason}: {reason}"
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    return logs.describe(exc)


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)


async def check_access(namespace: str, group: str, version: str, plural: str) -> None:
    """Before kopf starts: the API answers, the CRD is served, we may list TunnelAgents."""
    configuration = client.Configuration.get_default_copy()
    configuration.retries = 0  # answer now, without urllib3 retry warnings
    host = configuration.host
    api = client.CustomObjectsApi(client.ApiClient(configuration))
    try:
        await call(
            api.list_namespaced_custom_object,
            group,
            version,
            namespace,
            plural,
            limit=1,
            _request_timeout=(5, 15),
        )
    except ApiException as exc:
        if exc.status == 404:
            raise KubernetesAccessError(
                f"{plural}.{group}/{version} is not served by {host}: "
                "install the CRD first (kubectl apply -f manifests/crd.yaml)"
            ) from None
        raise KubernetesAccessError(
            f"cannot list {plural}.{group} in namespace {namespace!r} at {host}: {describe(exc)}"
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise KubernetesAccessError(
            f"cannot reach the Kubernetes API at {host}: {describe(exc)}"
        ) from None


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
    owner: kopf.Body | None = None,
    type_: str = "kubernetes.io/tls",
    labels: dict[str, str] | None = None,
) -> bool:
    """Create; False if it already exists (someone else won the race)."""
    return await _create(namespace, _secret_body(name, data, owner, type_, labels))


async def put_secret(
    namespace: str,
    name: str,
    data: dict[str, bytes],
    *,
    owner: kopf.Body | None = None,
    type_: str = "kubernetes.io/tls",
    labels: dict[str, str] | None = None,
) -> None:
    """Create or replace, with one body for both."""
    body = _secret_body(name, data, owner, type_, labels)
    if not await _create(namespace, body):
        await call(core().replace_namespaced_secret, name, namespace, body)


async def _create(namespace: str, body: dict[str, Any]) -> bool:
    try:
        await call(core().create_namespaced_secret, namespace, body)
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise
    return True


async def delete_secret(namespace: str, name: str) -> None:
    try:
        await call(core().delete_namespaced_secret, name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise


def _secret_body(
    name: str,
    data: dict[str, bytes],
    owner: kopf.Body | None,
    type_: str,
    labels: dict[str, str] | None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {"app.kubernetes.io/managed-by": "atlax-operator", **(labels or {})},
    }
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": type_,
        "metadata": metadata,
        "data": {k: b64(v) for k, v in data.items()},
    }
    if owner is not None:
        kopf.append_owner_reference(body, owner=owner)  # controller, blockOwnerDeletion
    return body


class PortTakenError(Exception):
    def __init__(self, port: int, owner: str) -> None:
        super().__init__(f"port {port} is already used by TunnelAgent {owner}")
        self.port = port
        self.owner = owner


class ServiceNotFoundError(Exception):
    def __init__(self, namespace: str, service: str) -> None:
        super().__init__(
            f"Service {namespace}/{service} does not exist: the relay's ports cannot be published "
            "(create it, or pass --service-name)"
        )


async def _read_service(namespace: str, service: str) -> Any:
    try:
        return await call(core().read_namespaced_service, service, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise ServiceNotFoundError(namespace, service) from None
        raise


def _owned(svc: Any) -> dict[str, str]:
    annotations = svc.metadata.annotations or {}
    try:
        owned = json.loads(annotations.get(PORTS_ANNOTATION, "{}"))
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in owned.items()} if isinstance(owned, dict) else {}


def _conflict(svc: Any, owner: str, ports: set[int]) -> PortTakenError | None:
    owned = _owned(svc)
    for port in sorted(ports):
        holder = owned.get(str(port))
        if holder is not None and holder != owner:
            return PortTakenError(port, holder)
    unmanaged = {p.port for p in svc.spec.ports or [] if str(p.port) not in owned}
    for port in sorted(ports & unmanaged):
        return PortTakenError(port, f"(the Service's own port {port})")
    return None


async def port_holders(namespace: str, service: str) -> dict[int, str]:
    """Who holds which port on the Service: the annotation's owners and "" for its own ports.

    The annotation outlives the relay process, so it decides ownership after a relay restart
    (when the relay itself remembers nothing and would hand a port to whoever asks first).
    """
    svc = await _read_service(namespace, service)
    owned = _owned(svc)
    holders = {p.port: "" for p in svc.spec.ports or [] if str(p.port) not in owned}
    holders.update({int(p): o for p, o in owned.items()})
    return holders


async def check_service_ports(namespace: str, service: str, owner: str, ports: set[int]) -> None:
    """Raise PortTakenError if another owner (or the Service itself) holds one of `ports`."""
    error = _conflict(await _read_service(namespace, service), owner, ports)
    if error is not None:
        raise error


async def sync_service_ports(
    namespace: str, service: str, owner: str, ports: set[int]
) -> str | None:
    """Make `owner`'s ports on the Service exactly `ports`; return the public address if known.

    Optimistic concurrency: read, modify, replace with the read resourceVersion; retry on 409.
    """
    for _ in range(10):
        svc = await _read_service(namespace, service)
        annotations = dict(svc.metadata.annotations or {})
        owned = _owned(svc)
        error = _conflict(svc, owner, ports)
        if error is not None:
            raise error
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
            svc = await _read_service(namespace, service)
        except ServiceNotFoundError:
            return
        annotations = dict(svc.metadata.annotations or {})
        owned = _owned(svc)
        mine = {int(p) for p, o in owned.items() if o == owner}
        if not mine:
            return
        annotations[PORTS_ANNOTATION] = json.dumps(
            {p: o for p, o in owned.items() if o != owner}, sort_keys=True
        )
        svc.metadata.annotations = annotations
        remaining = [p for p in svc.spec.ports or [] if p.port not in mine]
        if not remaining:  # a Service needs a port; the chart's agent port is always there
            return
        svc.spec.ports = remaining
        try:
            await call(core().replace_namespaced_service, service, namespace, svc)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
