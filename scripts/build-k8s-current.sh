#!/usr/bin/env bash
# Build (or reuse) current Kubernetes (1.34) and etcd (3.6) from the Go module proxy.
#
# The sources are pinned by two small build modules, committed with their go.sum:
#   build/k8s-1.34  requires k8s.io/kubernetes and replaces its staging modules with their
#                   published v0.34.x (see the comment in its go.mod);
#   build/etcd-3.6  requires go.etcd.io/etcd/server/v3 (its root is etcd's main package).
# Each is built with the Go of its `toolchain` line (upstream's own), which the go command
# downloads through the module proxy like any module; flags as upstream's release builds
# (CGO_ENABLED=0, -trimpath, -s -w, the version ldflags, k8s's build tags).
#
# Binaries are cached outside the repository, keyed by version:
#   $CACHE/k8s-<version>/bin   kube-apiserver, kube-controller-manager, kubectl (+ node ones:
#                              kubelet, kube-proxy, kube-scheduler, a static C `pause`)
#                              and `etcd`, a link to the one below;
#   $CACHE/etcd-<version>/bin  etcd.
# The module and build caches live under $CACHE/go, so a rebuild (another component, a
# wiped bin directory) only compiles what changed. Only missing binaries are built.
# Prints progress on stderr (a heartbeat at least every 60 s) and the k8s bin directory,
# last and alone, on stdout.
#
# Usage: scripts/build-k8s-current.sh [--node]
# Env:   AGENTRUN_CACHE (default ~/.cache/agentrun),
#        K8S_COMPONENTS (controlplane | node; --node is the same as node),
#        AGENTRUN_GOTOOLCHAIN (default: each go.mod's toolchain line; `local` uses the Go on
#        PATH, e.g. where the module proxy serves no toolchains).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${AGENTRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agentrun}"
K8S_COMPONENTS="${K8S_COMPONENTS:-controlplane}"
for arg in "$@"; do
  case "$arg" in
    --node) K8S_COMPONENTS=node ;;
    *) printf 'usage: %s [--node]\n' "$0" >&2; exit 2 ;;
  esac
done
K8S_BINARIES="kube-apiserver kube-controller-manager kubectl"
case "$K8S_COMPONENTS" in
  controlplane) ;;
  node) K8S_BINARIES="$K8S_BINARIES kubelet kube-proxy kube-scheduler" ;;
  *) printf 'K8S_COMPONENTS=%s: expected controlplane or node\n' "$K8S_COMPONENTS" >&2; exit 2 ;;
esac

