"""The generation engine: many streams advanced together, one character (or a few) per step.

An :class:`Engine` holds the recurrent state of every active stream as rows of one batch. `add`
primes a new stream with its start text and appends its row; `step` draws the next character for
every row, applies each stream's stop rule, drops finished rows, and runs one batched model step.
Streams may join and leave between any two steps, which is what lets a server share one model step
among requests that arrive at different times (continuous batching). Each stream keeps its own
sampling parameters and its own counter-based seed, so its text does not depend on its neighbours.

`step(max_chars)` draws up to that many characters per stream in one call. That is what makes
generation fast: an LSTM on the CPU then runs all of them inside compiled code (`kernels`), and the
Python work per stream (decoding, stop rules) is paid once per step instead of once per character.
A step is three parts, `begin_step`, `StepCall.run` (the model's work) and `finish_step`, so that a
server can run the model's part in another thread while its event loop keeps serving.

A start text is run through the model once per `Prefix`, a piece at a time if the caller wants
(`prime(prefix, max_chars)`), and any number of streams start from its state (`add(request,
prefix)`): the samples of one request share it, and a server can spread a long start text over
several steps of the streams already running. One stream's failure stays its own: `add` changes
nothing when it raises, and a stream that fails in `step` ends with its `StepOutput.error` while
the others go on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from charlstm.errors import UserError
from charlstm.generate.sampling import SamplingParams, StopRule, sample_step


@dataclass
class Request:
    prompt: Sequence[int]
    length: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0  # a per-stream seed, e.g. from sampling.stream_seeds
    stop: StopRule = field(default_factory=StopRule)

    def __post_init__(self) -> None:
        if self.length < 1:
            raise UserError(f"length must be >= 1, got {self.length}")
        if len(self.prompt) == 0:
            raise UserError(
                "the start text is empty after removing unknown characters; give a start text"
            )


@dataclass(eq=False)
class Prefix:
    """A start text run through the model, a piece at a time (`Engine.prime`). Once `complete`, any
    number of streams start from its state (`Engine.add(request, prefix)`) without running the text
    again. The state belongs to the engine that primed it; another engine starts it over."""

    prompt: np.ndarray  # (T,) int64 character ids
    done: int = 0  # characters run through so far
    state: Any = None  # compiled: (S, C, logits) of one row; reference: (logits, hidden)
    owner: Any = None  # the engine whose state this is

    def __post_init__(self) -> None:
        self.prompt = np.asarray(self.prompt, dtype=np.int64).reshape(-1)

    @property
    def complete(self) -> bool:
        return self.done >= len(self.prompt)

    def starts(self, request: Request) -> bool:
        """Whether `request` continues this start text."""
        return np.array_equal(self.prompt, np.asarray(request.prompt, dtype=np.int64))


@dataclass
class _Stream:
    request: Request
    drawn: int = 0  # characters drawn so far (the RNG counter)
    pending: str = ""  # text generated but not handed out yet (a possible start of a stop)
    tail: str = ""  # the last characters kept, enough to match a stop string across steps
    recent: list[int] = field(default_factory=list)  # for the repetition penalty (reference path)
    newlines: int = 0
    stanzas: int = 0
    stanza_has_text: bool = False

    @property
    def tail_size(self) -> int:
        return max([1] + [len(s) - 1 for s in self.request.stop.stop])


@dataclass
class StepOutput:
    text: str  # new text for this stream (may be empty when a stop string was cut away)
    finished: bool
    drawn: int = 1  # characters drawn for it in this step (`Engine.step(max_chars)` may draw more)
    error: Exception | None = None  # why this stream failed in this step (it is finished)


@dataclass(eq=False)
class StepCall:
    """The model's part of one `Engine.step` (`Engine.begin_step` makes it): `run` draws every
    stream's characters, in compiled code or module calls, and may run in another thread, since it
    only reads and writes the engine's batch, which nothing else touches until `finish_step`."""

    engine: Engine
    max_chars: int
    streams: list[_Stream]
    limits: np.ndarray  # (N,) characters each row may draw
    saved: Any  # the batch as it was, to step each row again alone if the batch fails
    ids: np.ndarray | None = None  # (N, max_chars) the ids drawn, -1 past a row's limit
    failed: dict[int, Exception] = field(default_factory=dict)  # row → why it failed alone

    @torch.inference_mode()
    def run(self) -> None:
        engine = self.engine
        try:
            self.ids = engine._advance(self.max_chars, self.limits)
        except Exception:  # noqa: BLE001 - find the stream that fails: each row again, alone
            self.ids, self.failed = engine._advance_alone(self.max_chars, self.limits, self.saved)


