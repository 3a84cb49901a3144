// agentrun web UI: plain script, no build step. Talks only to this server's own API:
// the login cookie authenticates, the CSRF cookie's value goes back in X-CSRF-Token on
// writes, and every run view is an EventSource that resumes by Last-Event-ID.
"use strict";

const API = "/api/v1";
const TYPES = ["workflow", "token", "tool", "approval", "metrics", "fault", "end",
  "heartbeat", "trimmed", "lagged"];
const FINISHED = new Set(["Succeeded", "Failed", "Stopped"]);

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

function csrf() {
  const m = document.cookie.match(/(?:^|;\s*)agentrun_csrf=([^;]+)/);
  return m ? decodeURIComponent(m[1]) : "";
}

async function call(method, path, body) {
  const headers = { "Accept": "application/json", "X-CSRF-Token": csrf() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (r.status === 401) { show("login"); }
  if (!r.ok) {
    const detail = data && data.detail;
    const text = typeof detail === "string" ? detail : JSON.stringify(detail || r.statusText);
    throw new Error(`${r.status}: ${text}`);
  }
  return data;
}

function show(section) {
  for (const s of ["login", "runs", "run"]) $(s).hidden = s !== section;
  $("logout").hidden = section === "login";
}

function setConn(state) {
  const c = $("conn");
  c.className = `conn ${state}`;
  c.textContent = state;
}

// -- login -------------------------------------------------------------------------------
$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("login-error").textContent = "";
  try {
    await call("POST", "/login", { token: $("token").value });
    $("token").value = "";
    route();
  } catch (e) {
    $("login-error").textContent = `Login failed (${e.message})`;
  }
});

$("logout").addEventListener("click", async () => {
  closeStream();
  await call("POST", "/logout").catch(() => {});
  show("login");
});

// -- run list ----------------------------------------------------------------------------
async function loadRuns() {
  const ns = $("ns-filter").value.trim();
  $("runs-error").textContent = "";
  let data;
  try {
    data = await call("GET", `${API}/runs${ns ? `?namespace=${encodeURIComponent(ns)}` : ""}`);
  } catch (e) {
    if (!$("login").hidden) return;
    $("runs-error").textContent = e.message;
    return;
  }
  show("runs");
  const body = $("run-table").querySelector("tbody");
  body.replaceChildren();
  for (const r of data.items) {
    const tr = el("tr");
    const a = el("a", "", `${r.namespace}/${r.name}`);
    a.href = `#/runs/${encodeURIComponent(r.namespace)}/${encodeURIComponent(r.name)}`;
    const name = el("td"); name.append(a);
    const usage = r.usage || {};
    tr.append(name, el("td", `phase ${r.phase}`, r.phase), el("td", "", r.step ?? "–"),
      el("td", "", r.pendingApprovalCount || 0), el("td", "", usage.totalTokens ?? "–"),
      el("td", "", usage.costUSD !== undefined ? `$${Number(usage.costUSD).toFixed(4)}` : "–"),
      el("td", "", r.createdAt || ""));
    body.append(tr);
  }
}

$("filter").addEventListener("submit", (ev) => { ev.preventDefault(); loadRuns(); });

$("chat-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("chat-error").textContent = "";
  try {
    const run = await call("POST", `${API}/agent/chat?stream=false`, {
      namespace: $("chat-ns").value.trim(), goal: $("chat-goal").value,
    });
    location.hash = `#/runs/${encodeURIComponent(run.namespace)}/${encodeURIComponent(run.name)}`;
  } catch (e) {
    $("chat-error").textContent = e.message;
  }
});

// -- one run -----------------------------------------------------------------------------
const view = { ns: "", name: "", es: null, lastId: "", lastSeq: 0, ended: false,
  retry: 500, timer: 0, cards: new Map() };

function closeStream() {
  if (view.es) view.es.close();
  view.es = null;
  clearTimeout(view.timer);
  setConn("idle");
}

function openRun(ns, name) {
  closeStream();
  Object.assign(view, { ns, name, lastId: "", lastSeq: 0, ended: false, retry: 500,
    cards: new Map() });
  show("run");
  $("run-title").textContent = `${ns}/${name}`;
  $("run-phase").textContent = "";
  $("answer").textContent = "";
  $("timeline").replaceChildren();
  $("run-notice").textContent = "";
  for (const id of ["m-ttft", "m-tokens", "m-cost", "m-step"]) $(id).textContent = "–";
  $("stop").disabled = false;
  $("run-trace").hidden = true;
  view.traceAsked = false;
  connect();
}

// The link to the run's trace (when the server has a trace URL and the run a trace id):
// asked once the stream shows the run has a trace.
async function showTrace() {
  if (view.traceAsked) return;
  view.traceAsked = true;
  const { ns, name } = view;
  try {
    const run = await call("GET", `${API}/runs/${encodeURIComponent(ns)}/${encodeURIComponent(name)}`);
    if (run.summary.traceURL && view.ns === ns && view.name === name) {
      $("run-trace").href = run.summary.traceURL;
      $("run-trace").hidden = false;
    }
  } catch (e) { view.traceAsked = false; }
}

