// The LLMOS dashboard: reads /dashboard/api/overview every few seconds and draws the panels.
// Vanilla JS, no external resources; every value enters the page as text (never as HTML).
"use strict";

(function () {
  const meta = (name) => (document.querySelector(`meta[name="${name}"]`) || {}).content || "";
  const CSRF = meta("llmos-csrf");
  const REFRESH_MS = Math.max(1, parseFloat(meta("llmos-refresh-s")) || 5) * 1000;
  const ADMIN = meta("llmos-admin") === "true";
  const SVG = "http://www.w3.org/2000/svg";
  let timer = null;
  let shownJob = null;
  let refreshes = 0;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  function fill(id, ...nodes) {
    const box = document.getElementById(id);
    box.replaceChildren(...nodes.filter((n) => n !== null && n !== undefined));
  }

  const fmtMs = (v) => (v === null || v === undefined ? "–" : v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${v.toFixed(1)} ms`);
  const fmtS = (v) => (v === null || v === undefined ? "–" : Math.abs(v) >= 120 ? `${(v / 60).toFixed(1)} min`
    : `${v.toFixed(Math.abs(v) < 10 ? 2 : 1)} s`);
  const fmtNum = (v) => (v === null || v === undefined ? "–" : typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(3) : String(v));
  const fmtTime = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
  const short = (id) => (id ? id.slice(0, 8) : "");

  function table(headers, rows, empty) {
    if (!rows.length) return el("p", { class: "empty", text: empty || "none" });
    return el("table", {},
      el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", { text: h })))),
      el("tbody", {}, ...rows));
  }

  function panelError(data) {
    return data && !Array.isArray(data) && data.error ? el("p", { class: "error", text: data.error }) : null;
  }

  function tenantParam() {
    const sel = document.getElementById("tenant-filter");
    return ADMIN && sel.value ? `?tenant=${encodeURIComponent(sel.value)}` : "";
  }

  function say(text, isError) {
    const m = document.getElementById("message");
    m.textContent = text;
    m.className = isError ? "message error" : "message";
    m.hidden = false;
  }

  async function api(path, method) {
    const opts = { method: method || "GET", credentials: "same-origin", headers: { Accept: "application/json" } };
    if (opts.method !== "GET") opts.headers["X-LLMOS-CSRF"] = CSRF;
    const resp = await fetch(path, opts);
    if (resp.status === 401) { window.location.assign("/dashboard"); throw new Error("logged out"); }
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error((body.error && body.error.message) || `HTTP ${resp.status}`);
    return body;
  }

  async function act(path, what) {
    try {
      await api(path, "POST");
      say(`${what}: done`);
    } catch (e) {
      say(`${what}: ${e.message}`, true);
    }
    refresh();
  }

  function actionButton(label, action, id, path, question) {
    return el("button", {
      class: `action ${action}`, "data-action": action, "data-id": id, text: label,
      onclick: () => { if (window.confirm(question)) act(path, `${label} ${short(id)}`); },
    });
  }

  // --- panels --------------------------------------------------------------------------------

  function drawCounts(c) {
    const cols = ["queued", "running", "succeeded", "failed", "cancelled", "expired"];
    const cell = (win, s) => {
      const v = (c[win] || {})[s];
      return v === undefined ? el("td", { class: "na", text: "" })
        : el("td", { id: `count-${win}-${s}`, "data-window": win, "data-status": s, "data-value": v, text: String(v) });
    };
    fill("counts", table(["", ...cols], [
      el("tr", {}, el("th", { text: "open now" }), ...cols.map((s) => cell("open", s))),
      el("tr", {}, el("th", { text: "finished, last hour" }), ...cols.map((s) => cell("hour", s))),
      el("tr", {}, el("th", { text: "finished, last 24 h" }), ...cols.map((s) => cell("day", s))),
    ]));
  }

  function drawThroughput(t) {
    const W = 900, H = 180, L = 40, B = 24, T = 8;
    const mins = t.minutes || [];
    const max = 4 * Math.ceil(Math.max(1, ...mins.map((m) => m.succeeded + m.other)) / 4);  // whole ticks
    const bw = (W - L) / Math.max(1, mins.length);
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "throughput", role: "img",
      "data-total": t.total, "aria-label": `${t.total} jobs finished in the last hour` });
    for (let i = 0; i <= 4; i++) {
      const y = T + (H - B - T) * (1 - i / 4);
      chart.append(svg("line", { x1: L, x2: W, y1: y, y2: y, class: "grid" }));
      const label = svg("text", { x: L - 4, y: y + 4, class: "axis", "text-anchor": "end" });
      label.textContent = String((max * i) / 4);
      chart.append(label);
    }
    mins.forEach((m, i) => {
      const x = L + i * bw;
      const hs = ((H - B - T) * m.succeeded) / max, ho = ((H - B - T) * m.other) / max;
      const ok = svg("rect", { x: x + 1, width: Math.max(1, bw - 2), y: H - B - hs, height: hs, class: "ok",
        "data-minute": m.t, "data-value": m.succeeded });
      const title = svg("title", {});
      title.textContent = `${new Date(m.t).toLocaleTimeString()}: ${m.succeeded} succeeded, ${m.other} other`;
      ok.append(title);
      chart.append(ok);
      if (m.other) chart.append(svg("rect", { x: x + 1, width: Math.max(1, bw - 2), y: H - B - hs - ho, height: ho, class: "bad" }));
      if (i % 10 === 0) {
        const lab = svg("text", { x: x, y: H - 6, class: "axis" });
        lab.textContent = new Date(m.t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
        chart.append(lab);
      }
    });
    fill("throughput", chart, el("p", { class: "legend" },
      el("span", { class: "key ok" }), " succeeded ", el("span", { class: "key bad" }), " failed, cancelled, expired · ",
      el("span", { id: "throughput-total", "data-value": t.total, text: `${t.total} in the hour` })));
  }

  function drawQueue(rows, redis) {
    const msgs = {};
    if (Array.isArray(redis)) for (const r of redis) msgs[`${r.model}|${r.priority}`] = r.messages;
    const trs = rows.map((q) => el("tr", { "data-model": q.model, "data-priority": q.priority, "data-queued": q.queued },
      el("td", { text: q.model }), el("td", { text: q.priority }),
      el("td", { class: "num queued", text: q.queued }),
      el("td", { class: "num", text: ADMIN ? fmtNum(msgs[`${q.model}|${q.priority}`] || 0) : "–" }),
      el("td", { class: "num", text: fmtS(q.oldest_s) })));
    fill("queue", panelError(redis), table(["model", "priority", "queued jobs", "Redis messages", "oldest waits"], trs, "nothing queued"));
  }

  function drawLatency(l) {
    const trs = l.models.map((m) => el("tr", { "data-model": m.model },
      el("td", { text: m.model }), el("td", { class: "num", text: m.jobs }),
      el("td", { class: "num", text: fmtMs(m.wait_p50_ms) }), el("td", { class: "num", text: fmtMs(m.wait_p95_ms) }),
      el("td", { class: "num", text: fmtMs(m.compute_p50_ms) }), el("td", { class: "num", text: fmtMs(m.compute_p95_ms) })));
    const note = l.sampled >= l.sample_limit ? el("p", { class: "note", text: `over the newest ${l.sample_limit} jobs of the hour` }) : null;
    fill("latency", table(["model", "jobs", "wait p50", "wait p95", "compute p50", "compute p95"], trs, "no job finished in the hour"), note);
  }

  function jobLink(id) {
    return el("a", { href: "#", class: "job", "data-job": id, text: short(id), onclick: (e) => { e.preventDefault(); showJob(id); } });
  }

  function drawQueued(rows) {
    const trs = rows.map((j) => el("tr", { "data-job-id": j.id, "data-status": "queued" },
      el("td", {}, jobLink(j.id)), el("td", { text: j.tenant }), el("td", { text: j.model }), el("td", { text: j.task }),
      el("td", { class: "num", text: j.priority }), el("td", { text: fmtTime(j.queued_at) }),
      el("td", { text: fmtTime(j.eta_start_at) }),
      el("td", {}, actionButton("Cancel", "cancel", j.id, `/dashboard/api/jobs/${j.id}/cancel`, `Cancel job ${j.id}?`))));
    fill("queued-jobs", table(["job", "tenant", "model", "task", "priority", "queued", "ETA start", ""], trs, "no queued job"));
  }

  function drawFailures(rows) {
    const trs = rows.map((f) => el("tr", { "data-job-id": f.id, "data-status": "failed" },
      el("td", {}, jobLink(f.id)), el("td", { text: f.tenant }), el("td", { text: f.model }), el("td", { text: f.task }),
      el("td", { class: "num", text: f.attempts }), el("td", { text: fmtTime(f.finished_at) }),
      el("td", { class: "error-text", text: f.error }),
      el("td", {}, actionButton("Retry", "retry", f.id, `/dashboard/api/jobs/${f.id}/retry`, `Run job ${f.id} again?`))));
    fill("failures", table(["job", "tenant", "model", "task", "attempts", "failed at", "error", ""], trs, "no failure"));
  }

  function drawBatches(rows) {
    const open = new Set(["validating", "in_progress", "finalizing"]);
    const trs = rows.map((b) => {
      const pct = b.total ? Math.round((100 * b.done) / b.total) : 0;
      const bar = el("div", { class: "bar", title: `${b.completed} completed, ${b.failed} failed of ${b.total}` },
        el("div", { class: "bar-ok", style: null }), el("div", { class: "bar-bad" }));
      bar.children[0].style.width = `${b.total ? (100 * b.completed) / b.total : 0}%`;
      bar.children[1].style.width = `${b.total ? (100 * b.failed) / b.total : 0}%`;
      return el("tr", { "data-batch-id": b.id, "data-status": b.status, "data-done": b.done, "data-total": b.total },
        el("td", { text: b.name || b.id }), el("td", { text: b.tenant }), el("td", { text: b.status }),
        el("td", { text: b.model || b.endpoint }), el("td", { class: "progress" }, bar, el("span", { text: ` ${b.done}/${b.total} (${pct}%)` })),
        el("td", { class: "num", text: `${b.queued} / ${b.running}` }), el("td", { text: fmtTime(b.created_at) }),
        el("td", {}, open.has(b.status) ? actionButton("Cancel", "cancel-batch", b.id, `/dashboard/api/batches/${encodeURIComponent(b.id)}/cancel`, `Cancel batch ${b.name || b.id}?`) : null));
    });
    fill("batches", table(["batch", "tenant", "status", "model", "progress", "queued / running", "created", ""], trs, "no batch"));
  }

  function drawWorkers(rows) {
    if (!rows) return;
    const trs = rows.map((w) => {
      const state = w.stopped_at ? "stopped" : w.silent_s > 30 ? "silent" : "live";
      return el("tr", { "data-worker": w.id, class: state },
        el("td", { text: w.id }), el("td", { text: w.model }), el("td", { text: w.device }), el("td", { text: state }),
        el("td", { class: "num", text: w.jobs_1h }), el("td", { class: "num", text: fmtNum(w.batch_mean) }),
        el("td", { class: "num", text: fmtNum(w.batch_max) }), el("td", { class: "num", text: fmtNum(w.max_batch_size) }),
        el("td", { text: `${fmtTime(w.last_heartbeat)} (${fmtS(w.silent_s)} ago)` }));
    });
    fill("workers", table(["worker", "model", "device", "state", "jobs 1 h", "mean batch", "max batch", "batch limit", "last heartbeat"], trs, "no worker in the last hour"));
  }

  function drawCapacity(rows) {
    if (rows === undefined || rows === null) return;
    if (!Array.isArray(rows)) { fill("capacity", panelError(rows)); return; }
    const trs = rows.map((r) => el("tr", { "data-model": r.model },
      el("td", { text: r.model }), el("td", { class: "num", text: fmtNum(r.lambda_per_s) }), el("td", { class: "num", text: fmtNum(r.mu_per_s) }),
      el("td", { class: "num", text: r.workers }), el("td", { class: "num", text: fmtNum(r.utilization) }),
      el("td", { class: "num", text: fmtNum(r.mean_wait_corrected_s) }), el("td", { class: "num", text: fmtNum(r.measured_wait_s) }),
      el("td", { class: "num", text: r.workers_needed === null ? "–" : r.workers_needed })));
    fill("capacity", table(["model", "λ/s", "μ/s", "workers", "ρ", "wait s", "measured s", "needed"], trs, "no load"));
  }

  function drawPlan(p) {
    if (p === undefined || p === null) return;
    if (p.error) { fill("plan", panelError(p)); return; }
    const trs = p.placements.map((x) => el("tr", {}, el("td", { text: x.host }), el("td", { text: x.device }),
      el("td", { text: x.model }), el("td", { class: "num", text: x.workers })));
    const notes = [
      ...p.evict.map((x) => `evict ${x.workers} × ${x.model} on ${x.host}/${x.device}`),
      ...Object.values(p.refused).map((why) => `refused: ${why}`),
      ...p.reasons.map((r) => `why: ${r}`)];
    fill("plan", table(["host", "device", "model", "workers"], trs, "no worker planned: no demand"),
      el("ul", { class: "notes" }, ...notes.map((n) => el("li", { text: n }))));
  }

  function drawTenants(list, current) {
    if (!ADMIN || !Array.isArray(list)) return;
    const box = document.getElementById("tenant-filter-box");
    box.hidden = false;
    const sel = document.getElementById("tenant-filter");
    const have = new Set([...sel.options].map((o) => o.value));
    for (const t of list) if (!have.has(t)) sel.append(el("option", { value: t, text: t }));
    if (current !== undefined) sel.value = current || "";
  }

  async function showJob(id) {
    shownJob = id;
    document.getElementById("timeline-id").value = id;
    try {
      drawTimeline(await api(`/dashboard/api/jobs/${encodeURIComponent(id)}`));
    } catch (e) {
      fill("timeline", el("p", { class: "error", text: e.message }));
    }
  }

  function drawTimeline(j) {
    const steps = [["created", j.created_at], ["queued", j.queued_at], ["started", j.started_at], ["finished", j.finished_at]];
    const when = steps.filter((s) => s[1]).map((s) => new Date(s[1]).getTime());
    const t0 = when.length ? Math.min(...when) : 0;
    const list = el("ol", { class: "steps" }, ...steps.map(([name, at]) => el("li", { class: at ? "done" : "todo", "data-step": name },
      el("b", { text: name }), " ", at ? `${fmtTime(at)} (+${fmtS((new Date(at).getTime() - t0) / 1000)})` : "not yet")));
    const eta = table(["", "predicted", "actual", "actual − predicted"], [
      el("tr", {}, el("th", { text: "start" }), el("td", { text: fmtTime(j.eta_start_at) }), el("td", { text: fmtTime(j.started_at) }), el("td", { text: fmtS(j.start_vs_eta_s) })),
      el("tr", {}, el("th", { text: "finish" }), el("td", { text: fmtTime(j.eta_finish_at) }), el("td", { text: fmtTime(j.finished_at) }), el("td", { text: fmtS(j.finish_vs_eta_s) }))]);
    const facts = el("p", { class: "facts" },
      el("span", { id: "timeline-status", "data-status": j.status, class: `status ${j.status}`, text: j.status }),
      ` ${j.task} on ${j.model} · tenant ${j.tenant} · priority ${j.priority} · attempt ${j.attempts}/${j.max_attempts}`,
      j.worker_id ? ` · ${j.worker_id} (${j.device}), batch of ${j.batch_size ?? "–"}` : "",
      ` · wait ${fmtMs(j.queue_wait_ms)}, compute ${fmtMs(j.compute_ms)}`);
    const buttons = el("p", {},
      j.cancellable ? actionButton("Cancel", "cancel", j.id, `/dashboard/api/jobs/${j.id}/cancel`, `Cancel job ${j.id}?`) : null,
      j.retryable ? actionButton("Retry", "retry", j.id, `/dashboard/api/jobs/${j.id}/retry`, `Run job ${j.id} again?`) : null);
    fill("timeline", el("p", { class: "mono", text: j.id }), facts, list, eta,
      j.error ? el("p", { class: "error-text", text: j.error }) : null, buttons);
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const d = await api(`/dashboard/api/overview${tenantParam()}`);
      document.getElementById("me-admin").textContent = d.me.admin ? " (admin)" : "";
      drawTenants(d.tenants);
      drawCounts(d.counts);
      drawThroughput(d.throughput);
      drawQueue(d.queue_depth, d.redis);
      drawLatency(d.latency);
      drawQueued(d.queued_jobs);
      drawFailures(d.failures);
      drawBatches(d.batches);
      drawWorkers(d.workers);
      drawCapacity(d.capacity);
      drawPlan(d.plan);
      for (const [name, age] of Object.entries(d.slow_age_s || {})) {
        const note = document.getElementById(`${name}-age`);
        if (note) note.textContent = age < 1 ? "(just made; made every 30 s)" : `(made ${Math.round(age)} s ago; every 30 s)`;
      }
      if (shownJob) await showJob(shownJob);
      refreshes += 1;
      const r = document.getElementById("refreshed");
      r.textContent = new Date().toLocaleTimeString();
      r.dataset.count = String(refreshes);
      document.body.dataset.loaded = "true";
    } catch (e) {
      if (e.message !== "logged out") say(`refresh failed: ${e.message}`, true);
    }
    timer = setTimeout(refresh, document.hidden ? REFRESH_MS * 4 : REFRESH_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (!ADMIN) for (const s of document.querySelectorAll(".admin-only")) s.hidden = true;
    document.getElementById("tenant-filter").addEventListener("change", refresh);
    document.getElementById("timeline-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const id = document.getElementById("timeline-id").value.trim();
      if (id) showJob(id);
    });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
    refresh();
  });
})();
