"""Fuzzing the control API: arbitrary requests and raw bytes never crash the relay or get a 500.

The example corpus lives in tests/corpus/ (read-only here, so test runs never modify the tree);
add a failing example there to keep it forever.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
from conftest import Pki, free_port, relay_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase

from atlax.control.server import ControlServer
from atlax.http import Request, request
from atlax.relay_main import RelayMain

CORPUS = ReadOnlyDatabase(
    DirectoryBasedExampleDatabase(str(Path(__file__).parent / "corpus" / "control"))
)
ALLOWED = {200, 400, 404, 405, 409, 413}

PORTS = st.one_of(st.sampled_from([0, -1, 65536, 70000, "80", None, 1.5]), st.integers(1, 65535))
SERVICE = st.fixed_dictionaries(
    {
        "name": st.one_of(st.sampled_from(["web", "smb", "a-b_c"]), st.text(max_size=70)),
        "port": PORTS,
    },
    optional={
        "proxy_protocol": st.sampled_from(["v2", "v1", None, 2]),
        "allow": st.lists(
            st.sampled_from(["127.0.0.1/32", "::1/128", "nope", "10.0.0.0/33", ""]), max_size=3
        ),
        "max_connections": st.one_of(st.integers(-2, 5), st.just("many")),
        "extra": st.text(max_size=5),
    },
)
BODY = st.one_of(
    st.builds(lambda s: {"services": s}, st.lists(SERVICE, max_size=4)),
    st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3),
    st.lists(st.integers(), max_size=3),
    st.none(),
)
PATH = st.one_of(
    st.sampled_from(
        ["/agents", "/healthz", "/agents/home-nas", "/agents/", "/agents/a/b", "/agents/Bad!", "/x"]
    ),
    st.text(alphabet="/abcdefghijklmnopqrstuvwxyz-.%0123456789", max_size=30).map(
        lambda p: "/" + p
    ),
)


def _safe_port(service: Any) -> Any:
    """Valid-looking ports are replaced by free ones so the fuzzer never grabs a real service's."""
    if (
        isinstance(service, dict)
        and isinstance(service.get("port"), int)
        and 1 <= service["port"] <= 65535
    ):
        return {**service, "port": free_port()}
    return service


@settings(
    max_examples=150,
    deadline=None,
    database=CORPUS,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.sampled_from(["GET", "PUT", "DELETE", "POST", "PATCH"]), PATH, BODY)
def test_control_api_answers_every_request_cleanly(
    pki: Pki, tmp_path_factory: Any, method: str, path: str, body: Any
) -> None:
    if isinstance(body, dict) and isinstance(body.get("services"), list):
        body = {"services": [_safe_port(s) for s in body["services"]]}

    async def run() -> None:
        sock = tmp_path_factory.mktemp("ctl") / "c.sock"
        relay = RelayMain(relay_settings(pki, control_socket=sock))
        async with anyio.create_task_group() as tg:
            await tg.start(relay.serve)
            server = relay.control
            assert isinstance(server, ControlServer)
            before = relay.registry.agents()
            raw = b"" if body is None else json.dumps(body).encode()
            response = await server.app(Request(method, path, {}, raw))
            assert response.status in ALLOWED, (response.status, response.body)
            answer = json.loads(response.body)
            # The end state: a refused request changed nothing; an accepted PUT made the agent
            # exactly what the body said (the relay starts empty, so DELETE finds nobody).
            after = relay.registry.agents()
            if response.status != 200 or method != "PUT":
                assert after == before
            else:
                assert [a["name"] for a in after] == [answer["agent"]["name"]]
                wanted = [{"name": s["name"], "port": s["port"]} for s in body.get("services", [])]
                assert sorted(after[0]["services"], key=str) == sorted(wanted, key=str)
            health = await server.app(Request("GET", "/healthz", {}, b""))
            assert health.status == 200
            tg.cancel_scope.cancel()

    anyio.run(run)


@settings(
    max_examples=100,
    deadline=None,
    database=CORPUS,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=2048))
def test_raw_bytes_on_the_control_socket(pki: Pki, tmp_path_factory: Any, junk: bytes) -> None:
    async def run() -> None:
        sock = tmp_path_factory.mktemp("ctl") / "c.sock"
        relay = RelayMain(
            relay_settings(pki, control_socket=sock, listen=f"127.0.0.1:{free_port()}")
        )
        async with anyio.create_task_group() as tg:
            await tg.start(relay.serve)
            async with await anyio.connect_unix(sock) as stream:
                await stream.send(junk)
                await stream.send_eof()
                reply = b""
                with anyio.fail_after(5):
                    try:
                        while True:
                            reply += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        pass
            assert not reply or reply.startswith(b"HTTP/1.1 ")
            assert b" 500 " not in reply[:20]
            async with await anyio.connect_unix(sock) as stream:
                status, _ = await request(stream, "GET", "/healthz")
            assert status == 200
            assert relay.registry.agents() == []  # bytes are never a command
            tg.cancel_scope.cancel()

    anyio.run(run)
