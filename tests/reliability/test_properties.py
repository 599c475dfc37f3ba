"""Property tests over the public surface: any input gives a valid result or the documented error.

Hypothesis draws corpora of arbitrary Unicode (emoji, combining marks, right-to-left text, NUL,
CR line ends, byte-order marks, and lone surrogates put in the file as invalid or escaped bytes),
arbitrary start texts and arbitrary sampling parameters. Every call must either return a result
that meets its contract or raise `UserError` (whose message is one line); any other exception is a
bug. Each example is counted in the "bad inputs handled" figure.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import charlstm
from charlstm.data.corpus import read_text
from charlstm.data.vocabulary import Vocabulary
from charlstm.errors import UserError
from charlstm.generate.sampling import SamplingParams, next_token_probs, sample_step, stream_seeds
from tests.helpers import CORPUS_TEXT, TALLY, quiet, tiny_regularised_config

pytestmark = pytest.mark.reliability

SPECIAL = [
    "😀",
    "👩‍👩‍👧",
    "🏳️‍🌈",  # emoji, with zero-width joiners and variation selectors
    "e\u0301",
    "\u0301",
    "ё",
    "\u0308\u0308",  # combining marks, also with nothing to combine with
    "שלום",
    "مرحبا",
    "\u202e",
    "\u200f",  # right-to-left text and direction overrides
    "\x00",
    "\r",
    "\r\n",
    "\n\n",
    "\t",
    "\ufeff",
    "\u2028",
    "\x85",
    " ",  # NUL, line ends, BOM
    "\ud800",
    "\udfff",
    "\udc80",  # lone surrogates
    "漢字",
    "\U0010ffff",
    "\ufffd",
]
pieces = (
    st.sampled_from(SPECIAL)
    | st.text(max_size=4)
    | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
)
texts = st.lists(pieces, max_size=12).map("".join)
F32_MAX = float(np.finfo(np.float32).max)
SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def _handled(ok_or_error) -> None:
    """Count one example; `ok_or_error` is True (valid result) or the UserError raised."""
    ok = ok_or_error is True or (
        isinstance(ok_or_error, UserError) and "\n" not in str(ok_or_error)
    )
    TALLY.handled(ok, valid=ok_or_error is True)
    assert ok, ok_or_error


def _write_corpus(path: Path, text: str, how: str) -> str:
    """Put `text` in `path` as bytes; returns the encoding to read it with."""
    if how == "utf-8 with surrogates as invalid bytes":
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        return "utf-8"
    if how == "surrogateescape bytes":  # U+DC80..U+DCFF become the raw bytes 0x80..0xFF
        try:
            path.write_bytes(text.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:
            path.write_bytes(text.encode("utf-8", "surrogatepass"))
        return "utf-8"
    if how == "utf-16":
        path.write_bytes(text.encode("utf-16", "surrogatepass"))
        return "utf-16"
    if how == "escaped (unicode_escape)":
        path.write_bytes(text.encode("unicode_escape"))
        return "unicode_escape"
    path.write_bytes(text.encode("cp1251", "replace"))
    return "cp1251"


def mostly(valid, anything):
    """Nine draws in ten from `valid`, else from `anything`: every parameter is usually fine, so
    that examples get past validation and exercise the sampler, with some garbage in each."""
    return st.integers(0, 9).flatmap(lambda k: anything if k == 0 else valid)


known = st.text(st.sampled_from(sorted(set(CORPUS_TEXT))), min_size=1, max_size=8)
# Text with every kind of special character but lone surrogates (which are refused by design).
clean = st.lists(
    st.sampled_from([c for c in SPECIAL if not 0xD800 <= ord(c[0]) <= 0xDFFF])
    | st.text(st.characters(exclude_categories=["Cs"]), max_size=4),
    min_size=1,
    max_size=12,
).map("".join)

WAYS = [
    "utf-8 with surrogates as invalid bytes",
    "surrogateescape bytes",
    "utf-16",
    "escaped (unicode_escape)",
    "cp1251",
]
_counter = itertools.count()


@settings(max_examples=300, deadline=None, suppress_health_check=SUPPRESS)
@given(unit=texts, reps=st.integers(1, 50), how=st.sampled_from(WAYS))
def test_any_corpus_file_reads_as_clean_text_or_a_user_error(tmp_path, unit, reps, how) -> None:
    """Reading a corpus file gives text with LF line ends and no lone surrogate (so it can
    be stored in a checkpoint and printed), whose vocabulary round-trips; or a `UserError`."""
    path = tmp_path / f"corpus-{next(_counter)}.txt"
    encoding = _write_corpus(path, unit * reps, how)
    try:
        text = read_text(path, encoding)
    except UserError as exc:
        return _handled(exc)
    assert "\r" not in text and text.strip()
    text.encode("utf-8")  # no lone surrogate
    vocab = Vocabulary.from_text(text)
    assert vocab.decode(vocab.encode(text)) == text
    _handled(True)


@settings(max_examples=20, deadline=None, suppress_health_check=SUPPRESS)
@given(
    unit=mostly(clean, texts),
    reps=mostly(st.sampled_from([40, 120]), st.sampled_from([1, 3])),
    how=mostly(st.sampled_from(WAYS[:2]), st.sampled_from(WAYS[3:])),
    start=mostly(clean, texts),
    batching=st.sampled_from(["stream", "random"]),
)
def test_training_on_any_corpus_works_or_is_a_user_error(
    tmp_path, unit, reps, how, start, batching
) -> None:
    """`charlstm.train` on an arbitrary corpus either trains (and the run then loads, generates
    from the start text or refuses it, and evaluates its own text) or raises `UserError`."""
    n = next(_counter)
    path = tmp_path / f"corpus-{n}.txt"
    encoding = _write_corpus(path, unit * reps, how)
    config = tiny_regularised_config(
        path,
        encoding=encoding,
        batching=batching,
        max_steps=2,
        eval_interval=1,
        batch_size=2,
        seq_len=4,
    )
    try:
        run = charlstm.train(config, tmp_path / f"run-{n}", progress=False, log=quiet)
    except UserError as exc:
        return _handled(exc)
    model = charlstm.load(run, device="cpu")
    try:
        out = model.generate(start or " ", length=5, seed=n)
        assert len(out) == 1 and isinstance(out[0], str)
        out[0].encode("utf-8")
    except UserError:
        pass
    metrics = model.evaluate(read_text(path, encoding))
    assert math.isfinite(metrics["loss"])
    _handled(True)


# --------------------------------------------------------------------------------------- generation

floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 5e-324, 1e-310, 1e-300, 1e-100, 1e-6, 0.3, 1.0, 2.0, 1e100, 1e308]
)


params = {
    "start_text": mostly(known, texts) | st.lists(mostly(known, texts), max_size=3),
    "length": mostly(st.integers(1, 25), st.integers(-2, 0)),
    "temperature": mostly(st.floats(0, 3) | st.just(0.0), floats),
    "top_k": mostly(st.none() | st.integers(0, 80), st.integers(-2, -1)),
    "top_p": mostly(st.none() | st.floats(0.01, 1.0), floats),
    "repetition_penalty": mostly(st.just(1.0) | st.floats(1, 5), floats),
    "num_samples": mostly(st.integers(1, 3), st.integers(-1, 0)),
    "seed": st.none() | st.integers(-(2**70), 2**70),
    "stop": mostly(st.lists(known, max_size=2), st.lists(texts, max_size=2)),
    "max_lines": mostly(st.none() | st.integers(1, 3), st.integers(-1, 0)),
    "max_stanzas": mostly(st.none() | st.integers(1, 2), st.integers(-1, 0)),
    "unknown": mostly(st.sampled_from(["error", "skip"]), st.just("ignore")),
}


@settings(max_examples=300, deadline=None, suppress_health_check=SUPPRESS)
@given(**params)
def test_generate_with_any_arguments_gives_text_or_a_user_error(
    trained_model,
    start_text,
    length,
    temperature,
    top_k,
    top_p,
    repetition_penalty,
    num_samples,
    seed,
    stop,
    max_lines,
    max_stanzas,
    unknown,
) -> None:
    """`TextModel.generate` with any start text and sampling parameters returns one text per stream,
    each the (normalised, filtered) start text followed by at most `length` characters of the
    vocabulary, the same for the same seed; or it raises `UserError`."""
    model = trained_model
    kwargs = {
        "start_text": start_text,
        "length": length,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "num_samples": num_samples,
        "seed": seed,
        "repetition_penalty": repetition_penalty,
        "stop": stop,
        "max_lines": max_lines,
        "max_stanzas": max_stanzas,
        "unknown": unknown,
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # --unknown skip warns about dropped characters
            out = model.generate(**kwargs)
    except UserError as exc:
        return _handled(exc)
    n = num_samples if isinstance(start_text, str) else len(start_text)
    assert isinstance(out, list) and len(out) == n
    prompts = [start_text] * n if isinstance(start_text, str) else start_text
    for text, prompt in zip(out, prompts, strict=True):
        kept = "".join(
            c
            for c in prompt.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
            if c in model.vocab
        )
        assert text.startswith(kept) and len(text) - len(kept) <= length
        assert all(c in model.vocab for c in text)
        text.encode("utf-8")
    if seed is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert model.generate(**kwargs) == out
    _handled(True)


@settings(max_examples=60, deadline=None, suppress_health_check=SUPPRESS)
@given(
    text=mostly(st.lists(known, max_size=6).map("".join), texts),
    unknown=st.sampled_from(["error", "skip"]),
)
def test_evaluate_any_text_gives_finite_metrics_or_a_user_error(
    trained_model, text, unknown
) -> None:
    """`TextModel.evaluate` on arbitrary text gives finite loss and bits per character, or a
    `UserError` (unknown characters, fewer than two known characters)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics = trained_model.evaluate(text, unknown=unknown)
    except UserError as exc:
        return _handled(exc)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["bits_per_char"])
    _handled(True)


