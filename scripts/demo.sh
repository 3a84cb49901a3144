#!/usr/bin/env bash
# `make demo`: a local control plane, Redis, the CRDs and an example run.
# `scripts/demo.sh down` stops what it started. Everything lives under .work/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=.work/demo
PY=.venv/bin/python
mkdir -p "$WORK"
say() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }

stop_pidfile() {
  local f="$1"
  if [ -f "$f" ]; then kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; fi
}

if [ "${1:-}" = "down" ]; then
  stop_pidfile "$WORK/redis.pid"
  [ -x "$PY" ] && "$PY" -m agentrun_operator.testing.controlplane down --dir "$WORK/controlplane" || true
  say "stopped"
  exit 0
fi

say "control plane (etcd + kube-apiserver + kube-controller-manager, Kubernetes 1.20.2)"
KUBECONFIG_FILE=$("$PY" -m agentrun_operator.testing.controlplane up --dir "$WORK/controlplane")
export KUBECONFIG="$KUBECONFIG_FILE"
KUBECTL=$("$PY" -c 'from agentrun_operator.testing.controlplane import default_bin_dir; print(default_bin_dir() / "kubectl")')

if [ -f "$WORK/redis.pid" ] && kill -0 "$(cat "$WORK/redis.pid")" 2>/dev/null; then
  say "reusing Redis on port $(cat "$WORK/redis.port")"
else
  port=$("$PY" -c 'from agentrun_operator.testing.controlplane import free_port; print(free_port())')
  say "starting Redis on 127.0.0.1:$port"
  redis-server --bind 127.0.0.1 --port "$port" --dir "$WORK" --appendonly yes --save '' \
    --daemonize yes --pidfile "$PWD/$WORK/redis.pid" --logfile "$PWD/$WORK/redis.log"
  echo "$port" > "$WORK/redis.port"
fi

say "installing the CRDs"
"$KUBECTL" apply -f crds/ >/dev/null
"$KUBECTL" wait --for=condition=Established crd/agentruns.agentrun.dev crd/toolapprovals.agentrun.dev >/dev/null
say "applying examples/"
"$KUBECTL" apply -f examples/
"$KUBECTL" get agentruns
say "KUBECONFIG=$KUBECONFIG_FILE  (stop everything with: make demo-down)"
