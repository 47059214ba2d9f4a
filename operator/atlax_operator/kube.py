"""The few Kubernetes API calls the operator makes, with the `kubernetes` client (run in threads).

Least privilege: Secrets in the operator's namespace (its CA, the relay's certificate, one per
agent), and get/update of one Service (the relay's), whose ports it shares with other owners
through the `atlax.dev/ports` and `atlax.dev/hostnames` annotations (claims.py). The
controller's Lease and the relays' report Leases (coordination.k8s.io), the relays'
EndpointSlices (read only).

Calls made by a controller while it leads are fenced (`fence`): once its Lease is no longer
certainly its own, no further call starts.
"""

from __future__ import annotations

import base64
import contextvars
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread
import kopf
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from atlax import logs

from .claims import Claims, Holdings

T = TypeVar("T")
log = logging.getLogger("atlax.operator")

# Set by the leader election for the tasks that act as leader (kopf and everything it starts):
# raises when this process no longer certainly holds the Lease. Context-local, so the election's
# own Lease calls are never fenced.
fence: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "atlax_fence", default=None
)


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
    check = fence.get()
    if check is not None:
        check()
    return await call_unfenced(func, *args, **kwargs)


async def call_unfenced(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    # Abandoned when cancelled: the request may still finish in its thread, but nothing waits
    # for it (a leader that steps down does not sit out a call stuck in a partition).
    return await anyio.to_thread.run_sync(lambda: func(*args, **kwargs), abandon_on_cancel=True)


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


def _holdings(svc: Any) -> Holdings:
    ports = [(p.port, str(p.protocol or "TCP")) for p in svc.spec.ports or []]
    return Holdings.read(svc.metadata.annotations or {}, ports)


async def holdings(namespace: str, service: str) -> Holdings:
    """The port and hostname claims written on the Service, and its own ports.

    The annotations outlive the relay process, so they decide ownership after a relay restart
    (when the relay itself remembers nothing and would hand a port to whoever asks first).
    """
    return _holdings(await _read_service(namespace, service))


async def check_claims(namespace: str, service: str, owner: str, claims: Claims) -> None:
    """Raise ClaimConflictError if another owner (or the Service itself) holds a claim."""
    error = _holdings(await _read_service(namespace, service)).conflict(owner, claims)
    if error is not None:
        raise error


async def sync_claims(namespace: str, service: str, owner: str, claims: Claims) -> str | None:
    """Make `owner`'s claims and ports on the Service exactly `claims`; return the public
    address if known.

    Optimistic concurrency: read, modify, replace with the read resourceVersion; retry on 409.
    """
    for _ in range(10):
        svc = await _read_service(namespace, service)
        before = _holdings(svc)
        error = before.conflict(owner, claims)
        if error is not None:
            raise error
        after = before.claim(owner, claims)
        if await _write(namespace, service, svc, before, after):
            continue  # someone else changed the Service first: read it again
        ingress = (
            (svc.status.load_balancer.ingress or [])
            if svc.status and svc.status.load_balancer
            else []
        )
        if ingress:
            return str(ingress[0].ip or ingress[0].hostname)
        return None
    raise RuntimeError(f"Service {namespace}/{service} kept changing; giving up for now")


async def remove_claims(namespace: str, service: str, owner: str) -> None:
    for _ in range(10):
        try:
            svc = await _read_service(namespace, service)
        except ServiceNotFoundError:
            return
        before = _holdings(svc)
        if not await _write(namespace, service, svc, before, before.release(owner)):
            return


async def _write(namespace: str, service: str, svc: Any, before: Holdings, after: Holdings) -> bool:
    """Write `after`'s annotations and ports over `before`'s; True if the Service changed
    under us (409) and the caller must read it again. Nothing is written if nothing changes."""
    dropped = before.managed() - after.managed()
    kept = [p for p in svc.spec.ports or [] if (p.port, str(p.protocol or "TCP")) not in dropped]
    present = {(p.port, str(p.protocol or "TCP")) for p in kept}
    added = sorted(after.managed() - present)
    kept += [
        client.V1ServicePort(
            name=f"p{port}" if protocol == "TCP" else f"p{port}-{protocol.lower()}",
            port=port,
            target_port=port,
            protocol=protocol,
        )
        for port, protocol in added
    ]
    annotations = dict(svc.metadata.annotations or {})
    wanted = after.annotate(annotations)
    if wanted == annotations and not dropped and not added:
        return False
    if not kept:  # a Service needs a port; the chart's agent port is always there
        return False
    svc.metadata.annotations = wanted
    svc.spec.ports = kept
    try:
        await call(core().replace_namespaced_service, service, namespace, svc)
    except ApiException as exc:
        if exc.status == 409:
            return True
        raise
    return False


# -- TunnelAgents, EndpointSlices -----------------------------------------------------------------


async def list_tunnel_agents(
    namespace: str, group: str, version: str, plural: str
) -> list[dict[str, Any]]:
    api = client.CustomObjectsApi()
    listing: Any = await call(
        api.list_namespaced_custom_object, group, version, namespace, plural, _request_timeout=30
    )
    items: list[dict[str, Any]] = listing.get("items", [])
    return items


async def relay_endpoints(namespace: str, service: str) -> dict[str, bool]:
    """The endpoints of `service` from its EndpointSlices, ready or not: pod name (else the
    addresses) -> whether it is terminating."""
    api = client.DiscoveryV1Api()
    slices: Any = await call(
        api.list_namespaced_endpoint_slice,
        namespace,
        label_selector=f"kubernetes.io/service-name={service}",
        _request_timeout=30,
    )
    endpoints: dict[str, bool] = {}
    for item in slices.items or []:
        for endpoint in item.endpoints or []:
            ref = endpoint.target_ref
            name = ref.name if ref is not None and ref.name else ",".join(endpoint.addresses)
            conditions = endpoint.conditions
            endpoints[name] = bool(conditions is not None and conditions.terminating)
    return endpoints


# -- Leases ------------------------------------------------------------------------------------


def coordination(*, retries: bool = True) -> client.CoordinationV1Api:
    """The Lease API; `retries=False`: one attempt per call (urllib3 retries a timed-out request
    three times by default, which would hide a partition from the election for four timeouts)."""
    if retries:
        return client.CoordinationV1Api()
    configuration = client.Configuration.get_default_copy()
    configuration.retries = 0
    return client.CoordinationV1Api(client.ApiClient(configuration))


async def read_lease(
    namespace: str,
    name: str,
    request_timeout: float = 10.0,
    api: client.CoordinationV1Api | None = None,
) -> Any | None:
    """The Lease, or None if it does not exist. Never fenced (the election reads it)."""
    api = api or coordination()
    try:
        return await call_unfenced(
            api.read_namespaced_lease, name, namespace, _request_timeout=request_timeout
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


async def write_lease(
    namespace: str,
    body: dict[str, Any],
    *,
    create: bool,
    request_timeout: float = 10.0,
    api: client.CoordinationV1Api | None = None,
) -> Any | None:
    """Create or replace (with the body's resourceVersion); None if someone else wrote first."""
    api = api or coordination()
    try:
        if create:
            return await call_unfenced(
                api.create_namespaced_lease, namespace, body, _request_timeout=request_timeout
            )
        name = body["metadata"]["name"]
        return await call_unfenced(
            api.replace_namespaced_lease, name, namespace, body, _request_timeout=request_timeout
        )
    except ApiException as exc:
        if exc.status in (404, 409):  # gone meanwhile, or a stale resourceVersion
            return None
        raise


async def list_leases(namespace: str, selector: str) -> list[Any]:
    leases: Any = await call(
        coordination().list_namespaced_lease,
        namespace,
        label_selector=selector,
        _request_timeout=30,
    )
    return list(leases.items or [])


# -- watching ----------------------------------------------------------------------------------


def watch_in_background(
    what: str, wake: Callable[[], None], func: Callable[..., Any], *args: Any, **kwargs: Any
) -> threading.Event:
    """Call `wake` on every event of a watch of `func(*args, **kwargs)`, in a daemon thread, until
    the returned Event is set. The caller lists what it needs itself: a watch only says when.

    A daemon thread rather than the event loop's executor: a watch blocks for minutes, and the
    executor's threads are waited for at exit."""
    stop = threading.Event()

    def run() -> None:
        failures = 0
        while not stop.is_set():
            try:
                events = watch.Watch().stream  # type: ignore[no-untyped-call]
                stream = events(func, *args, timeout_seconds=240, **kwargs)  # type: ignore[no-untyped-call]
                for _ in stream:
                    failures = 0
                    if stop.is_set():
                        return
                    wake()
            except Exception as exc:  # logged; the watch is opened again
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("watch of %s failed (%s); retrying", what, describe(exc))
                stop.wait(min(30.0, 0.5 * failures))
            else:
                wake()  # a watch that ends may have missed events: look once more

    threading.Thread(target=run, name=f"watch {what}", daemon=True).start()
    return stop
