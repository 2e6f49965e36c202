// The /ui chat page: plain JavaScript, no build step, nothing fetched from outside this server.
// It talks to the same OpenAI-compatible API as any client: POST ../v1/chat/completions, stream: true.
"use strict";

const API = new URL("../v1/", document.baseURI); // relative, so the page also works behind a path prefix
const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), empty: $("empty"), input: $("input"), send: $("send"), stop: $("stop"),
  composer: $("composer"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
  maxTokens: $("max-tokens"), system: $("system"), clear: $("clear"), model: $("model"), status: $("status"),
};

let model = "default";
let history = []; // [{role, content}] sent with every request: the conversation so far
let controller = null; // AbortController of the answer being streamed, if any

// ---- settings (kept across reloads) ---------------------------------------------------------------
const SETTINGS_KEY = "mistralrs-ui-settings";
function loadSettings() {
  try {
    const s = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
    if (typeof s.temperature === "number") els.temperature.value = s.temperature;
    if (typeof s.maxTokens === "string") els.maxTokens.value = s.maxTokens;
    if (typeof s.system === "string") els.system.value = s.system;
  } catch (e) { /* private mode or bad JSON: defaults */ }
  els.temperatureValue.textContent = els.temperature.value;
}
function saveSettings() {
  els.temperatureValue.textContent = els.temperature.value;
  try {
    localStorage.setItem(SETTINGS_KEY, JSON.stringify({
      temperature: Number(els.temperature.value), maxTokens: els.maxTokens.value, system: els.system.value,
    }));
  } catch (e) { /* ignore */ }
}

// ---- rendering (text only: model output is never parsed as HTML) ----------------------------------
function addMessage(role, text, state) {
  els.empty.hidden = true;
  const box = document.createElement("div");
  box.className = `msg ${role}`;
  box.dataset.state = state || "done";
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  const note = document.createElement("div");
  note.className = "note";
  box.append(label, content, note);
  els.messages.append(box);
  scrollDown();
  return box;
}
function scrollDown() { els.messages.scrollTop = els.messages.scrollHeight; }
function setBusy(busy) {
  els.send.disabled = busy;
  els.stop.hidden = !busy;
  els.stop.disabled = !busy;
}

// ---- the request ----------------------------------------------------------------------------------
function requestBody() {
  const messages = [];
  const system = els.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = { model, messages, stream: true, stream_options: { include_usage: true },
                 temperature: Number(els.temperature.value) };
  const max = parseInt(els.maxTokens.value, 10);
  if (Number.isFinite(max) && max > 0) body.max_tokens = max;
  return body;
}

// Yields the JSON payload of each `data:` line of a server-sent-events body; stops at [DONE].
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue; // comments (pings), blank separators
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const box = addMessage("assistant", "", "streaming");
  const content = box.querySelector(".content");
  const note = box.querySelector(".note");
  let answer = "";
  let finish = null;
  let usage = null;
  const started = performance.now();
  let firstToken = null;
  controller = new AbortController();
  setBusy(true);
  els.status.textContent = "generating…";
  try {
    const response = await fetch(new URL("chat/completions", API), {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (response.status === 401 && askForKey()) {
      els.status.textContent = "API key saved: send again";
      return;
    }
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try { message = (await response.json()).error.message || message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    for await (const chunk of sseData(response)) {
      if (chunk.error) throw new Error(chunk.error.message || "server error");
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      const piece = (choice.delta && choice.delta.content) || "";
      if (piece) {
        if (firstToken === null) firstToken = performance.now();
        answer += piece;
        content.textContent = answer;
        scrollDown();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    box.dataset.state = "done";
    const secs = (performance.now() - (firstToken || started)) / 1000;
    const parts = [];
    if (usage) parts.push(`${usage.completion_tokens} tokens`, `${(usage.completion_tokens / Math.max(secs, 1e-3)).toFixed(1)} tok/s`);
    if (firstToken !== null) parts.push(`first token ${((firstToken - started) / 1000).toFixed(2)} s`);
    if (finish === "length") parts.push("stopped at max tokens");
    note.textContent = parts.join(" · ");
  } catch (err) {
    if (err.name === "AbortError") {
      box.dataset.state = "stopped";
      note.textContent = "stopped";
    } else {
      box.dataset.state = "error";
      note.textContent = `error: ${err.message}`;
    }
  } finally {
    // NOTE: a stopped answer stays in the conversation (it is what the user saw); a failed request
    // leaves no assistant turn, so the next message is not answered against an empty reply.
    if (box.dataset.state === "error" && !answer) history.pop();
    else history.push({ role: "assistant", content: answer });
    controller = null;
    setBusy(false);
    els.status.textContent = "";
    els.input.focus();
  }
}

// ---- wiring ---------------------------------------------------------------------------------------
els.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = els.input.value;
  if (!text.trim() || controller) return;
  els.input.value = "";
  send(text);
});
els.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    els.composer.requestSubmit();
  }
});
els.stop.addEventListener("click", () => { if (controller) controller.abort(); });
els.clear.addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  els.messages.querySelectorAll(".msg").forEach((m) => m.remove());
  els.empty.hidden = false;
  els.input.focus();
});
for (const el of [els.temperature, els.maxTokens, els.system]) el.addEventListener("input", saveSettings);
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && controller) controller.abort(); });

loadSettings();
setBusy(false);
// A server started with --api-key wants `Authorization: Bearer KEY`; the key is asked for once
// (on the first 401) and kept in this browser's localStorage.
function authHeaders() {
  const key = localStorage.getItem("mistralrs-api-key");
  return key ? { Authorization: `Bearer ${key}` } : {};
}
function askForKey() {
  const key = window.prompt("This server needs an API key (--api-key):");
  if (!key) return false;
  localStorage.setItem("mistralrs-api-key", key.trim());
  return true;
}

fetch(new URL("models", API), { headers: authHeaders() })
  .then((r) => r.json())
  .then((j) => { model = j.data[0].id; els.model.textContent = model; document.title = `${model} · mistralrs-py`; })
  .catch(() => { els.model.textContent = "(model list unavailable)"; });
els.input.focus();
