#!/usr/bin/env bash
# The one place that installs the system packages agentrun's set-up, tests and demo need.
#
# Usage: scripts/install-deps.sh PURPOSE...     (quiet when nothing is missing)
#   python  a Python that can make a virtualenv (python3-venv where the interpreter lacks it)
#   demo    `make demo`: Redis, curl, and a Go >= 1.24 to build Kubernetes 1.34
#   test    `make test`: the demo's, plus NGINX and Chromium (proxy and web UI tests) and
#           Node.js with npm (the reference MCP server)
#   oldest  `make test-oldest`: etcd and what builds Kubernetes 1.20 from Debian's source
#   e2e     `make e2e`: a real node (containerd, runc, CNI, iptables, conntrack, etcd) and
#           the image build (buildah, debootstrap, a C compiler for the static pause binary)
#   all     everything above (CI)
# and the parts those are made of, for the scripts that need only one: base, build-oldest
# (Kubernetes 1.20 from Debian's source), pause, node, image, node-js. (A Node.js that
# brings its own npm, as NodeSource's does, is kept: Debian's npm package would conflict.)
#
# Only missing packages are installed, with one `apt-get install`, after saying what and
# why. On a machine without apt it names the packages to install and exits 1. It never
# upgrades or removes anything. Env: PYTHON (default python3), the interpreter make uses.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
say() { printf '\033[1m[install-deps]\033[0m %s\n' "$*" >&2; }

# package | why (one line each; the purposes below pick from these)
declare -A WHY=(
  [python3-venv]="lets $PYTHON create virtualenvs (the pinned uv is installed into one)"
  [curl]="health checks of the demo's processes"
  [redis-server]="the event streams and checkpoints (demo and integration tests)"
  [nginx]="the proxy tests run docs/nginx.conf in front of the SSE server"
  [chromium]="the web UI tests drive headless Chromium"
  [etcd-server]="etcd for the Kubernetes 1.20 control plane and the e2e node"
  [golang-go]="Debian's Go 1.19, which builds Kubernetes 1.20 from Debian's source"
  [rsync]="Kubernetes 1.20's build scripts"
  [dpkg-dev]="unpacks Debian's kubernetes source package"
  [golang-github-modern-go-reflect2-dev]="reflect2 1.0.2, which Kubernetes 1.20 needs on a newer Go"
  [gcc]="compiles the node's static pause binary"
  [libc6-dev]="compiles the node's static pause binary"
  [containerd]="the e2e node's container runtime"
  [runc]="the e2e node's container runtime"
  [containernetworking-plugins]="the e2e node's pod network (CNI bridge)"
  [iptables]="kube-proxy and the pod network on the e2e node"
  [conntrack]="kube-proxy on the e2e node"
  [buildah]="builds the agentrun image without a Docker daemon"
  [debootstrap]="builds the image's Debian base"
  [ca-certificates]="HTTPS to the package registries"
  [nodejs]="runs the reference MCP server (@modelcontextprotocol/server-everything) in the MCP tests"
  [npm]="installs the MCP tests' Node packages from tests/mcp/package-lock.json (npm ci)"
)

want=()
need_go=0
add() { local p; for p in "$@"; do want+=("$p"); done; }
purpose() {
  case "$1" in
    python) ;;
    base) add ca-certificates curl redis-server ;;
    demo) purpose base; need_go=1 ;;
    test) purpose demo; add nginx chromium; purpose node-js ;;
    node-js) add nodejs; command -v npm >/dev/null || add npm ;;
    build-oldest) add golang-go rsync dpkg-dev golang-github-modern-go-reflect2-dev ;;
    pause) add gcc libc6-dev ;;
    oldest) purpose base; purpose build-oldest; add etcd-server nginx chromium; purpose node-js ;;
    node) add etcd-server containerd runc containernetworking-plugins iptables conntrack ;;
    image) add buildah debootstrap ;;
    e2e) purpose demo; purpose node; purpose pause; purpose image; purpose node-js ;;
    all) purpose test; purpose oldest; purpose e2e ;;
    *) say "unknown purpose '$1' (python, demo, test, oldest, e2e, all; parts: base," \
         "build-oldest, pause, node, image)"; exit 2 ;;
  esac
}
[ "$#" -gt 0 ] || set -- all
for p in "$@"; do purpose "$p"; done
# Every purpose needs a Python that makes virtualenvs (Debian splits venv/ensurepip out).
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  if [ "$(command -v "$PYTHON")" = /usr/bin/python3 ]; then
    add python3-venv
  else
    say "$PYTHON cannot create virtualenvs (no ensurepip); set PYTHON= to one that can"; exit 1
  fi
fi

# Kubernetes 1.34 is built with the Go of its go.mod's toolchain line, which the go command
# fetches through the module proxy; that needs a Go >= 1.24 to start from.
GO_MIN=24
go_ok() {  # a go binary of at least 1.$GO_MIN
  local v; v=$("$1" env GOVERSION 2>/dev/null) || return 1
  v=${v#go}; [ "${v%%.*}" -gt 1 ] 2>/dev/null && return 0
  v=${v#1.}; [ "${v%%.*}" -ge "$GO_MIN" ] 2>/dev/null
}
if [ "$need_go" = 1 ]; then
  found=""
  for g in /usr/local/go/bin/go "$(command -v go || true)"; do
    if [ -n "$g" ] && [ -x "$g" ] && go_ok "$g"; then found=$g; break; fi
  done
  if [ -z "$found" ]; then
    say "no Go >= 1.$GO_MIN found (looked at /usr/local/go/bin/go and go on PATH)."
    say "Kubernetes 1.34 is built from the Go module proxy and needs one to start from;"
    say "Debian bookworm's golang-go (1.19) is too old. Install Go >= 1.$GO_MIN at /usr/local/go"
    say "(the official tarball), then run this again."
    exit 1
  fi
fi

# What is missing, de-duplicated, in a stable order.
missing=()
declare -A seen=()
for p in "${want[@]}"; do
  [ -n "${seen[$p]:-}" ] && continue
  seen[$p]=1
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed'; then
    missing+=("$p")
  fi
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
  say "this is not a Debian-like system (no apt-get). Install these packages (Debian names),"
  say "or their equivalents, then run this again:"
  for p in "${missing[@]}"; do say "  $p: ${WHY[$p]}"; done
  exit 1
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO=(sudo); else
    say "installing ${missing[*]} needs root, and there is no sudo: run this script as root"; exit 1
  fi
fi

say "installing ${#missing[@]} Debian package(s):"
for p in "${missing[@]}"; do say "  $p: ${WHY[$p]}"; done
export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)
# A fresh machine may have no package lists at all, or lists older than the archive.
# apt's own output goes to a log, shown only when a step fails.
aptlog=$(mktemp -t agentrun-apt.XXXXXX)
apt_get() {
  if ! "${SUDO[@]}" apt-get "$@" >"$aptlog" 2>&1; then
    tail -n 40 "$aptlog" >&2
    say "FAILED: apt-get $* (the output above; full log $aptlog)"
    exit 1
  fi
}
say "apt-get update"
apt_get update
say "apt-get install (a few minutes the first time; chromium is the largest)"
apt_get install -y --no-install-recommends "${missing[@]}"
rm -f "$aptlog"
say "installed in $(( $(date +%s) - start ))s"
