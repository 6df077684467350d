// The chat playground: streams /v1/chat/completions into the page, keeps conversations
// and settings in localStorage, shows token counts, time to first token and tok/s.
"use strict";

const CONV_ITEM = "pagellm.conversations";
const CURRENT_ITEM = "pagellm.current";
const SETTINGS_ITEM = "pagellm.settings";
const SETTING_IDS = ["model", "system", "temperature", "top_p", "top_k", "max_tokens", "seed",
                     "repetition_penalty", "stop-words", "format", "schema", "tools", "tool_choice"];

const $ = (id) => document.getElementById(id);
let conversations = [];
let current = null;
let controller = null; // the AbortController of the answer being streamed
let modelCards = [];

function load(item, fallback) {
  try {
    const v = JSON.parse(localStorage.getItem(item));
    return v == null ? fallback : v;
  } catch (e) {
    return fallback;
  }
}

function saveConversations() {
  localStorage.setItem(CONV_ITEM, JSON.stringify(conversations));
  if (current) localStorage.setItem(CURRENT_ITEM, current.id);
}

function saveSettings() {
  const s = {};
  for (const id of SETTING_IDS) s[id] = $(id).value;
  localStorage.setItem(SETTINGS_ITEM, JSON.stringify(s));
}

function restoreSettings() {
  const s = load(SETTINGS_ITEM, {});
  for (const id of SETTING_IDS) if (id in s && id !== "model") $(id).value = s[id];
  $("schema").hidden = $("format").value !== "json_schema";
}

function newConversation() {
  current = { id: "c" + Date.now().toString(36) + Math.random().toString(36).slice(2, 6),
              title: "New chat", messages: [], updated: Date.now() };
  conversations.unshift(current);
  saveConversations();
  renderAll();
}

function renderConversations() {
  const ul = $("conversations");
  ul.innerHTML = "";
  for (const c of conversations) {
    const li = document.createElement("li");
    li.className = c === current ? "active" : "";
    li.dataset.id = c.id;
    const span = document.createElement("span");
    span.textContent = c.title;
    span.title = c.title;
    const del = document.createElement("button");
    del.type = "button";
    del.textContent = "×";
    del.title = "Delete";
    del.onclick = (ev) => {
      ev.stopPropagation();
      conversations = conversations.filter((x) => x !== c);
      if (current === c) current = conversations[0] || null;
      if (!current) return newConversation();
      saveConversations();
      renderAll();
    };
    li.append(span, del);
    li.onclick = () => {
      if (controller) return; // not while an answer streams
      current = c;
      saveConversations();
      renderAll();
    };
    ul.append(li);
  }
}

function statsText(st) {
  if (!st) return "";
  const parts = [];
  if (st.model) parts.push(st.model);
  if (st.prompt_tokens != null) parts.push(st.prompt_tokens + " prompt tokens");
  if (st.completion_tokens != null) parts.push(st.completion_tokens + " completion tokens");
  if (st.ttft_ms != null) parts.push("TTFT " + Math.round(st.ttft_ms) + " ms");
  if (st.tok_s != null) parts.push(st.tok_s.toFixed(1) + " tok/s");
  if (st.finish_reason) parts.push("finish: " + st.finish_reason);
  if (st.cache) parts.push("cache: " + st.cache);
  return parts.join(" · ");
}

function renderMessage(m, el) {
  el = el || document.createElement("div");
  el.className = "msg " + m.role + (m.error ? " error-msg" : "");
  el.innerHTML = "";
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = m.role === "tool" ? "tool result" : m.role;
  el.append(role);
  if (m.reasoning) {
    const d = document.createElement("details");
    d.innerHTML = "<summary>reasoning</summary>";
    const pre = document.createElement("div");
    pre.className = "md";
    pre.innerHTML = Markdown.render(m.reasoning);
    d.append(pre);
    el.append(d);
  }
  const content = document.createElement("div");
  content.className = "content md";
  if (m.error) {
    content.classList.add("error");
    content.textContent = m.error;
  } else if (m.role === "assistant") {
    content.innerHTML = Markdown.render(m.content || "");
  } else {
    content.textContent = m.content || "";
    content.style.whiteSpace = "pre-wrap";
  }
  el.append(content);
  if (m.tool_calls && m.tool_calls.length) {
    const calls = document.createElement("div");
    calls.className = "tool-calls md";
    calls.innerHTML = m.tool_calls
      .map((c) => "<pre><code>" + PL.escapeHtml(c.function.name + "(" + c.function.arguments + ")") +
                  "</code></pre>")
      .join("");
    el.append(calls);
  }
  if (m.stats) {
    const st = document.createElement("div");
    st.className = "stats";
    st.textContent = statsText(m.stats);
    el.append(st);
  }
  return el;
}

