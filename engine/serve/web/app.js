// reel's web view: the jobs page (/) and a job's page (/jobs/{id}), drawn from
// the API of docs/api.md with the bearer token the user signed in with (kept
// in sessionStorage: gone when the tab closes). Plain JS, no framework, no
// build step; every text from the API goes into the page as text, never HTML.
"use strict";

const TOKEN_KEY = "reel.token";
const POLL_MS = 1000;
// A log page: what one request asks for, and most of what the page holds.
const LOG_PAGE = 256 * 1024;
const LOG_KEEP = 1024 * 1024;
const TERMINAL = ["Succeeded", "Failed", "Cancelled", "TimedOut", "Lost"];

let view = null; // the current view's stop function

// ---------------------------------------------------------------- helpers

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function announce(text) {
  document.getElementById("announce").textContent = text;
}

function fmtTime(ms) {
  if (ms === null || ms === undefined) return "";
  const d = new Date(ms);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function fmtDur(ms) {
  if (ms === null || ms === undefined || ms < 0) return "";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

function stateWord(job) {
  return job.state === "ended" ? (job.outcome || "ended") : job.state;
}

function badge(word) {
  return el("span", { class: `badge b-${word}`, text: word.replace("_", " ") });
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

class Unauthorized extends Error {}

// One API call. A refused token signs the user out.
async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {}, { Authorization: `Bearer ${token()}` });
  const resp = await fetch(path, Object.assign({}, opts, { headers }));
  if (resp.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    route("The daemon refused the token: sign in again.");
    throw new Unauthorized("unauthorized");
  }
  return resp;
}

async function apiJson(path, opts) {
  const resp = await api(path, opts);
  let body = null;
  try { body = await resp.json(); } catch (e) { body = { error: `HTTP ${resp.status}` }; }
  if (!resp.ok) throw new Error(body && body.error ? body.error : `HTTP ${resp.status}`);
  return body;
}

// A poller that runs `f` now and every `ms` until stopped; one call at a time.
function poller(f, ms) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    if (stopped) return;
    try { await f(); } catch (e) { if (e instanceof Unauthorized) return; }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

function navigate(path) {
  history.pushState(null, "", path);
  route();
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest && ev.target.closest("a[data-nav]");
  if (!a || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
  ev.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", () => route());

// ---------------------------------------------------------------- routing

function route(message) {
  if (view) { view(); view = null; }
  const main = document.getElementById("main");
  main.replaceChildren();
  const logout = document.getElementById("logout");
  if (!token()) {
    logout.hidden = true;
    document.getElementById("where").textContent = "";
    view = loginView(main, message);
    return;
  }
  logout.hidden = false;
  const m = location.pathname.match(/^\/jobs\/(\d+)\/?$/);
  if (m) view = jobView(main, Number(m[1]));
  else view = jobsView(main);
}

document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  route("Signed out.");
});

// ---------------------------------------------------------------- sign in

function loginView(main, message) {
  document.title = "Sign in · reel";
  const input = el("input", { id: "token", type: "password", autocomplete: "current-password", required: true, spellcheck: "false" });
  const error = el("p", { id: "login-error", class: "error", role: "alert", text: message || "" });
  const form = el("form", { class: "login", id: "login" },
    el("h1", { text: "Sign in to reel" }),
    el("p", {}, "Paste the daemon's token. It is in ", el("code", { text: "<state>/serve/token" }),
      "; ", el("code", { text: "reel serve" }), " prints its path when it starts."),
    el("label", { for: "token", text: "Token" }), input,
    el("button", { type: "submit", id: "sign-in", text: "Sign in" }), error);
  let stopped = false;
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    const t = input.value.trim();
    if (!t) return;
    let resp;
    try {
      resp = await fetch("/v1/scheduler", { headers: { Authorization: `Bearer ${t}` } });
    } catch (e) {
      error.textContent = `Cannot reach the daemon: ${e.message}`;
      return;
    }
    if (stopped) return;
    if (resp.status === 401) {
      error.textContent = "The daemon refused this token.";
      input.select();
      return;
    }
    if (!resp.ok) {
      error.textContent = `The daemon answered HTTP ${resp.status}.`;
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, t);
    route();
  });
  main.append(form);
  input.focus();
  return () => { stopped = true; };
}

// ---------------------------------------------------------------- jobs page

