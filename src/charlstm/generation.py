"""The generation engine: many streams advanced together, one character per step.

An :class:`Engine` holds the recurrent state of every active stream as rows of one batch. `add`
primes a new stream with its start text and appends its row; `step` draws the next character for
every row, applies each stream's stop rule, drops finished rows, and runs one batched model step.
Streams may join and leave between any two steps, which is what lets a server share one model step
among requests that arrive at different times (continuous batching). Each stream keeps its own
sampling parameters and its own counter-based seed, so its text does not depend on its neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from charlstm.errors import UserError
from charlstm.sampling import SamplingParams, StopRule, sample_step


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
            raise UserError("the start text is empty after removing unknown characters; give a start text")


@dataclass
class _Stream:
    request: Request
    generated: str = ""
    emitted: int = 0  # length of `generated` already handed out
    drawn: int = 0  # characters drawn so far (the RNG counter)
    recent: list[int] = field(default_factory=list)
    newlines: int = 0
    stanzas: int = 0
    stanza_has_text: bool = False


@dataclass
class StepOutput:
    text: str  # new text for this stream (may be empty when a stop string was cut away)
    finished: bool


def _held_back(s: _Stream) -> int:
    """How many trailing characters to hold back because they may be the start of a stop string:
    streamed text cannot be taken back once a client has it."""
    text = s.generated
    held = 0
    for stop in s.request.stop.stop:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def _stop_cut(s: _Stream, ch: str) -> int | None:
    """Feed one character to a stream's stop rule; the length of text to keep if it fires.

    Incremental twin of `StopRule.cut`: constant work per character instead of rescanning the text."""
    rule = s.request.stop
    text = s.generated  # already includes ch
    pos = len(text) - 1
    cuts = []
    for stop in rule.stop:
        if text.endswith(stop):
            cuts.append(len(text) - len(stop))
    if ch == "\n":
        s.newlines += 1
        if rule.max_lines is not None and s.newlines == rule.max_lines:
            cuts.append(pos)
        if pos > 0 and text[pos - 1] == "\n" and s.stanza_has_text:
            s.stanzas += 1
            s.stanza_has_text = False
            if rule.max_stanzas is not None and s.stanzas == rule.max_stanzas:
                cuts.append(pos - 1)
    elif not ch.isspace():
        s.stanza_has_text = True
    return min(cuts) if cuts else None


class Engine:
    """Batched, incremental generation over a `CharRNN`-like model."""

    def __init__(self, model: torch.nn.Module, decode: Callable[[Sequence[int]], str],
                 device: torch.device | str = "cpu") -> None:
        self.model = model.eval()
        self.decode = decode
        self.device = torch.device(device)
        self.ids: list[int] = []  # stream id of each batch row
        self.streams: dict[int, _Stream] = {}
        self.logits: torch.Tensor | None = None  # (N, V) next-character logits per row
        self.hidden = None  # per-layer state with N rows in dim 1
        self._next_id = 0

    @property
    def active(self) -> int:
        return len(self.ids)

    @torch.inference_mode()
    def add(self, request: Request) -> int:
        """Prime a stream with its start text and add it to the batch; returns its id."""
        x = torch.tensor([list(request.prompt)], dtype=torch.long, device=self.device)
        logits, hidden = self.model(x)
        sid = self._next_id
        self._next_id += 1
        self.streams[sid] = _Stream(request, recent=list(request.prompt)[-request.params.repetition_window:])
        self.ids.append(sid)
        row_logits = logits[:, -1]
        if self.logits is None:
            self.logits, self.hidden = row_logits, hidden
        else:
            self.logits = torch.cat([self.logits, row_logits])
            self.hidden = _cat_hidden(self.hidden, hidden)
        return sid

    def cancel(self, sid: int) -> None:
        """Drop a stream (e.g. its client went away); its row is freed at once."""
        if sid in self.streams:
            self._keep([i for i, s in enumerate(self.ids) if s != sid])

    def _keep(self, rows: list[int]) -> None:
        for i, sid in enumerate(self.ids):
            if i not in set(rows):
                self.streams.pop(sid, None)
        if not rows:
            self.ids, self.logits, self.hidden = [], None, None
            return
        if len(rows) == len(self.ids):
            return
        index = torch.tensor(rows, device=self.device)
        self.ids = [self.ids[i] for i in rows]
        self.logits = self.logits.index_select(0, index)
        self.hidden = _select_hidden(self.hidden, index)

    def _sample(self) -> np.ndarray:
        logits = self.logits.double().cpu().numpy()
        out = np.empty(len(self.ids), dtype=np.int64)
        groups: dict[SamplingParams, list[int]] = {}
        for row, sid in enumerate(self.ids):
            groups.setdefault(self.streams[sid].request.params, []).append(row)
        for params, rows in groups.items():
            streams = [self.streams[self.ids[r]] for r in rows]
            seeds = np.array([s.request.seed for s in streams], dtype=np.uint64)
            counters = np.array([s.drawn for s in streams], dtype=np.uint64)
            recent = None
            if params.repetition_penalty != 1.0:
                W = params.repetition_window
                recent = np.full((len(rows), W), -1, dtype=np.int64)
                for k, s in enumerate(streams):
                    tail = s.recent[-W:]
                    if tail:
                        recent[k, W - len(tail):] = tail
            out[rows] = sample_step(logits[rows], params, seeds, counters, recent)
        return out

    @torch.inference_mode()
    def step(self) -> dict[int, StepOutput]:
        """Advance every active stream by one character."""
        if not self.ids:
            return {}
        idx = self._sample()
        outputs: dict[int, StepOutput] = {}
        keep: list[int] = []
        for row, sid in enumerate(self.ids):
            s = self.streams[sid]
            ch = self.decode([idx[row]])
            s.generated += ch
            s.drawn += 1
            if s.request.params.repetition_penalty != 1.0:
                s.recent.append(int(idx[row]))
                del s.recent[: -s.request.params.repetition_window]
            cut = _stop_cut(s, ch) if s.request.stop.active else None
            if cut is not None:
                s.generated = s.generated[:cut]
            finished = cut is not None or s.drawn >= s.request.length
            end = len(s.generated) if finished else len(s.generated) - _held_back(s)
            outputs[sid] = StepOutput(s.generated[s.emitted:end], finished)
            s.emitted = max(s.emitted, end)
            if not finished:
                keep.append(row)
        self._keep(keep)
        if self.ids:
            x = torch.from_numpy(idx[keep]).to(self.device).view(-1, 1)
            out, self.hidden = self.model(x, self.hidden)
            self.logits = out[:, -1]
        return outputs


def _cat_hidden(a, b):
    if isinstance(a, tuple):
        return tuple(torch.cat([x, y], dim=1) for x, y in zip(a, b))
    return torch.cat([a, b], dim=1)


def _select_hidden(h, index: torch.Tensor):
    if isinstance(h, tuple):
        return tuple(x.index_select(1, index) for x in h)
    return h.index_select(1, index)


def generate_stream(model, prompts: Sequence[Sequence[int]], length: int, params: SamplingParams,
                    seeds: np.ndarray, decode, stop: StopRule | None = None,
                    device: torch.device | str = "cpu") -> Iterator[dict[int, StepOutput]]:
    """Run N streams to completion, yielding each step's outputs (stream index → StepOutput)."""
    engine = Engine(model, decode, device)
    for prompt, seed in zip(prompts, seeds):
        engine.add(Request(prompt, length, params, int(seed), stop or StopRule()))
    while engine.active:
        yield engine.step()
