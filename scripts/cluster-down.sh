#!/usr/bin/env bash
# Remove the single-node cluster `scripts/cluster-up.sh` made, and everything it changed on
# this host: its processes (control plane, containerd and its shims, kubelet, kube-proxy,
# kube-scheduler, the pods), mounts and network namespaces, the CNI bridge, the iptables
# chains kubelet, kube-proxy and the CNI plugins added, the node address on lo, the kernel
# settings they changed (restored from the baseline taken at cluster-up), its cgroups, pod
# logs, and the state directory itself. Safe to run when nothing is up.
#
# Env: CLUSTER_DIR (default .work/cluster), PYTHON (default .venv/bin/python).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${CLUSTER_DIR:-$ROOT/.work/cluster}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"

log() { printf '[cluster-down %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ ! -e "$DIR" ]; then
  log "no cluster in $DIR: nothing to do"; exit 0
fi
if [ ! -x "$PY" ]; then
  log "$PY not found: run \`make install\` first"; exit 1
fi
log "removing the cluster in $DIR"
"$PY" -m agentrun_harness.node down --dir "$DIR"
