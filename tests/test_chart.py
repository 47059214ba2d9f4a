"""The Helm chart and manifests, checked with real helm and a real kube-apiserver."""

from __future__ import annotations

import base64
import json
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, free_port, wait_for
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
    controller = docs[("Deployment", "atlax-controller")]
    pod = deployment["spec"]["template"]["spec"]
    controller_pod = controller["spec"]["template"]["spec"]
    for spec in (pod, controller_pod):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["limits"] and container["resources"]["requests"]
        assert spec["automountServiceAccountToken"] is False
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"} in pod["securityContext"][
        "sysctls"
    ]
    assert [c["name"] for c in pod["containers"]] == ["relay", "sync"]
    assert "initContainers" not in pod
    relay = next(c for c in pod["containers"] if c["name"] == "relay")
    assert relay["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert relay["livenessProbe"]["httpGet"]["path"] == "/healthz"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["control"]
    assert volumes["tls"]["secret"]["secretName"] == "atlax-relay-tls"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    service = docs[("Service", "atlax")]
    assert (
        service["spec"]["type"] == "LoadBalancer"
        and service["spec"]["externalTrafficPolicy"] == "Local"
    )
    # The Services pick the relay pods only, never a controller.
    relay_labels = deployment["spec"]["template"]["metadata"]["labels"]
    controller_labels = controller["spec"]["template"]["metadata"]["labels"]
    for name in ("atlax", "atlax-metrics"):
        selector = docs[("Service", name)]["spec"]["selector"]
        assert selector.items() <= relay_labels.items()
        assert not selector.items() <= controller_labels.items()
    assert ("ServiceMonitor", "atlax") not in docs
    assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs.values())
    # The relay container faces the internet: no ServiceAccount token in it; the sync beside it
    # and the controller mount one.
    token_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    mounts = {c["name"]: {m["mountPath"] for m in c["volumeMounts"]} for c in pod["containers"]}
    assert token_dir not in mounts["relay"] and token_dir in mounts["sync"]
    assert token_dir in {m["mountPath"] for m in controller_pod["containers"][0]["volumeMounts"]}
    assert pod["serviceAccountName"] == "atlax-sync"
    assert controller_pod["serviceAccountName"] == "atlax-controller"
    sources = volumes["kube-api-access"]["projected"]["sources"]
    assert any("serviceAccountToken" in source for source in sources)
    # Every namespaced object names its namespace (kubectl apply -f of the rendered file).
    assert all(d["metadata"].get("namespace") == "atlax" for d in docs.values())