def _stop_cut(s: _Stream, new: str) -> int | None:
    """Feed new text to a stream's stop rule; where to cut `new` if the rule fires in it (negative:
    the cut falls in the held-back text before it).

    Incremental twin of `StopRule.cut`: it fires at the first character after which `cut` of the
    text so far is not None, and cuts at the same place; the work is per stop string and per
    newline, with no rescan of the text."""
    rule = s.request.stop
    fired: tuple[int, int] | None = None  # (end of the event in `new`, cut), the earliest end wins
    if rule.stop:
        window = s.tail + new
        base = len(s.tail)
        for stop in rule.stop:
            i = window.find(stop)  # an occurrence inside `tail` alone would have fired already
            if i >= 0:
                fired = min(fired or (len(new) + 1, 0), (i + len(stop) - base, i - base))
    last = 0  # start of the text not yet scanned for stanza content
    pos = new.find("\n")
    while pos >= 0 and (fired is None or pos < fired[0]):
        if new[last:pos].strip():
            s.stanza_has_text = True
        last = pos + 1
        s.newlines += 1
        cuts = []
        if rule.max_lines is not None and s.newlines == rule.max_lines:
            cuts.append(pos)
        prev = new[pos - 1] if pos > 0 else s.tail[-1:]
        if prev == "\n" and s.stanza_has_text:
            s.stanzas += 1
            s.stanza_has_text = False
            if rule.max_stanzas is not None and s.stanzas == rule.max_stanzas:
                cuts.append(pos - 1)
        if cuts:
            fired = min(fired or (len(new) + 1, 0), (pos + 1, min(cuts)))
            break
        pos = new.find("\n", pos + 1)
    if fired is None and new[last:].strip():
        s.stanza_has_text = True
    s.tail = (s.tail + new)[-s.tail_size :]
    return None if fired is None else fired[1]


def _held_back(s: _Stream) -> int:
    """How many trailing characters to hold back because they may be the start of a stop: streamed
    text cannot be taken back once a client has it. `s.tail` ends the text."""
    rule, text = s.request.stop, s.tail
    held = 0
    for stop in rule.stop:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    if rule.max_stanzas is not None and s.stanza_has_text and text.endswith("\n"):
        held = max(held, 1)  # a second newline would end the stanza before this one
    return held


def _codepoints(
    decode: Callable[[Sequence[int]], str], vocab_size: int | None
) -> np.ndarray | None:
    """Each id's code point, when `decode` maps ids to single characters: then a whole row of ids
    decodes with one numpy take and one bytes.decode instead of a Python call per character."""
    if not vocab_size:
        return None
    try:
        chars = decode(list(range(vocab_size)))
    except Exception:  # noqa: BLE001 - any decode we cannot probe just takes the general path
        return None
    if not isinstance(chars, str) or len(chars) != vocab_size:
        return None
    return np.array([ord(c) for c in chars], dtype="<u4")


