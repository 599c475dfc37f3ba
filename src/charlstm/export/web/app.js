// The exported page: the served page's controls, with the model running here (charlstm.js) instead
// of behind POST /v1/generate/stream. Generation runs in slices of ~16 ms between which the browser
// draws the text and handles clicks, so the poem grows as it is written and Stop takes effect at
// once. window.charlstmPage is for tests and benchmarks: the model, and generate() without the DOM.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const poem = $("poem"), statusLine = $("status");
  const generateButton = $("generate"), stopButton = $("stop");
  const SLICE_MS = 16;
  let model = null;
  let running = null; // { stopped } of the generation under way

  function describeModel(m) {
    const loss = m.valLoss == null ? "no validation loss"
      : `validation loss ${m.valLoss.toFixed(3)} nats/char`
        + ` (${(m.valLoss / Math.LN2).toFixed(2)} bits/char)`;
    return `Model ${m.name} · ${loss} · in this page, offline`;
  }

  function setRunning(on) {
    generateButton.disabled = on;
    stopButton.disabled = !on;
  }

  // Yield to the browser (draw, handle Stop) without setTimeout's 4 ms clamp.
  const channel = new MessageChannel();
  const waiting = [];
  channel.port1.onmessage = () => waiting.shift()();
  const nextTask = () => new Promise((resolve) => {
    waiting.push(resolve);
    channel.port2.postMessage(null);
  });

  // `length` characters after `ids`, handed to onText slice by slice; returns the count drawn.
  async function run(ids, { temperature, length, seed }, onText, job) {
    const stream = model.stream(ids, { temperature, seed });
    let drawn = 0;
    while (drawn < length && !job.stopped) {
      const until = performance.now() + SLICE_MS;
      let text = "";
      do {
        for (let k = 0; k < 8 && drawn < length; k++, drawn++) text += model.chars[stream.next()];
      } while (drawn < length && performance.now() < until);
      onText(text, drawn);
      if (drawn < length) await nextTask();
    }
    return drawn;
  }

  async function generate(event) {
    event.preventDefault();
    poem.classList.remove("error");
    const [ids, dropped] = model.encode($("start-text").value || " ");
    if (!ids.length) {
      poem.classList.add("error");
      poem.textContent = "the start text has no character the model knows; give another start text";
      statusLine.textContent = "";
      return;
    }
    const options = {
      temperature: +$("temperature").value,
      length: +$("length").value,
      seed: crypto.getRandomValues(new Uint32Array(1))[0],
    };
    poem.textContent = model.decode(ids);
    statusLine.textContent = dropped
      ? "dropped characters the model never saw; generating…" : "generating…";
    const job = (running = { stopped: false });
    setRunning(true);
    const started = performance.now();
    const chars = await run(ids, options, (text, drawn) => {
      poem.append(text);
      statusLine.textContent = `${drawn} characters…`;
    }, job);
    const seconds = (performance.now() - started) / 1000;
    if (job.stopped) {
      statusLine.textContent = `stopped after ${chars} characters (${seconds.toFixed(1)} s)`;
    } else {
      const rate = Math.round(chars / Math.max(seconds, 1e-3)).toLocaleString("en");
      statusLine.textContent = `${chars} characters in ${seconds.toFixed(1)} s`
        + ` (${rate} characters/s) · seed ${options.seed}`;
    }
    running = null;
    setRunning(false);
  }

  // What tests and benchmarks call: the text a start text and options give, without the DOM.
  async function generateText(startText, options) {
    const [ids] = model.encode(startText);
    let text = model.decode(ids);
    await run(ids, options, (t) => { text += t; }, { stopped: false });
    return text;
  }

  try {
    model = CharLSTM.load(window.CHARLSTM_MODEL);
    $("model-line").textContent = describeModel(model);
    generateButton.disabled = false;
  } catch (err) {
    $("model-line").textContent = window.CHARLSTM_MODEL === undefined
      ? "model.js is missing: keep it beside index.html, or export the page again"
      : `could not load the model: ${err.message}`;
  }
  window.charlstmPage = { model, generate: generateText };

  $("controls").addEventListener("submit", generate);
  stopButton.addEventListener("click", () => { if (running) running.stopped = true; });
  $("temperature").addEventListener("input", (e) => {
    $("temperature-value").textContent = (+e.target.value).toFixed(2);
  });
  $("length").addEventListener("input", (e) => { $("length-value").textContent = e.target.value; });
})();
