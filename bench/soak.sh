#!/usr/bin/env bash
# The soak (issue 12, goal 5; a bench, not a test): COMETS comets, CONNS connections from
# LOADERS load processes with CHURN client closes (each reconnecting) a second, key and room
# pushes, and one comet restarted every RESTART seconds (SIGTERM: it drains, then starts again
# under its name). Every received message is checked against its receiver. Writes into OUT:
# soak.json (totals, missing key pushes by cause, each process's RSS), soak.csv (per second:
# the load's counters and each process's RSS and CPU), soak.png, and each role's /metrics
# (a comet's also just before each restart).
# Usage: bench/soak.sh   (environment: DURATION=1800 CONNS=50000 COMETS=4 LOADERS=3
#   CHURN=500 KEY_RATE=100 ROOM_RATE=10 ROOMS=500 RESTART=300 OUT=bench/results/soak)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-1800}
CONNS=${CONNS:-50000}
COMETS=${COMETS:-4}
LOADERS=${LOADERS:-3}
RESTART=${RESTART:-300}
OUT=${OUT:-bench/results/soak}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/goim-rs/target}"
cargo build --release --locked -p goim -p goim-bench >/dev/null
BIN="$CARGO_TARGET_DIR/release"
GOIM=${GOIM:-$BIN/goim}
WORK=$(mktemp -d)
restarter=
cleanup() {
  [ -n "$restarter" ] && kill "$restarter" 2>/dev/null
  # Restarted comets are children of the restart loop: stop them by their pid files.
  local f
  for f in "$WORK"/pids/comet-*; do kill "$(cat "$f")" 2>/dev/null || true; done
  stop_cluster
  rm -rf "$WORK"
}
trap cleanup EXIT
echo "open-file limit per process: $(ulimit -n)" >&2
mkdir -p "$OUT"

# shellcheck source=bench/lib/cluster.sh
. bench/lib/cluster.sh
start_cluster "$COMETS"

# Restarts comet 0, 1, ... in turn every RESTART seconds, keeping its metrics from before.
restarts() {
  local n=0 c pid
  while sleep "$RESTART"; do
    c=$((n % COMETS))
    n=$((n + 1))
    curl -sf "http://127.0.0.1:$(comet_http "$c")/metrics" >"$OUT/metrics-comet-$c-restart-$n.txt" || true
    pid=$(cat "$WORK/pids/comet-$c")
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    start_comet "$c"
    wait_ready "$(comet_http "$c")"
    echo "$(date -u +%T) restarted comet-$c" >&2
  done
}
restarts &
restarter=$!

addrs=()
for i in $(seq 0 $((COMETS - 1))); do addrs+=(--addr "127.0.0.1:$(comet_tcp "$i")"); done
"$BIN/goim-bench" --out "$OUT" --server "goim-rs (distributed, $COMETS comets)" soak \
  "${addrs[@]}" --http "127.0.0.1:$LOGIC_HTTP" --conns "$CONNS" --loaders "$LOADERS" \
  --churn "${CHURN:-500}" --key-rate "${KEY_RATE:-100}" --room-rate "${ROOM_RATE:-10}" \
  --rooms "${ROOMS:-500}" --seconds "$DURATION" --pid-dir "$WORK/pids" | tee "$OUT/soak.json"
curl -sf "http://127.0.0.1:$LOGIC_HTTP/metrics" >"$OUT/metrics-logic.txt" || true
curl -sf "http://127.0.0.1:$JOB_HTTP/metrics" >"$OUT/metrics-job.txt" || true
for i in $(seq 0 $((COMETS - 1))); do
  curl -sf "http://127.0.0.1:$(comet_http "$i")/metrics" >"$OUT/metrics-comet-$i.txt" || true
done
