"""The Helm chart and manifests, checked with real helm and a real kube-apiserver."""

from __future__ import annotations

import base64
import json
import re
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, free_port, pod_relay, start_relay_process, wait_for
from controlplane import ControlPlane

CHART = ROOT / "charts" / "atlax"
KUBE_VERSION = "1.32.4"


def helm_binary() -> Path:
    tools = subprocess.run(
        [str(ROOT / "hack" / "tools")], capture_output=True, text=True, check=True
    )
    return Path(tools.stdout.strip().splitlines()[-1]) / "helm"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, timeout=60, check=check
    )


def render(*sets: str, namespace: str = "atlax", release: str = "atlax") -> list[dict[str, Any]]:
    args = [
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        KUBE_VERSION,
    ]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


CUSTOM = (
    "image.repository=registry.example.com/atlax",
    "image.tag=1.2.3",
    "metrics.serviceMonitor.enabled=true",
    "service.loadBalancerSourceRanges={203.0.113.0/24}",
    "service.externalTrafficPolicy=Cluster",
    "relay.publicAddress=relay.example.com",
    "relay.extraSANs={203.0.113.10}",
    "relay.allowPrivilegedPorts=false",
)


def test_chart_crd_is_the_manifest_crd() -> None:
    assert (CHART / "crds" / "tunnelagents.yaml").read_text() == (
        ROOT / "manifests" / "crd.yaml"
    ).read_text()


def test_helm_renders_the_chart_without_a_kube_version() -> None:
    """helm is built with the ldflags of its own Makefile (hack/tools): it knows its version and
    the Kubernetes version of its client (1.31), which the chart's `kubeVersion: >=1.27.0-0`
    accepts. Without them it assumed v1.20.0 and refused the chart."""
    version = helm("version", "--template", "{{.Version}} {{.GitCommit}}").stdout.split()
    assert version[0] == "v3.16.4" and len(version[1]) == 40, version
    result = helm("template", "atlax", str(CHART), check=False)
    assert result.returncode == 0, result.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(result.stdout) if d}
    assert {"Deployment", "Service", "ServiceAccount"} <= kinds


def test_helm_lint() -> None:
    result = helm("lint", str(CHART), "--kube-version", KUBE_VERSION, "--strict")
    assert "0 chart(s) failed" in result.stdout


def test_default_render_is_hardened() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render()}
    deployment = docs[("Deployment", "atlax")]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"} in pod["securityContext"][
        "sysctls"
    ]
    for container in pod["containers"] + pod["initContainers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["limits"] and container["resources"]["requests"]
    relay = next(c for c in pod["containers"] if c["name"] == "relay")
    assert relay["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert relay["livenessProbe"]["httpGet"]["path"] == "/healthz"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["control"] and "emptyDir" in volumes["tls"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    service = docs[("Service", "atlax")]
    assert (
        service["spec"]["type"] == "LoadBalancer"
        and service["spec"]["externalTrafficPolicy"] == "Local"
    )
    assert ("ServiceMonitor", "atlax") not in docs
    rules = docs[("Role", "atlax")]["rules"]
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in rules)
    assert next(r for r in rules if r["resources"] == ["services"])["resourceNames"] == ["atlax"]
    assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs.values())
    # Secrets: only the CA and the relay certificate may be read; agents' are written, never read.
    for rule in (r for r in rules if "secrets" in r["resources"]):
        if {"get", "list", "watch"} & set(rule["verbs"]):
            assert set(rule["resourceNames"]) == {"atlax-ca", "atlax-relay-tls"}, rule
        assert "delete" not in rule["verbs"] and "list" not in rule["verbs"], rule
    # The relay container faces the internet: no ServiceAccount token in it.
    assert pod["automountServiceAccountToken"] is False
    assert docs[("ServiceAccount", "atlax")]["automountServiceAccountToken"] is False
    token_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    mounts = {c["name"]: {m["mountPath"] for m in c["volumeMounts"]} for c in pod["containers"]}
    mounts["certificates"] = {m["mountPath"] for m in pod["initContainers"][0]["volumeMounts"]}
    assert token_dir not in mounts["relay"]
    assert token_dir in mounts["operator"] and token_dir in mounts["certificates"]
    sources = volumes["kube-api-access"]["projected"]["sources"]
    assert any("serviceAccountToken" in source for source in sources)
    # Every namespaced object names its namespace (kubectl apply -f of the rendered file).
    assert all(d["metadata"].get("namespace") == "atlax" for d in docs.values())


