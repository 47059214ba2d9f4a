"""`atlax operator-uninstall`: what `helm uninstall` runs first (the chart's pre-delete hook).

Uninstalling Atlax decommissions it. Every TunnelAgent in the namespace is deleted while the
operator still runs, so each is revoked at the relay and its ports leave the Service; the garbage
collector then deletes its Secret (owned by the TunnelAgent). Then the CA and the relay's
certificate are deleted. If the operator has not finished with a TunnelAgent within `timeout` (it
is gone or broken), its finalizer is removed here: nothing is left that would keep the namespace
from being deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from . import FINALIZER, GROUP, PLURAL, VERSION, kube, pki

log = logging.getLogger("atlax.operator")


async def uninstall(namespace: str, grace: float) -> None:
    """Delete every TunnelAgent, give the operator `grace` seconds to revoke them, then the CA."""
    api = client.CustomObjectsApi()
    names = await _tunnel_agents(api, namespace)
    for name in names:
        try:
            await kube.call(
                api.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
        log.info("deleted TunnelAgent %s/%s", namespace, name)
    left = await _wait_gone(api, namespace, grace)
    for name in left:
        await _drop_finalizer(api, namespace, name)
        log.warning(
            "TunnelAgent %s/%s: the operator did not revoke it within %gs; removed its finalizer",
            namespace,
            name,
            grace,
        )
    if left:
        await _wait_gone(api, namespace, 30.0)
    for secret in (pki.CA_SECRET, pki.RELAY_SECRET):
        await kube.delete_secret(namespace, secret)
    log.info(
        "uninstalled: %d TunnelAgent(s) revoked, Secrets %s and %s deleted",
        len(names),
        pki.CA_SECRET,
        pki.RELAY_SECRET,
    )


async def _tunnel_agents(api: client.CustomObjectsApi, namespace: str) -> list[str]:
    listing: Any = await kube.call(
        api.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL
    )
    return sorted(item["metadata"]["name"] for item in listing.get("items", []))


async def _wait_gone(api: client.CustomObjectsApi, namespace: str, seconds: float) -> list[str]:
    """Poll until no TunnelAgent is left or `seconds` passed; return the ones left."""
    left = await _tunnel_agents(api, namespace)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while left:
                await asyncio.sleep(1.0)
                left = await _tunnel_agents(api, namespace)
    return left


async def _drop_finalizer(api: client.CustomObjectsApi, namespace: str, name: str) -> None:
    try:
        obj: Any = await kube.call(
            api.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
        )
        finalizers = [f for f in obj["metadata"].get("finalizers") or [] if f != FINALIZER]
        patch = {
            "metadata": {
                "finalizers": finalizers,
                "resourceVersion": obj["metadata"]["resourceVersion"],
            }
        }
        await kube.call(
            api.patch_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name, patch
        )
    except ApiException as exc:
        if exc.status not in (404, 409):  # gone, or changed meanwhile (the operator woke up)
            raise