def test_the_default_render_rolls_relays_without_a_gap() -> None:
    """Two relay pods of two workers; a rollout surges one pod and removes an old one only once
    the new one is ready; a stopping pod keeps serving for the preStop delay (the load balancer
    stops sending it connections), then drains, within its termination grace; a PDB and a
    topology spread; two controllers, one leading."""
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render()}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    deployment = docs[("Deployment", "atlax")]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    pod = spec["template"]["spec"]
    relay = next(c for c in pod["containers"] if c["name"] == "relay")
    assert "--workers=2" in relay["args"]
    delay, drain = values["relay"]["preStopDelay"], values["relay"]["drainTimeout"]
    assert relay["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(delay)]
    assert pod["terminationGracePeriodSeconds"] == delay + drain + 5
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    pdb = docs[("PodDisruptionBudget", "atlax")]["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["selector"] == spec["selector"]
    sync = next(c for c in pod["containers"] if c["name"] == "sync")
    assert sync["args"][:2] == ["operator", "sync"]
    assert "--pod-name=$(POD_NAME)" in sync["args"]
    # The pod is ready once the relay has its state (its probe) and the agents connected to the
    # other pods have their tunnels here too (the sync's).
    assert sync["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "sync-health"}
    assert f"--health-port={values['sync']['healthPort']}" in sync["args"]
    # Agents dial a Service that includes pods that are not ready yet: they reach a new pod
    # before it takes public connections.
    agents = docs[("Service", "atlax-agents")]["spec"]
    assert agents["publishNotReadyAddresses"] is True
    assert agents["selector"] == docs[("Service", "atlax")]["spec"]["selector"]
    assert [p["port"] for p in agents["ports"]] == [7443]
    controller = docs[("Deployment", "atlax-controller")]["spec"]
    assert controller["replicas"] == 2
    args = controller["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["operator", "controller"]
    assert "--lease-name=atlax-controller" in args and "--identity=$(POD_NAME)" in args


def test_each_operator_role_has_a_least_privilege_role_of_its_own() -> None:
    """The relay pod's sync sidecar reads no Secret and writes nothing but Leases (its report);
    the controller's Lease rights are narrowed to its election Lease where a name can be."""
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render()}
    sync = docs[("Role", "atlax-sync")]["rules"]
    assert not any("secrets" in r["resources"] for r in sync)
    writes = [r for r in sync if set(r["verbs"]) - {"get", "list", "watch"}]
    assert [(r["resources"], sorted(r["verbs"])) for r in writes] == [
        (["leases"], ["create", "get", "list", "update", "watch"])
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
    controller = docs[("Deployment", "atlax-controller")]["spec"]["template"]["spec"]
    operator_args = controller["containers"][0]["args"]
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
    controller = docs[("Deployment", "atlax-controller")]["spec"]["template"]["spec"]
    assert "--relay-address=192.0.2.10:30443" in controller["containers"][0]["args"]
    port = docs[("Service", "atlax-agents")]["spec"]["ports"][0]
    assert (port["port"], port["nodePort"]) == (7443, 30443)
    assert "nodePort" not in docs[("Service", "atlax")]["spec"]["ports"][0]


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
        ("replicaCount=101", "replicaCount: Must be less than or equal to 100"),
        ("relay.workers=0", "relay.workers: Must be greater than or equal to 1"),
        ("relay.preStopDelay=-1", "relay.preStopDelay: Must be greater than or equal to 0"),
        ("controller.leaseDuration=0", "controller.leaseDuration: Must be greater than 0"),
        ("sync.interval=0", "sync.interval: Must be greater than 0"),
        ("podDisruptionBudget.maxUnavailable=0", "podDisruptionBudget.maxUnavailable"),
        ("topologySpread.whenUnsatisfiable=Never", "topologySpread.whenUnsatisfiable"),
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


@pytest.mark.k8s
def test_the_operator_roles_work_with_only_the_charts_rbac(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The chart's ServiceAccounts, Roles and RoleBindings; a controller and a relay pod (relay
    and sync sidecar), each process with its role's token (tests/pods.py): a TunnelAgent gets
    its certificate, its port on the Service and at the relay without a Forbidden. A controller
    started afresh reads no agent's Secret back (it may not): the certificate stays."""
    from pods import Controller, Kubelet, Namespace, RelayPod, port_open, tunnel_agent

    ns = Namespace.create(control_plane, tmp_path)
    agent_port, port = free_port(), free_port()
    relay_address = f"127.0.0.1:{agent_port}"
    controllers = [Controller(ns, "controller-a", relay_address)]
    pod = RelayPod(ns, "relay-1", "127.0.0.1", agent_port)

    def ports_open() -> bool:
        return bool(ns.condition("rbac-check", "PortsOpen").get("status") == "True")

    try:
        with Kubelet(ns, [pod]):
            pod.start()
            ns.apply(tunnel_agent("rbac-check", web=port))
            wait_for(ports_open, 60, "PortsOpen under the chart's RBAC")
            assert port_open("127.0.0.1", port)
            secret = ns.get("secret", "atlax-agent-rbac-check")
            assert base64.b64decode(secret["data"]["relay"]).decode() == relay_address
            assert port in {p["port"] for p in ns.get("service", "atlax")["spec"]["ports"]}
            events = [e["reason"] for e in ns.get("events")["items"]]
            assert "CertificateIssued" in events

            controllers[0].process.stop()
            controllers.append(Controller(ns, "controller-b", relay_address))
            wait_for(lambda: ns.lease_holder() == "controller-b", 60, "controller-b to lead")
            # It acts (a TunnelAgent created now is served), and it has seen the first one.
            ns.apply(tunnel_agent("second", web=free_port()))
            wait_for(
                lambda: ns.condition("second", "PortsOpen").get("status") == "True",
                60,
                "controller-b to serve a new TunnelAgent",
            )
            assert ports_open()
            again = ns.get("secret", "atlax-agent-rbac-check")
            assert again["data"]["tls.crt"] == secret["data"]["tls.crt"]

            control_plane.kubectl(
                "delete", "tunnelagent", "rbac-check", "-n", ns.name, "--timeout=60s"
            )
            owner = again["metadata"]["ownerReferences"][0]
            assert (owner["kind"], owner["name"]) == ("TunnelAgent", "rbac-check")
            assert port not in {p["port"] for p in ns.get("service", "atlax")["spec"]["ports"]}
            wait_for(lambda: not port_open("127.0.0.1", port), 30, "the port to close")
    finally:
        processes = [c.process for c in controllers] + pod.processes()
        for process in processes:
            process.stop()
        ns.cleanup()
    text = "\n".join(p.text() for p in processes if not p.name.endswith("/relay"))
    assert "Forbidden" not in text and "(403)" not in text, text[-3000:]


@pytest.mark.k8s
def test_no_token_in_reach_of_the_relay_reads_a_secret(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The relay container holds no token (test_default_render_is_hardened): it reaches the API
    as system:anonymous, which reads no Secret. The sync sidecar's token (the same pod) reads no
    Secret at all. The controller's token reads the CA and the relay certificate only: no
    agent's Secret, no other Secret, no listing."""
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

    operator = chart_token(cp, ns, "atlax-controller", tmp_path / "controller")
    sync = chart_token(cp, ns, "atlax-sync", tmp_path / "sync")

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
    for what in (["secret", "atlax-ca"], ["secret", "atlax-agent-home-nas"], ["secrets"]):
        result = get(sync, *what)
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
    objects = [("configmap", "atlax"), ("service", "atlax"), ("deployment", "atlax")]
    objects += [("poddisruptionbudget", "atlax"), ("deployment", "atlax-controller")]
    for role in ("atlax-controller", "atlax-sync"):
        objects += [("serviceaccount", role), ("role", role), ("rolebinding", role)]
    for kind, name in objects:
        assert cp.kubectl("get", kind, name, "-n", "atlax", "-o", "name").stdout.strip()
        assert cp.kubectl("get", kind, name, "-n", "default", check=False).returncode != 0
    for role in ("atlax-controller", "atlax-sync"):
        binding = json.loads(
            cp.kubectl("get", "rolebinding", role, "-n", "atlax", "-o", "json").stdout
        )
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": role, "namespace": "atlax"}
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


def test_the_relay_containers_memory_limit_holds_every_worker_at_its_limits() -> None:
    """Each worker of a relay pod applies every limit of relay.toml on its own (an agent holds a
    tunnel to each of them): the container's limit covers the worst case of them all (the
    per-process figures of docs/security.md)."""
    mib = 1024 * 1024
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render()}
    pod = docs[("Deployment", "atlax")]["spec"]["template"]["spec"]
    relay = next(c for c in pod["containers"] if c["name"] == "relay")
    limit = relay["resources"]["limits"]["memory"]
    assert limit.endswith("Gi"), limit
    values = yaml.safe_load((CHART / "values.yaml").read_text())["relay"]
    per_worker = (
        45 * mib
        + values["maxBufferedBytes"]
        + values["maxHandshakes"] * 80 * 1024
        + values["maxPublicConnections"] * 2560
        + values["maxAgents"] * 2.3 * mib
    )
    assert values["workers"] * per_worker <= int(limit[:-2]) * 1024 * mib