class Engine:
    """Batched, incremental generation over a `CharRNN`-like model.

    An LSTM on the CPU runs in compiled kernels (`charlstm.generate.kernels`, numba); any other
    model, CUDA, or a process where numba cannot be imported runs the reference path: one module
    call per step and `sampling.sample_step`. Both draw the same characters from the same logits.
    `fast=False` forces the reference path, `fast=True` the compiled one."""

    def __init__(
        self,
        model: torch.nn.Module,
        decode: Callable[[Sequence[int]], str],
        device: torch.device | str = "cpu",
        *,
        fast: bool | None = None,
        threads: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.decode = decode
        self.device = torch.device(device)
        self.ids: list[int] = []  # stream id of each batch row
        self.streams: dict[int, _Stream] = {}
        self.logits: torch.Tensor | None = None  # reference path: (N, V) next-character logits
        self.hidden = None  # reference path: per-layer state with N rows in dim 1
        self._next_id = 0
        self.primed_chars = 0  # characters run through `prime`, all start texts together
        self._rows = _compiled_rows(model, self.device) if fast is not False else None
        if fast and self._rows is None:
            raise UserError("the compiled generator needs numba and an LSTM on the CPU")
        if self._rows is not None:
            self._rows.threads = threads  # threads a call uses at most; None: the kernels' own
        fc = getattr(model, "fc", None)
        self.vocab_size: int | None = getattr(fc, "out_features", None)  # else known once primed
        self._codepoints = _codepoints(decode, self.vocab_size)

    @property
    def active(self) -> int:
        return len(self.ids)

    @property
    def compiled(self) -> bool:
        """Whether this engine runs the compiled kernels (else the reference module calls)."""
        return self._rows is not None

    def warm_up(self) -> float:
        """Load the compiled kernels and run them once on this model's weights, on throwaway rows
        (this engine's streams are untouched), so that the first request does not pay for it;
        returns the seconds it took. The reference path has nothing to load: 0.0."""
        if self._rows is None:
            return 0.0
        from charlstm.generate import kernels

        return kernels.warm_up(self._rows.w)

    @torch.inference_mode()
    def prime(self, prefix: Prefix, max_chars: int | None = None) -> int:
        """Run up to `max_chars` more characters of `prefix`'s start text through the model (all of
        them by default); returns how many it ran. The batch is untouched."""
        if prefix.owner is not self:  # primed by another engine (or never): start over
            prefix.done, prefix.state, prefix.owner = 0, None, self
        end = len(prefix.prompt)
        if max_chars is not None:
            end = min(end, prefix.done + max(0, max_chars))
        piece = prefix.prompt[prefix.done : end]
        if len(piece) == 0:
            return 0
        if self._rows is not None:
            prefix.state = self._rows.prime(piece, prefix.state)
        else:
            x = torch.from_numpy(piece).to(self.device).view(1, -1)
            logits, hidden = self.model(x, None if prefix.state is None else prefix.state[1])
            prefix.state = (logits[:, -1], hidden)
            self.vocab_size = self.vocab_size or logits.shape[-1]
        prefix.done = end
        self.primed_chars += len(piece)
        return len(piece)

    @torch.inference_mode()
    def add(self, request: Request, prefix: Prefix | None = None) -> int:
        """Add a stream to the batch, starting from `prefix` (its start text, already primed by
        this engine) or else priming its start text now; returns its id. When it raises (e.g.
        `UserError` for sampling settings this model cannot take) nothing has changed."""
        if self.vocab_size is not None:
            request.params.check_vocabulary(self.vocab_size)
        if prefix is None:
            prefix = Prefix(request.prompt)
            self.prime(prefix)
            request.params.check_vocabulary(self.vocab_size)  # known now on every path
        elif prefix.owner is not self or not prefix.complete or not prefix.starts(request):
            raise ValueError("add a stream from a complete prefix of its own start text")
        sid = self._next_id
        if self._rows is not None:
            self._rows.add(request.prompt, request.params, request.seed, prefix.state)
        else:
            row_logits, hidden = prefix.state
            if self.logits is None:
                self.logits, self.hidden = row_logits, hidden
            else:
                logits = torch.cat([self.logits, row_logits])
                self.logits, self.hidden = logits, _cat_hidden(self.hidden, hidden)
        self._next_id += 1
        recent = list(request.prompt)[-request.params.repetition_window :]
        self.streams[sid] = _Stream(request, recent=recent)
        self.ids.append(sid)
        return sid

    def cancel(self, sid: int) -> None:
        """Drop a stream (e.g. its client went away); its row is freed at once."""
        if sid in self.streams:
            self._keep([i for i, s in enumerate(self.ids) if s != sid])

    def _keep(self, rows: list[int]) -> None:
        kept = {self.ids[i] for i in rows}
        for sid in self.ids:
            if sid not in kept:
                self.streams.pop(sid, None)
        if len(rows) == len(self.ids):
            return
        self.ids = [self.ids[i] for i in rows]
        if self._rows is not None:
            self._rows.keep(rows)
        elif not rows:
            self.logits, self.hidden = None, None
        else:
            index = torch.tensor(rows, device=self.device)
            self.logits = self.logits.index_select(0, index)
            self.hidden = _select_hidden(self.hidden, index)

    def _sample(self, t: int = 0) -> np.ndarray:
        """Reference path: each row's next character, the t-th of this step."""
        logits = self.logits.double().cpu().numpy()
        out = np.empty(len(self.ids), dtype=np.int64)
        groups: dict[SamplingParams, list[int]] = {}
        for row, sid in enumerate(self.ids):
            groups.setdefault(self.streams[sid].request.params, []).append(row)
        for params, rows in groups.items():
            streams = [self.streams[self.ids[r]] for r in rows]
            seeds = np.array([s.request.seed for s in streams], dtype=np.uint64)
            counters = np.array([s.drawn + t for s in streams], dtype=np.uint64)
            recent = None
            if params.repetition_penalty != 1.0:
                W = params.repetition_window
                recent = np.full((len(rows), W), -1, dtype=np.int64)
                for k, s in enumerate(streams):
                    tail = s.recent[-W:]
                    if tail:
                        recent[k, W - len(tail) :] = tail
            out[rows] = sample_step(logits[rows], params, seeds, counters, recent)
        return out

    def _reference_advance(self, k: int, limits: np.ndarray) -> np.ndarray:
        """Reference path: k steps of sample_step and one module call each."""
        out = np.full((len(self.ids), k), -1, dtype=np.int64)
        for t in range(k):
            idx = self._sample(t)
            for row, sid in enumerate(self.ids):
                if t < limits[row]:
                    out[row, t] = idx[row]
                    s = self.streams[sid]
                    if s.request.params.repetition_penalty != 1.0:
                        s.recent.append(int(idx[row]))
                        del s.recent[: -s.request.params.repetition_window]
            if t + 1 < k or (limits == k).any():  # the last module call only feeds rows that go on
                x = torch.from_numpy(idx).to(self.device).view(-1, 1)
                out_logits, self.hidden = self.model(x, self.hidden)
                self.logits = out_logits[:, -1]
        return out

    def _decode_block(self, ids: np.ndarray) -> str | None:
        """All rows of `ids` (N, k) as one string of N·k characters (-1 decodes to some character,
        cut away by the caller), with one take and one decode for the whole step; None where ids
        do not map to single code points."""
        if self._codepoints is None:
            return None
        return self._codepoints[ids].tobytes().decode("utf-32-le")

    def _decode(self, ids: np.ndarray) -> str:
        if self._codepoints is not None:
            return self._codepoints[ids].tobytes().decode("utf-32-le")
        return self.decode(ids.tolist())

    def step(self, max_chars: int = 1) -> dict[int, StepOutput]:
        """Advance every active stream by one character, or by up to `max_chars` in one call
        (far less overhead per character; a stream that stops early wastes the rest of its step).

        A stream that fails (its model step, its decoding or its stop rule) is finished with the
        exception in its `StepOutput.error`, and the others go on as if it had never been there:
        when the batched step raises, every row is stepped again alone from where it was.

        The same as `begin_step`, `StepCall.run` and `finish_step` one after the other: a caller
        that runs the model's part in another thread (a server's event loop) calls those."""
        call = self.begin_step(max_chars)
        if call is None:
            return {}
        call.run()
        return self.finish_step(call)

    def begin_step(self, max_chars: int = 1) -> StepCall | None:
        """The first part of `step`: what each stream may draw; None when no stream is active.
        Until `finish_step`, nothing but the returned call's `run` may use this engine."""
        if not self.ids:
            return None
        if max_chars < 1:
            raise UserError(f"max_chars must be >= 1, got {max_chars}")
        streams = [self.streams[sid] for sid in self.ids]
        limits = np.array([min(max_chars, s.request.length - s.drawn) for s in streams], np.int64)
        return StepCall(self, max_chars, streams, limits, self._save())

    def finish_step(self, call: StepCall) -> dict[int, StepOutput]:
        """The last part of `step`: decode what `call.run` drew, apply the stop rules, drop the
        streams that finished or failed, and return each stream's output."""
        ids, failed, limits = call.ids, call.failed, call.limits
        if ids is None:
            raise ValueError("finish a step whose call has run")
        outputs: dict[int, StepOutput] = {}
        keep: list[int] = []
        k = ids.shape[1]
        block = self._decode_block(ids)  # every row's k characters, one after the other
        for row, (sid, s) in enumerate(zip(self.ids, call.streams)):
            n = int(limits[row])
            try:
                if row in failed:
                    raise failed[row]
                new = (
                    block[row * k : row * k + n]
                    if block is not None
                    else self._decode(ids[row, :n])
                )
                outputs[sid] = _hand_out(s, new, n)
            except Exception as exc:  # noqa: BLE001 - this stream's own failure ends it alone
                outputs[sid] = StepOutput("", True, 0, exc)
            if not outputs[sid].finished:
                keep.append(row)
        self._keep(keep)
        return outputs

    def _advance(self, k: int, limits: np.ndarray) -> np.ndarray:
        if self._rows is not None:
            return self._rows.advance(k, limits)
        return self._reference_advance(k, limits)

    def _save(self):
        """What a step changes in place, to step again from (the compiled rows' arrays are
        written in place; the reference path's tensors are replaced, not changed)."""
        if self._rows is not None:
            return self._rows.save()
        return self.logits, self.hidden, [list(self.streams[sid].recent) for sid in self.ids]

    def _advance_alone(
        self, k: int, limits: np.ndarray, saved
    ) -> tuple[np.ndarray, dict[int, Exception]]:
        """After a failed batched step: back to where it started, then each row alone; returns the
        ids and the failure of each row that fails alone (its state is then left as it was)."""
        N = len(self.ids)
        out = np.full((N, k), -1, dtype=np.int64)
        failed: dict[int, Exception] = {}
        if self._rows is not None:
            self._rows.restore(saved)
            for r in range(N):
                try:
                    self._rows.advance_row(r, k, limits, out)
                except Exception as exc:  # noqa: BLE001 - recorded for that row
                    failed[r] = exc
            return out, failed
        logits, hidden, recents = saved
        ids = self.ids
        new_logits, new_hidden = [], []
        try:
            for r, sid in enumerate(ids):
                self.streams[sid].recent = list(recents[r])
                index = torch.tensor([r], device=self.device)
                self.ids = [sid]
                self.logits, self.hidden = logits[r : r + 1], _select_hidden(hidden, index)
                try:
                    out[r] = self._reference_advance(k, limits[r : r + 1])[0]
                except Exception as exc:  # noqa: BLE001 - recorded for that row
                    failed[r] = exc
                    self.logits, self.hidden = logits[r : r + 1], _select_hidden(hidden, index)
                new_logits.append(self.logits)
                new_hidden.append(self.hidden)
        finally:
            self.ids = ids
        self.logits = torch.cat(new_logits)
        self.hidden = new_hidden[0]
        for h in new_hidden[1:]:
            self.hidden = _cat_hidden(self.hidden, h)
        return out, failed


def _hand_out(s: _Stream, new: str, drawn: int) -> StepOutput:
    """Give a stream its newly drawn text: apply its stop rule, and hold back what a stop string
    could still claim (streamed text cannot be taken back once a client has it)."""
    s.drawn += drawn
    if not s.request.stop.active:  # nothing to cut or hold back: the common case, made cheap
        return StepOutput(new, s.drawn >= s.request.length, drawn)
    buf = s.pending + new
    cut = _stop_cut(s, new) if s.request.stop.active else None
    finished = cut is not None or s.drawn >= s.request.length
    if cut is not None:
        buf = buf[: max(0, len(s.pending) + cut)]
    held = 0 if finished else min(_held_back(s), len(buf))
    s.pending = buf[len(buf) - held :] if held else ""
    return StepOutput(buf[: len(buf) - held], finished, drawn)


def runs_compiled(model: torch.nn.Module, device: torch.device | str) -> bool:
    """Whether an `Engine` of this model on `device` runs the compiled kernels (`Engine.compiled`),
    known without building one."""
    try:
        from charlstm.generate import kernels
    except ImportError:  # numba is missing: the reference path still works
        return False
    return kernels.supports(model, torch.device(device))


def _compiled_rows(model: torch.nn.Module, device: torch.device):
    """The compiled path's rows for this model, or None where it does not apply."""
    if not runs_compiled(model, device):
        return None
    from charlstm.generate import kernels

    return kernels.LSTMRows(kernels.LSTMWeights.from_model(model))


def _cat_hidden(a, b):
    if isinstance(a, tuple):
        return tuple(torch.cat([x, y], dim=1) for x, y in zip(a, b))
    return torch.cat([a, b], dim=1)


def _select_hidden(h, index: torch.Tensor):
    if isinstance(h, tuple):
        return tuple(x.index_select(1, index) for x in h)
    return h.index_select(1, index)


def generate_stream(
    model,
    prompts: Sequence[Sequence[int]],
    length: int,
    params: SamplingParams,
    seeds: np.ndarray,
    decode,
    stop: StopRule | None = None,
    device: torch.device | str = "cpu",
    max_chars: int = 64,
    fast: bool | None = None,
) -> Iterator[dict[int, StepOutput]]:
    """Run N streams to completion, yielding each step's outputs (stream index → StepOutput).

    Each step draws up to `max_chars` characters per stream: 64 keeps the per-step Python work
    small next to the arithmetic while text still arrives every fraction of a millisecond."""
    engine = Engine(model, decode, device, fast=fast)
    prefixes: dict[tuple[int, ...], Prefix] = {}  # equal start texts are primed once
    for prompt, seed in zip(prompts, seeds):
        request = Request(prompt, length, params, int(seed), stop or StopRule())
        prefix = prefixes.setdefault(tuple(prompt), Prefix(prompt))
        if not prefix.complete:
            engine.prime(prefix)
        engine.add(request, prefix)
    while engine.active:
        outputs = engine.step(max_chars)
        for out in outputs.values():
            if out.error is not None:
                raise out.error
        yield outputs
