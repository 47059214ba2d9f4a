"""A public port the relay may not bind (below net.ipv4.ip_unprivileged_port_start, no
CAP_NET_BIND_SERVICE) is reported as that, not as a conflict with another agent.

The relay runs as a real process without CAP_NET_BIND_SERVICE (`setpriv`), as the chart's non-root
relay does when relay.allowPrivilegedPorts=false; the operator on the real API server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from conftest import ROOT, Pki, free_port, wait_for
from controlplane import ControlPlane

from atlax.control.client import ControlClient

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"),
    reason="needs root and setpriv to start a relay without CAP_NET_BIND_SERVICE",
)


def low_port() -> int:
    """A free port below the unprivileged start (root may bind it to check)."""
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    for port in range(min(start, 1024) - 1, 0, -1):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no privileged port is free")


@pytest.fixture
def unprivileged_relay(pki: Pki, tmp_path: Path) -> Iterator[Path]:
    """`atlax relay` with a control socket, without CAP_NET_BIND_SERVICE; yields the socket."""
    sock = tmp_path / "run" / "control.sock"
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\nlisten = "127.0.0.1:{free_port()}"\nca = "{pki.ca}"\ncert = "{pki.relay_crt}"\n'
        f'key = "{pki.relay_key}"\npublic_host = "127.0.0.1"\ncontrol_socket = "{sock}"\n'
    )
    log = tmp_path / "relay.log"
    relay = subprocess.Popen(
        [
            "setpriv",
            "--bounding-set",
            "-net_bind_service",
            sys.executable,
            "-m",
            "atlax.cli",
            "relay",
            "--config",
            str(config),
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: "control socket listening" in log.read_text(), 30, "the relay")
        yield sock
    finally:
        relay.send_signal(signal.SIGTERM)
        try:
            relay.wait(15)
        except subprocess.TimeoutExpired:
            relay.kill()


def test_a_privileged_port_is_a_permission_error_not_a_conflict(unprivileged_relay: Path) -> None:
    port, free = low_port(), free_port()

    async def put(*ports: int) -> tuple[int, object]:
        services = [{"name": f"s{p}", "port": p} for p in ports]
        return await ControlClient(unprivileged_relay).put_agent("home-nas", services)

    status, reply = anyio.run(put, free, port)
    assert status == 403, reply
    assert isinstance(reply, dict) and reply["port"] == port
    assert f"cannot listen on 127.0.0.1:{port}: permission denied" in reply["error"]
    assert "net.ipv4.ip_unprivileged_port_start" in reply["error"]
    assert "relay.allowPrivilegedPorts=true" in reply["error"]
    # All or nothing: the free port was not opened either.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", free)) != 0

    # A port the OS already gives to someone else is still a conflict.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        status, reply = anyio.run(put, holder.getsockname()[1])
    assert status == 409, reply

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "atlax.cli",
            "relayctl",
            "--socket",
            str(unprivileged_relay),
            "put",
            "home-nas",
            "--service",
            f"smb={port}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "permission denied" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.k8s
def test_the_operator_reports_a_privileged_port_as_not_permitted(
    control_plane: ControlPlane, unprivileged_relay: Path, tmp_path: Path
) -> None:
    cp, ns = control_plane, "atlax-lowport"
    cp.kubectl("apply", "-f", str(ROOT / "manifests" / "crd.yaml"))
    cp.kubectl("create", "namespace", ns, check=False)
    cp.kubectl("create", "service", "loadbalancer", "atlax", "--tcp=7443:7443", "-n", ns)
    wait_for(
        lambda: cp.kubectl("get", "tunnelagents", "-n", ns, check=False).returncode == 0,
        30,
        "the CRD",
    )
    log = tmp_path / "operator.log"
    operator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atlax.cli",
            "operator",
            "--namespace",
            ns,
            "--control-socket",
            str(unprivileged_relay),
            "--service-name",
            "atlax",
            "--relay-address",
            "127.0.0.1:7443",
            "--status-interval",
            "1",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={"KUBECONFIG": str(cp.kubeconfig), "PATH": "/usr/bin:/bin"},
    )
    port = low_port()
    try:
        agent = {
            "apiVersion": "atlax.dev/v1alpha1",
            "kind": "TunnelAgent",
            "metadata": {"name": "smb-box", "namespace": ns},
            "spec": {"services": [{"name": "smb", "port": port}]},
        }
        cp.kubectl("apply", "-f", "-", input=json.dumps(agent))

        def ports_open() -> dict[str, str]:
            out = cp.kubectl("get", "tunnelagent", "smb-box", "-n", ns, "-o", "json").stdout
            conditions = json.loads(out).get("status", {}).get("conditions", [])
            found = next((c for c in conditions if c["type"] == "PortsOpen"), {})
            return {} if found.get("reason") == "Pending" else found  # the relay has not answered

        condition = wait_for(ports_open, 60, "the PortsOpen condition")
        assert isinstance(condition, dict)
        assert condition["status"] == "False"
        assert condition["reason"] == "PortNotPermitted", condition
        assert "permission denied" in condition["message"]
        cp.kubectl("delete", "tunnelagent", "smb-box", "-n", ns, "--timeout=60s")
    finally:
        operator.send_signal(signal.SIGTERM)
        try:
            operator.wait(15)
        except subprocess.TimeoutExpired:
            operator.kill()
        cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)
