// The live dashboard: polls /metrics (the Prometheus text the server already exports) and
// charts it; /server_info gives the memory plan and the engine configuration. Rates and
// percentiles come from the difference between samples: tokens/s over the last interval,
// TTFT/TPOT percentiles over the last WINDOW_S seconds (Prometheus' histogram_quantile:
// linear inside the bucket).
"use strict";

const params = new URLSearchParams(location.search);
const INTERVAL_MS = Math.max(200, Number(params.get("interval")) || 1000);
const WINDOW_S = Math.max(5, Number(params.get("window")) || 30);
const charts = new Map();
let history = []; // [{t, m}] samples of the last WINDOW_S seconds and one before
let info = null;

function parseMetrics(text) {
  const out = new Map();
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[2]) {
      for (const l of m[2].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
        labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
    }
    if (!out.has(m[1])) out.set(m[1], []);
    out.get(m[1]).push({ labels, value: Number(m[3]) });
  }
  return out;
}

const matches = (labels, filter) =>
  Object.entries(filter || {}).every(([k, v]) => labels[k] === v);

function total(m, name, filter) {
  let s = 0;
  let seen = false;
  for (const x of m.get(name) || []) {
    if (matches(x.labels, filter)) {
      s += x.value;
      seen = true;
    }
  }
  return seen ? s : null;
}

function byLabel(m, name, label, filter) {
  const out = {};
  for (const x of m.get(name) || []) {
    if (!matches(x.labels, filter)) continue;
    const k = x.labels[label];
    out[k] = (out[k] || 0) + x.value;
  }
  return out;
}

// Cumulative bucket counts of a histogram, summed over its series: [[le, count], ...].
function buckets(m, base, filter) {
  const per = byLabel(m, base + "_bucket", "le", filter);
  return Object.entries(per)
    .map(([le, c]) => [le === "+Inf" ? Infinity : Number(le), c])
    .sort((a, b) => a[0] - b[0]);
}

function quantile(bs, q) {
  const n = bs.length ? bs[bs.length - 1][1] : 0;
  if (!(n > 0)) return null;
  const rank = q * n;
  let prevLe = 0, prevCount = 0;
  for (const [le, count] of bs) {
    if (count >= rank) {
      if (le === Infinity) return prevLe;
      const inBucket = count - prevCount;
      return prevLe + (le - prevLe) * (inBucket > 0 ? (rank - prevCount) / inBucket : 1);
    }
    prevLe = le;
    prevCount = count;
  }
  return prevLe;
}

function diffBuckets(now, before) {
  const old = new Map(before.map(([le, c]) => [le, c]));
  return now.map(([le, c]) => [le, c - (old.get(le) || 0)]);
}

function chart(id, title, options) {
  if (charts.has(id)) return charts.get(id);
  const box = document.createElement("div");
  box.className = "chart";
  box.id = "chart-" + id;
  const h = document.createElement("h4");
  h.textContent = title;
  const canvas = document.createElement("canvas");
  box.append(h, canvas);
  document.getElementById("charts").append(box);
  const c = new LineChart(canvas, options);
  charts.set(id, c);
  return c;
}

function card(id, label, value, isText) {
  let el = document.getElementById("card-" + id);
  if (!el) {
    el = document.createElement("div");
    el.className = "card" + (isText ? " text" : "");
    el.id = "card-" + id;
    el.innerHTML = '<div class="label"></div><div class="value"></div>';
    el.querySelector(".label").textContent = label;
    document.getElementById("cards").append(el);
  }
  el.querySelector(".value").textContent = value;
}

const pct = (v) => (v == null ? "–" : (100 * v).toFixed(1) + " %");
const ms = (s) => (s == null ? null : s * 1000);

function engines(m) {
  return Object.keys(byLabel(m, "pagellm:engine_alive", "engine")).sort((a, b) => a - b);
}

