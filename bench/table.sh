#!/usr/bin/env bash
# The README's Performance table from one run: every row's measurement, one after another on
# this machine, into OUT (each run's JSON and a row of OUT/results.md; cluster runs also save
# each role's /metrics and print each process's CPU). About seven minutes on 2 cores.
# Not measured here (each its own long run): conversations (bench/chat.sh), 200k+
# connections (bench/scale.sh), TLS, and the soak (bench/soak.sh).
# Usage: bench/table.sh   (OUT=bench/results/table)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/table}
export OUT
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/goim-rs/target}"
cargo build --release --locked -p goim -p goim-bench >/dev/null
BIN="$CARGO_TARGET_DIR/release"
WORK=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$OUT"
echo "$(date -u +%FT%TZ) $(uname -srm), $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" |
  tee "$OUT/machine.txt"
echo "open-file limit per process: $(ulimit -n)" | tee -a "$OUT/machine.txt"

BASE=27000
# One goim-bench run against a fresh standalone server (its pid for RSS and CPU).
standalone() {
  RUST_LOG=warn "$BIN/goim" standalone --tcp "127.0.0.1:$BASE" --ws "127.0.0.1:$((BASE + 1))" \
    --http "127.0.0.1:$((BASE + 11))" --name table 2>"$WORK/standalone.log" &
  server=$!
  until curl -sf "http://127.0.0.1:$((BASE + 11))/readyz" >/dev/null; do sleep 0.1; done
  "$BIN/goim-bench" --out "$OUT" "$@" --pid "$server" >/dev/null
  kill "$server"
  wait "$server" 2>/dev/null || true
  server=""
  tail -n 1 "$OUT/results.md"
}

echo "== memory per idle connection and connects/s, standalone"
standalone idle --addr "127.0.0.1:$BASE" --conns 19000 --source-base 20
standalone idle --addr "127.0.0.1:$((BASE + 1))" --proto ws --conns 19000 --source-base 21
echo "== single-key push latency at 10k pushes/s, standalone"
standalone latency --addr "127.0.0.1:$BASE" --http "127.0.0.1:$((BASE + 11))" --conns 1000 \
  --rooms 0 --rate 10000 --seconds 5 --source-base 22
echo "== room push to 1,000 members"
standalone room --addr "127.0.0.1:$BASE" --http "127.0.0.1:$((BASE + 11))" --conns 1000 \
  --rooms 1 --rate 20 --seconds 10 --source-base 23
echo "== room fan-out against the machine's limit"
bench/fanout.sh
echo "== room fan-out, unsaturated (5,000 connections): comet against raw epoll and io_uring"
CONNS=5000 RUNS="comet-tcp raw-tcp-epoll raw-tcp-io-uring" bench/fanout.sh
echo "== distributed: connects and a disconnect storm through logic into etcd"
COMETS=1 bench/cluster.sh idle --conns 15000 --rooms 10
echo "== distributed: key pushes"
COMETS=1 bench/cluster.sh latency --conns 1000 --rooms 0 --rate 10000 --seconds 5 --pushers 32
echo "== distributed: job CPU per room message, members on 2 of N comets"
for n in 1 5 20; do
  COMETS=$n SPREAD=$((n < 2 ? n : 2)) bench/cluster.sh room --conns 200 --rooms 1 --rate 200 --seconds 12
done