def test_each_operator_role_has_a_least_privilege_role_of_its_own() -> None:
    """The relay pod's sync sidecar reads no Secret and writes nothing but Leases (its report);
    the controller's Lease rights are narrowed to its election Lease where a name can be."""
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render()}
    sync = docs[("Role", "atlax-sync")]["rules"]
    assert not any("secrets" in r["resources"] for r in sync)
    writes = [r for r in sync if set(r["verbs"]) - {"get", "list", "watch"}]
    assert [(r["resources"], sorted(r["verbs"])) for r in writes] == [
        (["leases"], ["create", "get", "update"])
    ]
    assert next(r for r in sync if r["resources"] == ["services"])["resourceNames"] == ["atlax"]
    assert docs[("ServiceAccount", "atlax-sync")]["automountServiceAccountToken"] is False
    controller = docs[("Role", "atlax-controller")]["rules"]
    election = next(r for r in controller if r.get("resourceNames") == ["atlax-controller"])
    assert election["resources"] == ["leases"] and election["verbs"] == ["get", "update"]
    for role in ("controller", "sync"):
        rules = docs[("Role", f"atlax-{role}")]["rules"]
        assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in rules)
        binding = docs[("RoleBinding", f"atlax-{role}")]
        assert binding["roleRef"]["name"] == f"atlax-{role}"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"atlax-{role}", "namespace": "atlax"}
        ]


