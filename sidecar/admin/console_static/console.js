// The sidecar console: plain DOM, textContent only (no HTML from data), SVG charts drawn here.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const num = new Intl.NumberFormat();
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  const COLORS = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477", "#66aa00", "#b82e2e", "#316395"];
  let csrf = null;
  let role = null;
  let before = null;

  const when = (epoch) => new Date(epoch * 1000).toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });

  async function api(method, path, body) {
    const opts = { method, headers: {}, credentials: "same-origin" };
    if (body !== undefined) {
      opts.headers["content-type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    if (method !== "GET" && csrf) opts.headers["x-csrf-token"] = csrf;
    const r = await fetch("/console/api/" + path, opts);
    const doc = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error((doc.error && doc.error.message) || r.status + " " + r.statusText);
    return doc;
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  // A key as operators know it: its name, its id beside it (and on hover); the id alone for a key no longer known.
  function keyCell(id, name) {
    if (!id) return "none";
    const span = el("span", name || id);
    span.title = id;
    if (name) span.append(" ", el("small", id, "kid"));
    return span;
  }

  function table(target, columns, rows, onPick) {
    const t = $(target);
    t.replaceChildren();
    const head = el("tr");
    columns.forEach((c) => head.append(el("th", c.label, c.num ? "num" : "")));
    t.append(head);
    rows.forEach((row) => {
      const tr = el("tr", null, onPick ? "pick" : "");
      columns.forEach((c) => {
        const v = c.get(row);
        const td = v instanceof Node ? el("td") : el("td", v === null || v === undefined ? "" : v, c.num ? "num" : "");
        if (v instanceof Node) td.append(v);
        tr.append(td);
      });
      if (onPick) tr.addEventListener("click", () => onPick(row));
      t.append(tr);
    });
    if (!rows.length) t.append(el("tr")).append(el("td", "nothing yet"));
  }

  // A stacked bar chart: series[t][group] = value.
  // Every bucket from `since` to now, so an empty hour or day shows as a gap, not as nothing.
  function buckets(since, bucket) {
    const step = bucket === "hour" ? 3600 : 86400;
    const out = [];
    for (let t = Math.floor(since / step) * step; t <= Date.now() / 1000; t += step) out.push(t);
    return out;
  }

  function stacked(target, rows, groupKey, measure, bucket, since) {
    const box = $(target);
    box.replaceChildren();
    const times = since ? buckets(since, bucket) : [...new Set(rows.map((r) => r.t))].sort((a, b) => a - b);
    const totals = Object.create(null); // group names come from clients: no prototype to collide with
    rows.forEach((r) => (totals[r[groupKey] ?? "none"] = (totals[r[groupKey] ?? "none"] || 0) + r[measure]));
    const groups = Object.keys(totals).sort((a, b) => totals[b] - totals[a]);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 1000 240");
    svg.setAttribute("role", "img");
    svg.dataset.bars = String(times.length);
    const perT = Object.create(null);
    rows.forEach((r) => ((perT[r.t] = perT[r.t] || Object.create(null))[r[groupKey] ?? "none"] = r[measure]));
    const max = Math.max(1, ...times.map((t) => Object.values(perT[t] || {}).reduce((a, b) => a + b, 0)));
    const w = times.length ? 940 / times.length : 940;
    times.forEach((t, i) => {
      let y = 210;
      groups.forEach((g, gi) => {
        const v = (perT[t] || {})[g] || 0;
        if (!v) return;
        const h = (v / max) * 190;
        y -= h;
        const rect = document.createElementNS(ns, "rect");
        rect.setAttribute("x", String(50 + i * w + 1));
        rect.setAttribute("y", String(y));
        rect.setAttribute("width", String(Math.max(1, w - 2)));
        rect.setAttribute("height", String(h));
        rect.setAttribute("fill", COLORS[gi % COLORS.length]);
        const title = document.createElementNS(ns, "title");
        title.textContent = `${g}: ${num.format(v)} (${when(t)})`;
        rect.append(title);
        svg.append(rect);
      });
      if (i % Math.ceil(times.length / 8 || 1) === 0) {
        const label = document.createElementNS(ns, "text");
        label.setAttribute("x", String(50 + i * w));
        label.setAttribute("y", "230");
        label.setAttribute("font-size", "11");
        const d = new Date(t * 1000);
        // Buckets are UTC hours and days: so are their labels.
        label.textContent = bucket === "hour"
          ? d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", timeZone: "UTC" }) + " UTC"
          : d.toLocaleDateString(undefined, { timeZone: "UTC" });
        svg.append(label);
      }
    });
    const top = document.createElementNS(ns, "text");
    top.setAttribute("x", "4");
    top.setAttribute("y", "24");
    top.setAttribute("font-size", "11");
    top.textContent = num.format(max);
    svg.append(top);
    box.append(svg);
    const legend = el("div", null, "legend");
    groups.forEach((g, gi) => {
      const item = el("span");
      const swatch = el("i");
      swatch.style.background = COLORS[gi % COLORS.length];
      item.append(swatch, `${g} (${num.format(totals[g])})`);
      legend.append(item);
    });
    box.append(legend);
  }

  async function loadUsage() {
    const since = $("range").value, bucket = $("bucket").value, split = $("split").value, measure = $("measure").value;
    const [usage, outcomes, byKey, byModel] = await Promise.all([
      api("GET", `series?since=${since}&bucket=${bucket}&split=${split}`),
      api("GET", `series?since=${since}&bucket=${bucket}&split=outcome`),
      api("GET", `usage?since=${since}&by=key`),
      api("GET", `usage?since=${since}&by=model`),
    ]);
    if (split === "key") usage.data.forEach((r) => r.name && (r.key = `${r.name} (${r.key})`)); // the legend names keys
    stacked("chart-usage", usage.data, split, measure, bucket, usage.since);
    stacked("chart-outcomes", outcomes.data, "outcome", "requests", bucket, outcomes.since);
    const cols = (k) => [
      { label: k, get: (r) => (k === "key" ? keyCell(r.key, r.name) : r[k] ?? "none") },
      { label: "requests", num: true, get: (r) => num.format(r.requests) },
      { label: "tokens", num: true, get: (r) => num.format(r.total_tokens) },
      { label: "cached", num: true, get: (r) => num.format(r.cached_tokens) },
      { label: "cache write", num: true, get: (r) => num.format(r.cache_write_tokens) },
      { label: "reasoning", num: true, get: (r) => num.format(r.reasoning_tokens) },
      { label: "failed", num: true, get: (r) => num.format(r.failed) },
    ];
    const top = (rows) => rows.sort((a, b) => b.total_tokens - a.total_tokens).slice(0, 10);
    table("top-keys", cols("key"), top(byKey.data));
    table("top-models", cols("model"), top(byModel.data));
  }

  async function loadKeys() {
    const keys = await api("GET", "keys");
    table("keys", [
      { label: "name", get: (k) => k.name },
      { label: "id", get: (k) => k.id },
      { label: "rpm", num: true, get: (k) => (k.rpm ? num.format(k.rpm) : "") },
      { label: "tpm", num: true, get: (k) => (k.tpm ? num.format(k.tpm) : "") },
      { label: "concurrency", num: true, get: (k) => k.concurrency ?? "" },
      { label: "budget", get: (k) => (k.budget_tokens ? `${num.format(k.budget_tokens)} / ${k.budget_period}` : "") },
      { label: "budget used", num: true, get: budgetUsed },
      { label: "weight", num: true, get: (k) => k.weight ?? 1 },
      { label: "priority", get: (k) => k.priority || "normal" },
      { label: "models", get: (k) => (k.models ? k.models.join(", ") : "all") },
      { label: "expires", get: (k) => (k.expires_at ? when(k.expires_at) : "never") },
      { label: "created", get: (k) => when(k.created_at) },
      { label: "state", get: (k) => state(k) },
      { label: "", get: (k) => (k.revoked_at || k.source === "static" ? "" : actions(k)) },
    ], keys.data);
  }

  function state(k) {
    if (k.revoked_at) return "revoked " + when(k.revoked_at);
    if (k.expires_at && k.expires_at * 1000 <= Date.now()) return "expired " + when(k.expires_at);
    return "active";
  }

  // What the key's stored requests used of its budget this period: a warning from 80%, refused at 100% (the
  // chart's SidecarKeyBudgetLow and SidecarKeyBudgetExhausted alerts, at their default threshold).
  function budgetUsed(k) {
    const r = k.budget_used_ratio;
    if (r === undefined || r === null) return "";
    const mark = el("span", `${Math.floor(r * 100 + 1e-9)}%`, r >= 1 ? "refused" : r >= 0.8 ? "warn" : "");
    mark.title = `${num.format(k.budget_remaining)} tokens left this period`;
    return mark;
  }

  function actions(k) {
    const span = el("span", null, "actions");
    const edit = el("button", "Edit");
    edit.type = "button";
    edit.dataset.edit = k.id;
    edit.setAttribute("aria-label", `Edit key ${k.name}`);
    edit.addEventListener("click", () => openEdit(k));
    const revoke = el("button", "Revoke");
    revoke.type = "button";
    revoke.dataset.revoke = k.id;
    revoke.addEventListener("click", async () => {
      if (!window.confirm(`Revoke ${k.name}? Requests with it will get 401 at once.`)) return;
      await guarded(() => api("DELETE", "keys/" + encodeURIComponent(k.id)), "keys-error");
      await loadKeys();
    });
    span.append(edit, " ", revoke);
    return span;
  }

  // The edit dialog: every field a key has. Values go to the admin API as typed (a number as a number): its
  // validation is the only one, and its message is shown in the dialog, which stays open.
  let editing = null; // the key being edited, as the keys list gave it
  const EDIT_TEXT = { "e-name": "name", "e-period": "budget_period", "e-cache-group": "cache_group" };
  const EDIT_NUMBERS = { "e-rpm": "rpm", "e-tpm": "tpm", "e-concurrency": "concurrency", "e-budget": "budget_tokens", "e-weight": "weight" };
  const EDIT_CHOICES = { "e-audit": "audit", "e-priority": "priority" };

  function openEdit(k) {
    editing = k;
    $("edit-title").textContent = `Edit key ${k.name}`;
    $("edit-id").textContent = k.id;
    for (const [id, field] of Object.entries({ ...EDIT_TEXT, ...EDIT_NUMBERS, ...EDIT_CHOICES })) $(id).value = k[field] ?? "";
    $("e-models").value = (k.models || []).join(", ");
    $("e-expires").value = "";
    $("e-expires-hint").textContent =
      (k.expires_at ? `Expires ${when(k.expires_at)}.` : "Never expires.") + ' Empty: unchanged; a time from now (30d, 12h); or "never".';
    $("edit-error").textContent = "";
    $("edit-dialog").showModal();
  }

  // The form as the API takes it: an empty field is null (no limit, the default; an empty name is the server's
  // to refuse); a number typed is sent as one, anything else as typed, for the server to say what is wrong.
  function editValues() {
    const out = {};
    const number = (v) => (v.trim() === "" ? null : Number.isFinite(Number(v)) ? Number(v) : v);
    for (const [id, field] of Object.entries(EDIT_TEXT)) out[field] = $(id).value === "" ? null : $(id).value;
    out.name = $("e-name").value;
    for (const [id, field] of Object.entries(EDIT_NUMBERS)) out[field] = number($(id).value);
    for (const [id, field] of Object.entries(EDIT_CHOICES)) out[field] = $(id).value || null;
    const models = $("e-models").value.split(",").map((m) => m.trim()).filter(Boolean);
    out.models = models.length ? models : null;
    return out;
  }

  async function saveEdit(ev) {
    ev.preventDefault();
    // Only what was changed: another operator's edit of another field meanwhile stands; the audit row says what.
    const change = {};
    for (const [field, v] of Object.entries(editValues())) {
      if (JSON.stringify(v) !== JSON.stringify(editing[field] ?? null)) change[field] = v;
    }
    if ($("e-expires").value.trim()) change.expires_in = $("e-expires").value.trim();
    if (Object.keys(change).length) {
      try {
        await api("PATCH", "keys/" + encodeURIComponent(editing.id), change);
      } catch (e) {
        $("edit-error").textContent = e.message;
        return;
      }
    }
    $("edit-dialog").close();
    await guarded(loadKeys, "keys-error");
  }

  async function guarded(fn, errorTarget) {
    $(errorTarget).textContent = "";
    try {
      return await fn();
    } catch (e) {
      $(errorTarget).textContent = e.message;
      return null;
    }
  }

  async function createKey(ev) {
    ev.preventDefault();
    const body = { name: $("new-name").value };
    for (const [id, field] of [["new-rpm", "rpm"], ["new-tpm", "tpm"], ["new-concurrency", "concurrency"]]) {
      if ($(id).value) body[field] = Number($(id).value);
    }
    if ($("new-weight").value) body.weight = Number($("new-weight").value);
    if ($("new-priority").value) body.priority = $("new-priority").value;
    if ($("new-period").value) {
      body.budget_tokens = Number($("new-budget").value || 0);
      body.budget_period = $("new-period").value;
    }
    const created = await guarded(() => api("POST", "keys", body), "keys-error");
    if (!created) return;
    $("create-form").reset();
    await loadKeys();
    $("created-key").textContent = created.key;
    $("created").hidden = false;
  }

  async function loadRequests(more) {
    if (!more) before = null;
    const q = new URLSearchParams({ since: $("f-since").value, limit: "50" });
    if ($("f-key").value) q.set("key_id", $("f-key").value);
    if ($("f-model").value) q.set("model", $("f-model").value);
    if ($("f-outcome").value) q.set("outcome", $("f-outcome").value);
    if (more && before) q.set("before", before);
    const page = await api("GET", "requests?" + q);
    before = page.next_before;
    $("more").hidden = !before;
    table("requests", [
      { label: "time", get: (r) => when(r.started_at) },
      { label: "key", get: (r) => keyCell(r.key_id, r.key_name) },
      { label: "model", get: (r) => r.model },
      { label: "status", num: true, get: (r) => r.status },
      { label: "outcome", get: (r) => r.outcome },
      { label: "tokens", num: true, get: (r) => (r.total_tokens === null ? "" : num.format(r.total_tokens)) },
      { label: "cached", num: true, get: (r) => (r.cached_tokens === null ? "" : num.format(r.cached_tokens)) },
      { label: "reasoning", num: true, get: (r) => (r.reasoning_tokens === null ? "" : num.format(r.reasoning_tokens)) },
      { label: "ms", num: true, get: (r) => num.format(Math.round(r.latency_ms)) },
    ], page.data, (r) => {
      $("request-detail").textContent = JSON.stringify(r, null, 2);
      $("request-detail").hidden = false;
    });
  }

  async function loadAudit() {
    const log = await api("GET", "audit?limit=100");
    table("audit", [
      { label: "time", get: (e) => when(e.at) },
      { label: "actor", get: (e) => e.actor },
      { label: "action", get: (e) => e.action },
      { label: "key", get: (e) => keyCell(e.target, e.target_name) },
      { label: "changes", get: (e) => JSON.stringify(e.changes ?? "") },
    ], log.data);
  }

  async function loadRecords() {
    const page = await api("GET", "audit-records?since=7d&limit=50");
    table("records", [
      { label: "time", get: (r) => when(r.emitted_at) },
      { label: "request", get: (r) => r.request_id },
      { label: "key", get: (r) => keyCell(r.key_id, r.key_name) },
    ], page.data, (r) => {
      $("record-detail").textContent = JSON.stringify(r, null, 2);
      $("record-detail").hidden = false;
    });
  }

  async function loadMine() {
    const me = await api("GET", "me");
    const rows = [
      ["name", me.name], ["id", me.id],
      ["requests per minute", me.rpm ? num.format(me.rpm) : "no limit"],
      ["tokens per minute", me.tpm ? num.format(me.tpm) : "no limit"],
      ["concurrency", me.concurrency ?? "default"],
      ["budget", me.budget_tokens ? `${num.format(me.budget_tokens)} tokens per ${me.budget_period}` : "none"],
      ["left this period", me.budget_remaining === undefined || me.budget_remaining === null ? "" : num.format(me.budget_remaining)],
      ["resets", me.budget_resets_at ? when(me.budget_resets_at) : ""],
    ];
    table("my-key", [{ label: "", get: (r) => r[0] }, { label: "", get: (r) => r[1] }], rows.filter((r) => r[1] !== ""));
    const series = await api("GET", `series?since=${$("my-range").value}&bucket=day&split=model`);
    stacked("chart-mine", series.data, "model", "total_tokens", "day", series.since);
  }

  // The dispatch queue now, and who got the engine lately; refreshed every few seconds while the tab is shown.
  async function loadQueue() {
    const q = await api("GET", "queue");
    $("queue-summary").textContent =
      `Order ${q.order}; ${num.format(q.active)} of ${num.format(q.limit)} upstream slots in use; ` +
      `queue holds ${num.format(q.size)}; shares over the last ${Math.round(q.window_seconds / 60)} minutes ` +
      `(${num.format(q.served_tokens)} tokens, ${num.format(q.keys)} keys).`;
    table("queue-depth", Object.keys(q.depth).map((p) => ({ label: p, num: true, get: (d) => num.format(d[p]) })), [q.depth]);
    const waiting = (r) => Object.values(r.waiting).reduce((a, b) => a + b, 0);
    table("queue-keys", [
      { label: "key", get: (r) => (r.key_id ? r.key_name || r.key_id : "(no key)") },
      { label: "id", get: (r) => r.key_id || "" },
      { label: "waiting", num: true, get: (r) => num.format(waiting(r)) },
      { label: "by class", get: (r) => Object.entries(r.waiting).filter((e) => e[1]).map((e) => `${e[0]} ${e[1]}`).join(", ") },
      { label: "running", num: true, get: (r) => num.format(r.in_flight) },
      { label: "tokens served", num: true, get: (r) => num.format(r.served_tokens) },
      { label: "share", num: true, get: (r) => (r.share * 100).toFixed(1) + "%" },
    ], q.data);
  }

  let queueTimer = null;
  function watchQueue(on) {
    if (queueTimer) clearInterval(queueTimer);
    queueTimer = on ? setInterval(() => guarded(loadQueue, "signin-error"), 3000) : null;
  }

  const loaders = { usage: loadUsage, keys: loadKeys, queue: loadQueue, requests: () => loadRequests(false), audit: loadAudit, records: loadRecords };

  function showTab(name) {
    document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("on", b.dataset.tab === name));
    document.querySelectorAll(".tab").forEach((t) => (t.hidden = t.id !== "tab-" + name));
    watchQueue(name === "queue");
    guarded(loaders[name], name === "keys" ? "keys-error" : "signin-error");
  }

  function enter(session) {
    csrf = session.csrf;
    role = session.role;
    $("signin").hidden = true;
    $("logout").hidden = false;
    $("who").textContent = role === "admin" ? "operator" : `key ${session.name || session.key_id}`;
    if (role === "admin" && session.name) $("who").textContent = `operator ${session.name}` + (session.read_only ? " (read-only)" : "");
    document.body.classList.toggle("read-only", !!session.read_only); // the server refuses a viewer's changes too
    if (role === "admin") {
      $("operator").hidden = false;
      showTab("usage");
    } else {
      $("holder").hidden = false;
      guarded(loadMine, "signin-error");
    }
  }

  async function signIn(ev) {
    ev.preventDefault();
    const token = $("token").value;
    $("token").value = "";
    const session = await guarded(() => api("POST", "session", { token }), "signin-error");
    if (session) enter(session);
  }

  async function signOut() {
    await guarded(() => api("DELETE", "session"), "signin-error");
    window.location.reload();
  }

  document.addEventListener("DOMContentLoaded", async () => {
    $("zone").textContent = `Times in ${zone}.`;
    $("signin-form").addEventListener("submit", signIn);
    $("logout").addEventListener("click", signOut);
    $("create-form").addEventListener("submit", createKey);
    $("edit-form").addEventListener("submit", saveEdit);
    $("edit-cancel").addEventListener("click", () => $("edit-dialog").close());
    $("filter-form").addEventListener("submit", (ev) => { ev.preventDefault(); guarded(() => loadRequests(false), "signin-error"); });
    $("queue-refresh").addEventListener("click", () => guarded(loadQueue, "signin-error"));
    $("more").addEventListener("click", () => guarded(() => loadRequests(true), "signin-error"));
    $("copy-key").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("created-key").textContent));
    document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
    for (const id of ["range", "bucket", "split", "measure"]) $(id).addEventListener("change", () => guarded(loadUsage, "signin-error"));
    $("my-range").addEventListener("change", () => guarded(loadMine, "signin-error"));
    const session = await api("GET", "session").catch(() => ({ role: null }));
    if (session.role) enter(session);
    else if (session.oidc) {
      $("oidc-signin").textContent = `Sign in with ${session.oidc}`;
      $("oidc").hidden = false;
    }
  });
})();
