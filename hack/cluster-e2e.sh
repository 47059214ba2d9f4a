#!/usr/bin/env bash
# End to end on a real single-node Kubernetes on this machine (hack/cluster), the twin of
# hack/kind-e2e.sh: both run hack/e2e/scenario.sh. Brings the node up if it is not (and takes it
# down again afterwards unless it was already up, or KEEP=1), builds both images from the
# Dockerfiles, then: helm install with the local images and service.type=NodePort, a TunnelAgent,
# the agent as a pod in namespace `home` with the minted Secret, traffic, helm upgrade,
# kubectl delete pod, kubectl delete tunnelagent, helm uninstall. Each step prints its duration.
# Root only; tests/test_cluster.py runs it as part of `make test`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state="${ATLAX_CLUSTER_DIR:-/var/lib/atlax-cluster}"
[ "$(id -u)" -eq 0 ] || { echo "hack/cluster-e2e.sh: must run as root (see hack/cluster)" >&2; exit 1; }

# One scenario at a time on the machine's one node (several checkouts may run `make test`).
mkdir -p "$state"
exec 9>"$state/.lock"
flock -w 3600 9 || { echo "hack/cluster-e2e.sh: the node stayed busy for an hour" >&2; exit 1; }
export ATLAX_CLUSTER_LOCKED=1

source "$root/hack/e2e/scenario.sh"
t_start=$(e2e_now)
was_up=0
"$root/hack/cluster" status 2>/dev/null && was_up=1
finish() {
    local rc=$?
    [ -n "${E2E_PROBE_PID:-}" ] && kill "$E2E_PROBE_PID" 2>/dev/null
    if [ "$was_up" = 0 ] && [ "${KEEP:-0}" != 1 ]; then
        "$root/hack/cluster" down || rc=1
    fi
    rm -rf "$E2E_TMP"
    echo "cluster e2e: $([ $rc -eq 0 ] && echo OK || echo FAILED) in $(e2e_since "$t_start")s"
    exit $rc
}
trap finish EXIT

t0=$(e2e_now)
kubeconfig=$("$root/hack/cluster" up | tail -1)
export "${kubeconfig?}"
E2E_TIMINGS+=("$(printf '%-52s %6ss' "cluster up ($([ $was_up = 1 ] && echo "already up" || echo started))" "$(e2e_since "$t0")")")
t0=$(e2e_now)
"$root/hack/cluster" images
E2E_TIMINGS+=("$(printf '%-52s %6ss' "images built and imported" "$(e2e_since "$t0")")")
HELM="$("$root/hack/tools" | tail -1)/helm"
E2E_NODE_IP=10.200.0.1   # hack/cluster's node address: NodePorts listen there only

e2e_platform_checks() {
    e2e_step "pods cannot reach off the machine" pod_egress_refused
}

pod_egress_refused() {  # the machine's default gateway, from a pod: refused by the FORWARD rule
    local gateway out
    gateway=$(ip -4 route show default | awk '{print $3; exit}')
    [ -n "$gateway" ] || { e2e_say "no default route: nothing to leave through"; return 0; }
    out=$(kc exec -n "$E2E_HOME_NS" deploy/echo -- python3 -c "
import socket
try:
    socket.create_connection(('$gateway', 443), timeout=5)
    print('connected')
except OSError as exc:
    print(exc.strerror or type(exc).__name__)")
    e2e_say "a pod connecting to $gateway:443 (off the machine): $out"
    [ "$out" = "Connection refused" ]
}

e2e_all
