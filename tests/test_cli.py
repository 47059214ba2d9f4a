"""The `atlax` command as a user runs it: real processes, real files, one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from conftest import (
    Pki,
    agent_settings,
    echo_handler,
    exchange,
    free_port,
    running_agent,
    tcp_service,
    wait_until,
)

from atlax.agent import Agent

ATLAX = [sys.executable, "-m", "atlax.cli"]


def run(
    *args: str, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ATLAX, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("atlax: error: ")
    assert fragment in lines[0]


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["ca"],
        ["ca", "init"],
        ["cert"],
        ["cert", "issue"],
        ["relay"],
        ["agent"],
        ["demo"],
        ["relayctl"],
        ["relayctl", "put"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: atlax" in result.stdout


def test_ca_and_certificates_from_the_command_line(tmp_path: Path) -> None:
    assert run("ca", "init", "--dir", "pki", cwd=tmp_path).returncode == 0
    server = run(
        "cert",
        "issue",
        "--ca-dir",
        "pki",
        "--name",
        "relay",
        "--server",
        "--san",
        "relay.example.com",
        "--san",
        "203.0.113.10",
        "--out-dir",
        "pki",
        cwd=tmp_path,
    )
    assert server.returncode == 0, server.stderr
    client = run(
        "cert",
        "issue",
        "--ca-dir",
        "pki",
        "--name",
        "home-nas",
        "--client",
        "--lifetime",
        "30d",
        "--out-dir",
        "out",
        cwd=tmp_path,
    )
    assert client.returncode == 0, client.stderr
    for key in ("pki/ca.key", "pki/relay.key", "out/home-nas.key"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600
    from atlax import certs

    pair = certs.load_pair(tmp_path / "out/home-nas.crt", tmp_path / "out/home-nas.key")
    assert pair.common_name == "home-nas"
    certs.verify_issued_by(pair.cert, certs.load_ca(tmp_path / "pki").cert)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["cert", "issue", "--ca-dir", "missing", "--name", "a", "--client", "--out-dir", "o"],
            "cannot read missing/ca.crt",
        ),
        (
            [
                "cert",
                "issue",
                "--ca-dir",
                "pki",
                "--name",
                "Bad_Name",
                "--client",
                "--out-dir",
                "o",
            ],
            "agent name 'Bad_Name'",
        ),
        (
            [
                "cert",
                "issue",
                "--ca-dir",
                "pki",
                "--name",
                "a",
                "--client",
                "--lifetime",
                "5x",
                "--out-dir",
                "o",
            ],
            "lifetime '5x'",
        ),
        (
            [
                "cert",
                "issue",
                "--ca-dir",
                "pki",
                "--name",
                "r",
                "--server",
                "--san",
                "bad name!",
                "--out-dir",
                "o",
            ],
            "neither an IP address nor a DNS name",
        ),
        (["ca", "init", "--dir", "pki"], "already exists"),
        (["relay", "--config", "missing.toml"], "cannot read missing.toml"),
        (["relay", "--config", "bad-port.toml"], "bad-port.toml: agents[0].services[0].port"),
        (["relay", "--config", "bad-toml.toml"], "bad-toml.toml: not valid TOML"),
        (
            [
                "agent",
                "--relay",
                "localhost",
                "--ca",
                "pki/ca.crt",
                "--cert",
                "pki/ca.crt",
                "--key",
                "pki/ca.key",
                "--service",
                "web=127.0.0.1:80",
            ],
            "no port",
        ),
        (["agent", "--relay", "localhost:7443"], "give --config FILE"),
        (
            [
                "agent",
                "--relay",
                "localhost:1",
                "--ca",
                "pki/ca.crt",
                "--cert",
                "pki/ca.crt",
                "--key",
                "pki/ca.key",
            ],
            "no service",
        ),
        (
            [
                "agent",
                "--relay",
                "localhost:1",
                "--ca",
                "pki/ca.crt",
                "--cert",
                "pki/ca.crt",
                "--key",
                "pki/other.key",
                "--service",
                "web=127.0.0.1:80",
            ],
            "cannot load certificate",
        ),
        (
            [
                "agent",
                "--relay",
                "localhost:1",
                "--ca",
                "pki/ca.crt",
                "--cert",
                "pki/ca.crt",
                "--key",
                "pki/ca.key",
                "--service",
                "web",
            ],
            "expected NAME=HOST:PORT",
        ),
        (["relayctl", "--socket", "no.sock", "list"], "cannot reach control socket no.sock"),
        (
            ["relayctl", "--socket", "no.sock", "put", "x", "--json", "missing.json"],
            "cannot read missing.json: No such file or directory",
        ),
        (["relayctl", "--socket", "no.sock", "put", "x", "--service", "web"], "expected NAME=PORT"),
        (
            ["relayctl", "--socket", "no.sock", "put", "x", "--service", "web=443/tls"],
            "expected NAME=PORT",
        ),
        (
            ["relayctl", "--socket", "no.sock", "put", "x", "--service", "web=53/sctp"],
            "expected NAME=PORT",
        ),
        (
            [
                "agent",
                "--relay",
                "r:1",
                "--ca",
                "c",
                "--cert",
                "c",
                "--key",
                "k",
                "--service",
                "dns=127.0.0.1:53/sctp",
            ],
            "the protocol after '/' must be tcp or udp",
        ),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    assert run("ca", "init", "--dir", "pki", cwd=tmp_path).returncode == 0
    run(
        "cert",
        "issue",
        "--ca-dir",
        "pki",
        "--name",
        "other",
        "--client",
        "--out-dir",
        "pki",
        cwd=tmp_path,
    )
    (tmp_path / "bad-port.toml").write_text(
        '[relay]\nlisten = "127.0.0.1:7443"\nca = "pki/ca.crt"\ncert = "c"\nkey = "k"\n'
        '[[agents]]\nname = "a"\nservices = [{ name = "web", port = 70000 }]\n'
    )
    (tmp_path / "bad-toml.toml").write_text("[relay\n")
    assert_one_line_error(run(*args, cwd=tmp_path), fragment)


@pytest.mark.parametrize(
    ("command", "line", "fragment"),
    [
        ("relay", "listen = 7443", 'relay.listen: expected a string like "HOST:PORT"'),
        ("relay", "metrics = 9100", 'relay.metrics: expected a string like "HOST:PORT"'),
        ("relay", "ca = 5", "relay.ca: expected a file path (a string)"),
        ("relay", "control_socket = true", "relay.control_socket: expected a file path"),
        ("agent", "relay = 7443", 'agent.relay: expected a string like "HOST:PORT"'),
        ("agent", "cert = []", "agent.cert: expected a file path (a string)"),
        ("agent", "web = 8080", 'services.web: expected a string like "HOST:PORT"'),
    ],
)
def test_a_value_of_the_wrong_type_in_a_config_file_says_what_is_expected(
    tmp_path: Path, command: str, line: str, fragment: str
) -> None:
    """Not pydantic's "Input should be ... an instance of HostPort" or "valid path for
    <class 'pathlib.Path'>": the user never wrote a HostPort."""
    key, value = line.split(" = ")
    table = {"listen": '"127.0.0.1:7443"'} if command == "relay" else {"relay": '"r:1"'}
    table |= {"ca": '"ca.crt"', "cert": '"c.crt"', "key": '"c.key"'}
    services = {"web": '"127.0.0.1:80"'}
    (services if key == "web" else table)[key] = value
    text = f"[{command}]\n" + "".join(f"{k} = {v}\n" for k, v in table.items())
    if command == "agent":
        text += "[services]\n" + "".join(f"{k} = {v}\n" for k, v in services.items())
    config = tmp_path / "x.toml"
    config.write_text(text)
    assert_one_line_error(run(command, "--config", str(config)), fragment)