function jobsView(main) {
  document.title = "Jobs · reel";
  document.getElementById("where").textContent = "jobs";
  const params = new URLSearchParams(location.search);
  const filter = {
    state: params.get("state") || "",
    outcome: params.get("outcome") || "",
    owner: params.get("owner") || "",
  };
  // The cursors of the pages before this one (the first page has none).
  const cursors = [];
  let cursor = null;
  let next = null;

  const budget = el("div", { class: "meter", id: "budget" });
  const owners = el("ul", { class: "owners", id: "owners" });
  const counts = el("p", { class: "muted", id: "counts" });
  const stateSel = el("select", { id: "f-state" },
    ...["", "queued", "running", "ended"].map((v) => el("option", { value: v, text: v || "all" })));
  const outcomeSel = el("select", { id: "f-outcome" },
    ...["", "succeeded", "failed", "cancelled", "timed_out", "lost"].map((v) => el("option", { value: v, text: v ? v.replace("_", " ") : "any" })));
  const ownerIn = el("input", { id: "f-owner", type: "text", placeholder: "any owner", size: 14 });
  stateSel.value = filter.state;
  outcomeSel.value = filter.outcome;
  ownerIn.value = filter.owner;
  const tbody = el("tbody", { id: "jobs" });
  const empty = el("p", { class: "muted", id: "no-jobs", hidden: true, text: "No jobs match." });
  const historyLine = el("p", { class: "muted", id: "history" });
  const newer = el("button", { type: "button", id: "newer", text: "‹ Newer", disabled: true });
  const older = el("button", { type: "button", id: "older", text: "Older ›", disabled: true });
  const pageNo = el("span", { class: "muted" });
  const status = el("p", { class: "error", role: "status" });

  main.append(
    el("h1", { text: "Jobs" }),
    el("div", { class: "summary" },
      el("section", { class: "card", "aria-labelledby": "h-budget" },
        el("h2", { id: "h-budget", text: "Budget" }), budget, counts),
      el("section", { class: "card", "aria-labelledby": "h-queue" },
        el("h2", { id: "h-queue", text: "Queue per owner" }), owners)),
    el("form", { class: "filters", role: "search", onsubmit: (e) => e.preventDefault() },
      el("label", {}, "State", stateSel),
      el("label", {}, "Outcome", outcomeSel),
      el("label", {}, "Owner", ownerIn)),
    status,
    el("div", { class: "table-wrap" },
      el("table", { "aria-label": "jobs, newest first" },
        el("thead", {}, el("tr", {},
          el("th", { scope: "col", text: "Job" }),
          el("th", { scope: "col", text: "Name" }),
          el("th", { scope: "col", text: "Owner" }),
          el("th", { scope: "col", class: "hide-narrow", text: "Runner" }),
          el("th", { scope: "col", text: "State" }),
          el("th", { scope: "col", class: "hide-narrow", text: "Queued" }),
          el("th", { scope: "col", text: "Duration" }))),
        tbody)),
    empty,
    el("div", { class: "pager" }, newer, pageNo, older),
    historyLine);

  const refilter = () => {
    filter.state = stateSel.value;
    filter.outcome = outcomeSel.value;
    filter.owner = ownerIn.value.trim();
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(filter)) if (v) q.set(k, v);
    const s = q.toString();
    window.history.replaceState(null, "", s ? `/?${s}` : "/");
    cursors.length = 0;
    cursor = null;
    refresh();
  };
  stateSel.addEventListener("change", refilter);
  outcomeSel.addEventListener("change", refilter);
  let typing = null;
  ownerIn.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(refilter, 300); });
  newer.addEventListener("click", () => { cursor = cursors.pop() || null; refresh(); });
  older.addEventListener("click", () => { if (next) { cursors.push(cursor); cursor = next; refresh(); } });

  const rows = new Map();
  function rowFor(job) {
    let r = rows.get(job.id);
    if (!r) {
      const link = el("a", { href: `/jobs/${job.id}`, "data-nav": true, text: `#${job.id}` });
      r = {
        tr: el("tr", { "data-job": job.id }),
        cells: [el("td", {}, link), el("td"), el("td"), el("td", { class: "hide-narrow" }), el("td", { class: "state" }),
          el("td", { class: "hide-narrow mono" }), el("td", { class: "num" })],
        word: null,
      };
      r.tr.append(...r.cells);
      rows.set(job.id, r);
    }
    const set = (i, text) => { if (r.cells[i].textContent !== text) r.cells[i].textContent = text; };
    set(1, job.name || "");
    set(2, job.owner || "");
    set(3, job.runner || "");
    const word = stateWord(job);
    if (r.word !== word) { r.cells[4].replaceChildren(badge(word)); r.word = word; }
    set(5, fmtTime(job.queued_ms));
    const end = job.finished_ms || (job.started_ms ? Date.now() : null);
    set(6, job.started_ms ? fmtDur(end - job.started_ms) : "");
    return r.tr;
  }

  async function refresh() {
    const q = new URLSearchParams({ limit: "50" });
    for (const [k, v] of Object.entries(filter)) if (v) q.set(k, v);
    if (cursor) q.set("cursor", cursor);
    const [sched, page] = await Promise.all([apiJson("/v1/scheduler"), apiJson(`/v1/jobs?${q}`)]);
    status.textContent = "";
    drawBudget(sched);
    next = page.next_cursor;
    const seen = new Set();
    const trs = page.jobs.map((j) => { seen.add(j.id); return rowFor(j); });
    for (const id of rows.keys()) if (!seen.has(id)) rows.delete(id);
    // Only moves what moved, so focus and selection in the table survive a poll.
    trs.forEach((tr, i) => { if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null); });
    while (tbody.children.length > trs.length) tbody.lastChild.remove();
    empty.hidden = trs.length > 0;
    newer.disabled = cursors.length === 0 && cursor === null;
    older.disabled = !next;
    pageNo.textContent = `page ${cursors.length + 1}`;
    historyLine.textContent = page.deleted_before_ms
      ? `History goes back to ${fmtTime(page.deleted_before_ms)}: reel gc deleted the jobs that ended before.`
      : "History: every job since the log began.";
  }

  function drawBudget(s) {
    const rowsOut = [];
    for (const [key, name] of [["memory_mib", "memory"], ["vcpus", "vCPUs"], ["disk_mib", "disk"]]) {
      const total = s.budget[key];
      const used = s.used[key];
      const unit = key.endsWith("_mib") ? " MiB" : "";
      const pct = total > 0 ? Math.min(100, (100 * used) / total) : 0;
      const fill = el("span");
      fill.style.width = `${pct}%`;
      rowsOut.push(el("span", { text: name }),
        el("div", { class: "bar", role: "img", "aria-label": `${name}: ${used} of ${total}${unit} used` }, fill),
        el("span", { class: "mono", "data-resource": key, text: `${used}/${total}${unit} used, ${s.free[key]}${unit} free` }));
    }
    budget.replaceChildren(...rowsOut);
    counts.textContent = `${s.running} running, ${s.queued} queued${s.accepting ? "" : " — the daemon is draining"}`;
    const names = new Set([...Object.keys(s.queue_by_owner), ...Object.keys(s.running_by_owner)]);
    if (names.size === 0) {
      owners.replaceChildren(el("li", { class: "muted", text: "nobody is waiting" }));
    } else {
      owners.replaceChildren(...[...names].sort().map((o) =>
        el("li", { "data-owner": o }, el("span", { text: o }),
          el("span", { class: "mono", text: `${s.queue_by_owner[o] || 0} queued, ${s.running_by_owner[o] || 0} running` }))));
    }
  }

  const stop = poller(async () => {
    try { await refresh(); } catch (e) {
      if (e instanceof Unauthorized) throw e;
      status.textContent = `Cannot load the jobs: ${e.message}`;
    }
  }, POLL_MS);
  return () => { stop(); clearTimeout(typing); };
}