function update(now, t) {
  const prev = history.length ? history[history.length - 1] : null;
  history.push({ t, m: now });
  while (history.length > 2 && t - history[1].t > WINDOW_S * 1000) history.shift();
  const oldest = history[0];
  const es = engines(now);
  const multi = es.length > 1;
  const dt = prev ? (t - prev.t) / 1000 : 0;
  const rate = (name, filter) => {
    if (!prev || dt <= 0) return null;
    const a = total(now, name, filter), b = total(prev.m, name, filter);
    return a == null || b == null ? null : Math.max(a - b, 0) / dt;
  };

  // Cards: the state now and the totals since start-up.
  const model = (now.get("pagellm:engine_alive") || [{ labels: {} }])[0].labels.model_name || "";
  card("model", "Model", model, true);
  card("running", "Running", total(now, "pagellm:num_requests_running") ?? "–");
  card("waiting", "Waiting", total(now, "pagellm:num_requests_waiting") ?? "–");
  const usage = es.map((e) => total(now, "pagellm:kv_cache_usage_perc", { engine: e }) || 0);
  card("kv", "KV cache used", pct(usage.length ? Math.max(...usage) : null));
  const q = total(now, "pagellm:prefix_cache_queries_total"), h = total(now, "pagellm:prefix_cache_hits_total");
  card("prefix", "Prefix cache hits", q ? pct(h / q) : "–");
  const done = total(now, "pagellm:request_success_total");
  card("requests", "Requests finished", done ?? 0);
  card("generated", "Tokens generated", total(now, "pagellm:generation_tokens_total") ?? 0);
  const alive = total(now, "pagellm:engine_alive");
  card("replicas", "Replicas alive", alive + " / " + es.length);

  // Requests running and waiting (per replica when there are several).
  const reqs = { running: total(now, "pagellm:num_requests_running"),
                 waiting: total(now, "pagellm:num_requests_waiting") };
  if (multi) for (const e of es) reqs["running e" + e] = total(now, "pagellm:num_requests_running", { engine: e });
  chart("requests", "Requests running / waiting", { digits: 0 }).push(t, reqs);

  // KV cache usage per replica and per cache group.
  const kv = {};
  for (const e of es) {
    const groups = byLabel(now, "pagellm:kv_cache_group_usage_perc", "group", { engine: e });
    const names = Object.keys(groups);
    if (names.length > 1) {
      for (const g of names) kv[(multi ? "e" + e + " " : "") + "group " + g] = 100 * groups[g];
    } else {
      kv[multi ? "engine " + e : "used"] = 100 * (total(now, "pagellm:kv_cache_usage_perc", { engine: e }) || 0);
    }
  }
  chart("kv", "KV cache usage (%)", { max: 100, unit: "%" }).push(t, kv);

  // Prefix cache hit rate over the window (null while nothing was looked up in it).
  const hits = {};
  const grew = (name, f) => (total(now, name, f) || 0) - (total(oldest.m, name, f) || 0);
  for (const e of multi ? es : [undefined]) {
    const f = e === undefined ? undefined : { engine: e };
    const dq = grew("pagellm:prefix_cache_queries_total", f), dh = grew("pagellm:prefix_cache_hits_total", f);
    hits[e === undefined ? "hit rate" : "engine " + e] = dq > 0 ? (100 * dh) / dq : null;
  }
  chart("prefix", "Prefix cache hit rate (%, last " + WINDOW_S + " s)", { max: 100, unit: "%" }).push(t, hits);

  // Tokens per second.
  const tps = { generation: rate("pagellm:generation_tokens_total"), prompt: rate("pagellm:prompt_tokens_total") };
  if (multi) for (const e of es) tps["gen e" + e] = rate("pagellm:generation_tokens_total", { engine: e });
  chart("tokens", "Tokens / s", { digits: 1 }).push(t, tps);

  // Latency percentiles over the window.
  for (const [id, base, title] of [
    ["ttft", "pagellm:time_to_first_token_seconds", "Time to first token (ms, last " + WINDOW_S + " s)"],
    ["tpot", "pagellm:request_time_per_output_token_seconds", "Time per output token (ms, last " + WINDOW_S + " s)"],
  ]) {
    const win = diffBuckets(buckets(now, base), buckets(oldest.m, base));
    const values = {};
    for (const [name, p] of [["p50", 0.5], ["p90", 0.9], ["p99", 0.99]]) values[name] = ms(quantile(win, p));
    chart(id, title, { digits: 1 }).push(t, values);
  }

  // Per API key (a policy with keys): requests per second and requests in flight.
  const keyReqs = byLabel(now, "pagellm:key_usage_total", "key", { kind: "requests" });
  if (Object.keys(keyReqs).length && prev) {
    const before = byLabel(prev.m, "pagellm:key_usage_total", "key", { kind: "requests" });
    const perKey = {};
    for (const [k, v] of Object.entries(keyReqs)) perKey[k] = dt > 0 ? Math.max(v - (before[k] || 0), 0) / dt : null;
    chart("keys", "Requests / s per API key", { digits: 2 }).push(t, perKey);
    chart("inflight", "Requests in flight per API key", { digits: 0 })
      .push(t, byLabel(now, "pagellm:key_inflight", "key"));
  }

  // The policy's response cache: hits per lookup over the window.
  if (now.has("pagellm:response_cache_total")) {
    const look = (m) => total(m, "pagellm:response_cache_total") || 0;
    const hit = (m) => total(m, "pagellm:response_cache_total", { result: "hit" }) || 0;
    const dl = look(now) - look(oldest.m);
    chart("respcache", "Response cache hit rate (%, last " + WINDOW_S + " s)", { max: 100, unit: "%" })
      .push(t, { "hit rate": dl > 0 ? (100 * (hit(now) - hit(oldest.m))) / dl : null });
  }
}

