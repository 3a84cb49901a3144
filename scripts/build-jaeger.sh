#!/usr/bin/env bash
# Build (or reuse) Jaeger, the trace backend the tracing tests export to, from the Go module
# proxy.
#
# Pinned by the build module build/jaeger-1.75 (go.mod + go.sum committed; its `tool` line is
# github.com/jaegertracing/jaeger/cmd/jaeger, Jaeger's v2 binary), built like the Kubernetes
# binaries (scripts/lib-gobuild.sh: CGO_ENABLED=0, -trimpath, the module's toolchain) and
# cached outside the repository, keyed by version:
#   $CACHE/jaeger-<version>/bin/jaeger
# Cold on 2 cores: about 25 s of module downloads and 3 to 4 minutes of compiling.
# Prints progress on stderr and the binary's path, last and alone, on stdout.
# Env: AGENTRUN_CACHE (default ~/.cache/agentrun), AGENTRUN_GOTOOLCHAIN (see lib-gobuild.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${AGENTRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agentrun}"
MOD="$ROOT/build/jaeger-1.75"
log() { printf '[jaeger %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

VERSION="$(awk '$1 == "github.com/jaegertracing/jaeger" { print $2; exit }
                $1 == "require" && $2 == "github.com/jaegertracing/jaeger" { print $3; exit }' \
  "$MOD/go.mod")"
[ -n "$VERSION" ] || { log "cannot read the Jaeger version from $MOD/go.mod"; exit 1; }
BIN="$CACHE/jaeger-${VERSION#v}/bin"
if [ -x "$BIN/jaeger" ]; then
  log "reusing cached Jaeger $VERSION"
  echo "$BIN/jaeger"; exit 0
fi

mkdir -p "$BIN"
exec 9>"$CACHE/.build-jaeger.lock"
if ! flock -n 9; then
  log "another build holds $CACHE/.build-jaeger.lock; waiting for it"
  flock 9
fi
# shellcheck source=scripts/lib-gobuild.sh
source "$ROOT/scripts/lib-gobuild.sh"
if [ ! -x "$BIN/jaeger" ]; then
  log "building Jaeger $VERSION into $BIN (cold, on 2 cores: about 4 minutes)"
  go_build "Jaeger $VERSION" "$MOD" "$BIN" -ldflags "-s -w" github.com/jaegertracing/jaeger/cmd/jaeger
fi
echo "$BIN/jaeger"
