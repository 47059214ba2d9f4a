#!/usr/bin/env bash
# End to end in kind (needs Docker, kind, kubectl, helm, python3; run by
# .github/workflows/e2e-kind.yml): the same scenario as hack/cluster-e2e.sh on this machine
# (hack/e2e/scenario.sh), on a kind cluster with the images built by `docker build` from the
# upstream base image: helm install (NodePort, agent node port 30443), a TunnelAgent, the agent as
# a pod in namespace `home` with the minted Secret, 16 MiB hashed + 100 requests through the
# relay's node ports, the relay's uid/read-only root/port 445/no token, helm upgrade and
# kubectl delete pod with the outage measured, kubectl delete tunnelagent, helm uninstall.
# KEEP=1 keeps the cluster.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cluster=${CLUSTER:-atlax-e2e}
source "$root/hack/e2e/scenario.sh"
t_start=$(e2e_now)
finish() {
    local rc=$?
    [ -n "${E2E_PROBE_PID:-}" ] && kill "$E2E_PROBE_PID" 2>/dev/null
    [ "${KEEP:-0}" = 1 ] || kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
    rm -rf "$E2E_TMP"
    echo "kind e2e: $([ $rc -eq 0 ] && echo OK || echo FAILED) in $(e2e_since "$t_start")s"
    exit $rc
}
trap finish EXIT

t0=$(e2e_now)
kind create cluster --name "$cluster" --config "$root/kind-config.yaml" --wait 120s
E2E_TIMINGS+=("$(printf '%-52s %6ss' "kind create cluster" "$(e2e_since "$t0")")")
t0=$(e2e_now)
docker build -t localhost/atlax:dev -f "$root/Dockerfile" "$root"
docker build -t localhost/atlax-agent:dev -f "$root/Dockerfile.agent" "$root"
kind load docker-image --name "$cluster" localhost/atlax:dev localhost/atlax-agent:dev
E2E_TIMINGS+=("$(printf '%-52s %6ss' "images built and loaded" "$(e2e_since "$t0")")")

# NodePorts listen on the node container's address, which the runner reaches directly.
E2E_NODE_IP=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$cluster-control-plane")
e2e_all