log() { printf '[k8s-current %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

K8S_MOD="$ROOT/build/k8s-1.34"
ETCD_MOD="$ROOT/build/etcd-3.6"
# The version a build module requires of a module (single-line or block form of require).
required() {
  awk -v m="$2" '$1 == "require" && $2 == m { print $3; exit }
                 $1 == m && $2 ~ /^v/ { print $2; exit }' "$1/go.mod"
}

K8S_VERSION="$(required "$K8S_MOD" k8s.io/kubernetes)"      # v1.34.N
ETCD_VERSION="$(required "$ETCD_MOD" go.etcd.io/etcd/server/v3)" # v3.6.N
if [ -z "$K8S_VERSION" ] || [ -z "$ETCD_VERSION" ]; then
  log "cannot read the versions from build/*/go.mod"; exit 1
fi
K8S_DIR="$CACHE/k8s-${K8S_VERSION#v}"
ETCD_DIR="$CACHE/etcd-${ETCD_VERSION#v}"
BIN="$K8S_DIR/bin"
ETCD_BIN="$ETCD_DIR/bin"

missing_k8s() {
  local out="" b
  for b in $K8S_BINARIES; do [ -x "$BIN/$b" ] || out="$out $b"; done
  echo "${out# }"
}
pause_ok() { [ "$K8S_COMPONENTS" != node ] || [ -x "$BIN/pause" ]; }
if [ -z "$(missing_k8s)" ] && [ -x "$ETCD_BIN/etcd" ] && [ -e "$BIN/etcd" ] && pause_ok; then
  log "reusing cached Kubernetes $K8S_VERSION ($K8S_COMPONENTS) and etcd $ETCD_VERSION in $BIN"
  echo "$BIN"; exit 0
fi

mkdir -p "$CACHE" "$BIN" "$ETCD_BIN"
# One build at a time per cache (parallel test sessions may all ask for the binaries).
exec 9>"$CACHE/.build-k8s-current.lock"
if ! flock -n 9; then
  log "another build holds $CACHE/.build-k8s-current.lock; waiting for it"
  flock 9
fi

# shellcheck source=scripts/lib-gobuild.sh
source "$ROOT/scripts/lib-gobuild.sh"

# --- etcd -----------------------------------------------------------------------------------
if [ ! -x "$ETCD_BIN/etcd" ]; then
  log "building etcd $ETCD_VERSION into $ETCD_BIN"
  # etcd's own build also sets version.GitSHA; the module proxy gives no commit, and the
  # version, a constant of go.etcd.io/etcd/api/v3/version, is what `etcd --version` shows.
  go_build "etcd $ETCD_VERSION" "$ETCD_MOD" "$ETCD_BIN" -ldflags "-s -w" go.etcd.io/etcd/server/v3
  # go names a binary after the last path element that is not a major version: `server`.
  mv -f "$ETCD_BIN/server" "$ETCD_BIN/etcd"
fi

# --- Kubernetes ------------------------------------------------------------------------------
MISSING="$(missing_k8s)"
if [ -n "$MISSING" ]; then
  log "building Kubernetes $K8S_VERSION: $MISSING into $BIN"
  log "(cold, on 2 cores: about 5 minutes for the control plane, 30 s more for the node)"
  ver="${K8S_VERSION#v}"
  major="${ver%%.*}"; rest="${ver#*.}"; minor="${rest%%.*}"
  # Upstream's hack/lib/version.sh: the same variables in client-go and component-base. The
  # module proxy gives no commit hash (gitCommit is left empty rather than "$Format:%H$");
  # the tree is the tag's, verified by the checksum database. buildDate is the tag's date
  # (as upstream's SOURCE_DATE_EPOCH) so the binaries do not depend on when they were built.
  tag_date="$(cd "$K8S_MOD" && GOTOOLCHAIN="$(toolchain_for "$K8S_MOD")" go list -m \
    -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes \
    2>/dev/null || true)"
  ldflags=""
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags="$ldflags -X $pkg.gitVersion=$K8S_VERSION"
    ldflags="$ldflags -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags="$ldflags -X $pkg.gitCommit= -X $pkg.gitTreeState=clean"
    ldflags="$ldflags -X $pkg.buildDate=${tag_date:-1970-01-01T00:00:00Z}"
  done
  pkgs=""
  for b in $MISSING; do pkgs="$pkgs k8s.io/kubernetes/cmd/$b"; done
  # shellcheck disable=SC2086  # word splitting of the package list is intended
  go_build "Kubernetes $K8S_VERSION" "$K8S_MOD" "$BIN" \
    -tags selinux,notest,grpcnotrace -ldflags "all=${ldflags# } -s -w" $pkgs
fi
ln -sfn "$ETCD_BIN/etcd" "$BIN/etcd"

# --- the node's sandbox ("pause") binary: C, from the same tag's source in the module cache --
if [ "$K8S_COMPONENTS" = node ] && [ ! -x "$BIN/pause" ]; then
  src="$GOMODCACHE/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c"
  [ -f "$src" ] || (cd "$K8S_MOD" && GOTOOLCHAIN="$(toolchain_for "$K8S_MOD")" \
    go mod download k8s.io/kubernetes)
  log "compiling the static pause binary from $K8S_VERSION's build/pause/linux/pause.c"
  gcc -Os -static -DVERSION="$K8S_VERSION" -o "$BIN/.pause.new" "$src" >&2
  strip "$BIN/.pause.new" 2>/dev/null || true
  mv -f "$BIN/.pause.new" "$BIN/pause"
fi

log "cached in $BIN: $(cd "$BIN" && ls | tr '\n' ' ')"
echo "$BIN"
