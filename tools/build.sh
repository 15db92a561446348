#!/usr/bin/env bash
# Builds the real tools the control-plane tests need, at the versions pinned in go.mod, into a
# cache outside the clone: kube-apiserver and kubectl (k8s.io/kubernetes) and helm. etcd comes from
# Debian's etcd-server. Prints the bin directory. Safe to run again (Go caches everything).
set -euo pipefail
cd "$(dirname "$0")"
CACHE="${GOIM_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/goim-rs/go}"
export GOPATH="$CACHE" GOMODCACHE="$CACHE/mod" GOCACHE="$CACHE/build" GOFLAGS=-mod=mod
export CGO_ENABLED=0
BIN="$CACHE/bin"
mkdir -p "$BIN"
# Rebuild only when the pins change (a fresh clone's mtimes say nothing).
PINS=$(cat go.mod go.sum | sha256sum | cut -d' ' -f1)
build() {
  local out=$1 pkg=$2
  if [ ! -x "$BIN/$out" ] || [ "$(cat "$BIN/.$out.pins" 2>/dev/null)" != "$PINS" ]; then
    echo "tools: building $out" >&2
    go build -trimpath -ldflags="-s -w" -o "$BIN/$out" "$pkg"
    echo "$PINS" > "$BIN/.$out.pins"
  fi
}
build helm helm.sh/helm/v3/cmd/helm
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kubectl k8s.io/kubernetes/cmd/kubectl
echo "$BIN"
