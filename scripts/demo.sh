#!/usr/bin/env bash
# `make demo`: a local control plane, Redis, the mock LLM and the operator; then it applies
# examples/ and streams the example run's events in this terminal.
# `scripts/demo.sh check` (`make demo-check`, which CI runs) does the same without a person:
# it exits 0 only once the example run has Succeeded and the approval example waits for a
# person (AwaitingApproval), and says what went wrong otherwise.
# `scripts/demo.sh down` stops what it started. Everything lives under .work/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=.work/demo
PY=.venv/bin/python
NS=agentrun-demo
RUN=why-is-web-pending
mkdir -p "$WORK"
say() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
free_port() { "$PY" -c 'from agentrun_harness.controlplane import free_port; print(free_port())'; }
stop_pidfile() {
  if [ -f "$1" ]; then kill "$(cat "$1")" 2>/dev/null || true; rm -f "$1"; fi
}

MODE="${1:-show}"
case "$MODE" in show|check|down) ;; *) echo "usage: $0 [show|check|down]" >&2; exit 2 ;; esac
if [ "$MODE" = down ]; then
  for p in sse operator webhooks mockllm redis; do stop_pidfile "$WORK/$p.pid"; done
  if [ -x "$PY" ]; then
    "$PY" -m agentrun_harness.controlplane down --dir "$WORK/controlplane" || true
  fi
  say "stopped"
  exit 0
fi

release=$("$PY" -c 'from agentrun_harness.controlplane import k8s_release; print(k8s_release())')
say "control plane: etcd + kube-apiserver + kube-controller-manager (Kubernetes $release)"
KUBECONFIG=$("$PY" -m agentrun_harness.controlplane up --dir "$WORK/controlplane")
export KUBECONFIG
KUBECTL=$("$PY" -c 'from agentrun_harness.controlplane import default_bin_dir; print(default_bin_dir() / "kubectl")')

if alive "$WORK/redis.pid"; then
  say "reusing Redis on port $(cat "$WORK/redis.port")"
else
  port=$(free_port)
  say "Redis on 127.0.0.1:$port (AOF on)"
  redis-server --bind 127.0.0.1 --port "$port" --dir "$PWD/$WORK" --appendonly yes --save '' \
    --daemonize yes --pidfile "$PWD/$WORK/redis.pid" --logfile "$PWD/$WORK/redis.log"
  echo "$port" > "$WORK/redis.port"
  for _ in $(seq 50); do [ -f "$WORK/redis.pid" ] && break; sleep 0.1; done
fi
REDIS_URL="redis://127.0.0.1:$(cat "$WORK/redis.port")/0"

if alive "$WORK/mockllm.pid"; then
  say "reusing the mock LLM on port $(cat "$WORK/mockllm.port")"
else
  port=$(free_port)
  say "mock LLM (OpenAI-compatible) on 127.0.0.1:$port, 25 tokens/s"
  nohup .venv/bin/agentrun mock-llm --port "$port" --tokens-per-second 25 \
    --script scripts/mock-llm-demo.yaml \
    > "$WORK/mockllm.log" 2>&1 &
  echo $! > "$WORK/mockllm.pid"
  echo "$port" > "$WORK/mockllm.port"
fi
LLM_URL="http://127.0.0.1:$(cat "$WORK/mockllm.port")/v1"

say "installing the CRDs"
"$KUBECTL" apply -f crds/ >/dev/null
"$KUBECTL" wait --for=condition=Established --timeout=60s \
  crd/agentruns.agentrun.dev crd/toolapprovals.agentrun.dev >/dev/null

if alive "$WORK/webhooks.pid"; then
  say "reusing the admission webhook server (log: $WORK/webhooks.log)"
else
  port=$(free_port)
  say "admission webhook server on https://127.0.0.1:$port (log: $WORK/webhooks.log)"
  # A serving certificate from the local control plane's CA, and the webhook configurations.
  "$PY" - "$WORK" "$port" <<'PYEOF' | "$KUBECTL" apply -f - >/dev/null
import base64, json, sys
from pathlib import Path
from agentrun_operator import webhooks
from agentrun_harness.controlplane import issue_server_cert
work, port = Path(sys.argv[1]).resolve(), sys.argv[2]
pki = work / "controlplane" / "pki"
issue_server_cert(pki, work / "webhooks", hosts=["127.0.0.1"], name="webhooks")
ca = base64.b64encode((pki / "ca.crt").read_bytes()).decode()
items = webhooks.configurations(client_config={"url": f"https://127.0.0.1:{port}"}, ca_bundle=ca)
print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
PYEOF
  AGENTRUN_WEBHOOK_HOST=127.0.0.1 AGENTRUN_WEBHOOK_PORT="$port" \
  AGENTRUN_WEBHOOK_CERT_FILE="$PWD/$WORK/webhooks/webhooks.crt" \
  AGENTRUN_WEBHOOK_KEY_FILE="$PWD/$WORK/webhooks/webhooks.key" \
  AGENTRUN_MODEL_BASE_URL="$LLM_URL" \
    nohup "$PY" -m agentrun_operator.webhooks > "$WORK/webhooks.log" 2>&1 &
  echo $! > "$WORK/webhooks.pid"
  for _ in $(seq 100); do
    curl -fsk "https://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    alive "$WORK/webhooks.pid" || { tail -30 "$WORK/webhooks.log"; exit 1; }
    sleep 0.1
  done
