#!/usr/bin/env bash
# Bring up (or reuse) the real single-node Kubernetes cluster the e2e tests run on.
#
# 1. installs the host packages it needs (Debian's containerd, runc, CNI plugins, iptables,
#    etcd) when missing (scripts/install-deps.sh); 2. builds the Kubernetes binaries once,
#    cached by version under ~/.cache/agentrun (scripts/build-controlplane.sh --node); 3. starts etcd, kube-apiserver,
#    kube-controller-manager, kube-scheduler, a private containerd, kubelet, kube-proxy and
#    CoreDNS
#    (agentrun_harness.node). Idempotent: a running cluster is reused. All state lives
#    under .work/cluster/; the kubeconfig is .work/cluster/kubeconfig (never ~/.kube), and
#    its path is printed on stdout. `scripts/cluster-down.sh` removes everything.
#
# Env: NODE_K8S_VERSION (1.34, the default, or 1.20),
#      CLUSTER_DIR (default .work/cluster), PYTHON (default .venv/bin/python),
#      CLUSTER_TIMEOUT (seconds to wait for the node to be Ready, default 300).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${CLUSTER_DIR:-$ROOT/.work/cluster}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
# The node's Kubernetes: 1.34 (the Go module proxy) or 1.20 (Debian's source).
NODE_VERSION="${NODE_K8S_VERSION:-1.34}"

log() { printf '[cluster-up %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "a real node needs root (containerd, iptables, cgroups, mounts)"; exit 1
fi
if [ ! -x "$PY" ]; then
  log "$PY not found: run \`make install\` first"; exit 1
fi

started=$(date +%s)
log "1/3 host packages"
if [ "$NODE_VERSION" = 1.20 ]; then
  "$ROOT/scripts/install-deps.sh" node pause build-oldest
else
  "$ROOT/scripts/install-deps.sh" node pause demo
fi

log "2/3 Kubernetes binaries (control plane and node) and CoreDNS, cached by version"
BIN="$(K8S_VERSION="$NODE_VERSION" "$ROOT/scripts/build-controlplane.sh" --node)"
COREDNS="$("$ROOT/scripts/build-coredns.sh")"

log "3/3 the cluster in $DIR"
"$PY" -m agentrun_harness.node up --dir "$DIR" --bin-dir "$BIN" --coredns "$COREDNS" \
  --timeout "${CLUSTER_TIMEOUT:-300}"
log "done in $(( $(date +%s) - started ))s; use: export KUBECONFIG=$DIR/kubeconfig"
