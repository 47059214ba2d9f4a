"""Identity is the key, not the name: certificate pins, revocation, make-before-break renewal.

A pin is `sha256:` and the hex SHA-256 of the certificate's DER SubjectPublicKeyInfo (what
`openssl x509 -pubkey | openssl pkey -pubin -outform DER | sha256sum` prints). An agent whose
spec lists pins may connect only with a key among them; the relay refuses any other with
GOAWAY UNAUTHORIZED naming the reason. Relay and agents run as processes; the operator tests
use the real API server.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import test_operator
from conftest import Pki
from procs import (
    ATLAX,
    Proc,
    agent_process,
    agent_table,
    free_port,
    poll,
    relay_process,
    served,
    service,
)
from test_operator import apply, tunnel_agent

stack = test_operator.stack  # the operator's stack fixture: relay and operator processes
PIN = re.compile(r"sha256:[0-9a-f]{64}")


def openssl_pin(cert: Path) -> str:
    """The pin as openssl computes it: SHA-256 of the DER SubjectPublicKeyInfo."""
    pubkey = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-pubkey"],
        capture_output=True,
        check=True,
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"],
        input=pubkey,
        capture_output=True,
        check=True,
    ).stdout
    return "sha256:" + hashlib.sha256(der).hexdigest()


def issue(pki: Pki, out: Path, name: str = "home-nas") -> tuple[Path, Path, str]:
    """`atlax cert issue --client`; returns the files and the pin it printed."""
    args = ["cert", "issue", "--ca-dir", str(pki.dir), "--name", name, "--client"]
    result = subprocess.run(
        [*ATLAX, *args, "--out-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    pins = PIN.findall(result.stdout)
    assert pins, f"no pin printed: {result.stdout!r}"
    return out / f"{name}.crt", out / f"{name}.key", pins[0]


def curl(sock: Path, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    args = ["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", str(sock), "-X", method]
    if body is not None:
        args += ["-d", body if isinstance(body, str) else json.dumps(body)]
    result = subprocess.run(
        [*args, f"http://relay{path}"], capture_output=True, text=True, timeout=30
    )
    text, _, code = result.stdout.rpartition("\n")
    return int(code), json.loads(text) if text.strip() else None


def refused_as_unauthorized(agent: Proc) -> str:
    """The agent's log line saying the relay refused it, once it appears."""
    text = agent.wait_log("UNAUTHORIZED", 30)
    return next(line for line in text.splitlines() if "UNAUTHORIZED" in line)


# -- pins in relay.toml --------------------------------------------------------------------------


def test_cert_issue_prints_the_pin_openssl_computes(pki: Pki, tmp_path: Path) -> None:
    crt, _, pin = issue(pki, tmp_path / "a")
    assert pin == openssl_pin(crt)


def test_a_pinned_agent_is_refused_with_any_other_key_of_its_name(pki: Pki, tmp_path: Path) -> None:
    """Two valid certificates for home-nas from the same CA; relay.toml pins the second: the
    first is refused with UNAUTHORIZED naming its key, the second serves."""
    old_crt, old_key, old_pin = issue(pki, tmp_path / "old")
    new_crt, new_key, new_pin = issue(pki, tmp_path / "new")
    web = free_port()
    agents = agent_table("home-nas", {"web": web}, f'pins = ["{new_pin}"]')
    with service("echo") as echo, relay_process(tmp_path, pki, agents=agents) as relay:
        with agent_process(
            tmp_path,
            pki,
            relay.listen,
            {"web": echo},
            cert=old_crt,
            key=old_key,
            name="old",
            wait=False,
        ) as old:
            line = refused_as_unauthorized(old)
            assert old_pin in line and "not pinned" in line
        assert relay.metric("atlax_handshake_failures_total", reason="key_not_pinned") >= 1
        assert old_pin in relay.log()
        with agent_process(
            tmp_path, pki, relay.listen, {"web": echo}, cert=new_crt, key=new_key, name="new"
        ):
            assert served(web)