fi

if alive "$WORK/operator.pid"; then
  say "reusing the operator (log: $WORK/operator.log)"
else
  health=$(free_port)
  say "operator (log: $WORK/operator.log)"
  AGENTRUN_REDIS_URL="$REDIS_URL" AGENTRUN_MODEL_BASE_URL="$LLM_URL" AGENTRUN_MODEL_NAME=mock \
  AGENTRUN_HEALTH_HOST=127.0.0.1 AGENTRUN_HEALTH_PORT="$health" \
    nohup "$PY" -m agentrun_operator --verbose > "$WORK/operator.log" 2>&1 &
  echo $! > "$WORK/operator.pid"
  for _ in $(seq 150); do
    curl -fs "http://127.0.0.1:$health/healthz" >/dev/null 2>&1 && break
    alive "$WORK/operator.pid" || { tail -30 "$WORK/operator.log"; exit 1; }
    sleep 0.2
  done
fi

if alive "$WORK/sse.pid"; then
  say "reusing the SSE server and web UI on port $(cat "$WORK/sse.port")"
else
  port=$(free_port)
  say "SSE server and web UI on http://127.0.0.1:$port (log: $WORK/sse.log)"
  AGENTRUN_REDIS_URL="$REDIS_URL" AGENTRUN_SSE_HOST=127.0.0.1 AGENTRUN_SSE_PORT="$port" \
    nohup "$PY" -m agentrun_sse --kubeconfig "$KUBECONFIG" > "$WORK/sse.log" 2>&1 &
  echo $! > "$WORK/sse.pid"
  echo "$port" > "$WORK/sse.port"
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    alive "$WORK/sse.pid" || { tail -30 "$WORK/sse.log"; exit 1; }
    sleep 0.1
  done
fi
UI="http://127.0.0.1:$(cat "$WORK/sse.port")/"

say "applying examples/ in namespace $NS"
"$KUBECTL" create namespace "$NS" --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
"$KUBECTL" apply -f manifests/rbac.yaml >/dev/null
# The local control plane's user "approver" (group approvers) may decide approvals here.
"$KUBECTL" create rolebinding approver -n "$NS" --clusterrole=agentrun-approver --user=approver \
  --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
# A fresh run each time, so there is something to watch.
"$KUBECTL" delete agentruns --all -n "$NS" --wait=true >/dev/null 2>&1 || true
"$KUBECTL" apply -n "$NS" -f examples/
say "streaming $NS/$RUN (Ctrl-C stops watching, not the run):"
if [ "$MODE" = check ]; then
  # The same stream, bounded: `watch` returns at the run's `end` event.
  rc=0
  timeout 180 .venv/bin/agentrun watch --server "$UI" "$NS/$RUN" || rc=$?
  if [ "$rc" = 124 ]; then say "FAILED: the stream of $NS/$RUN did not end within 180 s"; exit 1; fi
  if [ "$rc" != 0 ]; then say "FAILED: agentrun watch $NS/$RUN exited with $rc"; exit 1; fi
else
  .venv/bin/agentrun watch --server "$UI" "$NS/$RUN" || true
fi
echo
"$KUBECTL" get agentruns -n "$NS"
cat <<MSG

  Web UI: $UI
    log in with a token of the local control plane: agentrun-approver-token (user
    "approver", may decide approvals here) or agentrun-admin-token (admin)

  KUBECONFIG=$KUBECONFIG
  REDIS=$REDIS_URL
  kubectl get agentruns -n $NS          # phase, step, tokens, cost
  kubectl describe agentrun $RUN -n $NS # the story as Kubernetes Events
  kubectl get ta -n $NS -o wide         # the scale-web run waits for an approval (and what it would change); decide it
                                        # as the user "approver" (group approvers):
  KUBECONFIG=${KUBECONFIG%/*}/approver.yaml kubectl patch ta NAME -n $NS --type merge -p '{"spec":{"decision":"Approved"}}'
  .venv/bin/agentrun watch --server $UI $NS/$RUN   # replay the stream (as you)
  make demo-down                        # stop everything
MSG

if [ "$MODE" = check ]; then
  # phase NAME WANT SECONDS: wait (bounded) until the run's phase is WANT.
  phase() {
    local got="" deadline=$(( $(date +%s) + $3 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
      got=$("$KUBECTL" get agentrun "$1" -n "$NS" -o 'jsonpath={.status.phase}' 2>/dev/null || true)
      [ "$got" = "$2" ] && return 0
      case "$got" in Succeeded|Failed|Stopped) break ;; esac
      sleep 1
    done
    say "FAILED: $NS/$1 is '${got:-without a phase}', expected $2 (log: $WORK/operator.log)"
    "$KUBECTL" get agentrun "$1" -n "$NS" -o 'jsonpath={.status.message}{"\n"}' >&2 || true
    return 1
  }
  phase "$RUN" Succeeded 30
  phase scale-web AwaitingApproval 120
  curl -fs "$UI" >/dev/null || { say "FAILED: the web UI at $UI does not answer"; exit 1; }
  say "check passed: $RUN Succeeded, scale-web AwaitingApproval, the web UI answers at $UI"
fi