// ---------------------------------------------------------------- timeline

// Where each lifecycle phase of the sandbox lane starts.
const PHASE_START = {
  Queued: "queued", SlotGranted: "lease", SandboxPlanned: "prepare", BootRequested: "boot",
  VmBooted: "connect", AgentConnected: "steps", TeardownStarted: "drain", Drained: "poweroff",
  PoweredOff: "cleanup",
};
const PHASE_TITLE = {
  queued: "queued: waiting for resources", lease: "lease: sandbox id and plan", prepare: "prepare: workdir and volumes",
  boot: "boot: starting the VM or agent", connect: "connect: agent handshake", steps: "steps",
  drain: "drain: flushing output", poweroff: "power off", cleanup: "cleanup: removing the sandbox",
};
const MARKS = {
  RecoveryStarted: "recovered", Reattached: "reattached", Reaped: "reaped", CancelRequested: "cancel",
  DeadlinePassed: "deadline", RunnerNotice: "notice",
};

// Segments and marks from a job's events: `now` ends what has not ended.
function timelineOf(events, stepCount, now) {
  const t0 = events.length ? events[0].at_ms : now;
  const terminal = events.find((e) => TERMINAL.includes(e.event));
  const tEnd = terminal ? terminal.at_ms : now;
  const sandbox = [];
  const marks = [];
  const steps = Array.from({ length: stepCount }, () => []);
  let phase = null;
  events.forEach((e, i) => {
    const p = PHASE_START[e.event];
    if (p) {
      if (phase) phase.end = e.at_ms;
      phase = { kind: p, start: e.at_ms, end: null, events: [e] };
      sandbox.push(phase);
    } else if (TERMINAL.includes(e.event)) {
      if (phase) { phase.end = e.at_ms; phase.events.push(e); phase = null; }
    } else if (phase && !MARKS[e.event]) {
      phase.events.push(e);
    }
    if (e.event === "RecoveryStarted" && i > 0) {
      // The dead engine's last sign of life is the event before this one.
      const last = events[i - 1];
      marks.push({ kind: "died", at: last.at_ms, events: [last], label: `engine died after this (its last event: ${last.event})` });
      sandbox.push({ kind: "down", start: last.at_ms, end: e.at_ms, events: [last, e] });
    }
    if (MARKS[e.event]) {
      const label = e.event === "RecoveryStarted" ? `engine pid ${e.engine_pid} took the job over`
        : e.event === "Reattached" ? "reattached to the live sandbox"
        : e.event === "Reaped" ? `reaped: ${e.reason}`
        : e.event === "CancelRequested" ? `cancel requested: ${e.reason}`
        : e.event === "DeadlinePassed" ? `deadline passed: ${e.reason}`
        : `runner notice: ${e.message}`;
      marks.push({ kind: MARKS[e.event], at: e.at_ms, events: [e], label });
    }
    if (e.event === "StepStarted" && steps[e.index]) {
      steps[e.index].push({ start: e.at_ms, end: null, result: "running", events: [e] });
    }
    if (e.event === "StepFinished" && steps[e.index]) {
      const runs = steps[e.index];
      let run = runs[runs.length - 1];
      if (!run || run.end !== null) { run = { start: e.at_ms, end: null, events: [] }; runs.push(run); }
      run.end = e.at_ms;
      run.events.push(e);
      run.result = e.timed_out ? "timed_out" : e.exit_code === 0 ? "ok" : e.exit_code !== null ? "failed" : "signal";
    }
  });
  if (phase) phase.end = null;
  for (const runs of steps) {
    for (const r of runs) if (r.end === null && terminal) { r.end = tEnd; r.result = "lost"; }
  }
  return { t0, tEnd, sandbox, marks, steps };
}

