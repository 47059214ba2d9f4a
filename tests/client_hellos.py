"""The ClientHellos real TLS clients send: captured live, and stored for tests/test_sniff_tls.py.

    .venv/bin/python tests/client_hellos.py > tests/data/client_hellos.toml

A listener on 127.0.0.1 takes one connection per client, reads records until the first handshake
message is complete (its own small parser, so the reader under test does not judge its own
input), writes the bytes as read and closes; the client then fails its handshake, which is
expected. Nothing is decrypted and no certificate is needed. Clients: openssl s_client, curl and
Python's ssl module, each with and without a server name; openssl also with records of at most
512 bytes and a long ALPN list, so its ClientHello arrives in several records.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime

TIMEOUT = 10.0


def read_client_hello(conn: socket.socket) -> bytes:
    """The bytes up to the end of the record that completes the first handshake message."""
    data = b""
    handshake = b""

    def recv_exactly(n: int) -> bytes:
        nonlocal data
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                raise EOFError(f"client closed after {len(data) + len(out)} bytes")
            out += chunk
        data += out
        return out

    while len(handshake) < 4 or len(handshake) < 4 + int.from_bytes(handshake[1:4], "big"):
        header = recv_exactly(5)
        if header[0] != 22:
            raise ValueError(f"record type {header[0]} is not handshake")
        handshake += recv_exactly(int.from_bytes(header[3:5], "big"))
    return data


def capture(client: Callable[[int], None]) -> bytes:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(TIMEOUT)
        port = server.getsockname()[1]
        thread = threading.Thread(target=client, args=(port,), daemon=True)
        thread.start()
        conn, _ = server.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            hello = read_client_hello(conn)
        thread.join(TIMEOUT)
        return hello


def run(*argv: str) -> Callable[[int], None]:
    def client(port: int) -> None:
        args = [a.replace("PORT", str(port)) for a in argv]
        subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)

    return client


def python_ssl(server_hostname: str | None, **options: object) -> Callable[[int], None]:
    def client(port: int) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        for name, value in options.items():
            setattr(context, name, value)
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock,
                context.wrap_socket(sock, server_hostname=server_hostname),
            ):
                pass
        except (OSError, ssl.SSLError):
            pass  # the listener hangs up after the ClientHello

    return client


def version(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].strip()


# 40 made-up protocol ids: a ClientHello of about 900 bytes, more than one 512-byte record
LONG_ALPN = ",".join(["h2", "http/1.1", *(f"x-atlax-test-{i:02d}" for i in range(38))])

CLIENTS: list[tuple[str, str | None, str, Callable[[int], None]]] = [
    # name, the server name it must yield, how it was made, the client
    (
        "openssl-sni",
        "nas.example.com",
        "openssl s_client -connect 127.0.0.1:PORT -servername nas.example.com",
        run("openssl", "s_client", "-connect", "127.0.0.1:PORT", "-servername", "nas.example.com"),
    ),
    (
        "openssl-no-sni",
        None,
        "openssl s_client -connect 127.0.0.1:PORT -noservername",
        run("openssl", "s_client", "-connect", "127.0.0.1:PORT", "-noservername"),
    ),
    (
        "openssl-fragmented",
        "photos.home.example.com",
        "openssl s_client -connect 127.0.0.1:PORT -servername photos.home.example.com "
        f"-max_send_frag 512 -alpn {LONG_ALPN}",
        run(
            "openssl",
            "s_client",
            "-connect",
            "127.0.0.1:PORT",
            "-servername",
            "photos.home.example.com",
            "-max_send_frag",
            "512",
            "-alpn",
            LONG_ALPN,
        ),
    ),
    (
        "openssl-tls12",
        "nas.example.com",
        "openssl s_client -connect 127.0.0.1:PORT -servername nas.example.com -tls1_2",
        run(
            "openssl",
            "s_client",
            "-connect",
            "127.0.0.1:PORT",
            "-servername",
            "nas.example.com",
            "-tls1_2",
        ),
    ),
    (
        "curl-sni",
        "nas.example.com",
        "curl -sk --resolve nas.example.com:PORT:127.0.0.1 https://nas.example.com:PORT/",
        run(
            "curl",
            "-sk",
            "--resolve",
            "nas.example.com:PORT:127.0.0.1",
            "https://nas.example.com:PORT/",
        ),
    ),
    (
        "curl-trailing-dot",
        "nas.example.com",
        "curl -sk --resolve nas.example.com.:PORT:127.0.0.1 https://nas.example.com.:PORT/",
        run(
            "curl",
            "-sk",
            "--resolve",
            "nas.example.com.:PORT:127.0.0.1",
            "https://nas.example.com.:PORT/",
        ),
    ),
    (
        "curl-ip",
        None,
        "curl -sk https://127.0.0.1:PORT/ (no SNI for an IP address)",
        run("curl", "-sk", "https://127.0.0.1:PORT/"),
    ),
    (
        "python-sni",
        "nas.example.com",
        "ssl.create_default_context().wrap_socket(sock, server_hostname='nas.example.com')",
        python_ssl("nas.example.com"),
    ),
    (
        "python-no-sni",
        None,
        "ssl.create_default_context().wrap_socket(sock, server_hostname=None)",
        python_ssl(None),
    ),
    (
        "python-tls12",
        "nas.example.com",
        "the same with maximum_version = TLSVersion.TLSv1_2",
        python_ssl("nas.example.com", maximum_version=ssl.TLSVersion.TLSv1_2),
    ),
    (
        "python-idn",
        "xn--bcher-kva.example",
        "wrap_socket(sock, server_hostname='bücher.example') (Python sends the A-label)",
        python_ssl("bücher.example"),
    ),
]


def main() -> None:
    for tool in ("openssl", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    print("# ClientHellos of real clients, written by tests/client_hellos.py")
    print(f"# on {datetime.now(UTC):%Y-%m-%d} with {version(['openssl', 'version'])},")
    print(f"# {version(['curl', '--version'])},")
    print(f"# Python {sys.version.split()[0]} ssl ({ssl.OPENSSL_VERSION}).")
    for name, server_name, how, client in CLIENTS:
        hello = capture(client)
        print(f"\n[{name}]")
        print(f"how = {json.dumps(how, ensure_ascii=False)}")  # a JSON string is a TOML string
        print(f'server_name = "{server_name}"' if server_name else "server_name = false")
        print(f'hex = "{hello.hex()}"')


if __name__ == "__main__":
    main()
