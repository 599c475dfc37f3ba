"""Compiled LSTM generation on the CPU: the model step and the sampler without per-call overhead.

One character of the lab-sized model (2 × 85, vocabulary 74) is about 93 k multiply-adds, a few µs
of arithmetic, while one PyTorch module call costs tens of µs. So generation runs here, in numba:

- `LSTMWeights` rearranges a `CharRNN`'s weights once. Layer 0's input projection is a table, one
  row of 4H gate inputs per character (embedding @ W_ih0ᵀ + both biases), so layer 0 only multiplies
  its own state. Layers above see [h_below, h_own] as one vector and use one stacked matrix.
- A stream's state is one row of `S` (N, L·H), the layers' h side by side, and of `C` (cells). Layer
  l's input [h_{l-1}, h_l] is then the contiguous slice S[:, (l-1)H:(l+1)H], so the batched path
  feeds views of `S` straight to a matrix multiply with no copies.
- Few streams (`advance_rows`): each row runs all its characters of a call inside one compiled
  call, matrix-vector products over weights that stay in cache (about 4.5 µs a character for the
  lab model, ~50x a module call). Many streams (`blas_steps`): one step of every row at a time,
  one GEMM per layer that reuses each weight across rows, all the call's steps in one compiled
  call that never takes Python's lock (the GIL): the GEMMs go straight to the BLAS inside
  PyTorch's library (MKL) through a function pointer. Where PyTorch has no such BLAS,
  `_batched_steps` makes the same steps from Python, one GEMM call (oneDNN, weights packed once,
  or numpy) and one kernel call at a time (~1.7 µs a character per core at 128 rows, 62% of it in
  the GEMMs); a server's event loop then competes with it for the GIL at every step.
- `LSTMRows.advance` splits the rows into blocks, one per thread; each worker runs single-threaded
  and never waits for another inside a call.

Numerics: weights, state and gates are float32 like the reference module; sigmoid and tanh use a
rational approximation that vectorises (within 3e-7 of PyTorch's). Sampling follows
`sampling.sample_step` operation by operation in float64: the same splitmix64 uniforms, temperature,
top-k, top-p and repetition penalty, numpy's pairwise sums, and the same cdf inversion, so given the
same logits it draws the same characters (exp may differ from numpy's in the last bit, which could
flip a draw only when a uniform lands within ~1e-16 of a cdf step; tests compare with
`sample_step`).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from dataclasses import dataclass

import numba as nb
import numpy as np
import torch

# float32 arithmetic may use FMA and reciprocals; no flag that changes inf/NaN handling, because the
# sampler relies on -inf for top-k (and those functions use no fast-math at all).
_FAST = {"contract", "arcp", "nsz", "afn"}

# -------------------------------------------------------------------------------------- activations

# tanh as an odd/even rational function on [-c, c] (the approximation Eigen and TensorFlow use for
# float32): branch-free, so LLVM vectorises the gate loops, unlike calls to libm's tanhf/expf.
_CLAMP = np.float32(7.90531110763549805)
_A1, _A3, _A5, _A7 = (
    np.float32(v)
    for v in (
        4.89352455891786e-03,
        6.37261928875436e-04,
        1.48572235717979e-05,
        5.12229709037114e-08,
    )
)
_A9, _A11, _A13 = (
    np.float32(v) for v in (-8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
)
_B0, _B2, _B4, _B6 = (
    np.float32(v)
    for v in (
        4.89352518554385e-03,
        2.26843463243900e-03,
        1.18534705686654e-04,
        1.19825839466702e-06,
    )
)
_HALF = np.float32(0.5)


@nb.njit(fastmath=_FAST, error_model="numpy", cache=True, inline="always")
def _tanh(x):
    x = min(max(x, -_CLAMP), _CLAMP)
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return x * p / q


@nb.njit(fastmath=_FAST, error_model="numpy", cache=True, inline="always")
def _sigmoid(x):
    return _HALF * _tanh(_HALF * x) + _HALF


# ---------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class LSTMWeights:
    """A `CharRNN` LSTM's weights, float32 and laid out for `advance_rows` and the batched step."""

    table: np.ndarray  # (V, 4H) layer 0's gate inputs per character, both biases included
    w_hh0: np.ndarray  # (H, 4H)
    w_up: np.ndarray  # (L-1, 2H, 4H) layers >= 1: [W_ih; W_hh]ᵀ acting on [h_below, h_own]
    b_up: np.ndarray  # (L-1, 4H)
    w_fc: np.ndarray  # (H, V)
    b_fc: np.ndarray  # (V,)
    # The batched path's one product per layer: h_l @ [W_hh_l | W_ih_{l+1}] (W_fc above the top
    # layer), (H, 4H + 4H or V): the layers below the top stacked in `fused_below` (L-1, H, 8H),
    # the top's in `fused_top` (H, 4H + V); `fused` the same per layer (views); and for oneDNN the
    # same matrices as nn.Linear keeps them (out, in).
    fused_below: np.ndarray
    fused_top: np.ndarray
    fused: tuple[np.ndarray, ...]
    fused_lin: tuple[torch.Tensor, ...]

    @property
    def hidden_size(self) -> int:
        return self.w_hh0.shape[0]

    @property
    def num_layers(self) -> int:
        return self.w_up.shape[0] + 1

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: torch.nn.Module) -> LSTMWeights:
        rnn, fc = model.rnn, model.fc
        L, H = rnn.num_layers, rnn.hidden_size

        def f32(t: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())

        def bias(name: str) -> torch.Tensor:
            b = getattr(rnn, name, None)
            return torch.zeros(4 * H) if b is None else b.float().cpu()

        emb = model.encoder.weight.float().cpu()  # (V, E)
        table = emb @ rnn.weight_ih_l0.float().cpu().T + bias("bias_ih_l0") + bias("bias_hh_l0")
        w_up = [
            torch.cat([getattr(rnn, f"weight_ih_l{l}"), getattr(rnn, f"weight_hh_l{l}")], 1).T
            for l in range(1, L)
        ]
        b_up = [bias(f"bias_ih_l{l}") + bias(f"bias_hh_l{l}") for l in range(1, L)]
        w_up = f32(torch.stack(w_up)) if w_up else np.zeros((0, 2 * H, 4 * H), np.float32)
        w_hh0, w_fc = f32(rnn.weight_hh_l0.T), f32(fc.weight.T)
        above = [getattr(rnn, f"weight_ih_l{l}") for l in range(1, L)] + [fc.weight]
        fused = [torch.cat([getattr(rnn, f"weight_hh_l{l}"), above[l]], 0).T for l in range(L)]
        below = f32(torch.stack(fused[:-1])) if L > 1 else np.zeros((0, H, 8 * H), np.float32)
        top = f32(fused[-1])
        fused = (*below, top)

        return cls(
            table=f32(table),
            w_hh0=w_hh0,
            w_up=w_up,
            b_up=f32(torch.stack(b_up)) if b_up else np.zeros((0, 4 * H), np.float32),
            w_fc=w_fc,
            b_fc=f32(fc.bias) if fc.bias is not None else np.zeros(fc.out_features, np.float32),
            fused_below=below,
            fused_top=top,
            fused=fused,
            fused_lin=tuple(_pack(torch.from_numpy(np.ascontiguousarray(m.T))) for m in fused),
        )