def test_pins_in_relay_toml_are_checked_when_the_file_is_read(pki: Pki, tmp_path: Path) -> None:
    web = free_port()
    for bad in ('"sha256:abc"', '"md5:' + "0" * 32 + '"', "42"):
        config = tmp_path / "relay.toml"
        config.write_text(
            f'[relay]\nlisten = "127.0.0.1:{free_port()}"\nca = "{pki.ca}"\n'
            f'cert = "{pki.relay_crt}"\nkey = "{pki.relay_key}"\n'
            + agent_table("home-nas", {"web": web}, f"pins = [{bad}]")
        )
        result = subprocess.run(
            [*ATLAX, "relay", "--config", str(config)], capture_output=True, text=True, timeout=15
        )
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "agents[0].pins" in lines[0] and "sha256:<64 hex digits>" in lines[0], lines[0]


# -- pins through the control API ----------------------------------------------------------------


def test_pins_pushed_through_the_control_api_revoke_a_live_tunnel(pki: Pki, tmp_path: Path) -> None:
    old_crt, old_key, old_pin = issue(pki, tmp_path / "old")
    new_crt, new_key, new_pin = issue(pki, tmp_path / "new")
    web = free_port()
    sock = tmp_path / "run" / "control.sock"
    with (
        service("echo") as echo,
        relay_process(tmp_path, pki, extra=f'control_socket = "{sock}"') as relay,
    ):
        spec = {"services": [{"name": "web", "port": web}], "pins": [old_pin]}
        assert curl(sock, "PUT", "/agents/home-nas", spec)[0] == 200
        with agent_process(
            tmp_path, pki, relay.listen, {"web": echo}, cert=old_crt, key=old_key, name="old"
        ) as old:
            assert served(web)
            status, live = curl(sock, "GET", "/agents/home-nas")
            assert status == 200 and live["pin"] == old_pin and live["pins"] == [old_pin]
            # Revoke the key in use: the live tunnel goes, and the key stays refused.
            spec["pins"] = [new_pin]
            ctl = [*ATLAX, "relayctl", "--socket", str(sock), "put", "home-nas"]
            put = subprocess.run(
                [*ctl, "--service", f"web={web}", "--pin", new_pin],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert put.returncode == 0 and new_pin in put.stdout, put.stderr
            line = refused_as_unauthorized(old)
            assert old_pin in line
            assert not served(web)
        with agent_process(
            tmp_path, pki, relay.listen, {"web": echo}, cert=new_crt, key=new_key, name="new"
        ):
            assert served(web)
            assert curl(sock, "GET", "/agents/home-nas")[1]["pin"] == new_pin
        status, reply = curl(sock, "PUT", "/agents/home-nas", {**spec, "pins": ["md5:00"]})
        assert status == 400 and "pins" in reply["error"]


# -- make-before-break renewal -------------------------------------------------------------------


def test_renewal_dials_the_new_tunnel_before_the_old_one_drains(pki: Pki, tmp_path: Path) -> None:
    """The agent's certificate files are replaced while one idle long-lived stream is open: new
    connections keep being served throughout (the new tunnel is up before the old one goes), the
    idle stream still works right after the renewal, and the old tunnel's drain is bounded by
    the relay's drain_timeout."""
    files = tmp_path / "agent-pki"
    files.mkdir()
    crt, key, _ = issue(pki, files)
    web = free_port()
    drain = 3.0
    with (
        service("echo") as echo,
        relay_process(
            tmp_path,
            pki,
            agents=agent_table("home-nas", {"web": web}),
            extra=f"drain_timeout = {drain}",
        ) as relay,
        agent_process(
            tmp_path,
            pki,
            relay.listen,
            {"web": echo},
            cert=crt,
            key=key,
            config="cert_check_interval = 0.5",
        ) as agent,
    ):
        idle = socket.create_connection(("127.0.0.1", web), timeout=10)
        idle.sendall(b"long-lived")
        assert idle.recv(64) == b"long-lived"
        mark = len(agent.log())
        issue(pki, files)  # renewal: new key and certificate in place of the old
        agent.wait_log("tunnel up to", 20, after=mark)
        renewed = time.monotonic()
        idle.sendall(b"still open")
        assert idle.recv(64) == b"still open"
        failures, attempts = 0, 0
        idle.settimeout(0.05)
        idle_closed_after = None
        while time.monotonic() - renewed < drain + 5:
            attempts += 1
            failures += not served(web)
            if idle_closed_after is None:
                try:
                    if idle.recv(64) == b"":
                        idle_closed_after = time.monotonic() - renewed
                except TimeoutError:
                    pass
                except OSError:
                    idle_closed_after = time.monotonic() - renewed
        idle.close()
        assert relay.alive()
    assert failures == 0, f"{failures} of {attempts} new connections failed"
    assert idle_closed_after is not None and idle_closed_after <= drain + 2


# -- the operator on the real API server ---------------------------------------------------------


def _secret_files(stack: Any, name: str, into: Path) -> dict[str, Path]:
    """The agent Secret's files, copied to `into` (what an agent at home would have)."""
    stack.agent_files(name)
    into.mkdir(parents=True, exist_ok=True)
    src = stack.dir / f"agent-{name}"
    for key in ("tls.crt", "tls.key", "ca.crt"):
        shutil.copy(src / key, into / key)
    return {"cert": into / "tls.crt", "key": into / "tls.key", "ca": into / "ca.crt"}


def _operator_agent(
    stack: Any, files: dict[str, Path], echo: tuple[str, int], name: str, *, wait: bool = True
) -> Any:
    return agent_process(
        stack.dir,
        None,
        stack.relay_port,
        {"web": echo},
        relay_host="127.0.0.1",
        name=name,
        wait=wait,
        **files,
    )


@pytest.mark.k8s
def test_deleting_and_recreating_a_tunnel_agent_revokes_the_old_certificate(stack: Any) -> None:
    cp, port = stack.cp, free_port()
    apply(cp, tunnel_agent("home-nas", web=port))
    poll(lambda: stack.condition("home-nas", "PortsOpen").get("status") == "True", 60, "PortsOpen")
    old = _secret_files(stack, "home-nas", stack.dir / "old")
    with service("echo") as echo:
        with _operator_agent(stack, old, echo, "first"):
            assert served(port)
        cp.kubectl("delete", "tunnelagent", "home-nas", "-n", "default", "--timeout=30s")
        apply(cp, tunnel_agent("home-nas", web=port))
        poll(
            lambda: stack.condition("home-nas", "PortsOpen").get("status") == "True",
            60,
            "PortsOpen again",
        )
        new = _secret_files(stack, "home-nas", stack.dir / "new")
        assert new["cert"].read_bytes() != old["cert"].read_bytes()
        with _operator_agent(stack, old, echo, "thief", wait=False) as thief:
            line = refused_as_unauthorized(thief)
            assert "not pinned" in line
        with _operator_agent(stack, new, echo, "owner"):
            assert served(port)


@pytest.mark.k8s
def test_renewal_pins_both_keys_until_the_agent_has_moved_then_only_the_new_one(
    stack: Any,
) -> None:
    """A 90 s certificate is renewed 60 s in. Until the agent connects with the new key the
    relay accepts both (an agent at home picks up the new Secret when it can); once it has
    moved, the old key is refused, although that certificate has not expired yet."""
    cp, port = stack.cp, free_port()
    obj = tunnel_agent("home-nas", web=port)
    obj["spec"]["certificateLifetime"] = "90s"
    apply(cp, obj)
    poll(lambda: stack.condition("home-nas", "PortsOpen").get("status") == "True", 60, "PortsOpen")
    old = _secret_files(stack, "home-nas", stack.dir / "old")
    sock = stack.socket

    def pins() -> list[str]:
        status, live = curl(sock, "GET", "/agents/home-nas")
        return list(live.get("pins", [])) if status == 200 else []

    with service("echo") as echo:
        with _operator_agent(stack, old, echo, "old-1"):
            assert served(port)
            poll(lambda: len(pins()) == 2, 90, "the renewed key pinned beside the old one")
            assert served(port)  # the old key still serves: the agent has not moved yet
        new = _secret_files(stack, "home-nas", stack.dir / "new")
        new_pin, old_pin = openssl_pin(new["cert"]), openssl_pin(old["cert"])
        assert set(pins()) == {new_pin, old_pin}
        with _operator_agent(stack, new, echo, "new-1"):
            assert served(port)
            poll(lambda: pins() == [new_pin], 30, "the old key to be unpinned")
        with _operator_agent(stack, old, echo, "old-2", wait=False) as late:
            assert old_pin in refused_as_unauthorized(late)
        with _operator_agent(stack, new, echo, "new-2"):
            assert served(port)