function renderMessages() {
  const box = $("messages");
  box.innerHTML = "";
  for (const m of current.messages) box.append(renderMessage(m));
  box.scrollTop = box.scrollHeight;
  const last = current.messages[current.messages.length - 1];
  const canAnswerTool = !!(last && last.role === "assistant" && last.tool_calls && last.tool_calls.length);
  $("as-tool-label").hidden = !canAnswerTool;
  if (!canAnswerTool) $("as-tool").checked = false;
}

function renderAll() {
  renderConversations();
  renderMessages();
  if (current.model && [...$("model").options].some((o) => o.value === current.model)) {
    $("model").value = current.model;
  }
  showModelInfo();
}

function showModelInfo() {
  const card = modelCards.find((c) => c.id === $("model").value);
  let info = "";
  if (card) {
    if (card.parent) info = "LoRA adapter on " + card.parent;
    else if (String(card.root || "").startsWith("route:")) info = "route: " + card.root.slice(6).replace("|", " / ");
    else info = "base model";
    if (card.max_model_len) info += " · max_model_len " + card.max_model_len;
  }
  $("model-info").textContent = info;
}

async function loadModels() {
  const resp = await PL.api("/v1/models");
  if (!resp.ok) {
    $("model-info").textContent = "Models: " + (await PL.errorText(resp));
    $("model-info").classList.add("error");
    return;
  }
  $("model-info").classList.remove("error");
  modelCards = (await resp.json()).data;
  const sel = $("model");
  sel.innerHTML = "";
  for (const card of modelCards) {
    const o = document.createElement("option");
    o.value = card.id;
    o.textContent = card.id + (card.parent ? " (LoRA)" : String(card.root || "").startsWith("route:") ? " (route)" : "");
    sel.append(o);
  }
  const wanted = (current && current.model) || load(SETTINGS_ITEM, {}).model;
  if (wanted && modelCards.some((c) => c.id === wanted)) sel.value = wanted;
  showModelInfo();
}

// The request body from the settings; throws Error with a message on bad input.
function requestBody() {
  const num = (id) => {
    const v = $(id).value.trim();
    if (v === "") return undefined;
    const n = Number(v);
    if (!isFinite(n)) throw new Error(id + " must be a number");
    return n;
  };
  const body = {
    model: $("model").value,
    messages: [],
    stream: true,
    stream_options: { include_usage: true },
    temperature: num("temperature"),
    top_p: num("top_p"),
    max_tokens: num("max_tokens"),
    seed: num("seed"),
  };
  const topK = num("top_k");
  if (topK != null && topK !== -1) body.top_k = topK;
  const rep = num("repetition_penalty");
  if (rep != null && rep !== 1) body.repetition_penalty = rep;
  const stop = $("stop-words").value.split("\n").filter((s) => s.length);
  if (stop.length) body.stop = stop;
  const format = $("format").value;
  if (format === "json_object") body.response_format = { type: "json_object" };
  if (format === "json_schema") {
    let schema;
    try {
      schema = JSON.parse($("schema").value);
    } catch (e) {
      throw new Error("The JSON schema is not valid JSON: " + e.message);
    }
    body.response_format = { type: "json_schema", json_schema: { name: "schema", schema } };
  }
  const toolsText = $("tools").value.trim();
  if (toolsText) {
    let tools;
    try {
      tools = JSON.parse(toolsText);
    } catch (e) {
      throw new Error("The tools are not valid JSON: " + e.message);
    }
    if (!Array.isArray(tools)) throw new Error("The tools must be a JSON array");
    body.tools = tools;
    body.tool_choice = $("tool_choice").value;
  }
  const system = $("system").value.trim();
  if (system) body.messages.push({ role: "system", content: system });
  for (const m of current.messages) {
    if (m.error) continue;
    const msg = { role: m.role, content: m.content || "" };
    if (m.tool_calls && m.tool_calls.length) msg.tool_calls = m.tool_calls;
    if (m.tool_call_id) msg.tool_call_id = m.tool_call_id;
    body.messages.push(msg);
  }
  return body;
}

