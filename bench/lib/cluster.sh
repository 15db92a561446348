# shellcheck shell=bash
# A local distributed cluster for the bench scripts: Debian's etcd in a temp dir, one logic,
# one job and comets, each its own process. Sourced; the caller sets WORK (a temp dir), GOIM
# (the goim binary) and optionally CONFIG (a TOML file every role reads). Every process's
# pid is kept in PIDS/NAMES and in the file $WORK/pids/<name> (rewritten when a comet is
# restarted), for samplers.
BASE=${BASE:-25000}
ETCD=127.0.0.1:$BASE
LOGIC_HTTP=$((BASE + 11))
LOGIC_GRPC=$((BASE + 19))
JOB_HTTP=$((BASE + 28))
PIDS=()
NAMES=()
mkdir -p "$WORK/pids"

# Records a started process under a name.
started() {
  PIDS+=("$2")
  NAMES+=("$1")
  echo "$2" >"$WORK/pids/$1"
}

stop_cluster() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }

wait_port() { until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do sleep 0.1; done; }
wait_ready() { until curl -sf "http://127.0.0.1:$1/readyz" >/dev/null; do sleep 0.1; done; }

# Comet i's ports: TCP, WebSocket +1, HTTP +8, gRPC +9.
comet_tcp() { echo $((BASE + 100 + $1 * 10)); }
comet_http() { echo $((BASE + 108 + $1 * 10)); }

# Becomes goim ROLE with the config (if any) and the cluster's etcd: called in a background
# subshell, whose pid ($!) is then goim's own.
goim_role() {
  local role=$1 config=()
  shift
  [ -n "${CONFIG:-}" ] && config=(--config "$CONFIG")
  RUST_LOG=warn exec "$GOIM" "${config[@]}" "$role" --etcd "$ETCD" --cluster bench "$@"
}

start_etcd() {
  etcd --name bench --data-dir "$WORK/etcd" --listen-client-urls "http://$ETCD" \
    --advertise-client-urls "http://$ETCD" --listen-peer-urls "http://127.0.0.1:$((BASE + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((BASE + 1))" \
    --initial-cluster "bench=http://127.0.0.1:$((BASE + 1))" >"$WORK/etcd.log" 2>&1 &
  started etcd $!
  wait_port "$BASE"
}

start_logic() {
  goim_role logic --http "127.0.0.1:$LOGIC_HTTP" --grpc "127.0.0.1:$LOGIC_GRPC" \
    2>"$WORK/logic.log" &
  started logic $!
}

start_job() {
  goim_role job --id job-0 --grpc "127.0.0.1:$((BASE + 29))" --http "127.0.0.1:$JOB_HTTP" \
    2>"$WORK/job.log" &
  started job $!
}

# Starts comet i (again, after a restart: same name and ports) and returns at once.
start_comet() {
  local p
  p=$(comet_tcp "$1")
  goim_role comet --name "comet-$1" --logic "127.0.0.1:$LOGIC_GRPC" --tcp "127.0.0.1:$p" --ws "127.0.0.1:$((p + 1))" \
    --grpc "127.0.0.1:$((p + 9))" --http "127.0.0.1:$((p + 8))" 2>>"$WORK/comet-$1.log" &
  started "comet-$1" $!
}

# etcd, logic, job and comets 0..n-1, each ready.
start_cluster() {
  start_etcd
  start_logic
  start_job
  for i in $(seq 0 $(($1 - 1))); do start_comet "$i"; done
  wait_ready "$LOGIC_HTTP"
  wait_ready "$JOB_HTTP"
  for i in $(seq 0 $(($1 - 1))); do wait_ready "$(comet_http "$i")"; done
  # Ready is not routable: logic takes pushes once its watch has seen the job (a push to a
  # room without members is answered code 0 then, and reaches no one).
  until curl -sf -X POST -d probe \
    "http://127.0.0.1:$LOGIC_HTTP/goim/push/room?operation=1000&type=probe&room=probe" |
    grep -q '"code":0'; do sleep 0.1; done
  # And the job must know every comet: until its watch has seen one, that comet's members
  # miss room pushes (counted as the job's undeliverable, see issue 12's note).
  until [ "$(curl -sf "http://127.0.0.1:$JOB_HTTP/comets" | grep -o '"comet-[0-9]*"' | wc -l)" -ge "$1" ]; do
    sleep 0.1
  done
}