@settings(max_examples=300, deadline=None)
@given(
    logits=st.lists(st.floats(-F32_MAX, F32_MAX, width=32), min_size=1, max_size=6),
    temperature=mostly(st.floats(0, 1e3), floats),
    top_k=st.none() | st.integers(0, 8),
    top_p=mostly(st.none() | st.floats(0, 1), floats),
    penalty=mostly(st.floats(1, 1e300), floats),
    recent=st.lists(st.integers(-1, 5), max_size=6),
    counter=st.integers(0, 2**40),
)
def test_the_sampler_draws_a_real_character_for_any_valid_parameters(
    logits, temperature, top_k, top_p, penalty, recent, counter
) -> None:
    """For any float32 logits and any parameters `SamplingParams` accepts, the reference sampler's
    probabilities are finite and sum to 1, and the draw is an index of the vocabulary (a tiny
    temperature or a huge penalty must not overflow into NaN, which silently draws index 0)."""
    try:
        p = SamplingParams(temperature, top_k, top_p, penalty)
    except UserError as exc:
        return _handled(exc)
    x = np.asarray([logits], dtype=np.float64)
    window = np.asarray([[r if r < x.shape[1] else -1 for r in recent]], dtype=np.int64)
    idx = sample_step(x, p, stream_seeds(7, 1), counter, window if recent else None)
    assert 0 <= int(idx[0]) < x.shape[1]
    if p.temperature > 0:
        from charlstm.generate.sampling import apply_repetition_penalty

        probs = next_token_probs(
            apply_repetition_penalty(x, window if recent else None, p.repetition_penalty), p
        )
        assert np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-9, probs
        assert probs[0, int(idx[0])] > 0
    _handled(True)


@settings(max_examples=40, deadline=None, suppress_health_check=SUPPRESS)
@given(
    temperature=st.floats(min_value=0, max_value=1e-12, exclude_min=True),
    seed=st.integers(0, 2**32),
)
def test_a_tiny_temperature_is_greedy_or_refused(trained_model, temperature, seed) -> None:
    """As the temperature goes to 0 sampling becomes greedy: any accepted tiny temperature gives
    the greedy text, whatever the seed (unless refused with `UserError`)."""
    try:
        out = trained_model.generate("\n", length=20, temperature=temperature, seed=seed)
    except UserError as exc:
        return _handled(exc)
    assert out == trained_model.generate("\n", length=20, temperature=0)
    _handled(True)
