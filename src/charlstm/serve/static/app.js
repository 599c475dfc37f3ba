// The page: POST /v1/generate/stream and show the text as its server-sent events arrive.
// EventSource cannot POST, so the stream is read with fetch and parsed here; Stop aborts the fetch,
// which closes the connection, and the server frees the stream's slot at once.
// A server started with API keys answers the API 401: the page then asks for a key, keeps it for
// this tab only (sessionStorage) and sends it as `Authorization: Bearer KEY`.
"use strict";

const $ = (id) => document.getElementById(id);
const poem = $("poem"), statusLine = $("status");
const generateButton = $("generate"), stopButton = $("stop");
const KEY_ITEM = "charlstm-api-key";
let models = [];
let controller = null;

function authHeaders() {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// Show the key form; `refused` when the key that was sent is not one the server accepts.
function askForKey(refused) {
  $("key-form").hidden = false;
  $("key-status").textContent = refused ? "the server refused that key; check it and try again" : "";
  $("model-line").textContent = "waiting for an API key";
  $("api-key").focus();
}

function describeModel(m) {
  const loss = m.val_loss == null ? "no validation loss"
    : `validation loss ${m.val_loss.toFixed(3)} nats/char (${m.val_bits_per_char.toFixed(2)} bits/char)`;
  return `Model ${m.name} · ${loss}`;
}

function selectedModel() {
  return models.find((m) => m.name === $("model").value) || models[0];
}

function showModel() {
  const m = selectedModel();
  if (!m) return;
  $("model-line").textContent = describeModel(m);
  const length = $("length");
  length.max = Math.min(m.limits.max_length, 4000);
  if (+length.value > +length.max) length.value = length.max;
  $("length-value").textContent = length.value;
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (response.status === 401) {
      askForKey(sessionStorage.getItem(KEY_ITEM) !== null);
      return;
    }
    const info = await response.json();
    if (!response.ok) {
      $("model-line").textContent = `${response.status}: ${info.detail || "request failed"}`;
      return;
    }
    $("key-form").hidden = true;
    models = info.models;
    $("model").replaceChildren();
    for (const m of models) $("model").add(new Option(m.name, m.name, m.name === info.default));
    $("model-choice").hidden = models.length < 2;
    showModel();
  } catch (err) {
    $("model-line").textContent = "could not reach the server";
  }
}

function useKey(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("api-key").value.trim());
  $("api-key").value = "";
  loadModels();
}

function setRunning(running) {
  generateButton.disabled = running;
  stopButton.disabled = !running;
}

function errorText(status, body) {
  if (status === 422 && Array.isArray(body.detail)) {
    return body.detail.map((d) => `${d.field}: ${d.reason}`).join("\n");
  }
  return `${status}: ${body.detail || "request failed"}`;
}

// Split a buffer into complete SSE events; returns [events, rest].
function parseEvents(buffer) {
  const events = [];
  const blocks = buffer.split("\n\n");
  const rest = blocks.pop();
  for (const block of blocks) {
    let name = "message", data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event: ")) name = line.slice(7);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    events.push({ name, data: data ? JSON.parse(data) : null });
  }
  return [events, rest];
}

async function generate(event) {
  event.preventDefault();
  const started = performance.now();
  let chars = 0;
  poem.textContent = "";
  poem.classList.remove("error");
  statusLine.textContent = "generating…";
  controller = new AbortController();
  setRunning(true);
  const body = {
    start_text: $("start-text").value || " ",
    temperature: +$("temperature").value,
    length: +$("length").value,
    unknown: "skip",
  };
  if (models.length > 1) body.model = $("model").value;
  try {
    const response = await fetch("/v1/generate/stream", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (response.status === 401) {
      askForKey(sessionStorage.getItem(KEY_ITEM) !== null);
      statusLine.textContent = "";
      return;
    }
    if (!response.ok) {
      poem.classList.add("error");
      poem.textContent = errorText(response.status, await response.json());
      statusLine.textContent = "";
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      let events;
      [events, buffer] = parseEvents(buffer + decoder.decode(value, { stream: true }));
      for (const e of events) {
        if (e.name === "start") {
          poem.textContent = e.data.start_text;
          if (e.data.start_text !== body.start_text.replace(/\r\n?/g, "\n")) {
            statusLine.textContent = "dropped characters the model never saw; generating…";
          }
        } else if (e.name === "chunk") {
          poem.textContent += e.data.text;
          chars += e.data.text.length;
          statusLine.textContent = `${chars} characters…`;
        } else if (e.name === "done") {
          const t = e.data.timing;
          statusLine.textContent = `${t.characters} characters in ${(t.total_ms / 1000).toFixed(1)} s`
            + ` · seed ${e.data.seed}`;
        } else if (e.name === "error") {
          statusLine.textContent = e.data.message;
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") {
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      statusLine.textContent = `stopped after ${chars} characters (${seconds} s)`;
    } else {
      statusLine.textContent = `connection failed: ${err.message}`;
    }
  } finally {
    controller = null;
    setRunning(false);
  }
}

$("controls").addEventListener("submit", generate);
$("key-form").addEventListener("submit", useKey);
stopButton.addEventListener("click", () => controller && controller.abort());
$("model").addEventListener("change", showModel);
$("temperature").addEventListener("input", (e) => {
  $("temperature-value").textContent = (+e.target.value).toFixed(2);
});
$("length").addEventListener("input", (e) => { $("length-value").textContent = e.target.value; });
loadModels();