def test_custom_values_render() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(*CUSTOM)}
    pod = docs[("Deployment", "atlax")]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com/atlax:1.2.3"
    assert "sysctls" not in pod["securityContext"]
    operator_args = next(c for c in pod["containers"] if c["name"] == "operator")["args"]
    assert "--relay-address=relay.example.com:7443" in operator_args
    assert "--relay-san=203.0.113.10" in operator_args
    assert docs[("Service", "atlax")]["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    assert docs[("ServiceMonitor", "atlax")]["spec"]["endpoints"][0]["port"] == "metrics"


def test_node_port_service_gives_agents_the_node_port() -> None:
    """With service.type=NodePort agents dial NODE:agentNodePort; that goes into their Secrets."""
    docs = {
        (d["kind"], d["metadata"]["name"]): d
        for d in render(
            "service.type=NodePort", "service.agentNodePort=30443", "relay.publicAddress=192.0.2.10"
        )
    }
    pod = docs[("Deployment", "atlax")]["spec"]["template"]["spec"]
    for container in (pod["initContainers"][0], pod["containers"][1]):
        assert "--relay-address=192.0.2.10:30443" in container["args"]
    port = docs[("Service", "atlax")]["spec"]["ports"][0]
    assert (port["port"], port["nodePort"]) == (7443, 30443)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "service.type=NodePort,relay.publicAddress=192.0.2.10",
            "service.agentNodePort is required with service.type=NodePort",
        ),
        (
            "service.type=NodePort,service.agentNodePort=30443",
            "relay.publicAddress is required with service.type=NodePort",
        ),
        ("replicaCount=abc", "replicaCount: Invalid type"),
        ("replicaCount=2", "replicaCount: Must be less than or equal to 1"),
        ("relay.agentPort=70000", "relay.agentPort: Must be less than or equal to 65535"),
        ("service.externalTrafficPolicy=Sometimes", "service.externalTrafficPolicy"),
        ("metrics.serviceMonitor.enabled=maybe", "metrics.serviceMonitor.enabled: Invalid type"),
        ("relay.unknownKey=1", "Additional property unknownKey is not allowed"),
        (
            "service.loadBalancerSourceRanges={nope}",
            "service.loadBalancerSourceRanges.0: Does not match pattern",
        ),
    ],
)
def test_schema_rejects_bad_values(value: str, message: str) -> None:
    result = helm(
        "template", "atlax", str(CHART), "--kube-version", KUBE_VERSION, "--set", value, check=False
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_manifests_are_rendered_from_the_chart() -> None:
    result = subprocess.run(
        [str(ROOT / "hack" / "render-manifests"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.agent"])
def test_dockerfiles_follow_the_rules(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S*)", text, re.M))
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) >= 2, "multi-stage build"
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)  # the default base
        assert ":" in image and not image.endswith(":latest"), f"pinned base image: {image}"
    # The same file builds without PyPI (hack/cluster images): packages from mounted wheels.
    assert re.search(r"^RUN pip wheel .*\$PIP_SOURCE", text, re.M) and args["PIP_SOURCE"] == '""'
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as non-root"
    final = text.split("FROM", 2)[-1]
    assert "--constraint constraints.txt" in text and "--no-index" in final, (
        "pinned deps, no network in the final stage"
    )
    assert not re.search(r"apt-get install .*(gcc|build-essential)", final)


def test_agent_entrypoint_is_valid_shell() -> None:
    result = subprocess.run(
        ["sh", "-n", str(ROOT / "docker" / "agent-entrypoint.sh")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# -- against the real API server -----------------------------------------------------------------


MINIMAL_SERVICEMONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "names": {"kind": "ServiceMonitor", "plural": "servicemonitors"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


@pytest.mark.k8s
@pytest.mark.parametrize("values", [(), CUSTOM], ids=["default", "custom"])
def test_every_rendered_object_passes_server_side_dry_run(
    control_plane: ControlPlane, values: tuple[str, ...]
) -> None:
    cp = control_plane
    cp.kubectl("apply", "-f", "-", input=json.dumps(MINIMAL_SERVICEMONITOR_CRD))
    cp.kubectl("apply", "-f", str(CHART / "crds" / "tunnelagents.yaml"))
    cp.kubectl("create", "namespace", "atlax", check=False)
    wait_for(
        lambda: cp.kubectl("get", "servicemonitors", "-n", "atlax", check=False).returncode == 0,
        30,
        "CRDs",
    )
    docs = render(*values)
    result = cp.kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        "atlax",
        "-f",
        "-",
        input="\n---\n".join(yaml.safe_dump(d) for d in docs),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(docs)


@pytest.mark.k8s
def test_rendered_manifests_pass_server_side_dry_run(control_plane: ControlPlane) -> None:
    result = control_plane.kubectl(
        "apply", "--dry-run=server", "-f", str(ROOT / "manifests" / "atlax.yaml"), check=False
    )
    assert result.returncode == 0, result.stderr


def chart_token(cp: ControlPlane, ns: str, account: str, path: Path) -> Path:
    """A kubeconfig with a token of the chart's ServiceAccount `account` in `ns`."""
    token = cp.kubectl("create", "token", account, "-n", ns, "--duration=1h").stdout.strip()
    return cp.kubeconfig_for_token(token, path, namespace=ns)


def operator_process(
    kubeconfig: Path, ns: str, sock: Path, relay_port: int, tmp_path: Path, *extra: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atlax.cli",
            "operator",
            "--namespace",
            ns,
            "--control-socket",
            str(sock),
            "--service-name",
            "atlax",
            "--relay-address",
            f"127.0.0.1:{relay_port}",
            "--relay-san",
            "127.0.0.1",
            "--relay-tls-dir",
            str(tmp_path / "tls"),
            "--status-interval",
            "1",
            *extra,
        ],
        stdout=(tmp_path / "operator.log").open("ab"),
        stderr=subprocess.STDOUT,
        env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin"},
    )


def stop(*procs: subprocess.Popen[Any]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.k8s
def test_operator_works_with_only_the_charts_rbac(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Create the chart's ServiceAccount, Role, RoleBinding and Service, then run the operator
    with that ServiceAccount's token, first as the pod's certificate step, then in full, then
    restarted: it must do its whole job without a Forbidden, and without reading any agent's
    Secret (which that token may not)."""
    cp, ns = control_plane, "atlax-rbac"
    cp.kubectl("apply", "-f", str(CHART / "crds" / "tunnelagents.yaml"))
    cp.kubectl("create", "namespace", ns, check=False)
    wanted = {"ServiceAccount", "Role", "RoleBinding", "Service"}
    docs = [d for d in render(namespace=ns) if d["kind"] in wanted]
    cp.kubectl("apply", "-n", ns, "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))
    kubeconfig = chart_token(cp, ns, "atlax", tmp_path / "sa-kubeconfig")
    port, relay_port = free_port(), free_port()
    sock = tmp_path / "run" / "control.sock"

    # The init container: CA and relay certificate, then exit.
    step = operator_process(kubeconfig, ns, sock, relay_port, tmp_path, "--certificates-only")
    assert step.wait(60) == 0, (tmp_path / "operator.log").read_text()
    assert {p.name for p in (tmp_path / "tls").iterdir()} >= {"ca.crt", "relay.crt", "relay.key"}

    config = pod_relay(tmp_path, relay_port, sock)
    relay = start_relay_process(config, tmp_path / "relay.log")
    operator = operator_process(kubeconfig, ns, sock, relay_port, tmp_path)
    try:
        agent = {
            "apiVersion": "atlax.dev/v1alpha1",
            "kind": "TunnelAgent",
            "metadata": {"name": "rbac-check", "namespace": ns},
            "spec": {"services": [{"name": "web", "port": port}]},
        }
        cp.kubectl("apply", "-f", "-", input=json.dumps(agent))

        def ports_open() -> bool:
            out = cp.kubectl("get", "tunnelagent", "rbac-check", "-n", ns, "-o", "json").stdout
            conds = json.loads(out).get("status", {}).get("conditions", [])
            return any(c["type"] == "PortsOpen" and c["status"] == "True" for c in conds)

        wait_for(ports_open, 60, "PortsOpen under the chart's RBAC")
        secret = json.loads(
            cp.kubectl("get", "secret", "atlax-agent-rbac-check", "-n", ns, "-o", "json").stdout
        )
        assert base64.b64decode(secret["data"]["relay"]).decode() == f"127.0.0.1:{relay_port}"
        service = json.loads(cp.kubectl("get", "service", "atlax", "-n", ns, "-o", "json").stdout)
        assert port in {p["port"] for p in service["spec"]["ports"]}
        events = cp.kubectl(
            "get", "events", "-n", ns, "--field-selector", "involvedObject.name=rbac-check"
        ).stdout
        assert "CertificateIssued" in events

        # Restarted, it resumes without reading the Secret back: the certificate stays.
        stop(operator)
        operator = operator_process(kubeconfig, ns, sock, relay_port, tmp_path)
        wait_for(
            lambda: (tmp_path / "operator.log").read_text().count("relay is up") >= 2, 60, "restart"
        )
        wait_for(ports_open, 60, "PortsOpen after the restart")
        again = json.loads(
            cp.kubectl("get", "secret", "atlax-agent-rbac-check", "-n", ns, "-o", "json").stdout
        )
        assert again["data"]["tls.crt"] == secret["data"]["tls.crt"]

        cp.kubectl("delete", "tunnelagent", "rbac-check", "-n", ns, "--timeout=60s")
        # The Secret goes with its owner (the garbage collector of a real cluster does that; this
        # bare API server has none, so the owner reference is what is checked here).
        owner = again["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("TunnelAgent", "rbac-check")
        assert port not in {
            p["port"]
            for p in json.loads(
                cp.kubectl("get", "service", "atlax", "-n", ns, "-o", "json").stdout
            )["spec"]["ports"]
        }
    finally:
        stop(operator, relay)
    text = (tmp_path / "operator.log").read_text()
    assert "Forbidden" not in text and "403" not in text, text[-3000:]


@pytest.mark.k8s
def test_no_token_in_reach_of_the_relay_reads_a_secret(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The relay container holds no token (test_default_render_is_hardened): it reaches the API
    as system:anonymous, which reads no Secret. The operator's own token reads the CA and the
    relay certificate only: no agent's Secret, no other Secret, no listing."""
    cp, ns = control_plane, "atlax-secrets"
    cp.kubectl("create", "namespace", ns, check=False)
    wanted = {"ServiceAccount", "Role", "RoleBinding"}
    docs = [d for d in render(namespace=ns) if d["kind"] in wanted]
    cp.kubectl("apply", "-n", ns, "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))
    for name in ("atlax-ca", "atlax-agent-home-nas", "unrelated"):
        cp.kubectl("create", "secret", "generic", name, "-n", ns, "--from-literal=k=v")

    context = ssl.create_default_context(cafile=str(cp.ca_file))

    def anonymous(path: str) -> int:
        """GET with verified TLS and no credential: what the relay container could do."""
        try:
            with urllib.request.urlopen(f"{cp.server}{path}", context=context, timeout=30) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    operator = chart_token(cp, ns, "atlax", tmp_path / "operator")

    def get(kubeconfig: Path, *what: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kubectl", f"--kubeconfig={kubeconfig}", "get", *what, "-n", ns, "-o", "name"],
            capture_output=True,
            text=True,
            timeout=60,
        )

    for path in ("secrets/atlax-ca", "secrets/atlax-agent-home-nas", "secrets"):
        assert anonymous(f"/api/v1/namespaces/{ns}/{path}") in (401, 403), path
    assert get(operator, "secret", "atlax-ca").returncode == 0
    for what in (["secret", "atlax-agent-home-nas"], ["secret", "unrelated"], ["secrets"]):
        result = get(operator, *what)
        assert result.returncode != 0 and "Forbidden" in result.stderr, result


@pytest.mark.k8s
def test_the_documented_kubectl_apply_installs_into_namespace_atlax(
    control_plane: ControlPlane,
) -> None:
    """`kubectl apply -f manifests/atlax.yaml`, as docs/deploy.md says, with no -n: everything
    lands in namespace atlax, where the RoleBinding looks for the ServiceAccount."""
    cp = control_plane
    result = cp.kubectl("apply", "-f", str(ROOT / "manifests" / "atlax.yaml"), check=False)
    assert result.returncode == 0, result.stderr
    for kind in ("serviceaccount", "role", "rolebinding", "configmap", "service", "deployment"):
        assert cp.kubectl("get", kind, "atlax", "-n", "atlax", "-o", "name").stdout.strip()
        assert cp.kubectl("get", kind, "atlax", "-n", "default", check=False).returncode != 0
    binding = json.loads(
        cp.kubectl("get", "rolebinding", "atlax", "-n", "atlax", "-o", "json").stdout
    )
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "atlax", "namespace": "atlax"}
    ]


@pytest.mark.k8s
def test_helm_notes_name_the_node_port_agents_dial(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            str(helm_binary()),
            "install",
            "atlax",
            str(CHART),
            "--namespace",
            "atlax-notes",
            "--dry-run=server",
            "--set",
            "service.type=NodePort,service.agentNodePort=30443",
            "--set",
            "relay.publicAddress=192.0.2.10",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "KUBECONFIG": str(control_plane.kubeconfig),
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
        },
    )
    assert result.returncode == 0, result.stderr
    assert "Agents dial 192.0.2.10:30443" in result.stdout


@pytest.mark.k8s
def test_uninstall_hook_revokes_every_tunnel_agent_and_removes_the_ca(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """What `helm uninstall` runs first, under the hook's own RBAC: with no operator left to
    handle them, TunnelAgents lose the operator's finalizer after --timeout, so nothing blocks
    deleting the namespace; the CA and relay certificate Secrets go too."""
    cp, ns = control_plane, "atlax-uninstall"
    cp.kubectl("apply", "-f", str(CHART / "crds" / "tunnelagents.yaml"))
    cp.kubectl("create", "namespace", ns, check=False)
    hook = [
        d
        for d in render(namespace=ns)
        if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"
    ]
    assert {d["kind"] for d in hook} == {"ServiceAccount", "Role", "RoleBinding", "Job"}
    job = next(d for d in hook if d["kind"] == "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][0] == "operator-uninstall"
    rbac = [d for d in hook if d["kind"] != "Job"]
    cp.kubectl("apply", "-n", ns, "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in rbac))
    for name in ("home-nas", "office"):
        agent = {
            "apiVersion": "atlax.dev/v1alpha1",
            "kind": "TunnelAgent",
            "metadata": {"name": name, "namespace": ns, "finalizers": ["atlax.dev/cleanup"]},
            "spec": {"services": [{"name": "web", "port": free_port()}]},
        }
        cp.kubectl("apply", "-f", "-", input=json.dumps(agent))
    for name in ("atlax-ca", "atlax-relay-tls", "unrelated"):
        cp.kubectl("create", "secret", "generic", name, "-n", ns, "--from-literal=k=v")
    kubeconfig = chart_token(cp, ns, "atlax-uninstall", tmp_path / "hook")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "atlax.cli",
            "operator-uninstall",
            "--namespace",
            ns,
            "--timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "removed its finalizer" in result.stderr
    assert not json.loads(cp.kubectl("get", "tunnelagents", "-n", ns, "-o", "json").stdout)["items"]
    secrets = cp.kubectl("get", "secrets", "-n", ns, "-o", "name").stdout.split()
    assert secrets == ["secret/unrelated"]


def test_the_charts_relay_toml_is_what_the_relay_reads(tmp_path: Path) -> None:
    """The rendered relay.toml passes the relay's own (strict) config loader, and its limits
    are the values'."""
    from atlax.config import load_relay_config

    docs = {(d["kind"], d["metadata"]["name"]): d for d in render()}
    config = tmp_path / "relay.toml"
    config.write_text(docs[("ConfigMap", "atlax")]["data"]["relay.toml"])
    relay = load_relay_config(config).relay
    values = yaml.safe_load((CHART / "values.yaml").read_text())["relay"]
    assert relay.max_agents == values["maxAgents"]
    assert relay.max_buffered_bytes == values["maxBufferedBytes"]
    assert relay.max_handshakes == values["maxHandshakes"]
    assert relay.max_public_connections == values["maxPublicConnections"]
    assert str(relay.control_socket) == "/run/atlax/control/relay/control.sock"
