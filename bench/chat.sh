#!/usr/bin/env bash
# Conversations benchmark: `goim standalone` with its conversations on SQLite, then on a
# PostgreSQL started here (Debian's; as the postgres user when run as root), each with a 1,000
# and a 10,000-member group, half online. Rows written per message come from PostgreSQL's own
# statistics. Usage: bench/chat.sh [MESSAGES_1K=2000] [MESSAGES_10K=300]
set -euo pipefail
cd "$(dirname "$0")/.."
M1K=${1:-2000}
M10K=${2:-300}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/goim-rs/target}"
cargo build --release --locked -p goim -p goim-bench >/dev/null
BIN="$CARGO_TARGET_DIR/release"
OUT=${OUT:-bench/results}
WORK=$(mktemp -d)
chmod 755 "$WORK"
pids=()
PGBIN=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d | sort -V | tail -1)
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  if [ -d "$WORK/pg" ]; then
    as_pg "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
echo "open-file limit per process: $(ulimit -n)"

PGPORT=24910
mkdir "$WORK/pg"
if [ "$(id -u)" -eq 0 ]; then chown postgres "$WORK/pg"; fi
as_pg "$PGBIN/initdb" -D "$WORK/pg" -U postgres --auth=trust -E UTF8 >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/log" -w \
  -o "-p $PGPORT -k $WORK/pg -c listen_addresses=127.0.0.1" start >/dev/null
psql=(psql -h 127.0.0.1 -p "$PGPORT" -U postgres -qtAX)
"${psql[@]}" -c "CREATE DATABASE chat" >/dev/null
rows() { "${psql[@]}" -d chat -c "SELECT COALESCE(SUM(n_tup_ins + n_tup_upd), 0) FROM pg_stat_user_tables WHERE relname IN ('conversations', 'members', 'messages')"; }

run() { # store label members messages
  local store=$1 label=$2 members=$3 messages=$4 port=24920 sink=24930
  cat >"$WORK/goim.toml" <<TOML
[logic.conversations]
store = "$store"
max_members = 20000
# Notifications the queue cannot take now go again from the store this soon.
renotify_after = "2s"
[logic.conversations.notify]
url = "http://127.0.0.1:$sink/notify"
batch = 500
linger = "20ms"
queue = 100000
TOML
  RUST_LOG=warn "$BIN/goim" --config "$WORK/goim.toml" standalone --tcp "127.0.0.1:$port" \
    --ws "127.0.0.1:$((port + 1))" --http "127.0.0.1:$((port + 2))" 2>"$WORK/goim-$label.log" &
  local pid=$!
  pids+=("$pid")
  until (exec 3<>"/dev/tcp/127.0.0.1/$((port + 2))") 2>/dev/null; do sleep 0.1; done
  local before=0
  [ "$label" = postgres ] && before=$(rows)
  "$BIN/goim-bench" --out "$OUT" --server "goim-rs ($label)" chat --http "127.0.0.1:$((port + 2))" \
    --addr "127.0.0.1:$port" --members "$members" --messages "$messages" --senders 4 \
    --sink "127.0.0.1:$sink" --pid "$pid" --inbox-conversations 1000 >"$WORK/chat.json"
  if [ "$label" = postgres ]; then
    sleep 2 # PostgreSQL publishes table statistics within a second of a transaction's end
    echo "rows written (inserts + updates) during the run: $(($(rows) - before))"
  fi
  cat "$WORK/chat.json"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

run "sqlite://$WORK/sqlite/chat.db" sqlite 1000 "$M1K"
run "sqlite://$WORK/sqlite/chat.db" sqlite 10000 "$M10K"
run "postgres://postgres@127.0.0.1:$PGPORT/chat" postgres 1000 "$M1K"
run "postgres://postgres@127.0.0.1:$PGPORT/chat" postgres 10000 "$M10K"
