"""The test control plane itself: a real API server that validates and enforces RBAC."""

from __future__ import annotations

import json

import pytest
from controlplane import ControlPlane

pytestmark = pytest.mark.k8s


def test_api_server_answers_and_validates(control_plane: ControlPlane) -> None:
    namespaces = control_plane.kubectl("get", "ns", "-o", "name").stdout.split()
    assert "namespace/default" in namespaces
    ok = control_plane.kubectl(
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "probe"},
                "data": {"a": "b"},
            }
        ),
    )
    assert "configmap/probe created (server dry run)" in ok.stdout
    bad = control_plane.kubectl(
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        check=False,
        input=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "x"},
                "spec": {"ports": [{"port": 70000}]},
            }
        ),
    )
    assert bad.returncode != 0 and "must be between 1 and 65535" in bad.stderr


def test_rbac_is_enforced_for_service_accounts(
    control_plane: ControlPlane, tmp_path: object
) -> None:
    from pathlib import Path

    control_plane.kubectl("create", "serviceaccount", "nobody", "-n", "default")
    token = control_plane.kubectl("create", "token", "nobody", "-n", "default").stdout.strip()
    kubeconfig = control_plane.kubeconfig_for_token(token, Path(str(tmp_path)) / "kc")
    import subprocess

    denied = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", "get", "secrets"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert denied.returncode != 0 and "forbidden" in denied.stderr
