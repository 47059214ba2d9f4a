"""The control socket and the config file against hostile or sloppy input, from outside.

A relay process with a control socket, driven with curl and the CLI: deeply nested JSON, loose
types (`"port": true`, `"port": "80"`), a PUT with thousands of services, a control-socket
directory that others may write to.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import Pki
from procs import ATLAX, agent_table, free_port, relay_process

MAX_SERVICES = 256  # per agent, documented in README and docs/security.md


def curl(sock: Path, method: str, path: str, body: str | None = None) -> tuple[int, Any]:
    args = ["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", str(sock), "-X", method]
    if body is not None:
        args += ["--data-binary", "@-"]
    result = subprocess.run(
        [*args, f"http://relay{path}"], input=body, capture_output=True, text=True, timeout=30
    )
    text, _, code = result.stdout.rpartition("\n")
    return int(code), json.loads(text) if text.strip() else None


@pytest.fixture
def control(pki: Pki, tmp_path: Path) -> Any:
    sock = tmp_path / "run" / "control.sock"
    with relay_process(tmp_path, pki, extra=f'control_socket = "{sock}"') as relay:
        relay.control_socket = sock
        yield relay


def put(relay: Any, body: str) -> tuple[int, Any]:
    return curl(relay.control_socket, "PUT", "/agents/home-nas", body)


def test_deeply_nested_json_is_a_400_not_a_traceback(control: Any) -> None:
    for body in ("[" * 100_000, '{"services": ' + "[" * 50_000 + "]" * 50_000 + "}"):
        status, reply = put(control, body)
        assert status == 400, (status, reply)
        assert "nested" in reply["error"]
    assert "Traceback" not in control.log()
    assert curl(control.control_socket, "GET", "/healthz")[0] == 200


@pytest.mark.parametrize(
    ("service", "key"),
    [
        ({"name": "web", "port": True}, "services[0].port"),
        ({"name": "web", "port": "80"}, "services[0].port"),
        ({"name": "web", "port": 80.0}, "services[0].port"),
        ({"name": "web", "port": 8080, "max_connections": True}, "services[0].max_connections"),
        ({"name": "web", "port": 8080, "max_connections": "5"}, "services[0].max_connections"),
    ],
    ids=["port-true", "port-string", "port-float", "max-connections-true", "max-connections-str"],
)
def test_the_control_api_takes_integers_only_as_integers(
    control: Any, service: dict[str, Any], key: str
) -> None:
    if service["port"] == 8080:
        service = {**service, "port": free_port()}
    status, reply = put(control, json.dumps({"services": [service]}))
    assert status == 400, reply
    assert key in reply["error"] and "integer" in reply["error"], reply
    assert curl(control.control_socket, "GET", "/agents/home-nas")[0] == 404  # nothing applied


def test_max_streams_must_be_an_integer(control: Any) -> None:
    body = {"services": [{"name": "web", "port": free_port()}], "max_streams": True}
    status, reply = put(control, json.dumps(body))
    assert status == 400 and "max_streams" in reply["error"], reply


@pytest.mark.parametrize("value", ["true", '"8080"', "8080.0"])
def test_relay_toml_takes_ports_only_as_integers(pki: Pki, tmp_path: Path, value: str) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\nlisten = "127.0.0.1:{free_port()}"\nca = "{pki.ca}"\ncert = "{pki.relay_crt}"\n'
        f'key = "{pki.relay_key}"\n'
        + agent_table("home-nas", {"web": 1}).replace("port = 1", f"port = {value}")
    )
    result = subprocess.run(
        [*ATLAX, "relay", "--config", str(config)], capture_output=True, text=True, timeout=15
    )  # a relay that accepts the file would run until the timeout
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "agents[0].services[0].port" in lines[0] and "integer" in lines[0], lines[0]


def test_a_put_is_limited_to_a_documented_number_of_services(control: Any) -> None:
    services = [{"name": f"s{i}", "port": 20000 + i} for i in range(MAX_SERVICES + 1)]
    status, reply = put(control, json.dumps({"services": services}))
    assert status == 400, reply
    assert f"at most {MAX_SERVICES} services" in reply["error"], reply
    listeners = sum(1 for _ in Path(f"/proc/{control.pid}/fd").iterdir())
    assert listeners < 100  # nothing was opened
    within = [{"name": f"s{i}", "port": free_port()} for i in range(4)]
    assert put(control, json.dumps({"services": within}))[0] == 200


# -- the control socket's directory --------------------------------------------------------------


def _relay_with_socket_in(pki: Pki, tmp_path: Path, directory: Path) -> subprocess.Popen[str]:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\nlisten = "127.0.0.1:{free_port()}"\nca = "{pki.ca}"\ncert = "{pki.relay_crt}"\n'
        f'key = "{pki.relay_key}"\ncontrol_socket = "{directory / "control.sock"}"\n'
    )
    return subprocess.Popen(
        [*ATLAX, "relay", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_an_existing_socket_directory_of_ours_is_tightened(pki: Pki, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)
    relay = _relay_with_socket_in(pki, tmp_path, run)
    try:
        sock = run / "control.sock"
        for _ in range(100):
            if sock.exists() or relay.poll() is not None:
                break
            import time

            time.sleep(0.1)
        assert sock.exists(), relay.stdout.read() if relay.stdout else ""
        assert run.stat().st_mode & 0o777 == 0o750
    finally:
        relay.terminate()
        try:
            output = relay.communicate(timeout=15)[0]
        except subprocess.TimeoutExpired:
            relay.kill()
            output = relay.communicate(timeout=5)[0]
    assert f"{run}" in output and "0777" in output and "0750" in output


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory another user owns")
def test_a_socket_directory_others_can_write_and_we_cannot_fix_is_refused(
    pki: Pki, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)
    os.chown(run, 65534, 65534)  # nobody's
    relay = _relay_with_socket_in(pki, tmp_path, run)
    try:
        output = relay.communicate(timeout=15)[0]
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait(5)
    assert relay.returncode == 1, output
    lines = output.strip().splitlines()
    assert lines[-1].startswith("atlax: error: ") and "Traceback" not in output
    assert str(run) in lines[-1] and "writable by other users" in lines[-1]
    assert not (run / "control.sock").exists()
