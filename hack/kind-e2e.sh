#!/usr/bin/env bash
# End to end in kind (needs Docker, kind, kubectl, helm; run by .github/workflows/e2e-kind.yml):
# cluster -> images -> chart -> TunnelAgent -> agent container with the minted Secret -> a request
# through the relay reaches a web service next to the agent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cluster=${CLUSTER:-atlax-e2e}
ns=atlax
tag=e2e
cleanup() {
    docker rm -f atlax-e2e-agent atlax-e2e-web >/dev/null 2>&1 || true
    [ -n "${pf_pid:-}" ] && kill "$pf_pid" 2>/dev/null || true
    [ "${KEEP:-0}" = 1 ] || kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
}
trap cleanup EXIT

kind create cluster --name "$cluster" --config "$root/kind-config.yaml" --wait 120s
docker build -t ghcr.io/atlax/atlax:$tag -f "$root/Dockerfile" "$root"
docker build -t ghcr.io/atlax/atlax-agent:$tag -f "$root/Dockerfile.agent" "$root"
kind load docker-image --name "$cluster" ghcr.io/atlax/atlax:$tag ghcr.io/atlax/atlax-agent:$tag

helm install atlax "$root/charts/atlax" --namespace $ns --create-namespace --wait --timeout 180s \
    --set image.tag=$tag --set service.type=NodePort --set service.agentNodePort=30443 \
    --set relay.publicAddress=127.0.0.1 --set operator.statusInterval=2
sed -e 's/port: 445/port: 4445/' "$root/manifests/examples/home-nas.yaml" | kubectl apply -n $ns -f -
for _ in $(seq 60); do kubectl get secret atlax-agent-home-nas -n $ns >/dev/null 2>&1 && break; sleep 2; done

bundle=$(mktemp -d)
for k in tls.crt tls.key ca.crt relay; do
    kubectl get secret atlax-agent-home-nas -n $ns -o jsonpath="{.data.${k//./\\.}}" | base64 -d > "$bundle/$k"
done
chmod 644 "$bundle"/*   # readable by the container's uid 10001

docker run -d --name atlax-e2e-web --network host python:3.11-slim \
    sh -c 'mkdir -p /w && echo "hello through atlax" > /w/index.html && cd /w && python -m http.server 18080 --bind 127.0.0.1'
docker run -d --name atlax-e2e-agent --network host -v "$bundle:/etc/atlax/agent:ro" \
    -e ATLAX_SERVICES="web=127.0.0.1:18080,smb=127.0.0.1:4450" ghcr.io/atlax/atlax-agent:$tag

kubectl wait --for=jsonpath='{.status.connected}'=true tunnelagent/home-nas -n $ns --timeout=120s
kubectl port-forward -n $ns deployment/atlax 18081:8080 >/dev/null 2>&1 &
pf_pid=$!
for _ in $(seq 30); do curl -fsS http://127.0.0.1:18081/ 2>/dev/null && break; sleep 1; done | tee /dev/stderr | grep -q "hello through atlax"
kubectl get tunnelagents -n $ns
echo "kind e2e: OK"
