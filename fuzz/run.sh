#!/usr/bin/env bash
# Builds every fuzz target and runs each; exits non-zero if any crashed. Two ways to run:
#
#   FUZZ_RUNS=N       a fixed number of inputs per target from a fixed seed, starting from the
#                     committed seeds only: the same result on every machine (what CI runs)
#   FUZZ_SECONDS      otherwise, explore for this many seconds per target (default 20), growing a
#                     corpus kept outside the repo; commit what it finds as a seed in fuzz/corpus/
#
#   FUZZ_TARGETS      space-separated targets to run (default: all)
#   FUZZ_TARGET_DIR   cargo target dir (default: a cache dir outside the repo)
#   FUZZ_CORPUS_DIR   where the grown corpus is kept; fuzz/corpus/ holds only the seeds
#
# Crashing inputs land in fuzz/artifacts/<target>/; replay one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --target-dir "$FUZZ_TARGET_DIR" <target> <file>
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/goim-rs"
target_dir="${FUZZ_TARGET_DIR:-$cache/fuzz-target}"
corpus_dir="${FUZZ_CORPUS_DIR:-$cache/fuzz-corpus}"
# cargo-fuzz needs nightly-only flags (sanitizers, -Z options); stable accepts them this way.
export RUSTC_BOOTSTRAP=1

# protoc for goim-proto's build script.
scripts/setup.sh

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  nice -n 19 cargo install cargo-fuzz --locked
fi

# Builds yield to whatever else the machine is doing.
nice -n 19 cargo fuzz build --target-dir "$target_dir"

if [ -n "${FUZZ_TARGETS:-}" ]; then
  read -r -a targets <<<"$FUZZ_TARGETS"
else
  mapfile -t targets < <(cargo fuzz list)
fi

failed=()
for t in "${targets[@]}"; do
  # Packets, frames and upgrade requests go past libFuzzer's default 4 KiB input size.
  max_len=4096
  case "$t" in
    packet | ws_frame | ws_upgrade) max_len=16384 ;;
  esac
  if [ -n "${FUZZ_RUNS:-}" ]; then
    # New inputs go to a scratch dir, so neither the seeds nor the next run change.
    scratch="$(mktemp -d)"
    echo "== fuzz $t: ${FUZZ_RUNS} inputs from seed 1"
    budget=(-runs="$FUZZ_RUNS" -seed=1)
    dirs=("$scratch" "fuzz/corpus/$t")
  else
    mkdir -p "$corpus_dir/$t"
    echo "== fuzz $t for ${seconds}s"
    budget=(-max_total_time="$seconds")
    # New inputs go to the first corpus dir, so the committed seeds stay as they are.
    dirs=("$corpus_dir/$t" "fuzz/corpus/$t")
  fi
  if ! nice -n 19 cargo fuzz run --target-dir "$target_dir" "$t" "${dirs[@]}" -- \
    "${budget[@]}" -max_len="$max_len" -timeout=30 -print_final_stats=1; then
    failed+=("$t")
  fi
  if [ -n "${scratch:-}" ]; then rm -rf "$scratch"; fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets ran without a crash"
