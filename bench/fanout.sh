#!/usr/bin/env bash
# Room fan-out against the machine's limit, from one command: comet (goim standalone) and the
# raw baseline (one write per socket from epoll, or io_uring), on TCP and on WebSocket, with
# the same connections, rate and duration. Each run is one row in OUT/results.md: deliveries
# per server CPU-second, user / system CPU, syscalls per delivery (when Linux's perf is
# installed and may read tracepoints), latency.
# Usage: bench/fanout.sh            (CONNS=10000 RATE=20 DURATION=10 OUT=bench/results)
#   RUNS="comet-tcp raw-tcp-epoll" picks some of: comet-tcp comet-ws raw-tcp-epoll
#   raw-ws-epoll raw-tcp-io-uring raw-ws-io-uring (all by default). CONFIG: a TOML file for comet.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-10000} RATE=${RATE:-20} DURATION=${DURATION:-10}
RUNS=${RUNS:-comet-tcp comet-ws raw-tcp-epoll raw-ws-epoll raw-tcp-io-uring raw-ws-io-uring}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/goim-rs/target}"
cargo build --release --locked -p goim -p goim-bench >/dev/null
BIN="$CARGO_TARGET_DIR/release"
OUT=${OUT:-bench/results}
WORK=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
echo "open-file limit per process: $(ulimit -n)" >&2
count=()
if command -v perf >/dev/null && perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1; then
  count=(--syscalls)
else
  echo "perf cannot count syscalls here: rows have no syscalls per delivery" >&2
fi

BASE=26000
wait_port() { until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do sleep 0.1; done; }
source_base=2
for run in $RUNS; do
  case $run in
  comet-*)
    proto=${run#comet-}
    [ -n "${CONFIG:-}" ] && export GOIM_CONFIG="$CONFIG"
    RUST_LOG=warn "$BIN/goim" standalone --tcp "127.0.0.1:$BASE" --ws "127.0.0.1:$((BASE + 1))" \
      --http "127.0.0.1:$((BASE + 11))" --name bench-comet 2>"$WORK/$run.log" &
    server=$!
    until curl -sf "http://127.0.0.1:$((BASE + 11))/readyz" >/dev/null; do sleep 0.1; done
    port=$BASE
    [ "$proto" = ws ] && port=$((BASE + 1))
    "$BIN/goim-bench" --out "$OUT" "${count[@]}" room --addr "127.0.0.1:$port" --proto "$proto" \
      --http "127.0.0.1:$((BASE + 11))" --conns "$CONNS" --rooms 1 --rate "$RATE" \
      --seconds "$DURATION" --pid "$server" --source-base "$source_base" >/dev/null
    ;;
  raw-*)
    rest=${run#raw-}
    proto=${rest%%-*} writer=${rest#*-}
    "$BIN/goim-bench" raw-server --listen "127.0.0.1:$((BASE + 20))" --rate "$RATE" \
      --proto "$proto" --writer "$writer" 2>"$WORK/$run.log" &
    server=$!
    wait_port $((BASE + 20))
    "$BIN/goim-bench" --out "$OUT" "${count[@]}" --server "raw ($writer)" raw \
      --addr "127.0.0.1:$((BASE + 20))" --proto "$proto" --conns "$CONNS" --rate "$RATE" \
      --seconds "$DURATION" --pid "$server" --source-base "$source_base" >/dev/null
    ;;
  *)
    echo "unknown run $run" >&2
    exit 2
    ;;
  esac
  kill "$server"
  wait "$server" 2>/dev/null || true
  server=""
  # Fresh source addresses per run: the last run's ports may still be in TIME_WAIT.
  source_base=$((source_base + 1))
  tail -n 1 "$OUT/results.md"
done