function niceStep(span) {
  const target = span / 6;
  const pow = Math.pow(10, Math.floor(Math.log10(Math.max(target, 1))));
  for (const m of [1, 2, 5, 10]) if (m * pow >= target) return m * pow;
  return 10 * pow;
}

function fieldsOf(e) {
  const out = [];
  for (const [k, v] of Object.entries(e)) {
    if (["job", "seq", "at_ms", "event"].includes(k)) continue;
    if (k === "handle" && v && Array.isArray(v.bytes)) { out.push([k, `version ${v.version}, ${v.bytes.length} bytes`]); continue; }
    out.push([k, typeof v === "string" ? v : JSON.stringify(v)]);
  }
  return out;
}

function drawTimeline(box, detail, tl, spec, selected) {
  const span = Math.max(tl.tEnd - tl.t0, 1);
  const pos = (t) => (100 * (t - tl.t0)) / span;
  const now = tl.tEnd;
  const show = (title, events, button) => {
    for (const b of box.querySelectorAll(".selected")) b.classList.remove("selected");
    if (button) button.classList.add("selected");
    selected.key = button ? button.dataset.key : null;
    detail.hidden = false;
    detail.replaceChildren(el("h3", { text: title }),
      el("table", {}, el("thead", {}, el("tr", {}, el("th", { text: "seq" }), el("th", { text: "time" }),
        el("th", { text: "+ from start" }), el("th", { text: "event" }), el("th", { text: "fields" }))),
      el("tbody", {}, ...events.map((e) => el("tr", {},
        el("td", { class: "num", text: e.seq }), el("td", { class: "mono", text: `${fmtTime(e.at_ms)}.${String(e.at_ms % 1000).padStart(3, "0")}` }),
        el("td", { class: "num", text: fmtDur(e.at_ms - tl.t0) }), el("td", { text: e.event }),
        el("td", {}, ...fieldsOf(e).map(([k, v]) => el("div", {}, el("span", { class: "muted", text: `${k}: ` }), el("code", { text: v })))))))));
  };
  const seg = (cls, start, end, title, events, key) => {
    const b = el("button", { type: "button", class: `seg ${cls}`, title, "aria-label": title, "data-key": key });
    b.style.left = `${pos(start)}%`;
    b.style.width = `${Math.max(pos(end === null ? now : end) - pos(start), 0)}%`;
    b.addEventListener("click", () => show(title, events, b));
    if (selected.key === key) b.classList.add("selected");
    return b;
  };
  const lanes = [];
  const sandboxTrack = el("div", { class: "track", "data-lane": "sandbox" });
  tl.sandbox.forEach((p, i) => {
    const dur = fmtDur((p.end === null ? now : p.end) - p.start);
    const title = p.kind === "down" ? `engine down: no engine ran the job for ${dur}` : `${PHASE_TITLE[p.kind]} — ${dur}${p.end === null ? " so far" : ""}`;
    const b = seg(`p-${p.kind}`, p.start, p.end, title, p.events, `p${i}`);
    b.dataset.phase = p.kind;
    sandboxTrack.append(b);
  });
  lanes.push(el("div", { class: "lane" }, el("span", { class: "lane-name", text: "sandbox" }), sandboxTrack));
  if (tl.marks.length) {
    // Marks close in time go to rows of their own, so each can be clicked.
    const width = Math.max(box.getBoundingClientRect().width - 170, 100);
    const rowEnds = [];
    const marksTrack = el("div", { class: "track marks", "data-lane": "marks" });
    tl.marks.forEach((m, i) => {
      const x = (pos(m.at) / 100) * width;
      let row = rowEnds.findIndex((end) => end < x - 7);
      if (row < 0) { row = rowEnds.length; rowEnds.push(0); }
      rowEnds[row] = x + 7;
      const b = el("button", { type: "button", class: `mark m-${m.kind}`, title: `${m.label} at ${fmtTime(m.at)}`, "aria-label": m.label, "data-key": `m${i}`, "data-mark": m.kind });
      b.style.left = `${pos(m.at)}%`;
      b.style.top = `${2 + row * 16}px`;
      b.addEventListener("click", () => show(m.label, m.events, b));
      if (selected.key === `m${i}`) b.classList.add("selected");
      marksTrack.append(b);
    });
    marksTrack.style.height = `${4 + rowEnds.length * 16}px`;
    lanes.push(el("div", { class: "lane" }, el("span", { class: "lane-name", text: "marks" }), marksTrack));
  }
  tl.steps.forEach((runs, i) => {
    const name = spec && spec.steps[i] ? spec.steps[i].name : `step ${i + 1}`;
    const track = el("div", { class: "track", "data-lane": `step-${i + 1}` });
    runs.forEach((r, k) => {
      const dur = fmtDur((r.end === null ? now : r.end) - r.start);
      const fin = r.events.find((e) => e.event === "StepFinished");
      const what = r.result === "running" ? "running" : r.result === "ok" ? "exit 0"
        : r.result === "failed" ? `exit ${fin.exit_code}` : r.result === "timed_out" ? "timed out"
        : r.result === "signal" ? `killed by signal ${fin.signal}` : "never finished";
      const title = `step ${i + 1} "${name}": ${what} — ${dur}${r.end === null ? " so far" : ""}`;
      const b = seg(`s-${r.result} step-bar`, r.start, r.end, title, r.events, `s${i}.${k}`);
      b.dataset.step = i + 1;
      b.dataset.result = r.result;
      track.append(b);
    });
    lanes.push(el("div", { class: "lane" }, el("span", { class: "lane-name", title: name, text: `${i + 1}. ${name}` }), track));
  });
  const axis = el("div", { class: "axis", "aria-hidden": "true" });
  const step = niceStep(span);
  for (let t = 0; t <= span; t += step) {
    const s = el("span", { text: fmtDur(t) || "0" });
    s.style.left = `${(100 * t) / span}%`;
    axis.append(s);
  }
  const legend = el("div", { class: "legend" },
    ...[["s-ok", "exit 0"], ["s-failed", "failed"], ["s-timed_out", "timed out"], ["s-signal", "signal"], ["s-running", "running"], ["p-down", "engine down"]]
      .map(([c, t]) => el("span", {}, el("i", { class: c }), t)),
    el("span", { text: "✕ engine died · R recovered · ↺ reattached · ⌫ reaped · ■ cancel" }));
  box.replaceChildren(...lanes, axis, legend);
}

