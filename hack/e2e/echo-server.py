"""The e2e's service behind the agent (runs in a pod; standard library only).

TCP :9000 echoes every byte back and half-closes after the client does (hashed transfers, the
outage probe). HTTP :8080: `GET /` answers a fixed line, `POST /echo` answers the request body.
"""

import http.server
import signal
import socket
import socketserver
import sys


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while data := sock.recv(262144):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


class Web(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(b"hello through atlax\n")

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    import threading

    echo = Server(("", 9000), Echo)
    web = http.server.ThreadingHTTPServer(("", 8080), Web)
    web.daemon_threads = True
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 ignores an unhandled SIGTERM
    print("echo on :9000, http on :8080", flush=True)
    try:
        web.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