async function send() {
  if (controller) return;
  const text = $("prompt").value;
  if (!text.trim()) return;
  $("settings-error").textContent = "";
  const last = current.messages[current.messages.length - 1];
  const user = { role: "user", content: text };
  if ($("as-tool").checked && last && last.tool_calls && last.tool_calls.length) {
    user.role = "tool";
    user.tool_call_id = last.tool_calls[0].id;
  }
  current.messages.push(user);
  let body;
  try {
    body = requestBody();
  } catch (e) {
    current.messages.pop();
    $("settings-error").textContent = e.message;
    return;
  }
  $("prompt").value = "";
  if (current.title === "New chat") current.title = text.slice(0, 40);
  current.model = body.model;
  current.updated = Date.now();
  saveSettings();
  const answer = { role: "assistant", content: "", stats: { model: body.model } };
  current.messages.push(answer);
  saveConversations();
  renderConversations();
  renderMessages();
  const el = $("messages").lastElementChild;
  el.dataset.done = "0";
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const t0 = performance.now();
  let tFirst = null;
  let chunks = 0;
  let pending = false;
  const repaint = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      renderMessage(answer, el);
      el.dataset.done = "0";
      $("messages").scrollTop = $("messages").scrollHeight;
    });
  };
  try {
    const resp = await PL.api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await PL.errorText(resp));
    const cache = resp.headers.get("x-pagellm-cache");
    if (cache) answer.stats.cache = cache;
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") {
            finished = true;
            break;
          }
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message || JSON.stringify(obj.error));
          if (obj.model) answer.stats.model = obj.model;
          if (obj.usage) {
            answer.stats.prompt_tokens = obj.usage.prompt_tokens;
            answer.stats.completion_tokens = obj.usage.completion_tokens;
          }
          const choice = obj.choices && obj.choices[0];
          if (!choice) continue;
          const delta = choice.delta || {};
          if (delta.content || delta.reasoning_content || delta.tool_calls) {
            chunks++;
            if (tFirst == null) {
              tFirst = performance.now();
              answer.stats.ttft_ms = tFirst - t0;
            }
          }
          if (delta.content) answer.content += delta.content;
          if (delta.reasoning_content) answer.reasoning = (answer.reasoning || "") + delta.reasoning_content;
          for (const tc of delta.tool_calls || []) {
            answer.tool_calls = answer.tool_calls || [];
            const slot = answer.tool_calls[tc.index || 0] ||
              (answer.tool_calls[tc.index || 0] = { id: "", type: "function", function: { name: "", arguments: "" } });
            if (tc.id) slot.id = tc.id;
            if (tc.function && tc.function.name) slot.function.name += tc.function.name;
            if (tc.function && tc.function.arguments) slot.function.arguments += tc.function.arguments;
          }
          if (choice.finish_reason) answer.stats.finish_reason = choice.finish_reason;
          repaint();
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") answer.stats.finish_reason = "stopped";
    else answer.error = e.message || String(e);
  } finally {
    const tEnd = performance.now();
    const n = answer.stats.completion_tokens != null ? answer.stats.completion_tokens : chunks;
    if (tFirst != null && n > 1 && tEnd > tFirst) answer.stats.tok_s = ((n - 1) * 1000) / (tEnd - tFirst);
    if (answer.stats.completion_tokens == null && chunks) answer.stats.completion_tokens = chunks;
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    current.updated = Date.now();
    saveConversations();
    renderMessages();
    $("messages").lastElementChild.dataset.done = "1";
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  conversations = load(CONV_ITEM, []);
  if (!Array.isArray(conversations)) conversations = [];
  const wanted = localStorage.getItem(CURRENT_ITEM);
  current = conversations.find((c) => c.id === wanted) || conversations[0] || null;
  restoreSettings();
  if (!current) newConversation();
  else renderAll();
  $("new-chat").onclick = () => {
    if (!controller) newConversation();
  };
  $("send").onclick = send;
  $("stop").onclick = () => controller && controller.abort();
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      send();
    }
  });
  $("format").onchange = () => {
    $("schema").hidden = $("format").value !== "json_schema";
    saveSettings();
  };
  $("model").onchange = () => {
    current.model = $("model").value;
    saveConversations();
    saveSettings();
    showModelInfo();
  };
  for (const id of SETTING_IDS) $(id).addEventListener("change", saveSettings);
  await loadModels();
  document.body.dataset.ready = "1";
});