// ---------------------------------------------------------------- logs

// SGR state → classes; other control sequences are dropped.
function ansiState() { return { fg: null, bg: null, bold: false, dim: false, italic: false, under: false, fg256: null }; }

const PALETTE = ["#000000", "#cd3131", "#0dbc79", "#e5e510", "#2472c8", "#bc3fbc", "#11a8cd", "#e5e5e5",
  "#666666", "#f14c4c", "#23d18b", "#f5f543", "#3b8eea", "#d670d6", "#29b8db", "#ffffff"];
function color256(n) {
  if (n < 16) return PALETTE[n];
  if (n < 232) {
    n -= 16;
    const c = (v) => (v === 0 ? 0 : 55 + v * 40);
    return `rgb(${c(Math.floor(n / 36))},${c(Math.floor(n / 6) % 6)},${c(n % 6)})`;
  }
  const g = 8 + (n - 232) * 10;
  return `rgb(${g},${g},${g})`;
}

function applySgr(st, params) {
  const p = params === "" ? [0] : params.split(";").map((x) => Number(x) || 0);
  for (let i = 0; i < p.length; i++) {
    const n = p[i];
    if (n === 0) Object.assign(st, ansiState());
    else if (n === 1) st.bold = true;
    else if (n === 2) st.dim = true;
    else if (n === 3) st.italic = true;
    else if (n === 4) st.under = true;
    else if (n === 22) { st.bold = false; st.dim = false; }
    else if (n === 23) st.italic = false;
    else if (n === 24) st.under = false;
    else if ((n >= 30 && n <= 37) || (n >= 90 && n <= 97)) { st.fg = n; st.fg256 = null; }
    else if (n === 39) { st.fg = null; st.fg256 = null; }
    else if (n >= 40 && n <= 47) st.bg = n;
    else if (n === 49) st.bg = null;
    else if (n === 38 && p[i + 1] === 5) { st.fg256 = color256(p[i + 2] || 0); st.fg = null; i += 2; }
    else if (n === 38 && p[i + 1] === 2) { st.fg256 = `rgb(${p[i + 2] || 0},${p[i + 3] || 0},${p[i + 4] || 0})`; st.fg = null; i += 4; }
    else if (n === 48 && p[i + 1] === 5) i += 2;
    else if (n === 48 && p[i + 1] === 2) i += 4;
  }
}

function classesOf(st, stream) {
  const c = [];
  if (stream === "stderr") c.push("err");
  if (st.fg) c.push(`f${st.fg}`);
  if (st.bg) c.push(`g${st.bg}`);
  if (st.bold) c.push("a-bold");
  if (st.dim) c.push("a-dim");
  if (st.italic) c.push("a-italic");
  if (st.under) c.push("a-under");
  return c.join(" ");
}

function hexBytes(hex) {
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(2 * i, 2), 16);
  return out;
}

// One step's output in a <pre>: a window of the combined stream, [start, end).
class LogView {
  constructor(pre, info) {
    this.pre = pre;
    this.info = info;
    this.reset(0);
  }

  reset(start) {
    this.pre.replaceChildren();
    this.start = start;
    this.end = start;
    this.chars = 0;
    this.streams = {};
    for (const s of ["stdout", "stderr"]) {
      this.streams[s] = { decoder: new TextDecoder("utf-8"), sgr: ansiState(), carry: "" };
    }
  }

