#!/usr/bin/env bash
# Build (or reuse) the Kubernetes control-plane binaries the tests and `make demo` run.
#
# Kubernetes 1.20.2 comes from Debian's `kubernetes` source package, built with Debian's
# Go 1.19. The binaries are cached outside the repository, keyed by version, so only the
# first run on a machine pays the ~8 minute build. Prints the bin directory on stdout.
#
# Env: K8S_VERSION (1.20 only for now), AGENTRUN_CACHE (default ~/.cache/agentrun).
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-1.20}"
CACHE="${AGENTRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agentrun}"
WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kubectl"
BINARIES="kube-apiserver kube-controller-manager kubectl"

log() { printf '[controlplane %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

case "$K8S_VERSION" in
  1.20|1.20.2) FULL=1.20.2 ;;
  *) log "K8S_VERSION=$K8S_VERSION is not supported (supported: 1.20)"; exit 2 ;;
esac

BIN="$CACHE/k8s-$FULL/bin"
have_all() { for b in $BINARIES; do [ -x "$BIN/$b" ] || return 1; done; }

if have_all; then
  log "reusing cached Kubernetes $FULL binaries in $BIN"
  echo "$BIN"; exit 0
fi

need_pkgs=()
for p in golang-go rsync dpkg-dev golang-github-modern-go-reflect2-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  log "installing build packages: ${need_pkgs[*]}"
  apt-get install -y -qq "${need_pkgs[@]}" >&2
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

mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
export PATH="/usr/lib/go-1.19/bin:$PATH"
export GOPATH="$PWD/.go" CGO_ENABLED=0 GOFLAGS=-mod=vendor GO111MODULE=on
log "building $WHAT with $(go version) (about 8-10 minutes on 2 cores)"
start=$(date +%s)
# make prints one line per step; add a heartbeat so a long link step is never silent.
( while sleep 60; do log "still building... $(( $(date +%s) - start ))s"; done ) &
hb=$!
trap 'kill $hb 2>/dev/null || true' EXIT
make WHAT="$WHAT" KUBE_GIT_VERSION="v$FULL" >&2
kill $hb 2>/dev/null || true
log "built in $(( $(date +%s) - start ))s"

mkdir -p "$BIN"
for b in $BINARIES; do
  install -m 0755 "_output/local/go/bin/$b" "$BIN/$b" 2>/dev/null \
    || install -m 0755 "$(find _output -type f -name "$b" | head -1)" "$BIN/$b"
done
cd "$CACHE/k8s-$FULL" && rm -rf src
log "cached in $BIN"
echo "$BIN"
