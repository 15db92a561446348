#!/usr/bin/env bash
# One command for a distributed run: starts etcd (Debian's), one logic, one job and COMETS
# comets as separate processes, runs one goim-bench scenario against comet 0 and logic, then
# prints the CPU seconds each process used during the scenario (user and system), and saves
# each role's /metrics in OUT.
# Usage: COMETS=1 bench/cluster.sh SCENARIO [goim-bench scenario flags...]
#   e.g. bench/cluster.sh latency --conns 1000 --rooms 0 --rate 10000 --seconds 5 --pushers 32
# Extra environment: CONFIG (a TOML file every role reads), OUT (results directory), SPREAD
# (the load generator's connections go round-robin over the first SPREAD comets; default 1),
# GOIM (a goim binary to run instead of this tree's release build, e.g. an older build).
set -euo pipefail
cd "$(dirname "$0")/.."
COMETS=${COMETS:-1}
SPREAD=${SPREAD:-1}
SCENARIO=${1:?usage: bench/cluster.sh SCENARIO [flags...]}
shift
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/goim-rs/target}"
cargo build --release --locked -p goim -p goim-bench >/dev/null
BIN="$CARGO_TARGET_DIR/release"
GOIM=${GOIM:-$BIN/goim}
OUT=${OUT:-bench/results}
WORK=$(mktemp -d)
cleanup() { stop_cluster; rm -rf "$WORK"; }
trap cleanup EXIT
echo "open-file limit per process: $(ulimit -n)" >&2

# shellcheck source=bench/lib/cluster.sh
. bench/lib/cluster.sh
start_cluster "$COMETS"

# utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat).
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
declare -A before
for i in "${!PIDS[@]}"; do before[$i]=$(ticks "${PIDS[$i]}"); done
via_logic=(--http "127.0.0.1:$LOGIC_HTTP")
# idle: connects, then every client closes at once and logic's Disconnects are timed.
[ "$SCENARIO" = idle ] && via_logic=(--logic-http "127.0.0.1:$LOGIC_HTTP")
also=()
for i in $(seq 1 $((SPREAD - 1))); do also+=(--also-addr "127.0.0.1:$(comet_tcp "$i")"); done
"$BIN/goim-bench" --out "$OUT" --server "goim-rs (distributed, $COMETS comets)" "$SCENARIO" \
  --addr "127.0.0.1:$(comet_tcp 0)" "${also[@]}" "${via_logic[@]}" --pid "${PIDS[3]}" "$@"
# Each role's metrics after the run, next to the results (latency histograms per call).
mkdir -p "$OUT"
curl -sf "http://127.0.0.1:$LOGIC_HTTP/metrics" >"$OUT/metrics-logic.txt" || true
curl -sf "http://127.0.0.1:$JOB_HTTP/metrics" >"$OUT/metrics-job.txt" || true
for i in $(seq 0 $((COMETS - 1))); do
  curl -sf "http://127.0.0.1:$(comet_http "$i")/metrics" >"$OUT/metrics-comet-$i.txt" || true
done
hz=$(getconf CLK_TCK)
echo "CPU seconds during the scenario (user / system):" >&2
for i in "${!PIDS[@]}"; do
  read -r u0 s0 <<<"${before[$i]}"
  read -r u1 s1 <<<"$(ticks "${PIDS[$i]}")"
  awk -v n="${NAMES[$i]}" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$hz" \
    'BEGIN { printf "  %-8s %6.2f / %6.2f\n", n, u / hz, s / hz }' >&2
done