  // A chunk from the API (`format=chunks`): its bytes at its offset.
  add(chunk) {
    if (chunk.offset + chunk.len <= this.end) return; // already shown
    const s = this.streams[chunk.stream] || this.streams.stdout;
    let text = chunk.text !== undefined ? chunk.text : s.decoder.decode(hexBytes(chunk.bytes_hex), { stream: true });
    text = s.carry + text;
    s.carry = "";
    // An escape sequence cut at the chunk's end waits for the next chunk.
    const cut = text.lastIndexOf("\x1b");
    if (cut >= 0 && !/^\x1b(\[[0-9;?]*[ -\/]*[@-~]|[@-Z\\-_])/.test(text.slice(cut)) && text.length - cut < 32) {
      s.carry = text.slice(cut);
      text = text.slice(0, cut);
    }
    const box = el("span", { "data-offset": chunk.offset });
    const re = /\x1b\[([0-9;?]*)([ -\/]*)([@-~])|\x1b[@-Z\\-_]|\r(?!\n)/g;
    let last = 0;
    let m;
    const flush = (upto) => {
      if (upto <= last) return;
      const piece = text.slice(last, upto);
      const cls = classesOf(s.sgr, chunk.stream);
      const span = el("span", { class: cls || null }, piece);
      if (s.sgr.fg256) span.style.color = s.sgr.fg256;
      box.append(span);
    };
    while ((m = re.exec(text)) !== null) {
      flush(m.index);
      if (m[3] === "m" && !m[2]) applySgr(s.sgr, m[1]);
      last = m.index + m[0].length;
    }
    flush(text.length);
    const stick = this.pre.scrollTop + this.pre.clientHeight >= this.pre.scrollHeight - 4;
    this.pre.append(box);
    this.end = chunk.offset + chunk.len;
    this.chars += text.length;
    // Bounded: the oldest chunks go once the page holds more than LOG_KEEP.
    while (this.chars > LOG_KEEP && this.pre.firstChild && this.pre.firstChild.nextSibling) {
      const first = this.pre.firstChild;
      this.chars -= first.textContent.length;
      first.remove();
      this.start = Number(this.pre.firstChild.dataset.offset);
    }
    if (stick) this.pre.scrollTop = this.pre.scrollHeight;
    this.info();
  }
}

// Reads an NDJSON response body chunk by chunk, calling `each` per line.
async function readChunks(resp, each, signal) {
  const reader = resp.body.getReader();
  const dec = new TextDecoder("utf-8");
  let buf = "";
  for (;;) {
    if (signal.aborted) { reader.cancel(); return; }
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (line) each(JSON.parse(line));
    }
  }
}

function logPanel(jobId, getJob) {
  const pre = el("pre", { class: "log", id: "log", tabindex: "0", "aria-label": "step output", "aria-live": "off" });
  const title = el("h2", { id: "log-title", text: "Output" });
  const where = el("span", { class: "muted mono", id: "log-where" });
  const state = el("span", { class: "muted", id: "log-state" });
  const first = el("button", { type: "button", id: "log-first", text: "⇤ Start" });
  const older = el("button", { type: "button", id: "log-older", text: "‹ Older" });
  const newer = el("button", { type: "button", id: "log-newer", text: "Newer ›" });
  const latest = el("button", { type: "button", id: "log-latest", text: "Latest ⇥" });
  const panel = el("section", { id: "log-panel", "aria-labelledby": "log-title" },
    title,
    el("div", { class: "log-head" }, first, older, newer, latest, where, el("span", { class: "grow" }), state),
    el("p", { class: "log-legend" }, "stdout as is; ", el("span", { class: "err-key", text: "stderr marked in red at the left" }), "."),
    pre);
  let step = null;
  let stored = 0;
  let ctl = null;
  let following = false;
  const lv = new LogView(pre, () => info());
  const info = () => {
    where.textContent = `bytes ${lv.start.toLocaleString()}–${lv.end.toLocaleString()} of ${Math.max(stored, lv.end).toLocaleString()}`;
    first.disabled = lv.start === 0;
    older.disabled = lv.start === 0;
    newer.disabled = following || lv.end >= stored;
    latest.disabled = following;
    pre.dataset.start = lv.start;
    pre.dataset.end = lv.end;
  };

  const runningIn = (j) => {
    const s = j && j.steps.find((x) => x.step === step);
    return !!(s && s.started_ms && !s.finished_ms && j.state !== "ended");
  };
  const stepRunning = () => runningIn(getJob());

  async function sizeOf() {
    const r = await api(`/v1/jobs/${jobId}/logs?step=${step}&limit=0`);
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    if (r.body) await r.body.cancel();
    return Number(r.headers.get("X-Reel-Stored") || 0);
  }

  function stop() {
    if (ctl) ctl.abort();
    ctl = null;
    following = false;
  }

  // One page [from, from + LOG_PAGE), then stop.
  async function page(from) {
    stop();
    const c = new AbortController();
    ctl = c;
    state.textContent = "loading…";
    // `from` is a page start the buttons computed from what is shown: within
    // the output; the answer says how much is stored now.
    lv.reset(from);
    const r = await api(`/v1/jobs/${jobId}/logs?step=${step}&offset=${from}&limit=${LOG_PAGE}&format=chunks`, { signal: c.signal });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    stored = Number(r.headers.get("X-Reel-Stored") || 0);
    info();
    await readChunks(r, (ch) => lv.add(ch), c.signal);
    if (ctl === c) ctl = null;
    state.textContent = stepRunning() ? "the step is running: Latest follows it" : "";
    pre.dataset.ready = "1";
    window.reelLogShownMs = window.reelLogShownMs || performance.now();
    info();
  }

  // The last page, then (while the step runs) everything it prints.
  async function tail() {
    stop();
    const c = new AbortController();
    ctl = c;
    following = true;
    state.textContent = "loading…";
    stored = await sizeOf();
    lv.reset(Math.max(0, stored - LOG_PAGE));
    info();
    let tries = 0;
    // The job as last asked here, when newer than the page's poll.
    let fresh = null;
    for (;;) {
      const live = fresh ? runningIn(fresh) : stepRunning();
      try {
        const r = await api(`/v1/jobs/${jobId}/logs?step=${step}&offset=${lv.end}&format=chunks${live ? "&follow=true" : `&limit=${Math.max(stored - lv.end, 0)}`}`, { signal: c.signal });
        if (!r.ok) throw new Error(`HTTP ${r.status}`);
        state.textContent = live ? "following the step's output live" : "";
        let firstChunk = true;
        await readChunks(r, (ch) => {
          lv.add(ch);
          stored = Math.max(stored, lv.end);
          if (firstChunk) { firstChunk = false; tries = 0; }
        }, c.signal);
        pre.dataset.ready = "1";
        window.reelLogShownMs = window.reelLogShownMs || performance.now();
        if (!live || c.signal.aborted) break;
        // The body ended whole: the step (or the job) ended, or the daemon
        // stopped following. A lost connection throws instead (below).
        fresh = await apiJson(`/v1/jobs/${jobId}`);
        if (c.signal.aborted) return;
        if (!runningIn(fresh)) {
          const end = await sizeOf();
          if (end <= lv.end) break;
          stored = end;
        } else {
          await new Promise((ok) => setTimeout(ok, 300));
        }
      } catch (e) {
        if (c.signal.aborted || e instanceof Unauthorized) return;
        fresh = null;
        tries++;
        state.textContent = `connection lost (${e.message}); reconnecting from byte ${lv.end.toLocaleString()}…`;
        await new Promise((ok) => setTimeout(ok, Math.min(5000, 500 * tries)));
      }
      if (c.signal.aborted) return;
    }
    if (ctl === c) { ctl = null; following = false; }
    state.textContent = lv.end === 0 ? "no output" : "";
    info();
  }

  const guard = (f) => async (...a) => {
    try { await f(...a); } catch (e) {
      if (e.name === "AbortError" || e instanceof Unauthorized) return;
      state.textContent = `cannot load the output: ${e.message}`;
    }
  };
  first.addEventListener("click", guard(() => page(0)));
  older.addEventListener("click", guard(() => page(Math.max(0, lv.start - LOG_PAGE))));
  newer.addEventListener("click", guard(() => (lv.end + LOG_PAGE >= stored ? tail() : page(lv.end))));
  latest.addEventListener("click", guard(() => tail()));

  return {
    panel,
    show: guard(async (n, name) => {
      step = n;
      title.textContent = `Output of step ${n}${name ? ` "${name}"` : ""}`;
      pre.dataset.step = n;
      delete pre.dataset.ready;
      await tail();
    }),
    step: () => step,
    stop,
  };
}

// ---------------------------------------------------------------- job page

function jobView(main, id) {
  document.title = `Job ${id} · reel`;
  document.getElementById("where").replaceChildren(el("a", { href: "/", "data-nav": true, text: "jobs" }), ` / #${id}`);
  const head = el("div", { id: "job-head" });
  const status = el("p", { class: "error", role: "status" });
  const tlBox = el("div", { class: "timeline", id: "timeline", role: "group", "aria-label": "timeline, drawn to scale" });
  const detail = el("div", { class: "detail", id: "event-detail", hidden: true, "aria-live": "polite" });
  const stepsBody = el("tbody", { id: "steps" });
  const artifacts = el("div", { id: "artifacts" });
  let job = null;
  const selected = { key: null };
  const logs = logPanel(id, () => job);
  let stopped = false;
  let lastWord = null;
  let autoStep = true;

  main.append(head, status,
    el("h2", { text: "Timeline" }), tlBox, detail,
    el("h2", { text: "Steps" }),
    el("div", { class: "table-wrap" }, el("table", { class: "steps", "aria-label": "steps" },
      el("thead", {}, el("tr", {}, el("th", { text: "#" }), el("th", { text: "Name" }), el("th", { text: "Result" }),
        el("th", { text: "Duration" }), el("th", { text: "Output" }), el("th", { text: "" }))),
      stepsBody)),
    logs.panel,
    el("h2", { text: "Artifacts" }), artifacts);

  async function cancel(btn) {
    btn.disabled = true;
    try {
      const r = await api(`/v1/jobs/${id}/cancel`, { method: "POST" });
      const body = await r.json();
      if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
      announce(`job ${id}: ${body.cancel}`);
    } catch (e) {
      if (!(e instanceof Unauthorized)) { status.textContent = `Cannot cancel: ${e.message}`; btn.disabled = false; }
    }
  }

  function drawHead(j) {
    const word = stateWord(j);
    const cancelBtn = el("button", { type: "button", class: "danger", id: "cancel", text: j.cancel_requested ? "Cancel requested…" : "Cancel job", disabled: j.state === "ended" || j.cancel_requested });
    cancelBtn.addEventListener("click", () => cancel(cancelBtn));
    const fact = (k, v) => (v === null || v === undefined || v === "" ? null : el("div", {}, el("dt", { text: k }), el("dd", {}, v)));
    const link = (n) => el("a", { href: `/jobs/${n}`, "data-nav": true, text: `#${n}` });
    head.replaceChildren(...[
      el("h1", {}, `Job #${j.id} `, el("span", { text: j.name || "" }), " ", el("span", { id: "job-state" }, badge(word))),
      el("dl", { class: "facts" },
        fact("owner", j.owner), fact("runner", j.runner), fact("phase", j.phase),
        fact("queued", fmtTime(j.queued_ms)), fact("started", fmtTime(j.started_ms)), fact("finished", fmtTime(j.finished_ms)),
        fact("duration", j.started_ms ? fmtDur((j.finished_ms || Date.now()) - j.started_ms) : null),
        fact("attempt", String(j.attempt)), j.retry_of ? fact("retry of", link(j.retry_of)) : null,
        j.retried_as ? fact("retried as", link(j.retried_as)) : null, fact("reason", j.reason)),
      j.state === "ended" ? null : el("div", { class: "actions" }, cancelBtn)].filter(Boolean));
  }

  function drawSteps(j) {
    const spec = j.spec;
    const n = j.step_count;
    const rowsOut = [];
    for (let i = 1; i <= n; i++) {
      const s = j.steps.find((x) => x.step === i);
      const name = spec && spec.steps[i - 1] ? spec.steps[i - 1].name : "";
      let result = "not run";
      if (s && s.finished_ms) {
        result = s.timed_out ? "timed out" : s.exit_code !== null ? `exit ${s.exit_code}` : `signal ${s.signal}`;
      } else if (s && s.started_ms) result = j.state === "ended" ? "never finished" : "running";
      const dur = s && s.started_ms ? fmtDur((s.finished_ms || Date.now()) - s.started_ms) : "";
      const btn = el("button", { type: "button", class: "show-log", "data-step": i, text: logs.step() === i ? "Showing" : "Show output", disabled: !s });
      btn.addEventListener("click", () => { autoStep = false; logs.show(i, name); drawSteps(job); });
      rowsOut.push(el("tr", { "data-step": i },
        el("td", { class: "num", text: i }), el("td", { class: "name", text: name }),
        el("td", { class: "result", text: result }), el("td", { class: "num", text: dur }),
        el("td", { class: "num", text: s && s.finished_ms ? fmtBytes(s.output_bytes) : "" }), el("td", {}, btn)));
    }
    stepsBody.replaceChildren(...rowsOut);
  }

  function drawArtifacts(j) {
    if (!j.artifacts || j.artifacts.length === 0) {
      artifacts.replaceChildren(el("p", { class: "muted", text: j.state === "ended" ? "This job stored no artifacts." : "None yet: artifacts are stored as the job ends." }));
      return;
    }
    artifacts.replaceChildren(el("ul", {}, ...j.artifacts.map((a) => {
      const link = el("a", { href: `/v1/jobs/${id}/artifacts/${a.name.split("/").map(encodeURIComponent).join("/")}`, class: "artifact", text: a.name });
      link.addEventListener("click", async (ev) => {
        ev.preventDefault();
        try {
          const r = await api(link.getAttribute("href"));
          if (!r.ok) throw new Error(`HTTP ${r.status}`);
          const url = URL.createObjectURL(await r.blob());
          const a2 = el("a", { href: url, download: a.name.split("/").pop() });
          document.body.append(a2);
          a2.click();
          a2.remove();
          setTimeout(() => URL.revokeObjectURL(url), 10000);
        } catch (e) {
          if (!(e instanceof Unauthorized)) status.textContent = `Cannot download ${a.name}: ${e.message}`;
        }
      });
      return el("li", {}, link, el("span", { class: "muted", text: ` ${fmtBytes(a.size)}, crc32c ${a.crc32c}` }));
    })));
  }

  async function refresh() {
    const [j, ev] = await Promise.all([apiJson(`/v1/jobs/${id}`), apiJson(`/v1/jobs/${id}/events`)]);
    if (stopped) return;
    job = j;
    status.textContent = "";
    drawHead(j);
    drawTimeline(tlBox, detail, timelineOf(ev.events, j.step_count, Date.now()), j.spec, selected);
    // The step to show: the one running, else the last that started.
    const started = j.steps.filter((s) => s.started_ms);
    const want = started.length ? started[started.length - 1].step : null;
    if (autoStep && want && want !== logs.step()) {
      logs.show(want, j.spec && j.spec.steps[want - 1] ? j.spec.steps[want - 1].name : "");
    }
    drawSteps(j);
    drawArtifacts(j);
    const word = stateWord(j);
    if (lastWord && lastWord !== word) announce(`job ${id} is ${word}`);
    lastWord = word;
    tlBox.dataset.state = word;
    if (j.state === "ended") stopPoll();
  }

  const stopPoll = poller(async () => {
    try { await refresh(); } catch (e) {
      if (e instanceof Unauthorized) throw e;
      status.textContent = `Cannot load job ${id}: ${e.message}`;
    }
  }, POLL_MS);
  return () => { stopped = true; stopPoll(); logs.stop(); };
}

route();
