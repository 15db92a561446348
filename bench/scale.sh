#!/usr/bin/env bash
# Holds many connections on one box: N goim standalone processes (each a comet) and one load
# generator per comet, each opening PER connections from its own 127.0.0.x range. Reports the
# total held and RSS per connection. Every process stays under the per-process open-file
# limit (check `ulimit -n`); raise these first for large runs (root):
#   sysctl -w net.netfilter.nf_conntrack_max=1048576   # loopback connections are tracked
#   sysctl -w net.ipv4.ip_local_port_range="1024 65000"
# Usage: bench/scale.sh [COMETS=11] [PER=19000]
set -euo pipefail
cd "$(dirname "$0")/.."
COMETS=${1:-11}
PER=${2:-19000}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/goim-rs/target}"
cargo build --release --locked -p goim -p goim-bench >/dev/null
BIN="$CARGO_TARGET_DIR/release"
WORK=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

echo "open-file limit per process: $(ulimit -n)"
for i in $(seq 0 $((COMETS - 1))); do
  port=$((24000 + i * 10))
  RUST_LOG=warn "$BIN/goim" standalone --tcp "127.0.0.1:$port" --ws "127.0.0.1:$((port + 1))" \
    --http "127.0.0.1:$((port + 2))" --name "comet-$i" 2>"$WORK/comet-$i.log" &
  pids+=($!)
done
for i in $(seq 0 $((COMETS - 1))); do
  until (exec 3<>"/dev/tcp/127.0.0.1/$((24000 + i * 10))") 2>/dev/null; do sleep 0.1; done
done
base_rss=0
for p in "${pids[@]}"; do base_rss=$((base_rss + $(awk '/VmRSS/{print $2}' "/proc/$p/status"))); done

for i in $(seq 0 $((COMETS - 1))); do
  "$BIN/goim-bench" idle --addr "127.0.0.1:$((24000 + i * 10))" --conns "$PER" --source-base "$((i * 2))" \
    --key-prefix "c$i-" --rooms 100 --hold 30 >"$WORK/bench-$i.json" 2>"$WORK/bench-$i.log" &
done
# Wait until every load generator has reported (they hold their connections 30 s more).
for i in $(seq 0 $((COMETS - 1))); do
  until [ -s "$WORK/bench-$i.json" ]; do sleep 0.5; done
done
total=0
for i in $(seq 0 $((COMETS - 1))); do
  n=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['connections'])" "$WORK/bench-$i.json")
  total=$((total + n))
done
rss=0
for p in "${pids[@]}"; do rss=$((rss + $(awk '/VmRSS/{print $2}' "/proc/$p/status"))); done
held=$(ss -tn state established '( sport >= :24000 and sport < :24200 )' | tail -n +2 | wc -l)
echo "connections opened: $total, established server-side: $held"
echo "comet RSS: $((rss / 1024)) MiB total, $(( (rss - base_rss) * 1024 / (total > 0 ? total : 1) )) bytes per connection"
