#!/usr/bin/env bash
# Build (or reuse) CoreDNS, the cluster DNS of the e2e node, from the Go module proxy.
#
# Pinned by the build module build/coredns-1.12 (go.mod + go.sum committed), built like the
# Kubernetes binaries (scripts/lib-gobuild.sh: CGO_ENABLED=0, -trimpath, the module's
# toolchain) and cached outside the repository, keyed by version:
#   $CACHE/coredns-<version>/bin/coredns
# Prints progress on stderr and the binary's path, last and alone, on stdout.
# Env: AGENTRUN_CACHE (default ~/.cache/agentrun), AGENTRUN_GOTOOLCHAIN (see lib-gobuild.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${AGENTRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agentrun}"
MOD="$ROOT/build/coredns-1.12"
log() { printf '[coredns %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

VERSION="$(awk '$1 == "github.com/coredns/coredns" { print $2; exit }
                $1 == "require" && $2 == "github.com/coredns/coredns" { print $3; exit }' \
  "$MOD/go.mod")"
[ -n "$VERSION" ] || { log "cannot read the CoreDNS version from $MOD/go.mod"; exit 1; }
BIN="$CACHE/coredns-${VERSION#v}/bin"
if [ -x "$BIN/coredns" ]; then
  log "reusing cached CoreDNS $VERSION"
  echo "$BIN/coredns"; exit 0
fi

mkdir -p "$BIN"
exec 9>"$CACHE/.build-coredns.lock"
if ! flock -n 9; then
  log "another build holds $CACHE/.build-coredns.lock; waiting for it"
  flock 9
fi
# shellcheck source=scripts/lib-gobuild.sh
source "$ROOT/scripts/lib-gobuild.sh"
if [ ! -x "$BIN/coredns" ]; then
  log "building CoreDNS $VERSION into $BIN (cold, on 2 cores: about 2 minutes)"
  go_build "CoreDNS $VERSION" "$MOD" "$BIN" -ldflags "-s -w" github.com/coredns/coredns
fi
echo "$BIN/coredns"