function connect() {
  let url = `${API}/runs/${encodeURIComponent(view.ns)}/${encodeURIComponent(view.name)}/events`;
  // A new EventSource cannot set Last-Event-ID itself; the query parameter carries it.
  if (view.lastId) url += `?lastEventId=${encodeURIComponent(view.lastId)}`;
  const es = new EventSource(url, { withCredentials: true });
  view.es = es;
  setConn("connecting");
  es.onopen = () => { setConn("live"); view.retry = 500; };
  es.onerror = () => {
    if (view.es !== es || view.ended) return;
    if (es.readyState === EventSource.CONNECTING) { setConn("reconnecting"); return; }
    // Closed for good by the browser (an HTTP error, or 204 at the end): try again later,
    // unless the run is over.
    es.close();
    setConn("reconnecting");
    view.timer = setTimeout(async () => {
      try {
        const run = await call("GET",
          `${API}/runs/${encodeURIComponent(view.ns)}/${encodeURIComponent(view.name)}`);
        setPhase(run.summary.phase);
        if (FINISHED.has(run.summary.phase) && view.lastSeq > 0) { finish(); return; }
      } catch (e) { /* reconnect anyway */ }
      connect();
    }, view.retry);
    view.retry = Math.min(view.retry * 2, 15000);
  };
  for (const type of TYPES) es.addEventListener(type, (m) => onMessage(type, m));
}

function onMessage(type, m) {
  if (m.lastEventId) view.lastId = m.lastEventId;
  let ev;
  try { ev = JSON.parse(m.data); } catch (e) { return; }
  if (type === "heartbeat") { setPhase(ev.phase); return; }
  if (type === "trimmed") { notice(`Older history was trimmed; it starts at ${ev.firstId}.`); view.lastSeq = -1; return; }
  if (type === "lagged") { notice("Fell behind; resuming."); return; }
  if (typeof ev.seq === "number") {
    if (view.lastSeq > 0 && ev.seq <= view.lastSeq) return; // a duplicate after a reconnect
    if (view.lastSeq > 0 && ev.seq > view.lastSeq + 1) {
      notice(`Missed events ${view.lastSeq + 1}–${ev.seq - 1}.`);
    }
    view.lastSeq = ev.seq;
  }
  render(type, ev.data || {});
}

function notice(text) { $("run-notice").textContent = text; }

function setPhase(phase) {
  if (!phase) return;
  const p = $("run-phase");
  p.textContent = phase;
  p.className = `phase ${phase}`;
  if (FINISHED.has(phase)) $("stop").disabled = true;
}

const WORKFLOW_PHASE = { pending: "Pending", planning: "Running", executing: "Running",
  verifying: "Running", resumed: "Running", awaiting_approval: "AwaitingApproval",
  succeeded: "Succeeded", failed: "Failed", stopped: "Stopped" };

function render(type, d) {
  switch (type) {
    case "token":
      $("answer").append(document.createTextNode(d.text || ""));
      break;
    case "workflow":
      setPhase(WORKFLOW_PHASE[d.state]);
      if (d.step !== undefined) $("m-step").textContent = d.step;
      if (d.traceId) showTrace();
      if (d.state === "resumed") {
        $("answer").textContent = ""; // the half-streamed answer is superseded
        notice("The run resumed after an operator restart.");
      }
      item("workflow", `${d.state}${d.node ? ` (${d.node})` : ""}`);
      break;
    case "tool": toolCard(d); break;
    case "approval": approvalCard(d); break;
    case "metrics":
      if (d.ttftMs !== undefined) $("m-ttft").textContent = `${d.ttftMs} ms`;
      if (d.totalTokens !== undefined) $("m-tokens").textContent = d.totalTokens;
      else if (d.inputTokens !== undefined) {
        $("m-tokens").textContent = (d.inputTokens || 0) + (d.outputTokens || 0);
      }
      if (d.costUSD !== undefined) $("m-cost").textContent = `$${Number(d.costUSD).toFixed(4)}`;
      break;
    case "fault":
      item(d.fatal ? "fault fatal" : "fault", `${d.code || "fault"}: ${d.message || ""}`);
      break;
    case "end":
      setPhase(d.phase);
      item("end", `ended: ${d.phase}${d.stoppedBy ? ` by ${d.stoppedBy}` : ""}`);
      if (d.result && !$("answer").textContent) $("answer").textContent = d.result;
      finish();
      break;
  }
}

function finish() {
  view.ended = true;
  closeStream();
  setConn("ended");
}

function item(cls, text) {
  const li = el("li", cls, text);
  $("timeline").append(li);
  return li;
}

