#!/usr/bin/env bash
# End-to-end on kind, for machines with Docker and kind: build the image, load it, install
# the chart (with its single-node etcd), create a PushCluster, wait for Ready, connect goim
# clients through the comet Service, push through logic, roll the comets with a spec change,
# scale down with clients connected, delete. Logs are dumped on failure. Needs: docker, kind, kubectl, helm, cargo.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-goim-e2e}
IMAGE=${IMAGE:-goim-rs/goim:e2e}
NS=${NS:-goim-e2e}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/goim-rs/target}"
pids=()

dump() {
  echo "== e2e failed; state and logs" >&2
  kubectl -n "$NS" get all,pushclusters -o wide >&2 || true
  kubectl -n "$NS" describe pushclusters >&2 || true
  for p in $(kubectl -n "$NS" get pods -o name 2>/dev/null); do
    echo "--- $p" >&2
    kubectl -n "$NS" logs "$p" --all-containers --tail=200 >&2 || true
  done
}
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then dump; fi
  if [ "${#pids[@]}" -gt 0 ]; then kill "${pids[@]}" 2>/dev/null || true; fi
  if [ -z "${KEEP:-}" ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
  exit "$rc"
}
trap cleanup EXIT

kind create cluster --name "$CLUSTER" --wait 120s
docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

helm install goim charts/goim --namespace "$NS" --create-namespace --wait --timeout 5m \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=Never \
  --set etcd.enabled=true
kubectl wait crd/pushclusters.goim.rs --for=condition=Established --timeout=60s

kubectl -n "$NS" apply -f - <<YAML
apiVersion: goim.rs/v1beta1
kind: PushCluster
metadata: {name: demo}
spec:
  image: ${IMAGE}
  imagePullPolicy: Never
  etcd: {endpoints: ["goim-goim-etcd.${NS}:2379"]}
  auth: {mode: json}   # the load generator's clients send goim's JSON token
  comet: {replicas: 2, drainSeconds: 20}
YAML
kubectl -n "$NS" wait pushcluster/demo --for=condition=Ready --timeout=5m

# Clients through the comet Service, pushes through logic.
cargo build --release --locked -p goim-bench
BENCH="$CARGO_TARGET_DIR/release/goim-bench"
forward() {
  # A port-forward holds one pod: start it again after pods are replaced.
  kubectl -n "$NS" port-forward svc/demo-comet 13101:3101 >/dev/null 2>&1 & pids+=($!)
  kubectl -n "$NS" port-forward svc/demo-logic 13111:3111 >/dev/null 2>&1 & pids+=($!)
  for port in 13101 13111; do
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
  done
}
forward
check() {
  python3 -c 'import json,sys; r=json.loads(sys.stdin.read().splitlines()[-1]); sys.exit(0 if r["delivered"] == r["expected"] else 1)'
}
"$BENCH" latency --addr 127.0.0.1:13101 --http 127.0.0.1:13111 --conns 20 --rooms 0 --rate 20 --seconds 2 | check
"$BENCH" room --addr 127.0.0.1:13101 --http 127.0.0.1:13111 --conns 20 --rooms 1 --rate 5 --seconds 2 | check

# A change that needs a restart: the operator replaces the comets one at a time, drained first.
kubectl -n "$NS" patch pushcluster/demo --type merge -p '{"spec":{"comet":{"buckets":64}}}'
gen=$(kubectl -n "$NS" get pushcluster/demo -o jsonpath='{.metadata.generation}')
kubectl -n "$NS" wait pushcluster/demo --for=jsonpath='{.status.observedGeneration}'="$gen" --timeout=1m
kubectl -n "$NS" wait pushcluster/demo --for=jsonpath='{.status.comet.updatedReplicas}'=2 --timeout=5m
kubectl -n "$NS" wait pushcluster/demo --for=condition=Progressing=False --timeout=1m
kill "${pids[@]}" 2>/dev/null || true
pids=()
forward
"$BENCH" room --addr 127.0.0.1:13101 --http 127.0.0.1:13111 --conns 20 --rooms 1 --rate 5 --seconds 2 | check

# Scale down with clients connected: the highest comet drains first, then the StatefulSet shrinks.
"$BENCH" idle --addr 127.0.0.1:13101 --conns 50 --key-prefix held- --hold 60 >/dev/null & pids+=($!)
kubectl -n "$NS" scale pushcluster/demo --replicas=1
kubectl -n "$NS" wait statefulset/demo-comet --for=jsonpath='{.status.replicas}'=1 --timeout=3m
kubectl -n "$NS" wait pushcluster/demo --for=condition=Ready --timeout=3m

kubectl -n "$NS" delete pushcluster/demo --wait --timeout=2m
echo "e2e passed"
