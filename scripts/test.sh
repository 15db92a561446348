#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs every test tier that
# this machine can run.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/goim-rs/target}"
scripts/setup.sh etcd-server
cargo test --workspace --locked
