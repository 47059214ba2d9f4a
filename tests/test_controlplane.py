"""The test control plane itself: a real API server that validates and enforces RBAC."""

from __future__ import annotations

import json
import socket
from pathlib import Path

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


def test_start_up_survives_ports_taken_by_someone_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port found free is taken (by another test run, an outgoing connection) before etcd or
    kube-apiserver binds it: each is started again on new ports instead of failing the session."""
    import controlplane

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        held = taken.getsockname()[1]
        free = controlplane._free_port
        # etcd's first client port, then kube-apiserver's first port, are the held one.
        picks = iter([held, free(), free(), free(), held])
        monkeypatch.setattr(controlplane, "_free_port", lambda: next(picks, None) or free())
        plane = ControlPlane(tmp_path)
        plane.start()
        try:
            assert plane.server != f"https://127.0.0.1:{held}"
            assert "namespace/default" in plane.kubectl("get", "ns", "-o", "name").stdout.split()
        finally:
            plane.stop()
    for name in ("etcd", "kube-apiserver"):
        log = (tmp_path / "logs" / f"{name}.log").read_text()
        assert f"127.0.0.1:{held}: bind: address already in use" in log, log[-2000:]
        assert "--- attempt 2:" in log and "--- attempt 3:" not in log