function table(title, rows, id) {
  const sec = document.createElement("section");
  sec.id = "table-" + id;
  sec.innerHTML = "<h4></h4><table class='kv'></table>";
  sec.querySelector("h4").textContent = title;
  const tb = sec.querySelector("table");
  for (const [k, v] of rows) {
    const tr = tb.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = typeof v === "object" && v !== null ? JSON.stringify(v) : String(v);
  }
  return sec;
}

function flatten(obj, prefix, out) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? prefix + "." + k : k;
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, key, out);
    else if (v !== null && v !== "" && !(Array.isArray(v) && !v.length)) out.push([key, v]);
  }
  return out;
}

function showInfo() {
  const box = document.getElementById("tables");
  box.innerHTML = "";
  if (!info) return;
  const p = info.memory_plan;
  box.append(table("Memory plan", [
    ["weights", PL.formatBytes(p.weight_bytes)],
    ["KV cache", PL.formatBytes(p.kv_bytes) + " (" + p.num_blocks + " blocks × " + p.block_size + " tokens)"],
    ["KV per token", PL.formatBytes(p.kv_bytes_per_token)],
    ["tokens held", p.num_tokens],
    ["max_model_len", p.max_model_len],
    ["requests at max_model_len", p.max_concurrency],
    ["KV groups", p.groups.map((g) => (g.window == null ? "full" : "window " + g.window) + ": " + g.layers.length + " layers").join("; ")],
    ["second tier", p.num_tier_slots ? p.num_tier_slots + " blocks" : "none"],
    ["summary", p.summary],
  ], "memory"));
  box.append(table("Machine", [
    ["CPU", info.machine.cpu], ["cores", info.machine.cpu_count],
    ["kernels", (info.machine.kernel_isas || []).join(", ")], ["pagellm", info.version],
    ["API key required", info.api_key_required],
  ], "machine"));
  box.append(table("Models", info.models.map((c) => [c.id, c.parent ? "LoRA on " + c.parent : c.root]), "models"));
  if (info.replicas) {
    box.append(table("Replicas", info.replicas.engines.map((e, i) => ["engine " + i, e]), "replicas"));
  }
  if (info.policy) box.append(table("Policy", flatten(info.policy, "", []), "policy"));
  box.append(table("Engine configuration", flatten(info.engine_config, "", []), "config"));
}

async function loadInfo() {
  const resp = await PL.api("/server_info");
  if (resp.ok) {
    info = await resp.json();
    showInfo();
  }
}

async function poll() {
  if (!document.getElementById("paused").checked) {
    try {
      const resp = await PL.api("/metrics");
      if (!resp.ok) throw new Error(await PL.errorText(resp));
      update(parseMetrics(await resp.text()), Date.now());
      document.getElementById("poll-state").textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    } catch (e) {
      document.getElementById("poll-state").textContent = "metrics: " + e.message;
    }
  }
  setTimeout(poll, INTERVAL_MS);
}

document.addEventListener("DOMContentLoaded", async () => {
  window.addEventListener("resize", () => charts.forEach((c) => c.draw()));
  await loadInfo();
  setInterval(loadInfo, 30000);
  poll();
});
