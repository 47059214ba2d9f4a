"""A real Kubernetes control plane for tests: etcd + kube-apiserver as local processes.

This is what controller-runtime's envtest does: no kubelet, no controller-manager (so nothing
garbage-collects owned objects), but a real API server with real validation, real RBAC and real
ServiceAccount tokens. Binaries come from $KUBEBUILDER_ASSETS or .tools/bin (built by hack/tools).

    python tests/controlplane.py up --state-dir DIR     # prints KUBECONFIG=... last
    python tests/controlplane.py down --state-dir DIR
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIND_ATTEMPTS = 5


def find_binaries() -> Path:
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and all((Path(assets) / b).exists() for b in ("etcd", "kube-apiserver")):
        return Path(assets)
    tools = ROOT / ".tools" / "bin"
    if not all((tools / b).exists() for b in ("etcd", "kube-apiserver")):
        subprocess.run([str(ROOT / "hack" / "tools")], check=True, stdout=subprocess.DEVNULL)
    return tools


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _etcd_member_is(url: str, name: str) -> bool:
    """The etcd answering at `url` is the single member `name` (asked over its v3 JSON gateway)."""
    req = urllib.request.Request(f"{url}/v3/cluster/member/list", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        members = json.load(resp).get("members", [])
    return [m.get("name") for m in members] == [name]


def _last_attempt(log: Path) -> str:
    text = log.read_text(errors="replace")
    return text[text.rfind("--- attempt ") :]


def _write_sa_keys(directory: Path) -> tuple[Path, Path]:
    key, pub = directory / "sa.key", directory / "sa.pub"
    if not key.exists():
        subprocess.run(
            ["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
            check=True,
            capture_output=True,
        )
    return key, pub


class ControlPlane:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.kubeconfig = state_dir / "kubeconfig"
        self.server = ""
        self.token = ""
        self._procs: list[subprocess.Popen[bytes]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> None:
        bins = find_binaries()
        d = self.state_dir
        for sub in ("etcd", "certs", "logs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for log in (d / "logs").glob("*.log"):
            log.unlink()  # each start's logs only: _failure shows their tails
        deadline = time.monotonic() + timeout
        try:
            etcd_url = self._start_etcd(bins, deadline)
            self._start_apiserver(bins, etcd_url, deadline)
        except BaseException:
            self.stop()
            raise
        self._write_kubeconfig()
        (d / "state.json").write_text(
            json.dumps({"pids": [p.pid for p in self._procs], "server": self.server})
        )

    # A port found free can be taken by another process (another test run, an outgoing
    # connection's ephemeral port) before etcd or kube-apiserver binds it. Then the process exits
    # with "address already in use" and is started again on new ports, a bounded number of times.

    def _start_etcd(self, bins: Path, deadline: float) -> str:
        d = self.state_dir
        # A name of its own, checked in the member list: a foreign etcd that holds the port we
        # chose must not pass for ours while ours is still failing to bind it.
        name_file = d / "etcd-name"  # kept with the data an `up` after a `down` starts from
        if not name_file.exists():
            name_file.write_text(f"atlax-test-{secrets.token_hex(4)}")
        name = name_file.read_text()
        fresh = not (d / "etcd" / "member").exists()  # else: data of an earlier `up`, kept
        for attempt in range(1, BIND_ATTEMPTS + 1):
            if fresh and attempt > 1:  # the failed attempt may have written its peer URL
                shutil.rmtree(d / "etcd", ignore_errors=True)
            client_port, peer_port = _free_port(), _free_port()
            etcd_url = f"http://127.0.0.1:{client_port}"
            peer_url = f"http://127.0.0.1:{peer_port}"
            proc = self._spawn(
                "etcd",
                attempt,
                [
                    str(bins / "etcd"),
                    "--name",
                    name,
                    "--data-dir",
                    str(d / "etcd"),
                    "--listen-client-urls",
                    etcd_url,
                    "--advertise-client-urls",
                    etcd_url,
                    "--listen-peer-urls",
                    peer_url,
                    "--initial-advertise-peer-urls",
                    peer_url,
                    "--initial-cluster",
                    f"{name}={peer_url}",
                    "--unsafe-no-fsync",
                    "--log-level",
                    "warn",
                ],
            )
            ours = functools.partial(_etcd_member_is, etcd_url, name)
            if self._wait(proc, deadline, ours, "etcd"):
                return etcd_url
            self._discard(proc)
        raise RuntimeError(self._failure(f"etcd found no free port in {BIND_ATTEMPTS} attempts"))

    def _start_apiserver(self, bins: Path, etcd_url: str, deadline: float) -> None:
        d = self.state_dir
        self.token = secrets.token_hex(16)
        tokens = d / "tokens.csv"
        tokens.write_text(f'{self.token},admin,admin,"system:masters"\n')
        tokens.chmod(0o600)
        sa_key, sa_pub = _write_sa_keys(d / "certs")
        for attempt in range(1, BIND_ATTEMPTS + 1):
            api_port = _free_port()
            proc = self._spawn(
                "kube-apiserver",
                attempt,
                [
                    str(bins / "kube-apiserver"),
                    f"--etcd-servers={etcd_url}",
                    f"--cert-dir={d / 'certs'}",
                    f"--secure-port={api_port}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    "--allow-privileged=true",
                    "--authorization-mode=RBAC",
                    f"--token-auth-file={tokens}",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-account-key-file={sa_pub}",
                    f"--service-account-signing-key-file={sa_key}",
                    # No controller-manager runs here, so nothing would create token Secrets.
                    "--disable-admission-plugins=ServiceAccount",
                    "--enable-priority-and-fairness=false",
                ],
            )
            self.server = f"https://127.0.0.1:{api_port}"
            # Verified with the certificate our kube-apiserver wrote: a foreign one on the port
            # fails the handshake.
            if self._wait(proc, deadline, self._apiserver_ready, "the API server"):
                return
            self._discard(proc)
        raise RuntimeError(
            self._failure(f"kube-apiserver found no free port in {BIND_ATTEMPTS} attempts")
        )

    def stop(self) -> None:
        for proc in reversed(self._procs):
            _terminate(proc.pid)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._procs.clear()

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers -----------------------------------------------------------------------------

    def _spawn(self, name: str, attempt: int, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.state_dir / "logs" / f"{name}.log").open("ab") as log:
            log.write(f"--- attempt {attempt}: {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._procs.append(proc)
        return proc

    def _discard(self, proc: subprocess.Popen[bytes]) -> None:
        self._procs.remove(proc)
        proc.wait()

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "certs" / "apiserver.crt"

    def _wait(
        self,
        proc: subprocess.Popen[bytes],
        deadline: float,
        ready: Callable[[], bool],
        what: str,
    ) -> bool:
        """True once `ready()`; False if `proc` exited because its port was taken; else raises."""
        last = "not started"
        while time.monotonic() < deadline:
            for other in self._procs:
                if other.poll() is None:
                    continue
                log = self.state_dir / "logs" / f"{Path(str(other.args[0])).name}.log"
                if other is proc and "address already in use" in _last_attempt(log):
                    return False
                raise RuntimeError(self._failure(f"{other.args[0]} exited with {other.returncode}"))
            try:
                if ready():
                    return True
            except (OSError, ValueError, http.client.HTTPException) as exc:
                last = str(exc)
            time.sleep(0.3)
        raise RuntimeError(self._failure(f"{what} not ready in time: {last}"))

    def _apiserver_ready(self) -> bool:
        if not self.ca_file.exists():
            return False
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(
            f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            return bool(resp.status == 200)

    def _failure(self, message: str) -> str:
        tails = []
        for log in sorted((self.state_dir / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            tails.append(f"--- {log.name}\n" + "\n".join(lines))
        return message + "\n" + "\n".join(tails)

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "test",
                    "context": {"cluster": "test", "user": "admin", "namespace": "default"},
                }
            ],
            "current-context": "test",
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2))
        self.kubeconfig.chmod(0o600)

    def kubeconfig_for_token(self, token: str, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig that authenticates with `token` (e.g. a ServiceAccount's), to test RBAC."""
        config = json.loads(self.kubeconfig.read_text())
        config["users"] = [{"name": "sa", "user": {"token": token}}]
        config["contexts"][0]["context"].update(user="sa", namespace=namespace)
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kubectl", f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )


def _terminate(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


# -- command line (hack/control-plane) -----------------------------------------------------------


def _up(state_dir: Path) -> int:
    state = state_dir / "state.json"
    if state.exists():
        pids = json.loads(state.read_text())["pids"]
        if all(_alive(p) for p in pids):
            print(f"KUBECONFIG={state_dir / 'kubeconfig'}")
            return 0
        _down(state_dir)
    plane = ControlPlane(state_dir)
    plane.start()
    print(f"control plane up at {plane.server} (logs in {state_dir / 'logs'})", file=sys.stderr)
    print(f"KUBECONFIG={plane.kubeconfig}")
    return 0


def _down(state_dir: Path) -> int:
    state = state_dir / "state.json"
    if not state.exists():
        print("control plane is not running", file=sys.stderr)
        return 0
    for pid in reversed(json.loads(state.read_text())["pids"]):
        _terminate(pid)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    state.unlink()
    print("control plane stopped", file=sys.stderr)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run etcd + kube-apiserver for tests.")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".tools" / "run")
    args = parser.parse_args(argv)
    try:
        return _up(args.state_dir) if args.action == "up" else _down(args.state_dir)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"control-plane: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
