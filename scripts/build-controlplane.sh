#!/usr/bin/env bash
# Build (or reuse) the Kubernetes binaries the tests, `make demo` and `make cluster-up` run.
#
# Kubernetes 1.20.2 comes from Debian's `kubernetes` source package, built with Debian's
# Go 1.19. The binaries are cached outside the repository, keyed by version, so only the
# first run on a machine pays the ~8 minute build. Prints the bin directory on stdout.
#
# Without arguments: the control plane (kube-apiserver, kube-controller-manager, kubectl).
# With --node (or K8S_COMPONENTS=node): also what a real node needs (kubelet, kube-proxy,
# kube-scheduler and a static `pause` for the sandbox image). Only missing binaries are
# built, into the same bin directory, so adding the node never rebuilds the control plane.
#
# Env: K8S_VERSION (1.20 here; 1.34 hands over to build-k8s-current.sh), AGENTRUN_CACHE (default ~/.cache/agentrun),
#      K8S_COMPONENTS (controlplane | node).
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-1.20}"
CACHE="${AGENTRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agentrun}"
K8S_COMPONENTS="${K8S_COMPONENTS:-controlplane}"
for arg in "$@"; do
  case "$arg" in
    --node) K8S_COMPONENTS=node ;;
    *) printf 'usage: %s [--node]\n' "$0" >&2; exit 2 ;;
  esac
done
GO_BINARIES="kube-apiserver kube-controller-manager kubectl"
case "$K8S_COMPONENTS" in
  controlplane) ;;
  node) GO_BINARIES="$GO_BINARIES kubelet kube-proxy kube-scheduler" ;;
  *) printf 'K8S_COMPONENTS=%s: expected controlplane or node\n' "$K8S_COMPONENTS" >&2; exit 2 ;;
esac

log() { printf '[controlplane %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

case "$K8S_VERSION" in
  1.20|1.20.2) FULL=1.20.2 ;;
  # The current release comes from the Go module proxy (build/k8s-1.34/go.mod).
  1.34|1.34.*) exec "$(dirname "$0")/build-k8s-current.sh" "$@" ;;
  *) log "K8S_VERSION=$K8S_VERSION is not supported (supported: 1.20, 1.34)"; exit 2 ;;
esac

BIN="$CACHE/k8s-$FULL/bin"
# The Go binaries still missing, and whether the node's static pause is missing.
MISSING=""
for b in $GO_BINARIES; do [ -x "$BIN/$b" ] || MISSING="$MISSING $b"; done
MISSING="${MISSING# }"
NEED_PAUSE=0
if [ "$K8S_COMPONENTS" = node ] && [ ! -x "$BIN/pause" ]; then NEED_PAUSE=1; fi

if [ -z "$MISSING" ] && [ "$NEED_PAUSE" = 0 ]; then
  log "reusing cached Kubernetes $FULL binaries ($K8S_COMPONENTS) in $BIN"
  echo "$BIN"; exit 0
fi
if [ "$NEED_PAUSE" = 1 ]; then
  log "to build: ${MISSING:-nothing from Go} + pause"
  "$(dirname "$0")/install-deps.sh" build-oldest pause
else
  log "to build: $MISSING"
  "$(dirname "$0")/install-deps.sh" build-oldest
fi

# apt-get source needs a deb-src entry for bookworm main.
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
  log "adding a deb-src entry for bookworm main"
  cat > /etc/apt/sources.list.d/agentrun-deb-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -qq >&2
fi

WORK="$CACHE/k8s-$FULL/src"
rm -rf "$WORK" && mkdir -p "$WORK"
cd "$WORK"
log "downloading Debian's kubernetes source package"
apt-get source --download-only kubernetes >&2
dsc=$(ls kubernetes_*.dsc | head -1)
log "unpacking $dsc"
dpkg-source --no-check -x "$dsc" tree >&2
cd tree

# Known defect: reflect2 1.0.1 (vendored) faults on Go >= 1.18 at the first write of a
# custom resource. Debian's packaged 1.0.2 fixes it (see DESIGN.md, test ground).
log "swapping vendored reflect2 1.0.1 for Debian's 1.0.2"
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2

mkdir -p "$BIN"
if [ "$NEED_PAUSE" = 1 ]; then
  # The sandbox ("pause") container: no registry here, so the image is built from this.
  log "compiling the static pause binary"
  gcc -Os -static -o pause build/pause/linux/pause.c >&2
  strip pause 2>/dev/null || true
  install -m 0755 pause "$BIN/pause"
fi

if [ -n "$MISSING" ]; then
  WHAT=""
  for b in $MISSING; do WHAT="$WHAT cmd/$b"; done
  WHAT="${WHAT# }"
  mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
  export PATH="/usr/lib/go-1.19/bin:$PATH"
  export GOPATH="$PWD/.go" CGO_ENABLED=0 GOFLAGS=-mod=vendor GO111MODULE=on
  log "building $WHAT with $(go version) (about 2 minutes a binary on 2 cores)"
  start=$(date +%s)
  # make prints one line per step; add a heartbeat so a long link step is never silent.
  # stdout to /dev/null: the heartbeat (and its sleep) must not hold the stdout of
  # `BIN=$(scripts/build-controlplane.sh)` open after the build.
  ( while sleep 60; do log "still building... $(( $(date +%s) - start ))s"; done ) >/dev/null &
  hb=$!
  trap 'kill $hb 2>/dev/null || true' EXIT
  make WHAT="$WHAT" KUBE_GIT_VERSION="v$FULL" >&2
  kill $hb 2>/dev/null || true
  log "built in $(( $(date +%s) - start ))s"
  for b in $MISSING; do
    install -m 0755 "_output/local/go/bin/$b" "$BIN/$b" 2>/dev/null \
      || install -m 0755 "$(find _output -type f -name "$b" | head -1)" "$BIN/$b"
  done
fi
cd "$CACHE/k8s-$FULL" && rm -rf src
log "cached in $BIN"
echo "$BIN"