function pretty(value) {
  if (value === undefined || value === null) return "";
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

function toolCard(d) {
  let card = view.cards.get(`tool:${d.callId}`);
  if (!card) {
    card = el("li", "card tool");
    card.append(el("h3", "", d.name || "tool"), el("span", "status"), el("pre", "args"),
      el("pre", "result"));
    card.dataset.callId = d.callId || "";
    view.cards.set(`tool:${d.callId}`, card);
    $("timeline").append(card);
  }
  card.querySelector(".status").textContent = d.status || "";
  card.querySelector(".status").className = `status ${d.status || ""}`;
  if (d.arguments !== undefined) card.querySelector(".args").textContent = pretty(d.arguments);
  if (d.result !== undefined) card.querySelector(".result").textContent = pretty(d.result);
}

function approvalCard(d) {
  let card = view.cards.get(`approval:${d.callId}`);
  if (!card) {
    card = el("li", "card approval");
    card.dataset.callId = d.callId || "";
    card.append(el("h3", "", `Approval: ${d.tool || ""}`), el("span", "status"),
      el("pre", "args", pretty(d.arguments)), ruleOf(d.rule), previewOf(d.preview));
    const comment = el("input", "comment");
    comment.placeholder = "comment (optional)";
    const approve = el("button", "approve", "Approve");
    const deny = el("button", "deny danger", "Deny");
    const error = el("p", "error");
    approve.addEventListener("click", () => decide(card, d.callId, "approve"));
    deny.addEventListener("click", () => decide(card, d.callId, "deny"));
    const actions = el("div", "actions");
    actions.append(comment, approve, deny, error);
    card.append(actions);
    view.cards.set(`approval:${d.callId}`, card);
    $("timeline").append(card);
  }
  const state = d.state || "pending";
  if (state === "pending" && d.preview) {
    // Asked again (the object changed after an approval): show the fresh preview.
    card.querySelector(".preview").replaceWith(previewOf(d.preview));
    card.querySelector(".rule").replaceWith(ruleOf(d.rule));
  }
  card.querySelector(".status").textContent = state + (d.decidedBy ? ` by ${d.decidedBy}` : "");
  card.querySelector(".status").className = `status ${state}`;
  card.querySelector(".actions").hidden = state !== "pending";
}

// The AgentPolicy rule that asked for this approval, and why.
function ruleOf(r) {
  const box = el("p", "rule");
  if (r) box.textContent = `Asked by ${r.policy || "a policy"} rule ${r.name || ""}` +
    (r.message ? `: ${r.message}` : "");
  return box;
}

// What the call would change (the operator's server-side dry run), shown above the buttons.
function previewOf(p) {
  const box = el("div", "preview");
  if (!p) return box;
  const t = p.target || {};
  const where = [t.namespace, t.name].filter(Boolean).join("/");
  box.append(el("p", "preview-head",
    `${p.operation || "update"} ${t.kind || ""} ${where}` +
    (p.approximate ? " (approximate: a webhook does not support dry run)" : "")));
  const list = el("ul", "changes");
  for (const c of p.changes || []) {
    const li = el("li", "change");
    li.append(el("code", "path", c.path), el("span", "before", c.before ?? "(absent)"),
      el("span", "arrow", " → "), el("span", "after", c.after ?? "(absent)"));
    list.append(li);
  }
  if (p.moreChanges) list.append(el("li", "change more", `… and ${p.moreChanges} more`));
  if (p.owner) list.append(el("li", "change owner",
    `${p.owner} ${p.replaced ? "replaces it" : "owns it"}`));
  box.append(list);
  return box;
}

async function decide(card, callId, decision) {
  const error = card.querySelector(".error");
  error.textContent = "";
  for (const b of card.querySelectorAll("button")) b.disabled = true;
  try {
    await call("POST", `${API}/runs/${encodeURIComponent(view.ns)}/${encodeURIComponent(view.name)}` +
      `/approvals/${encodeURIComponent(callId)}?stream=false`,
      { decision, comment: card.querySelector(".comment").value || null });
    card.querySelector(".status").textContent = decision === "approve" ? "approving…" : "denying…";
  } catch (e) {
    error.textContent = e.message;
    for (const b of card.querySelectorAll("button")) b.disabled = false;
  }
}

// One request per pending call: each decision is recorded (and judged) on its own.
$("approve-all").addEventListener("click", async () => {
  const pending = [...view.cards.entries()]
    .filter(([key, card]) => key.startsWith("approval:") && !card.querySelector(".actions").hidden)
    .map(([, card]) => card);
  if (!pending.length) { notice("No pending approvals."); return; }
  await Promise.all(pending.map((card) => decide(card, card.dataset.callId, "approve")));
});

$("stop").addEventListener("click", async () => {
  $("stop").disabled = true;
  try {
    const r = await call("POST",
      `${API}/runs/${encodeURIComponent(view.ns)}/${encodeURIComponent(view.name)}/stop`);
    notice(`Stop requested${r.by ? ` by ${r.by}` : ""}.`);
  } catch (e) {
    notice(`Stop failed: ${e.message}`);
    $("stop").disabled = false;
  }
});

// -- routing -----------------------------------------------------------------------------
function route() {
  const m = location.hash.match(/^#\/runs\/([^/]+)\/([^/]+)$/);
  if (m) { openRun(decodeURIComponent(m[1]), decodeURIComponent(m[2])); return; }
  closeStream();
  loadRuns();
}

window.addEventListener("hashchange", route);
route();