def supports(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether `LSTMWeights` can run this model: a plain LSTM (no projections) on the CPU."""
    rnn = getattr(model, "rnn", None)
    return (
        device.type == "cpu"
        and isinstance(rnn, torch.nn.LSTM)
        and not rnn.bidirectional
        and getattr(rnn, "proj_size", 0) == 0
        and all(hasattr(model, n) for n in ("encoder", "fc"))
    )


# ---------------------------------------------------------------------------------------- the step


@nb.njit(fastmath=_FAST, error_model="numpy", cache=True)
def _cell(g, h, c):
    """Gates g (4H,) in PyTorch's order i, f, g, o → new c (H,) and h (H,) in place.

    Every array is indexed by the bare loop variable: numba adds a negative-index check to an
    expression like H + j, and that check alone stops LLVM from vectorising the loop."""
    H = h.shape[0]
    gi, gf, gg, go = g[:H], g[H : 2 * H], g[2 * H : 3 * H], g[3 * H :]
    for j in range(H):
        cj = _sigmoid(gf[j]) * c[j] + _sigmoid(gi[j]) * _tanh(gg[j])
        c[j] = cj
        h[j] = _sigmoid(go[j]) * _tanh(cj)


@nb.njit(fastmath=_FAST, error_model="numpy", cache=True)
def _matvec_add(h, W, g):
    """g += h @ W for h (K,), W (K, N), in axpy order (g[j] += h[k]·W[k, j]) so that the inner loop
    runs along contiguous memory and vectorises; four rows of W per pass of g quarter the loads
    and stores of g, which bound this loop."""
    K = h.shape[0]
    K4 = K - K % 4
    for k in range(0, K4, 4):
        h0, h1, h2, h3 = h[k], h[k + 1], h[k + 2], h[k + 3]
        w0, w1, w2, w3 = W[k], W[k + 1], W[k + 2], W[k + 3]
        for j in range(g.shape[0]):
            g[j] += h0 * w0[j] + h1 * w1[j] + h2 * w2[j] + h3 * w3[j]
    for k in range(K4, K):
        hk, wk = h[k], W[k]
        for j in range(g.shape[0]):
            g[j] += hk * wk[j]


@nb.njit(fastmath=_FAST, error_model="numpy", cache=True)
def _step_row(table, w_hh0, w_up, b_up, w_fc, S, C, logits, r, x, g):
    """Feed character x to row r: update its state and write its next logits (no fc bias)."""
    H = w_hh0.shape[0]
    g[:] = table[x]
    _matvec_add(S[r, :H], w_hh0, g)
    _cell(g, S[r, :H], C[r, :H])
    for l in range(w_up.shape[0]):
        g[:] = b_up[l]
        lo = l * H  # layer l+1 reads [h_l (just updated), h_{l+1} (previous step)]
        _matvec_add(S[r, lo : lo + 2 * H], w_up[l], g)
        _cell(g, S[r, lo + H : lo + 2 * H], C[r, lo + H : lo + 2 * H])
    top = w_up.shape[0] * H
    logits[r, :] = 0.0
    _matvec_add(S[r, top : top + H], w_fc, logits[r])


@nb.njit(error_model="numpy", cache=True, nogil=True)
def prime_row(table, w_hh0, w_up, b_up, w_fc, S, C, logits, r, prompt):
    """Run a start text through row r (whose state the caller has zeroed)."""
    g = np.empty(4 * w_hh0.shape[0], np.float32)
    for t in range(prompt.shape[0]):
        _step_row(table, w_hh0, w_up, b_up, w_fc, S, C, logits, r, prompt[t], g)


@nb.njit(fastmath=_FAST, error_model="numpy", cache=True, nogil=True)
def lstm_cells(below, own, bias, S, C, layer):
    """Batched step of layer >= 1: its gates are below[:, 4H:] (h_below @ W_ih, this step's product
    of the layer below) + own[:, :4H] (h_own @ W_hh, from the previous step) + the bias; update c
    and h of `layer` in place. Both products come from `fused` GEMMs, so the rows are contiguous."""
    H = bias.shape[0] // 4
    off = layer * H
    g = np.empty(4 * H, np.float32)
    for r in range(S.shape[0]):
        x, y = below[r, 4 * H : 8 * H], own[r, : 4 * H]
        for j in range(4 * H):
            g[j] = x[j] + y[j] + bias[j]
        _cell(g, S[r, off : off + H], C[r, off : off + H])


# ---------------------------------------------------------------------------------------- sampling

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = (np.uint64(s) for s in (30, 27, 31, 11))
_ONE = np.uint64(1)
_INV53 = 1.0 / (1 << 53)


@nb.njit(error_model="numpy", cache=True)
def _uniform(seed, counter):
    """`sampling.uniforms` for one stream (splitmix64 of seed + (counter + 1)·γ)."""
    z = seed + (counter + _ONE) * _GAMMA
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    z = z ^ (z >> _S31)
    return np.float64(z >> _S11) * _INV53


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split in two (fdlibm): n·_LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_EXP_MIN = -708.0  # below this exp(x) is subnormal, and 0 changes no cdf comparison
# 1/k!: the Taylor series of exp(r) to r^13, for |r| <= ln2/2 (truncation error < 0.1 ulp).
_F2, _F3, _F4, _F5, _F6, _F7, _F8, _F9, _F10, _F11, _F12, _F13 = (
    1.0 / math.factorial(k) for k in range(2, 14)
)


@nb.njit(fastmath={"contract"}, error_model="numpy", cache=True)
def _exp_nonpositive(z, out, bits):
    """out[v] = exp(z[v]) for z <= 0 (-inf allowed), in float64 to about 1 ulp (np.exp is within
    1 ulp too). numba's np.exp calls libm once per element; this one vectorises: x = n·ln2 + r, a
    polynomial for exp(r), and 2^n built in the exponent bits of `bits` (int64 scratch)."""
    scale = bits.view(np.float64)
    for v in range(z.shape[0]):
        x = max(z[v], _EXP_MIN)
        n = np.floor(x * _LOG2E + 0.5)
        r = (x - n * _LN2_HI) - n * _LN2_LO
        p = _F13 * r + _F12
        p = p * r + _F11
        p = p * r + _F10
        p = p * r + _F9
        p = p * r + _F8
        p = p * r + _F7
        p = p * r + _F6
        p = p * r + _F5
        p = p * r + _F4
        p = p * r + _F3
        p = p * r + _F2
        p = p * r + 1.0
        p = p * r + 1.0
        out[v] = p if z[v] >= _EXP_MIN else 0.0
        bits[v] = (np.int64(n) + 1023) << 52
    for v in range(z.shape[0]):
        out[v] *= scale[v]


@nb.njit(error_model="numpy", cache=True)
def _max(a):
    """max(a) with eight running maxima: the same value as a sequential max (max is exact), but
    eight independent chains instead of one long one."""
    V = a.shape[0]
    if V < 8:
        m = a[0]
        for v in range(1, V):
            m = max(m, a[v])
        return m
    m0, m1, m2, m3, m4, m5, m6, m7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    end = V - V % 8
    for i in range(8, end, 8):
        m0 = max(m0, a[i])
        m1 = max(m1, a[i + 1])
        m2 = max(m2, a[i + 2])
        m3 = max(m3, a[i + 3])
        m4 = max(m4, a[i + 4])
        m5 = max(m5, a[i + 5])
        m6 = max(m6, a[i + 6])
        m7 = max(m7, a[i + 7])
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for i in range(end, V):
        m = max(m, a[i])
    return m


@nb.njit(error_model="numpy", cache=True)
def _sum_block(a, lo, hi):
    """numpy's pairwise_sum for one block of at most 128 elements: 8 running sums, then a tree."""
    n = hi - lo
    if n < 8:
        res = 0.0
        for i in range(lo, hi):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    end = hi - n % 8
    for i in range(lo + 8, end, 8):
        r0 += a[i]
        r1 += a[i + 1]
        r2 += a[i + 2]
        r3 += a[i + 3]
        r4 += a[i + 4]
        r5 += a[i + 5]
        r6 += a[i + 6]
        r7 += a[i + 7]
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(end, hi):
        res += a[i]
    return res


@nb.njit(error_model="numpy", cache=True)
def _sum(a):
    """numpy's pairwise sum of `a` (the order `ndarray.sum` adds a row in), so that normalising
    gives bit for bit the reference's probabilities. numpy halves blocks above 128 elements
    recursively; this walks the same tree with an explicit stack (recursive numba functions do
    not survive its on-disk cache)."""
    if a.shape[0] <= 128:
        return _sum_block(a, 0, a.shape[0])
    los = np.empty(64, np.int64)
    his = np.empty(64, np.int64)
    stage = np.zeros(64, np.int64)  # 0: split, 1: left done, 2: right done
    left = np.empty(64)
    los[0], his[0], sp, ret = 0, a.shape[0], 1, 0.0
    while sp > 0:
        f = sp - 1
        lo, hi = los[f], his[f]
        if hi - lo <= 128:
            ret = _sum_block(a, lo, hi)
            sp -= 1
            continue
        mid = (hi - lo) // 2
        mid = lo + mid - mid % 8
        if stage[f] == 0:
            stage[f] = 1
            los[sp], his[sp], stage[sp] = lo, mid, 0
            sp += 1
        elif stage[f] == 1:
            left[f] = ret
            stage[f] = 2
            los[sp], his[sp], stage[sp] = mid, hi, 0
            sp += 1
        else:
            ret = left[f] + ret
            sp -= 1
    return ret


@nb.njit(error_model="numpy", cache=True, inline="always")
def _sample_row(
    lg,
    b_fc,
    temperature,
    top_k,
    top_p,
    penalty,
    recent,
    window,
    seed,
    counter,
    z,
    p,
    mark,
    order,
    bits,
):
    """`sampling.sample_step` for one row, in the same float64 operations and order. lg: float32
    logits without the fc bias; recent: this row's last ids, right-aligned, -1 where empty; top_k 0
    and top_p >= 1 mean off. z, p (V,) float64, mark (V,) bool, order and bits (V,) int64 are
    scratch."""
    V = lg.shape[0]
    for v in range(V):
        z[v] = np.float64(lg[v] + b_fc[v])
    if penalty != 1.0:  # each distinct recent id once, as the reference's fancy assignment does
        mark[:] = False
        for q in range(recent.shape[0] - window, recent.shape[0]):
            t = recent[q]
            if t >= 0 and not mark[t]:
                mark[t] = True
                z[t] = z[t] / penalty if z[t] > 0 else z[t] * penalty
    if temperature == 0.0:
        best = 0
        for v in range(1, V):
            if z[v] > z[best]:
                best = v
        return best
    for v in range(V):
        z[v] = z[v] / temperature
    if 0 < top_k < V:
        p[:] = z
        kth = np.partition(p, V - top_k)[V - top_k]  # as the reference finds it
        for v in range(V):
            if z[v] < kth:
                z[v] = -np.inf
    m = _max(z)
    for v in range(V):
        z[v] -= m
    _exp_nonpositive(z, p, bits)
    s = _sum(p)
    for v in range(V):
        p[v] /= s
    if top_p < 1.0:
        # Stable sort by descending probability (insertion sort: no allocation, V is small), then
        # drop each entry whose mass strictly before it already reaches top_p.
        for q in range(V):
            pos = q
            while pos > 0 and p[order[pos - 1]] < p[q]:
                order[pos] = order[pos - 1]
                pos -= 1
            order[pos] = q
        acc = 0.0
        for q in range(V):
            i = order[q]
            acc += p[i]
            mark[i] = acc - p[i] >= top_p
        for v in range(V):
            if mark[v]:
                p[v] = 0.0
        s = _sum(p)
        for v in range(V):
            p[v] /= s
    # cdf inversion: the number of cdf entries <= u · cdf[-1]
    acc = 0.0
    for v in range(V):
        acc += p[v]
        z[v] = acc
    u = _uniform(seed, counter) * z[V - 1]
    idx = 0
    for v in range(V):  # a count, not a search: it vectorises and never mispredicts a branch
        idx += z[v] <= u
    return min(idx, V - 1)


@nb.njit(error_model="numpy", cache=True, inline="always")
def _draw(
    r,
    lg,
    b_fc,
    temperature,
    top_k,
    top_p,
    penalty,
    window,
    recent,
    seeds,
    counters,
    z,
    p,
    mark,
    order,
    bits,
):
    """Draw row r's next character from its logits lg and advance its counter and recent window."""
    x = _sample_row(
        lg,
        b_fc,
        temperature[r],
        top_k[r],
        top_p[r],
        penalty[r],
        recent[r],
        window[r],
        seeds[r],
        counters[r],
        z,
        p,
        mark,
        order,
        bits,
    )
    counters[r] += _ONE
    if penalty[r] != 1.0:
        W = recent.shape[1]
        for q in range(W - 1):
            recent[r, q] = recent[r, q + 1]
        recent[r, W - 1] = x
    return x


@nb.njit(error_model="numpy", cache=True, nogil=True)
def sample_rows(
    logits,
    b_fc,
    temperature,
    top_k,
    top_p,
    penalty,
    window,
    recent,
    seeds,
    counters,
    limits,
    t,
    out,
):
    """Draw every row's character t of this call into out[:, t] (-1 once a row has drawn its
    `limits[r]` characters)."""
    V = logits.shape[1]
    z, p, bits, order = np.empty(V), np.empty(V), np.empty(V, np.int64), np.empty(V, np.int64)
    mark = np.empty(V, np.bool_)
    for r in range(logits.shape[0]):
        out[r, t] = -1
        if t < limits[r]:
            out[r, t] = _draw(
                r,
                logits[r],
                b_fc,
                temperature,
                top_k,
                top_p,
                penalty,
                window,
                recent,
                seeds,
                counters,
                z,
                p,
                mark,
                order,
                bits,
            )


@nb.njit(fastmath=_FAST, error_model="numpy", cache=True, nogil=True)
def sample_into_layer0(
    G0,
    table,
    S,
    C,
    logits,
    lg_off,
    b_fc,
    temperature,
    top_k,
    top_p,
    penalty,
    window,
    recent,
    seeds,
    counters,
    limits,
    t,
    out,
):
    """Batched step, first half: draw every row's character t (as `sample_rows`) from
    logits[r, lg_off:lg_off + V], then feed it to layer 0, whose recurrent product h0 @ W_hh0 is
    G0[:, :4H] (computed before the draw: it does not depend on the character): add the
    character's table row and update c and h. G0 is scratch afterwards."""
    H = table.shape[1] // 4
    V = table.shape[0]
    z, p, bits, order = np.empty(V), np.empty(V), np.empty(V, np.int64), np.empty(V, np.int64)
    mark = np.empty(V, np.bool_)
    for r in range(S.shape[0]):
        x = 0  # rows that are done are fed a dummy character: they leave after this call
        out[r, t] = -1
        if t < limits[r]:
            x = _draw(
                r,
                logits[r, lg_off : lg_off + V],
                b_fc,
                temperature,
                top_k,
                top_p,
                penalty,
                window,
                recent,
                seeds,
                counters,
                z,
                p,
                mark,
                order,
                bits,
            )
            out[r, t] = x
        g = G0[r, : 4 * H]
        row = table[x]
        for j in range(4 * H):
            g[j] += row[j]
        _cell(g, S[r, :H], C[r, :H])


@nb.njit(error_model="numpy", cache=True)
def _advance_row(
    r,
    table,
    w_hh0,
    w_up,
    b_up,
    w_fc,
    b_fc,
    S,
    C,
    logits,
    temperature,
    top_k,
    top_p,
    penalty,
    window,
    recent,
    seeds,
    counters,
    limits,
    out,
):
    V = logits.shape[1]
    z = np.empty(V)
    p = np.empty(V)
    mark = np.empty(V, np.bool_)
    order = np.empty(V, np.int64)
    bits = np.empty(V, np.int64)
    g = np.empty(4 * w_hh0.shape[0], np.float32)
    for t in range(limits[r]):
        x = _draw(
            r,
            logits[r],
            b_fc,
            temperature,
            top_k,
            top_p,
            penalty,
            window,
            recent,
            seeds,
            counters,
            z,
            p,
            mark,
            order,
            bits,
        )
        out[r, t] = x
        _step_row(table, w_hh0, w_up, b_up, w_fc, S, C, logits, r, x, g)
    for t in range(limits[r], out.shape[1]):
        out[r, t] = -1


@nb.njit(error_model="numpy", cache=True, nogil=True)
def advance_rows(
    table,
    w_hh0,
    w_up,
    b_up,
    w_fc,
    b_fc,
    S,
    C,
    logits,
    temperature,
    top_k,
    top_p,
    penalty,
    window,
    recent,
    seeds,
    counters,
    limits,
    out,
):
    """Few streams: row r draws limits[r] characters into out[r] (then -1), all in this call."""
    for r in range(S.shape[0]):
        _advance_row(
            r,
            table,
            w_hh0,
            w_up,
            b_up,
            w_fc,
            b_fc,
            S,
            C,
            logits,
            temperature,
            top_k,
            top_p,
            penalty,
            window,
            recent,
            seeds,
            counters,
            limits,
            out,
        )


# ---------------------------------------------------------------------------------------- streams


class LSTMRows:
    """The state of N streams as rows of arrays, with their sampling settings, advanced together.

    Rows are added (primed with a start text) and dropped between calls to `advance`. In a block of
    fewer than `batch_rows` rows each row runs its characters in one compiled call; from
    `batch_rows` on, every step multiplies all the block's rows at once, which reuses each weight
    across rows. Measured per core: 2 x 85 per-row 210 k chars/s, batched 170 k at 4 rows, 250 k at
    8, 380 k at 32, 560 k at 128 (590 k since the fused, packed GEMMs); 1 x 512 per-row 18 k,
    batched 22 k at 4, 34 k at 8."""

    batch_rows = 8
    threads: int | None = None  # blocks at most; None: `set_threads`' count (`_threads`)

    def __init__(self, weights: LSTMWeights) -> None:
        self.w = weights
        H, L, V = weights.hidden_size, weights.num_layers, weights.vocab_size
        self.S = np.zeros((0, L * H), np.float32)  # h of every layer, side by side
        self.C = np.zeros((0, L * H), np.float32)
        self.logits = np.zeros((0, V), np.float32)  # next-character logits, without the fc bias
        self.temperature = np.zeros(0)
        self.top_k = np.zeros(0, np.int64)
        self.top_p = np.zeros(0)
        self.penalty = np.zeros(0)
        self.window = np.zeros(0, np.int64)
        self.recent = np.full((0, 1), -1, np.int64)  # last ids, right-aligned, -1 where empty
        self.seeds = np.zeros(0, np.uint64)
        self.counters = np.zeros(0, np.uint64)

    def __len__(self) -> int:
        return self.S.shape[0]

    def prime(self, ids, state=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run character `ids` through one row's state (S, C, logits), changed in place, or through
        a fresh one when None; returns it. A start text may be primed in pieces: the state after
        all of them is the state after the whole text."""
        w = self.w
        if state is None:
            S = np.zeros((1, self.S.shape[1]), np.float32)
            state = (S, np.zeros_like(S), np.zeros((1, w.vocab_size), np.float32))
        S, C, logits = state
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        prime_row(w.table, w.w_hh0, w.w_up, w.b_up, w.w_fc, S, C, logits, 0, ids)
        return state

    def add(self, prompt, params, seed: int, state=None) -> None:
        """Append a row primed with `prompt` (character ids), or starting from `state` (`prime`'s,
        after `prompt`; copied, so that one state starts many rows), with sampling settings
        `params`. Nothing changes when it raises."""
        if state is None:
            state = self.prime(prompt)
        S, C, logits = state
        W = max(self.recent.shape[1], params.repetition_window)
        old = self.recent
        if W > old.shape[1]:  # widen on the left: rows stay right-aligned
            old = np.concatenate([np.full((len(self), W - old.shape[1]), -1, np.int64), old], 1)
        recent = np.full((1, W), -1, np.int64)
        tail = list(prompt)[-params.repetition_window :]
        recent[0, W - len(tail) :] = tail
        # top_k at most V, as `SamplingParams.check_vocabulary` asks: k >= V keeps every character
        top_k = min(params.top_k or 0, self.w.vocab_size)
        values = {
            "S": S,
            "C": C,
            "logits": logits,
            "recent": recent,
            "temperature": params.temperature,
            "top_k": top_k,
            "top_p": 2.0 if params.top_p is None else params.top_p,
            "penalty": params.repetition_penalty,
            "window": params.repetition_window,
            "seeds": seed % (1 << 64),
            "counters": 0,
        }
        new = {}  # every array first, then assign them all: a failure leaves the rows as they were
        for name, value in values.items():
            arr = old if name == "recent" else getattr(self, name)
            row = np.asarray(value, dtype=arr.dtype).reshape((1, *arr.shape[1:]))
            new[name] = np.concatenate([arr, row])
        for name, arr in new.items():
            setattr(self, name, arr)

    # The arrays of the rows' state and settings, in the order the kernels take them.
    _ROW_ARRAYS = (
        "S",
        "C",
        "logits",
        "temperature",
        "top_k",
        "top_p",
        "penalty",
        "window",
        "recent",
        "seeds",
        "counters",
    )
    _STATE = ("S", "C", "logits", "recent", "counters")  # what `advance` changes in place

    def save(self) -> tuple[np.ndarray, ...]:
        """A copy of what `advance` changes, for `restore`."""
        return tuple(getattr(self, name).copy() for name in self._STATE)

    def restore(self, saved: tuple[np.ndarray, ...]) -> None:
        for name, arr in zip(self._STATE, saved):
            getattr(self, name)[...] = arr

    def advance_row(self, r: int, k: int, limits: np.ndarray, out: np.ndarray) -> None:
        """`advance` for row r alone, into out[r] (after a batched step failed: which row fails)."""
        self._advance_block(r, r + 1, k, np.ascontiguousarray(limits, dtype=np.int64), out)

    def keep(self, rows) -> None:
        """Keep only `rows` (indices, in order)."""
        index = np.asarray(rows, dtype=np.int64)
        for name in self._ROW_ARRAYS:
            setattr(self, name, np.ascontiguousarray(getattr(self, name)[index]))

    def advance(self, k: int, limits: np.ndarray) -> np.ndarray:
        """Draw up to k characters per row (row r: limits[r] <= k); returns (N, k) ids, -1 after.

        Rows never interact, so with T threads each takes a contiguous block of rows: no
        synchronisation inside the k steps, unlike a threaded GEMM per step (which also collapses
        when other processes share the cores)."""
        N = len(self)
        out = np.empty((N, k), np.int64)
        limits = np.ascontiguousarray(limits, dtype=np.int64)
        threads = self.threads or _threads()
        if N >= self.batch_rows:  # batched blocks, each of at least batch_rows rows
            T = max(1, min(threads, N // self.batch_rows))
        else:  # per-row blocks: worth a thread hop only for enough characters
            T = min(threads, N) if N * k >= _THREAD_MIN_WORK else 1
        bounds = [N * i // T for i in range(T + 1)]
        tasks = [
            lambda a=a, b=b: self._advance_block(a, b, k, limits, out)
            for a, b in itertools.pairwise(bounds)
        ]
        batched = N >= self.batch_rows
        workers = _workers() if T > 1 or batched else None
        if T == 1 and getattr(_LOCAL, "single", False):
            tasks[0]()  # this thread's products are single-threaded (`single_threaded`)
        elif workers is not None and (workers.usable or not batched):
            # GEMMs run in the workers, single-threaded: a threaded GEMM from the caller's thread
            # spins at a barrier three times a step, which collapses when the cores are busy
            workers.run(tasks)
        else:
            for task in tasks:
                task()
        return out

    def _advance_block(self, a: int, b: int, k: int, limits: np.ndarray, out: np.ndarray) -> None:
        w = self.w
        args = [x[a:b] for x in (*(getattr(self, n) for n in self._ROW_ARRAYS), limits, out)]
        if b - a >= self.batch_rows:
            sgemm = _blas_sgemm()
            if sgemm is not None:
                blas_steps(sgemm, k, w.table, w.fused_below, w.fused_top, w.b_up, w.b_fc, *args)
            else:
                _batched_steps(w, k, *args)
        else:
            advance_rows(w.table, w.w_hh0, w.w_up, w.b_up, w.w_fc, w.b_fc, *args)


def _batched_steps(
    w: LSTMWeights,
    k,
    S,
    C,
    logits,
    temperature,
    top_k,
    top_p,
    penalty,
    window,
    recent,
    seeds,
    counters,
    limits,
    out,
) -> None:
    """k steps of every row at once, one GEMM per layer and step.

    Layer l's h at step t is needed twice: as its own recurrent input at t + 1 and as the input of
    layer l + 1 (or of the output layer) at t. One product h_l @ [W_hh_l | W_ih_{l+1}] gives both,
    so a step makes L GEMMs of width 8H instead of L + 1 narrower ones; wider products run closer to
    the GEMM's peak and each call's fixed cost is paid once less."""
    H, L, V = w.hidden_size, w.num_layers, w.vocab_size
    with torch.inference_mode():  # worker threads start in grad mode; skip autograd's dispatch
        # the recurrent products of the state the rows start from (logits are already known)
        A = [_gemm(S[:, l * H : (l + 1) * H], w.fused[l], w.fused_lin[l]) for l in range(L)]
        lg, lg_off = logits, 0
        for t in range(k):
            sample_into_layer0(
                A[0],
                w.table,
                S,
                C,
                lg,
                lg_off,
                w.b_fc,
                temperature,
                top_k,
                top_p,
                penalty,
                window,
                recent,
                seeds,
                counters,
                limits,
                t,
                out,
            )
            for l in range(L):
                new = _gemm(S[:, l * H : (l + 1) * H], w.fused[l], w.fused_lin[l])
                if l + 1 < L:  # layer l+1: this step's input product, its own from the last step
                    lstm_cells(new, A[l + 1], w.b_up[l], S, C, l + 1)
                A[l] = new
            lg, lg_off = A[L - 1], 4 * H
        logits[:] = lg[:, lg_off : lg_off + V]


@nb.njit(error_model="numpy", cache=True, nogil=True)
def _sgemm(sgemm, x, W, out, dims, scalars, op):
    """out = x @ W through the Fortran `sgemm` (column-major, every argument by pointer): outᵀ =
    Wᵀ xᵀ. x (M, K) may be a view with a row stride (its rows contiguous); W (K, N) and out (M, N)
    are C-contiguous. dims (6,) int32, scalars (2,) float32 = (1, 0), op (1,) uint8 = 'N'."""
    M, K = x.shape
    N = W.shape[1]
    dims[0], dims[1], dims[2] = N, M, K
    dims[3], dims[4], dims[5] = N, x.strides[0] // 4, N
    sgemm(
        op.ctypes.data,
        op.ctypes.data,
        dims[0:].ctypes.data,
        dims[1:].ctypes.data,
        dims[2:].ctypes.data,
        scalars[0:].ctypes.data,
        W.ctypes.data,
        dims[3:].ctypes.data,
        x.ctypes.data,
        dims[4:].ctypes.data,
        scalars[1:].ctypes.data,
        out.ctypes.data,
        dims[5:].ctypes.data,
    )


@nb.njit(error_model="numpy", cache=True, nogil=True)
def blas_steps(
    sgemm,
    k,
    table,
    below,
    top,
    b_up,
    b_fc,
    S,
    C,
    logits,
    temperature,
    top_k,
    top_p,
    penalty,
    window,
    recent,
    seeds,
    counters,
    limits,
    out,
):
    """`_batched_steps` in one compiled call: the same k steps, products and order, with each
    product made by `sgemm` (a BLAS function pointer) instead of a PyTorch or numpy call, so that
    the k steps never come back to Python, nor need its lock (the GIL) between two products.

    below (L-1, H, 8H) and top (H, 4H + V) are `LSTMWeights.fused_below` and `fused_top`. The
    product of layer l at each step goes into one of two buffers by the step's parity: the one
    written at step t is read (as that layer's recurrent input) at step t + 1."""
    N = S.shape[0]
    L = below.shape[0] + 1
    H = top.shape[0]
    V = top.shape[1] - 4 * H
    dims = np.empty(6, np.int32)
    scalars = np.array([1.0, 0.0], np.float32)
    op = np.array([ord("N")], np.uint8)
    mid = np.empty((2, L - 1, N, 8 * H), np.float32)  # layers below the top, by parity
    last = np.empty((2, N, 4 * H + V), np.float32)  # the top layer (its logits after 4H), by parity
    # the recurrent products of the state the rows start from (logits are already known)
    for l in range(L - 1):
        _sgemm(sgemm, S[:, l * H : (l + 1) * H], below[l], mid[0, l], dims, scalars, op)
    _sgemm(sgemm, S[:, (L - 1) * H :], top, last[0], dims, scalars, op)
    for t in range(k):
        now, nxt = t % 2, (t + 1) % 2
        G0 = mid[now, 0] if L > 1 else last[now]
        lg = logits if t == 0 else last[now]
        sample_into_layer0(
            G0,
            table,
            S,
            C,
            lg,
            0 if t == 0 else 4 * H,
            b_fc,
            temperature,
            top_k,
            top_p,
            penalty,
            window,
            recent,
            seeds,
            counters,
            limits,
            t,
            out,
        )
        for l in range(L - 1):
            new = mid[nxt, l]
            _sgemm(sgemm, S[:, l * H : (l + 1) * H], below[l], new, dims, scalars, op)
            own = mid[now, l + 1] if l + 1 < L - 1 else last[now]
            lstm_cells(new, own, b_up[l], S, C, l + 1)
        _sgemm(sgemm, S[:, (L - 1) * H :], top, last[nxt], dims, scalars, op)
    if k > 0:
        logits[:] = last[k % 2][:, 4 * H : 4 * H + V]


# ---------------------------------------------------------------------------------------- threads
#
# Rows never interact, so `LSTMRows.advance` gives each worker thread a block of rows and every
# worker runs single-threaded: no synchronisation inside a call, where a threaded GEMM per step
# would meet at a barrier three times a step (and collapse when other processes share the cores).
# PyTorch's OpenMP and numpy's OpenBLAS both let a thread set its own thread count.

_THREAD_MIN_WORK = 1024  # characters per call below which one thread beats handing work off


_THREADS: list[int] = []  # set_threads' count, if it was called


def set_threads(n: int | None) -> None:
    """Blocks of rows `LSTMRows.advance` runs at once (one worker thread each), apart from
    PyTorch's own thread count; None: PyTorch's again. A server keeps PyTorch on one thread (the
    reference path's tiny products only lose from more) and gives the kernels every core: their
    workers never wait for each other inside a call, nor hold Python's lock."""
    _THREADS[:] = [] if n is None else [max(1, n)]


def _threads() -> int:
    """Threads to use: `set_threads`' count, else PyTorch's setting (the user's --threads), so
    one knob governs both."""
    return _THREADS[0] if _THREADS else max(1, torch.get_num_threads())


def _load_function(folder: str, patterns: tuple[str, ...], name: str, restype):
    """`name(int)` from the first shared library in `folder` that has it (already loaded by
    PyTorch or numpy, so this is the same copy they use), or None."""
    import ctypes
    import glob

    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(folder, pattern))):
            try:
                fn = getattr(ctypes.CDLL(path), name)
            except (OSError, AttributeError):
                continue
            fn.argtypes, fn.restype = [ctypes.c_int], restype
            return fn
    return None


_ONEDNN_MIN_FLOP = 4e6  # oneDNN's call costs ~12 µs more than numpy's; below this numpy wins


def _gemm(x: np.ndarray, W: np.ndarray, W_lin: torch.Tensor) -> np.ndarray:
    """x @ W for the batched step (x (N, K) a row-strided view of S): a C-contiguous float32 array.

    oneDNN through PyTorch for the large products: it uses AVX-512 on any CPU that has it, while
    numpy's OpenBLAS runs AVX2 kernels on AMD Zen 4/5 and MKL's sgemm is no faster there; oneDNN
    measured 1.3-1.6x faster for the lab model's shapes. (`_linear_pointwise` is the op PyTorch's
    own compiler emits for linear layers on the CPU.) numpy for small products and as fallback."""
    if 2 * x.shape[0] * x.shape[1] * W.shape[1] >= _ONEDNN_MIN_FLOP and _onednn_works():
        return torch.ops.mkldnn._linear_pointwise(
            torch.from_numpy(x), W_lin, None, "none", [], ""
        ).numpy()
    return x @ W


def _pack(lin: torch.Tensor) -> torch.Tensor:
    """`lin` (out, in) reordered once into oneDNN's blocked layout, which spares every product the
    reordering of its weight (measured 7-13% faster for the lab model's shapes, same results);
    `lin` itself where oneDNN is not used or cannot pack it."""
    if not _onednn_works():
        return lin
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(lin, _PACK_ROWS)
        x = torch.arange(8 * lin.shape[1], dtype=torch.float32).reshape(8, -1) / lin.shape[1]
        same = torch.allclose(
            torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
            torch.ops.mkldnn._linear_pointwise(x, lin, None, "none", [], ""),
            rtol=1e-5,
            atol=1e-5,
        )
    except (RuntimeError, AttributeError):
        return lin
    return packed if same else lin


_PACK_ROWS = 128  # the rows a batched block typically has (256 streams on 2 threads)


@functools.cache
def _onednn_works() -> bool:
    if not (
        hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
    ):
        return False
    x, W = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((3, 4), np.float32)
    try:
        y = torch.ops.mkldnn._linear_pointwise(
            torch.from_numpy(x), torch.from_numpy(W.T.copy()), None, "none", [], ""
        )
    except RuntimeError:
        return False
    return np.array_equal(y.numpy(), x @ W)


@functools.cache
def _blas_sgemm():
    """The Fortran `sgemm` of the BLAS inside PyTorch's CPU library (MKL on x86), as a ctypes
    function that `blas_steps` calls from compiled code without the GIL; None where the library
    has none, or its product is wrong (then the batched step calls PyTorch or numpy per product).
    Every row of its product does the same arithmetic whatever the number of rows (from 2 on;
    checked on this machine), so a stream's text does not depend on the size of its batch."""
    import ctypes

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        fn = ctypes.CDLL(path).sgemm
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = None, [ctypes.c_void_p] * 13
    rng = np.random.default_rng(0)
    S = rng.standard_normal((5, 14)).astype(np.float32)
    W, out = rng.standard_normal((7, 9)).astype(np.float32), np.empty((5, 9), np.float32)
    try:
        _sgemm(
            fn,
            S[:, 3:10],
            W,
            out,
            np.empty(6, np.int32),
            np.array([1, 0], np.float32),
            np.array([ord("N")], np.uint8),
        )
    except Exception:  # noqa: BLE001 - any failure means: not this way
        return None
    return fn if np.allclose(out, S[:, 3:10] @ W, rtol=1e-5, atol=1e-5) else None


def _mkl_single_thread() -> None:
    """One thread for MKL's products in the calling thread, if PyTorch's library has MKL."""
    import ctypes

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        lib.MKL_Set_Num_Threads_Local(ctypes.c_int(1))
    except (OSError, AttributeError):
        pass


class _Workers:
    """A few daemon threads for `LSTMRows.advance` (the kernels release the GIL)."""

    def __init__(self) -> None:
        import ctypes

        # PyTorch's OpenMP runtime (oneDNN GEMMs) and numpy's OpenBLAS: per-thread thread counts
        self._omp = _load_function(
            os.path.join(os.path.dirname(torch.__file__), "lib"),
            ("libgomp*", "libiomp5*", "libomp*"),
            "omp_set_num_threads",
            None,
        )
        self._blas = _load_function(
            os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs"),
            ("*openblas*",),
            "openblas_set_num_threads_local",
            ctypes.c_int,
        )
        # without a way to make a worker single-threaded: one thread, and threaded GEMMs
        self.usable = self._blas is not None and (self._omp is not None or not _onednn_works())
        self._pool = None
        self._size = 0
        self._lock = threading.Lock()

    def _init_thread(self) -> None:
        torch.ones(1 << 16).sum()  # PyTorch sets each thread's OpenMP count once, at its first op
        if self._omp is not None:
            self._omp(1)
        _mkl_single_thread()
        if self._blas is not None:
            self._blas(1)

    def run(self, tasks) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with self._lock:
            if self._size < len(tasks):
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._size = max(len(tasks), _threads())
                self._pool = ThreadPoolExecutor(self._size, "charlstm-gen", self._init_thread)
            for f in [self._pool.submit(t) for t in tasks]:
                f.result()


_WORKERS: list[_Workers] = []
_LOCAL = threading.local()  # `single_threaded`'s mark on a thread


def single_threaded() -> bool:
    """Make the calling thread's products single-threaded (PyTorch's OpenMP, MKL, OpenBLAS), as
    in the workers' threads, so that `LSTMRows.advance` runs a call of one block right here
    instead of handing it to a worker and waiting: a thread that steps its own rows (a server's
    engine thread, one per core) then needs no other thread, and no hand-over of Python's lock,
    per call. Returns False, changing nothing, where a thread cannot be made single-threaded."""
    workers = _workers()
    if not workers.usable:
        return False
    workers._init_thread()
    _LOCAL.single = True
    return True


def _workers() -> _Workers:
    if not _WORKERS:
        _WORKERS.append(_Workers())
        # A forked child has none of the parent's threads: it must start its own pool.
        os.register_at_fork(after_in_child=_WORKERS.clear)
    return _WORKERS[0]


def warm_up(weights: LSTMWeights | None = None) -> float:
    """Load (or, on the first run ever, compile) every kernel now and run both paths once, so that
    a server's first request pays for neither; returns the seconds it took.

    Numba compiles per argument type, not per shape, so any LSTM reuses what this loads, and once
    numba's cache holds the kernels this takes milliseconds. Given a served model's `weights`, the
    batched step also runs at that model's shapes (where oneDNN creates its GEMM kernels) and the
    worker threads start; without, a tiny throwaway model is used. The rows are throwaway too:
    no engine's state is touched. `charlstm serve` calls it through `Engine.warm_up` for every
    served model before it accepts requests."""
    import time

    from charlstm.generate.sampling import SamplingParams

    t0 = time.perf_counter()
    if weights is None:
        from charlstm.config import ModelConfig
        from charlstm.model import CharRNN

        tiny = ModelConfig(embedding_size=2, hidden_size=4, num_layers=2, vocab_size=3)
        weights = LSTMWeights.from_model(CharRNN(tiny).eval())
    rows = LSTMRows(weights)
    prompt = [i % weights.vocab_size for i in range(2)]
    params = SamplingParams(1.0, top_k=2, top_p=0.9, repetition_penalty=1.1)
    for n in (1, LSTMRows.batch_rows):  # the per-row kernels, then the batched step
        while len(rows) < n:
            rows.add(prompt, params, 7)
        rows.advance(2, np.full(n, 2))
    # The batched step without the BLAS pointer as well (what runs where PyTorch has none), so
    # that what a server has loaded does not depend on the machine.
    args = [getattr(rows, name) for name in LSTMRows._ROW_ARRAYS]
    _batched_steps(
        weights, 1, *args, np.ones(len(rows), np.int64), np.empty((len(rows), 1), np.int64)
    )
    return time.perf_counter() - t0
