#!/usr/bin/env bash
# Builds and runs goim standalone on goim's default ports (TCP 3101, WebSocket 3102/sub,
# HTTP 3111). Extra arguments go to `goim standalone`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/goim-rs/target}"
scripts/setup.sh
exec cargo run --release --locked -p goim -- standalone "$@"
