// charlstm's generator in plain JavaScript: a trained CharRNN (embedding, 1-3 LSTM, GRU or RNN
// layers, a linear layer) stepped one character at a time, and the same sampler as Python's
// charlstm.generate.sampling. No DOM, no network, no dependencies: model.js sets
// window.CHARLSTM_MODEL (the vocabulary, the shapes and the float32 weights as base64), and a
// <script> tag is the only way a page opened from disk (file://) can load it, since fetch() of a
// local file is refused there.
//
// Numerics: weights are the checkpoint's float32 values; every sum and activation runs in float64
// (JavaScript's numbers), so the logits are within ~1e-6 of PyTorch's float32 ones and temperature
// 0 (greedy: the first largest logit) picks the same characters. Sampling follows sample_step
// operation by operation: softmax(logits / T) in float64, the cumulative sum, and the stream's
// counter-based uniform (splitmix64 of the seed and the character's index), so a seed draws the
// same text as `charlstm generate --seed` unless a uniform lands within ~1e-6 of a step of the cdf.
"use strict";

(function (root) {
  // ------------------------------------------------------------------------------------ weights

  // base64 of little-endian float32 → Float32Array (copied through a DataView on a big-endian CPU).
  function floats(base64) {
    const text = atob(base64);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    if (new Uint8Array(new Uint16Array([1]).buffer)[0] === 1) return new Float32Array(bytes.buffer);
    const view = new DataView(bytes.buffer), out = new Float32Array(bytes.length / 4);
    for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
    return out;
  }

  // out = W x + b for W (rows, cols) row-major, as PyTorch stores nn.Linear and the RNN weights.
  // Eight rows at a time: each x[k] is read once for eight independent sums, which the CPU overlaps
  // (about twice the speed of one row at a time in V8).
  function matvec(W, b, x, out, rows, cols) {
    let j = 0;
    for (; j + 7 < rows; j += 8) {
      const o0 = j * cols, o1 = o0 + cols, o2 = o1 + cols, o3 = o2 + cols;
      const o4 = o3 + cols, o5 = o4 + cols, o6 = o5 + cols, o7 = o6 + cols;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
      for (let k = 0; k < cols; k++) {
        const xk = x[k];
        s0 += W[o0 + k] * xk;
        s1 += W[o1 + k] * xk;
        s2 += W[o2 + k] * xk;
        s3 += W[o3 + k] * xk;
        s4 += W[o4 + k] * xk;
        s5 += W[o5 + k] * xk;
        s6 += W[o6 + k] * xk;
        s7 += W[o7 + k] * xk;
      }
      out[j] = b[j] + s0;
      out[j + 1] = b[j + 1] + s1;
      out[j + 2] = b[j + 2] + s2;
      out[j + 3] = b[j + 3] + s3;
      out[j + 4] = b[j + 4] + s4;
      out[j + 5] = b[j + 5] + s5;
      out[j + 6] = b[j + 6] + s6;
      out[j + 7] = b[j + 7] + s7;
    }
    for (; j < rows; j++) {
      const o = j * cols;
      let s = 0;
      for (let k = 0; k < cols; k++) s += W[o + k] * x[k];
      out[j] = b[j] + s;
    }
  }

  const sigmoid = (x) => 1 / (1 + Math.exp(-x));
  const GATES = { lstm: 4, gru: 3, rnn: 1 };

  // --------------------------------------------------------------------------------------- model

  class Model {
    constructor(spec) {
      if (!spec || spec.format !== "charlstm-web" || spec.version !== 1) {
        throw new Error("model.js is not a charlstm web export of this version; export it again");
      }
      const w = floats(spec.weights);
      const tensor = (name) => {
        const [offset, shape] = spec.tensors[name];
        return w.subarray(offset, offset + shape.reduce((a, b) => a * b, 1));
      };
      this.name = spec.name;
      this.valLoss = spec.val_loss;
      this.cell = spec.cell;
      this.chars = spec.vocab;
      this.index = new Map(spec.vocab.map((c, i) => [c, i]));
      const V = (this.V = spec.vocab.length);
      const E = spec.embedding_size;
      const H = (this.H = spec.hidden_size);
      const L = (this.L = spec.num_layers);
      const GH = (this.GH = GATES[spec.cell] * H);
      const zeros = new Float32Array(GH);
      this.layers = [];
      for (let l = 0; l < L; l++) {
        this.layers.push({
          w_ih: tensor(`rnn.weight_ih_l${l}`), // (GH, E or H)
          w_hh: tensor(`rnn.weight_hh_l${l}`), // (GH, H)
          b_ih: spec.tensors[`rnn.bias_ih_l${l}`] ? tensor(`rnn.bias_ih_l${l}`) : zeros,
          b_hh: spec.tensors[`rnn.bias_hh_l${l}`] ? tensor(`rnn.bias_hh_l${l}`) : zeros,
        });
      }
      // Layer 0's input part per character, once: table[v] = W_ih0 · embedding[v] + b_ih0, so a
      // step of layer 0 only multiplies its own state.
      const emb = tensor("encoder.weight"); // (V, E)
      this.table = new Float64Array(V * GH);
      const x = new Float64Array(E), row = new Float64Array(GH);
      for (let v = 0; v < V; v++) {
        for (let e = 0; e < E; e++) x[e] = emb[v * E + e];
        matvec(this.layers[0].w_ih, this.layers[0].b_ih, x, row, GH, E);
        this.table.set(row, v * GH);
      }
      this.w_fc = tensor("fc.weight"); // (V, H)
      this.b_fc = tensor("fc.bias");
      this.gi = new Float64Array(GH); // scratch: the input part of the gates
      this.gh = new Float64Array(GH); // and the hidden part
    }

    // A fresh recurrent state: h (and c for an LSTM) of every layer, zeros as in init_hidden.
    state() {
      const make = () => Array.from({ length: this.L }, () => new Float64Array(this.H));
      return { h: make(), c: this.cell === "lstm" ? make() : null };
    }

    // Feed character `id`: update `state` in place and write the next character's logits (V).
    step(state, id, logits) {
      const H = this.H, GH = this.GH, gi = this.gi, gh = this.gh;
      let x = null;
      for (let l = 0; l < this.L; l++) {
        const layer = this.layers[l], h = state.h[l];
        const input = l === 0 ? this.table.subarray(id * GH, (id + 1) * GH) : gi;
        if (l > 0) matvec(layer.w_ih, layer.b_ih, x, gi, GH, H);
        matvec(layer.w_hh, layer.b_hh, h, gh, GH, H);
        if (this.cell === "lstm") {
          // PyTorch's gate order: input, forget, cell, output.
          const c = state.c[l];
          for (let j = 0; j < H; j++) {
            const i = sigmoid(input[j] + gh[j]);
            const f = sigmoid(input[H + j] + gh[H + j]);
            const g = Math.tanh(input[2 * H + j] + gh[2 * H + j]);
            const o = sigmoid(input[3 * H + j] + gh[3 * H + j]);
            c[j] = f * c[j] + i * g;
            h[j] = o * Math.tanh(c[j]);
          }
        } else if (this.cell === "gru") {
          // Reset, update, new; the reset gate scales the hidden part of "new", bias included.
          for (let j = 0; j < H; j++) {
            const r = sigmoid(input[j] + gh[j]);
            const z = sigmoid(input[H + j] + gh[H + j]);
            const n = Math.tanh(input[2 * H + j] + r * gh[2 * H + j]);
            h[j] = (1 - z) * n + z * h[j];
          }
        } else {
          for (let j = 0; j < H; j++) h[j] = Math.tanh(input[j] + gh[j]);
        }
        x = h;
      }
      matvec(this.w_fc, this.b_fc, x, logits, this.V, H);
    }

    // Text → [ids of the characters the model knows, whether any were dropped]. Line ends are
    // normalised as charlstm.data.corpus.normalise_newlines does; characters are code points.
    encode(text) {
      text = text.replace(/^\ufeff/, "").replace(/\r\n?/g, "\n");
      const ids = [];
      let dropped = false;
      for (const ch of text) {
        const id = this.index.get(ch);
        if (id === undefined) dropped = true;
        else ids.push(id);
      }
      return [ids, dropped];
    }

    decode(ids) {
      let text = "";
      for (const id of ids) text += this.chars[id];
      return text;
    }

    // A stream continuing `ids` (at least one): `next()` draws its next character id.
    stream(ids, { temperature = 0, seed = 0 } = {}) {
      return new Stream(this, ids, temperature, seed);
    }
  }

  // ------------------------------------------------------------------------------------ sampling

  // splitmix64, as charlstm.generate.sampling: stream_seeds(seed, 1)[0] and uniforms(seed, t).
  const MASK = (1n << 64n) - 1n;
  const GAMMA = 0x9e3779b97f4a7c15n, M1 = 0xbf58476d1ce4e5b9n, M2 = 0x94d049bb133111ebn;
  function mix64(z) {
    z = ((z ^ (z >> 30n)) * M1) & MASK;
    z = ((z ^ (z >> 27n)) * M2) & MASK;
    return z ^ (z >> 31n);
  }
  const streamSeed = (seed) => mix64((BigInt.asUintN(64, BigInt(seed)) + M2) & MASK);
  function uniform(seed, counter) {
    const state = (seed + (BigInt(counter) + 1n) * GAMMA) & MASK;
    return Number(mix64(state) >> 11n) / 2 ** 53;
  }

  // The first largest logit (numpy's argmax).
  function argmax(logits) {
    let best = 0;
    for (let v = 1; v < logits.length; v++) if (logits[v] > logits[best]) best = v;
    return best;
  }

  // sample_step without top-k, top-p or a repetition penalty: p = softmax(logits / T), then the
  // number of cdf entries <= u · cdf[V-1] (cdf rises, so: the first entry above it).
  function draw(logits, temperature, u, cdf) {
    const V = logits.length;
    let max = -Infinity;
    for (let v = 0; v < V; v++) max = Math.max(max, logits[v] / temperature);
    let sum = 0;
    for (let v = 0; v < V; v++) sum += cdf[v] = Math.exp(logits[v] / temperature - max);
    let run = 0;
    for (let v = 0; v < V; v++) cdf[v] = run += cdf[v] / sum;
    const target = u * cdf[V - 1];
    let idx = 0;
    while (idx < V && cdf[idx] <= target) idx++;
    return Math.min(idx, V - 1);
  }

  class Stream {
    constructor(model, ids, temperature, seed) {
      if (!ids.length) throw new Error("a stream needs at least one character to start from");
      if (!(temperature >= 0) || !Number.isFinite(temperature)) {
        throw new Error(`temperature must be a finite number >= 0, got ${temperature}`);
      }
      this.model = model;
      this.temperature = temperature;
      this.seed = streamSeed(seed);
      this.drawn = 0;
      this.state = model.state();
      this.logits = new Float64Array(model.V);
      this.p = new Float64Array(model.V);
      for (const id of ids) model.step(this.state, id, this.logits); // prime with the start text
    }

    next() {
      const id =
        this.temperature === 0
          ? argmax(this.logits)
          : draw(this.logits, this.temperature, uniform(this.seed, this.drawn), this.p);
      this.drawn++;
      this.model.step(this.state, id, this.logits);
      return id;
    }
  }

  root.CharLSTM = { Model, load: (spec) => new Model(spec) };
})(typeof window !== "undefined" ? window : globalThis);
