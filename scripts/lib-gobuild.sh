# Shared by the scripts that build Go binaries from the module proxy (build-k8s-current.sh,
# build-coredns.sh). Source it after setting CACHE and defining log(); it needs the caller's
# build lock on fd 9 (closed in the heartbeat) and defines toolchain_of, toolchain_for,
# start_heartbeat/stop_heartbeat and go_build.
# shellcheck shell=bash

toolchain_of() { awk '$1 == "toolchain" { print $2; exit }' "$1/go.mod"; }

export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build"
export GOFLAGS="-mod=mod -buildvcs=false" GOWORK=off CGO_ENABLED=0 GO111MODULE=on
# The go that starts the build must know `toolchain` lines (>= 1.21; install-deps.sh asks for
# 1.24): Debian's golang-go (1.19, for Kubernetes 1.20) may come first on PATH.
go_minor() { local v; v=$("${1:-go}" env GOVERSION 2>/dev/null) || return 1; v=${v#go1.}; echo "${v%%.*}"; }
if [ "$(go_minor go || echo 0)" -lt 21 ] 2>/dev/null; then export PATH="/usr/local/go/bin:$PATH"; fi
if [ "$(go_minor go || echo 0)" -lt 21 ] 2>/dev/null; then
  log "no Go >= 1.21 on PATH nor in /usr/local/go/bin (scripts/install-deps.sh demo says more)"
  exit 1
fi

# go build -v lists each package it compiles into $2; the heartbeat counts them.
HB=""
stop_heartbeat() {
  if [ -n "$HB" ]; then kill "$HB" 2>/dev/null || true; wait "$HB" 2>/dev/null || true; HB=""; fi
}
trap stop_heartbeat EXIT
start_heartbeat() {
  local what="$1" buildlog="$2" start
  start=$(date +%s)
  # Closes the lock and stdout (a caller's `$(...)` waits for them), and ends its sleep.
  ( exec 9>&- >/dev/null
    s=""
    trap 'if [ -n "$s" ]; then kill "$s" 2>/dev/null; fi; exit 0' TERM
    while :; do
      sleep 60 & s=$!
      wait "$s"
      log "still building $what... $(( $(date +%s) - start ))s," \
        "$(wc -l < "$buildlog" 2>/dev/null || echo 0) packages compiled"
    done ) &
  HB=$!
}

# The Go a build module is built with: its toolchain line unless AGENTRUN_GOTOOLCHAIN says.
toolchain_for() { local tc="${AGENTRUN_GOTOOLCHAIN:-$(toolchain_of "$1")}"; echo "${tc:-local}"; }

# go_build NAME MODULE_DIR OUT_DIR BUILD-ARGS...: go build in MODULE_DIR with its toolchain,
# output first into OUT_DIR/.new, then moved in (a killed build leaves no half binary).
go_build() {
  local name="$1" mod="$2" out="$3"; shift 3
  local tc; tc="$(toolchain_for "$mod")"
  local buildlog="$out/../build.log" start rc=0
  rm -rf "$out/.new" && mkdir -p "$out/.new"
  : > "$buildlog"
  log "$name: preparing Go $tc (the first time, a download through the module proxy)"
  log "$name: $(cd "$mod" && GOTOOLCHAIN="$tc" go version)"
  start=$(date +%s)
  start_heartbeat "$name" "$buildlog"
  (cd "$mod" && GOTOOLCHAIN="$tc" go build -v -trimpath -o "$out/.new/" "$@") 2>"$buildlog" || rc=$?
  stop_heartbeat
  if [ "$rc" != 0 ]; then
    log "$name: go build failed ($rc); the end of $buildlog:"
    grep -v '^[a-zA-Z0-9._/-]*$' "$buildlog" | tail -40 >&2 || tail -40 "$buildlog" >&2
    exit "$rc"
  fi
  local f
  for f in "$out/.new"/*; do mv -f "$f" "$out/"; done
  rmdir "$out/.new"
  log "$name: built in $(( $(date +%s) - start ))s ($(wc -l < "$buildlog") packages compiled)"
  printf 'toolchain=%s built=%s\n' "$(cd "$mod" && GOTOOLCHAIN="$tc" go env GOVERSION)" \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$out/../BUILDINFO"
}