def _relay_toml(tmp: Path, pki: Pki, listen: int, web: int, extra: str = "") -> Path:
    path = tmp / "relay.toml"
    path.write_text(
        f'[relay]\nlisten = "127.0.0.1:{listen}"\nca = "{pki.ca}"\ncert = "{pki.relay_crt}"\n'
        f'key = "{pki.relay_key}"\npublic_host = "127.0.0.1"\nkeepalive_interval = 1.0\n'
        f"keepalive_timeout = 3.0\ndrain_timeout = 5.0\n{extra}\n"
        f'[[agents]]\nname = "home-nas"\nservices = [{{ name = "web", port = {web} }}]\n'
    )
    return path


async def _refused(port: int) -> bool:
    """Whether a connect to 127.0.0.1:port is refused now (a connection made is closed again)."""
    try:
        conn = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return True
    await conn.aclose()
    return False


def _start_relay(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*ATLAX, "relay", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.anyio
async def test_relay_process_killed_and_restarted(pki: Pki, tmp_path: Path) -> None:
    """kill -9 the relay process; a new one on the same ports gets the agent back."""
    listen, web = free_port(), free_port()
    config = _relay_toml(tmp_path, pki, listen, web)
    settings = agent_settings(pki, listen, backoff_cap=0.5)
    relay = _start_relay(config)
    try:
        async with tcp_service(echo_handler) as echo:
            agent = Agent(settings, {"web": echo})
            async with running_agent(agent, wait=False):
                await wait_until(lambda: agent.session is not None, 15)
                assert await exchange(web, b"first relay") == b"first relay"
                relay.kill()
                relay.wait(5)
                await wait_until(lambda: agent.session is None, 10)
                relay = _start_relay(config)
                started = anyio.current_time()
                await wait_until(lambda: agent.session is not None, 15)
                reconnect = anyio.current_time() - started
                assert await exchange(web, b"second relay") == b"second relay"
        assert reconnect < 10  # relay start-up (a Python process) + at most one backoff cap
    finally:
        relay.kill()
        relay.wait(5)


@pytest.mark.anyio
async def test_sigterm_drains_open_streams_then_exits_zero(pki: Pki, tmp_path: Path) -> None:
    listen, web = free_port(), free_port()
    config = _relay_toml(tmp_path, pki, listen, web)
    settings = agent_settings(pki, listen)
    relay = _start_relay(config)
    try:
        async with tcp_service(echo_handler) as echo:
            agent = Agent(settings, {"web": echo})
            async with running_agent(agent, wait=False):
                await wait_until(lambda: agent.session is not None, 15)
                async with await anyio.connect_tcp("127.0.0.1", web) as client:
                    await client.send(b"open before SIGTERM")
                    assert await client.receive() == b"open before SIGTERM"
                    relay.send_signal(signal.SIGTERM)
                    # Once the relay has taken the signal it lets no new client in (a loaded
                    # machine may take a while to deliver it: wait for that, not for a time) ...
                    with anyio.fail_after(15):
                        while not await _refused(web):
                            await anyio.sleep(0.05)
                    # ... while the open stream still works during the grace period ...
                    await client.send(b"still flowing")
                    assert await client.receive() == b"still flowing"
                    # ... and new clients are no longer accepted.
                    with pytest.raises(OSError):
                        await anyio.connect_tcp("127.0.0.1", web)
                    await client.send_eof()
                    with pytest.raises(anyio.EndOfStream):
                        await client.receive()
                code = await anyio.to_thread.run_sync(relay.wait, 10)
        assert code == 0
        output = relay.stdout.read() if relay.stdout else ""
        assert "relay shutting down: draining streams" in output
        assert "Traceback" not in output
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait(5)


def test_relayctl_and_curl_against_a_running_relay(pki: Pki, tmp_path: Path) -> None:
    listen, web = free_port(), free_port()
    sock = tmp_path / "run" / "control.sock"
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\nlisten = "127.0.0.1:{listen}"\nca = "{pki.ca}"\ncert = "{pki.relay_crt}"\n'
        f'key = "{pki.relay_key}"\npublic_host = "127.0.0.1"\ncontrol_socket = "{sock}"\n'
    )
    relay = _start_relay(config)
    try:
        for _ in range(100):
            if sock.exists():
                break
            relay.poll()
            assert relay.returncode is None, relay.stdout.read() if relay.stdout else ""
            import time

            time.sleep(0.1)
        assert sock.stat().st_mode & 0o777 == 0o660
        ctl = ["relayctl", "--socket", str(sock)]
        assert '"status": "ok"' in run(*ctl, "health").stdout
        put = run(*ctl, "put", "home-nas", "--service", f"web={web}")
        assert put.returncode == 0 and '"changed": true' in put.stdout
        listing = run(*ctl, "list").stdout
        assert "home-nas" in listing and f"web:{web}" in listing
        curl = subprocess.run(
            ["curl", "-s", "--unix-socket", str(sock), "http://relay/agents/home-nas"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if curl.returncode != 127:
            assert '"name": "home-nas"' in curl.stdout
        conflict = run(*ctl, "put", "office", "--service", f"files={web}")
        assert_one_line_error(conflict, f"HTTP 409: port {web} is already used by agent 'home-nas'")
        # A port shared by hostname and a UDP port; a later claim on a name names its owner.
        shared, dns = free_port(), free_port()
        put = run(
            *ctl, "put", "office", "--service", f"wiki={shared}/tls=wiki.example.com,*.wiki.example.com",
            "--service", f"dns={dns}/udp",
        )  # fmt: skip
        assert put.returncode == 0, put.stderr
        listing = run(*ctl, "list").stdout
        assert f"wiki:{shared}/tls=wiki.example.com+*.wiki.example.com" in listing
        assert f"dns:{dns}/udp" in listing
        taken = run(*ctl, "put", "third", "--service", f"x={shared}/tls=wiki.example.com")
        assert_one_line_error(
            taken,
            f"HTTP 409: hostname 'wiki.example.com' on port {shared} is already used by agent 'office'",
        )
        assert run(*ctl, "delete", "home-nas").returncode == 0
        assert_one_line_error(run(*ctl, "get", "home-nas"), "HTTP 404")
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(10)
    assert not sock.exists()


def test_relay_refuses_agents_in_file_with_control_socket(pki: Pki, tmp_path: Path) -> None:
    config = _relay_toml(
        tmp_path, pki, free_port(), free_port(), f'control_socket = "{tmp_path}/c.sock"'
    )
    assert_one_line_error(
        run("relay", "--config", str(config)), "cannot be combined with control_socket"
    )


def test_port_in_use_is_a_clear_error(pki: Pki, tmp_path: Path) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        config = _relay_toml(tmp_path, pki, free_port(), held.getsockname()[1])
        result = run("relay", "--config", str(config))
    assert_one_line_error(result, "Address already in use")


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("held", ["agent port", "metrics port"])
def test_a_relay_port_in_use_is_named(pki: Pki, tmp_path: Path, held: str, workers: str) -> None:
    """The agent port or the metrics port held by another process: one line naming the address
    (it said only "Address already in use"), and with --workers the supervisor stops at once
    instead of restarting workers that can never listen."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        agent_port = port if held == "agent port" else free_port()
        extra = f'metrics = "127.0.0.1:{port}"' if held == "metrics port" else ""
        config = _relay_toml(tmp_path, pki, agent_port, free_port(), extra)
        result = run("relay", "--config", str(config), "--workers", workers, timeout=60)
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}: Address already in use")


def test_a_public_port_in_use_under_workers_ends_the_supervisor(pki: Pki, tmp_path: Path) -> None:
    """relay.toml's public port held by another process, --workers 2: the workers' error and
    the supervisor's, then exit 1 (it restarted the workers forever, never ready)."""
    import socket

    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        config = _relay_toml(tmp_path, pki, free_port(), port)
        result = run("relay", "--config", str(config), "--workers", "2", timeout=90)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("atlax: error: ")]
    assert f"atlax: error: cannot listen on 127.0.0.1:{port}: Address already in use" in errors
    assert "before it was ready" in errors[-1], result.stderr


def test_workers_flag_overrides_the_file_in_what_the_relay_advertises(
    pki: Pki, tmp_path: Path
) -> None:
    """relay.toml says `workers = 3`, the command line `--workers 1`: one relay process runs,
    and it must count itself as one (it advertised a cluster of 3 to its agents, which then
    looked for two instances that do not exist)."""
    sock = tmp_path / "run" / "control.sock"
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\nlisten = "127.0.0.1:{free_port()}"\nca = "{pki.ca}"\n'
        f'cert = "{pki.relay_crt}"\nkey = "{pki.relay_key}"\npublic_host = "127.0.0.1"\n'
        f'control_socket = "{sock}"\nworkers = 3\n'
    )
    relay = subprocess.Popen(
        [*ATLAX, "relay", "--config", str(config), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cluster = None
        for _ in range(300):
            assert relay.poll() is None
            cluster = run("relayctl", "--socket", str(sock), "cluster")
            if cluster.returncode == 0:
                break
            import time

            time.sleep(0.1)
        assert cluster is not None and cluster.returncode == 0, cluster
        assert '"workers": 1,' in cluster.stdout and '"size": 1,' in cluster.stdout, cluster
    finally:
        relay.terminate()
        relay.wait(timeout=60)


@pytest.fixture(autouse=True)
def _no_uvloop_surprises() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def test_demo_on_a_busy_port_says_how_to_pick_another() -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        result = run("demo", "--public-port", str(held.getsockname()[1]))
    assert_one_line_error(result, "pick another with --public-port (0 = any free port)")
