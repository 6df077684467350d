// Shared by the playground and the dashboard: the API key and calls to the server's API.
// The key lives in localStorage; a call answered 401 opens the key dialog and is retried
// with the key the user enters.
"use strict";

const PL = (() => {
  const KEY_ITEM = "pagellm.apiKey";
  let dialog = null;
  let waiting = null; // the promise of an open key dialog, shared by concurrent calls

  function key() {
    return localStorage.getItem(KEY_ITEM) || "";
  }

  function setKey(value) {
    if (value) localStorage.setItem(KEY_ITEM, value);
    else localStorage.removeItem(KEY_ITEM);
    showKeyState();
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const k = key();
    if (k) h["Authorization"] = "Bearer " + k;
    return h;
  }

  function buildDialog() {
    dialog = document.createElement("dialog");
    dialog.id = "key-dialog";
    dialog.innerHTML =
      '<form method="dialog">' +
      "<h3>API key</h3>" +
      '<p class="muted" id="key-message">This server needs an API key.</p>' +
      '<input id="key-input" type="password" autocomplete="off" placeholder="sk-...">' +
      '<div class="row"><button type="button" class="secondary" id="key-cancel">Cancel</button>' +
      '<button id="key-save" value="save">Save</button></div></form>';
    document.body.appendChild(dialog);
  }

  // Ask for the key; resolves true once one was entered, false when cancelled.
  function askKey(message) {
    if (waiting) return waiting;
    if (!dialog) buildDialog();
    dialog.querySelector("#key-message").textContent = message || "This server needs an API key.";
    const input = dialog.querySelector("#key-input");
    input.value = "";
    waiting = new Promise((resolve) => {
      const done = (ok) => {
        dialog.close();
        waiting = null;
        resolve(ok);
      };
      dialog.querySelector("#key-save").onclick = (ev) => {
        ev.preventDefault();
        const value = input.value.trim();
        if (!value) return;
        setKey(value);
        done(true);
      };
      dialog.querySelector("#key-cancel").onclick = () => done(false);
      dialog.oncancel = () => done(false);
    });
    dialog.showModal();
    input.focus();
    return waiting;
  }

  // fetch() against the server with the key; on 401 ask for a key and retry.
  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    for (;;) {
      opts.headers = headers(options && options.headers);
      const resp = await fetch(path, opts);
      if (resp.status !== 401) return resp;
      const body = await resp.json().catch(() => ({}));
      const reason = (body.error && body.error.message) || "The API key was refused.";
      const hadKey = !!key();
      if (!(await askKey(hadKey ? reason + " Enter another key." : reason))) return resp;
    }
  }

  // The error message of a failed call (OpenAI's error body), or the status line.
  async function errorText(resp) {
    const text = await resp.text();
    try {
      const body = JSON.parse(text);
      if (body.error) return body.error.message || JSON.stringify(body.error);
    } catch (e) {
      /* not JSON */
    }
    return resp.status + " " + resp.statusText + (text ? ": " + text.slice(0, 300) : "");
  }

  function showKeyState() {
    const el = document.getElementById("key-state");
    if (!el) return;
    el.innerHTML = "";
    if (key()) {
      el.append("API key set ");
      const b = document.createElement("button");
      b.className = "secondary";
      b.textContent = "Forget";
      b.onclick = () => setKey("");
      el.append(b);
    }
  }

  function escapeHtml(s) {
    return String(s)
      .replace(/&/g, "&amp;")
      .replace(/</g, "&lt;")
      .replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;")
      .replace(/'/g, "&#39;");
  }

  function formatBytes(n) {
    if (n == null) return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }

  document.addEventListener("DOMContentLoaded", showKeyState);
  return { key, setKey, askKey, api, errorText, escapeHtml, formatBytes };
})();
