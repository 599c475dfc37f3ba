"""What a trained run learned: memorisation, novelty and verse structure against its training text.

`analyze_run` loads a run, samples texts at several temperatures (or takes a text you give it),
and compares them with the run's own training text using `charlstm.analysis`; it returns one
JSON-ready dict. `write_report` turns that dict into ``report.html`` (self-contained: the plots are
embedded as base64 PNGs) and ``report.md`` in the run folder, with the PNGs in ``report/`` beside
them. `format_table` is the terminal view. `charlstm analyze`, `charlstm report` and
``charlstm train --report`` are thin wrappers around these three.

By default the *last* checkpoint is analysed: the weights training ended with, which is what the
lab's own recipe hands over (it has no validation set to pick a best one). ``which="best"`` analyses
the early-stopping pick instead.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from charlstm.analysis.largecorpus import MIN_LENGTH as BASE_MIN_LENGTH
from charlstm.errors import UserError
from charlstm.runs.folder import RunFolder, run_dir_of

DEFAULT_TEMPERATURES = (0.2, 0.5, 0.8, 1.0)
COPY_LENGTHS = (20, 50)  # K: a character counts as copied if it lies in a copy of >= K characters
HIGHLIGHT_LENGTH = 50  # copies this long are highlighted in the sample poems
SAMPLE_CHARS = 700  # characters of each sample poem shown in the report
REPORT_DIR = "report"  # PNGs and analysis.json, inside the run folder


# ---------------------------------------------------------------------------------------- analysis


def _history(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Summary of the training curves: best and last validation loss, last training loss."""
    vals = [r for r in records if isinstance(r.get("val_loss"), int | float)]
    if not vals:
        return None
    best = min(vals, key=lambda r: r["val_loss"])
    # The final record (training's full pass) names best/'s full-pass figure; the scheduled ones
    # may read only a slice of the split, so their minimum is not best/'s figure.
    if vals[-1].get("final") and isinstance(vals[-1].get("best_val_loss"), int | float):
        best = {"val_loss": vals[-1]["best_val_loss"], "step": vals[-1].get("best_step")}
    trains = [r for r in records if isinstance(r.get("train_loss"), int | float)]
    return {
        "evaluations": sum(not r.get("final") for r in vals),
        "best_val_loss": best["val_loss"],
        "best_step": best["step"],
        "last_val_loss": vals[-1]["val_loss"],
        "last_step": vals[-1]["step"],
        "last_train_loss": trains[-1]["train_loss"] if trains else None,
        "seconds": vals[-1].get("time"),
    }


def _check_settings(samples: int, length: int, temperatures: Sequence[float]) -> None:
    if samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    if length < 1:
        raise UserError(f"--length must be >= 1, got {length}")
    if not temperatures:
        raise UserError("give at least one temperature, e.g. --temperatures 0.2,0.5,0.8,1.0")
    for t in temperatures:
        if not (math.isfinite(t) and t >= 0):
            raise UserError(f"temperatures must be finite and >= 0, got {t!r}")


def _analyse_text(
    index, train_stats, lexicon, text: str, excerpt: str, base: dict | None, base_ms
) -> dict[str, Any]:
    """Memorisation, real words and structure of one text against the corpus (and against the
    base corpus `base`, given its matching statistics `base_ms`), and one excerpt to show."""
    import numpy as np

    from charlstm.analysis import (
        copied_spans,
        memorisation_report,
        structure_distance,
        structure_stats,
    )
    from charlstm.analysis.memorisation import copy_figures, covered, mask_spans
    from charlstm.analysis.words import real_words

    report = memorisation_report(index, text, COPY_LENGTHS)
    memo = report.to_dict()
    memo.pop("copied_spans")  # spans of the joined samples: the excerpt carries its own below
    stats = structure_stats(text)
    result = {
        "chars": len(text),
        "memorisation": memo,
        "words": real_words(text, lexicon).to_dict(),
        "base_copies": None,
        # characters in copies of >= HIGHLIGHT_LENGTH of the training text or the base corpus;
        # unknown when the base corpus could not be read
        "copied_any": memo["coverage"][HIGHLIGHT_LENGTH] if base is None else None,
        "structure": stats.to_dict(),
        "distance": structure_distance(stats, train_stats),
        "excerpt": {
            "text": excerpt,
            "copied_spans": [list(span) for span in copied_spans(index, excerpt, HIGHLIGHT_LENGTH)],
        },
    }
    if base_ms is not None:
        result["base_copies"] = copy_figures(base_ms, text, COPY_LENGTHS)
        copied = covered(base_ms, HIGHLIGHT_LENGTH)
        for a, b in report.copied_spans:
            copied[a:b] = True
        result["copied_any"] = float(copied.mean()) if len(copied) else None
        # The excerpt is where the text starts: its copies are those that end inside it.
        n = len(excerpt)
        inside = np.minimum(base_ms[:n], n - np.arange(n))
        spans = mask_spans(covered(inside, HIGHLIGHT_LENGTH))
        result["excerpt"]["base_copied_spans"] = [list(span) for span in spans]
    return result


def _base_of(config) -> str | None:
    """The shipped base model the run started from ("ru"), or None: "auto", "none", or a run
    folder, whose corpus the analysis does not know."""
    from charlstm.data.basecorpus import BASE_CORPORA

    base = config.train.base
    return base if f"base-{base}" in BASE_CORPORA else None


def _base_corpus(name: str) -> tuple[str | None, dict[str, Any]]:
    """The text of the base corpus of base `name` when it is built on this machine (None when
    not), and what the analysis records of it."""
    from charlstm.data import basecorpus

    corpus = f"base-{name}"
    info: dict[str, Any] = {
        "name": name,
        "corpus": corpus,
        "language": basecorpus.BASE_CORPORA[corpus].language,
        "measured": False,
        "characters": None,
        "sha256": None,
        "min_length": BASE_MIN_LENGTH,
        "note": None,
    }
    meta = basecorpus.built_meta(corpus)
    if meta is None or meta.get("format_version") != basecorpus.FORMAT_VERSION:
        info["note"] = (
            f"copies of the base corpus {corpus} not measured: it is not built on this machine; "
            f'build it once (it downloads its collection) with python -c "from charlstm.data '
            f"import basecorpus; basecorpus.load('{corpus}')\""
        )
        return None, info
    try:
        text, _ = basecorpus.load(corpus, allow_download=False)
    except UserError as exc:
        info["note"] = f"copies of the base corpus {corpus} not measured: {exc}"
        return None, info
    info.update(measured=True, characters=len(text), sha256=meta["sha256"])
    return text, info


def analyze_run(
    run: str | Path,
    *,
    samples: int = 8,
    length: int = 1000,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    text: str | None = None,
    text_label: str = "given text",
    seed: int = 0,
    which: str = "last",
    device: str = "auto",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compare what RUN generates (or `text`) with RUN's training text; a JSON-ready dict.

    Without `text`, for each temperature `samples` texts of `length` characters are generated
    from a newline (seeded with `seed`) and analysed together, joined by blank lines (so each
    sample is its own stanza group). With `text`, that text alone is analysed, as one result with
    temperature None. Either way the checkpoint's loss on the validation split is measured.
    """
    import torch

    from charlstm.analysis import CorpusIndex, largecorpus, structure_stats
    from charlstm.analysis.words import Lexicon, describe
    from charlstm.config import from_dict
    from charlstm.data.loading import prepare_data
    from charlstm.generate.textmodel import load
    from charlstm.model.evaluation import evaluate_ids, loss_metrics, streams_for

    log = log or (lambda msg: None)
    if text is None:
        _check_settings(samples, length, temperatures)
    elif not text.strip():
        raise UserError(f"{text_label} holds no text to analyse")
    clock = {"start": time.perf_counter()}
    model = load(run, which=which, device=device)
    ckpt = model.path
    run_dir = run_dir_of(ckpt)
    config = from_dict(model.meta["config"])
    data = prepare_data(config, model.vocab)
    log(f"analysing {ckpt} against {data.source} ({len(data.train_text):,} training characters)")

    validation = None
    if len(data.val_ids) >= 2:
        loss = evaluate_ids(  # documents kept apart, as training and `evaluate` read the split
            model.model,
            data.val_ids,
            n_streams=streams_for(len(data.val_ids), config.train.eval_streams),
            device=model.device,
            starts=data.val_starts,
        )
        validation = {**loss_metrics(loss), "characters": len(data.val_ids)}
    clock["validation"] = time.perf_counter()

    index = CorpusIndex(data.train_text)
    train_stats = structure_stats(data.train_text)
    clock["index"] = time.perf_counter()
    base = _base_of(config)
    base_text, base_info = _base_corpus(base) if base else (None, None)
    lexicon = Lexicon.for_text(data.train_text, base_info["language"] if base_info else None)
    log(describe(lexicon.to_dict()))
    if base_info and base_info["note"]:
        log(base_info["note"])
    clock["words"] = time.perf_counter()

    texts = []  # (temperature, source, text, excerpt): the excerpt is where the text starts
    generation_s = 0.0
    if text is not None:
        texts.append((None, text_label, text, text[:SAMPLE_CHARS]))
    else:
        start = "\n" if "\n" in model.vocab else model.vocab.chars[0]
        for t in temperatures:
            t0 = time.perf_counter()
            with torch.inference_mode():
                samples_t = model.generate(start, length, t, num_samples=samples, seed=seed)
            generation_s += time.perf_counter() - t0
            samples_t = [s[len(start) :] for s in samples_t]  # what the model wrote, not the prompt
            log(f"temperature {t:g}: {samples} × {length} characters generated")
            texts.append(
                (float(t), "generated", "\n\n".join(samples_t), samples_t[0][:SAMPLE_CHARS])
            )
    base_s = 0.0
    base_ms = [None] * len(texts)
    if base_text is not None:
        t0 = time.perf_counter()
        base_ms = largecorpus.matching_statistics(base_text, [t[2] for t in texts])
        base_s = time.perf_counter() - t0
        log(f"compared with the base corpus {base_info['corpus']} in {base_s:.1f} s")
    results = [
        {
            "temperature": t,
            "source": source,
            **_analyse_text(index, train_stats, lexicon, joined, excerpt, base_info, ms),
        }
        for (t, source, joined, excerpt), ms in zip(texts, base_ms, strict=True)
    ]
    end = time.perf_counter()

    records = RunFolder(run_dir).read_metrics() if run_dir else []
    return {
        "run": str(run_dir or ckpt),
        "name": model.name,
        "checkpoint": {
            "which": ckpt.parent.name if run_dir else None,
            "path": str(ckpt),
            "step": model.meta.get("step"),
        },
        "corpus": {
            "source": data.source,
            "training_chars": len(data.train_text),
            "validation_chars": len(data.val_ids),
            "vocabulary": len(model.vocab),
        },
        "validation": validation,
        "uniform_loss": math.log(len(model.vocab)),  # a model that learned nothing
        "history": _history(records),
        "metrics": records,
        "settings": {
            "samples": samples,
            "length": length,
            "temperatures": list(map(float, temperatures)),
            "seed": seed,
            "copy_lengths": list(COPY_LENGTHS),
            "highlight_length": HIGHLIGHT_LENGTH,
            "text": None if text is None else text_label,
        },
        "config": model.meta["config"],
        "training_structure": train_stats.to_dict(),
        "words": lexicon.to_dict(),
        "base": base_info,
        "results": results,
        "seconds": {
            "validation": clock["validation"] - clock["start"],
            "index": clock["index"] - clock["validation"],
            "words": clock["words"] - clock["index"],  # choosing the language, loading the base
            "generation": generation_s,
            "base": base_s,
            "analysis": end - clock["words"] - generation_s - base_s,
            "total": end - clock["start"],
        },
    }


# ---------------------------------------------------------------------------------------- tables


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _at(mapping: dict, key: int) -> Any:
    """mapping[key] for an int key, also after a JSON round trip turned the keys into strings."""
    return mapping[key] if key in mapping else mapping[str(key)]


def _label(result: dict[str, Any]) -> str:
    t = result["temperature"]
    return result["source"] if t is None else f"T = {t:g}"


def memorisation_table(analysis: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: copies, coverage, novelty and structure distance for each result."""
    ks = analysis["settings"]["copy_lengths"]
    header = [
        "text",
        "characters",
        "longest copy",
        *(f"copied ≥ {k}" for k in ks),
        "novel 3-grams",
        "novel 4-grams",
        "lines reproduced",
        "real words",
        "structure distance",
    ]
    rows = []
    for r in analysis["results"]:
        m = r["memorisation"]
        words = r.get("words") or {}  # absent from analyses written before real words
        rows.append(
            [
                _label(r),
                f"{r['chars']:,}",
                f"{m['longest_copy_length']:,}",
                *(_pct(_at(m["coverage"], k)) for k in ks),
                _pct(_at(m["novel_ngram_share"], 3)),
                _pct(_at(m["novel_ngram_share"], 4)),
                f"{m['lines_reproduced']}/{m['lines_considered']}",
                _pct(words.get("real_share")),
                _num(r["distance"]["structure_distance"]),
            ]
        )
    return header, rows


def words_sentence(analysis: dict[str, Any]) -> str | None:
    """What "real words" measured, and the training text's own figure beside it."""
    from charlstm.analysis.words import describe

    lexicon = analysis.get("words")
    if lexicon is None:
        return None
    sentence = describe(lexicon)  # a detected language's sentence already gives the figure
    if lexicon["how"] == "base" and lexicon["language_share"] is not None:
        sentence += f" The training text itself: {_pct(lexicon['language_share'])}."
    return sentence


def base_table(analysis: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows: what each result shares with the base corpus; None when the run has no
    base or its corpus was not read (`analysis["base"]["note"]` says why)."""
    base = analysis.get("base")
    if not base or not base["measured"]:
        return None
    ks = analysis["settings"]["copy_lengths"]
    header = [
        "text",
        "longest copy of the base",
        *(f"base copied ≥ {k}" for k in ks),
        f"copied ≥ {HIGHLIGHT_LENGTH}, training or base",
    ]
    rows = []
    for r in analysis["results"]:
        b = r["base_copies"]
        longest = b["longest_copy_length"]
        rows.append(
            [
                _label(r),
                f"{longest:,}" if longest else f"< {base['min_length']}",
                *(_pct(_at(b["coverage"], k)) for k in ks),
                _pct(r["copied_any"]),
            ]
        )
    return header, rows


STRUCTURE_ROWS = (
    ("mean line length, characters", "mean_line_chars", 1),
    ("mean line length, words", "mean_line_words", 1),
    ("mean syllables per line", "mean_line_syllables", 1),
    ("mean lines per stanza", "mean_stanza_lines", 1),
    ("lines starting with a capital", "uppercase_start_share", None),
    ("rhyme rate", "rhyme_rate", None),
)


def structure_table(analysis: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the shape of the training text and of each result, measure by measure."""
    train = analysis["training_structure"]
    results = analysis["results"]
    header = ["measure", "training", *map(_label, results)]
    rows = []
    for title, key, digits in STRUCTURE_ROWS:
        fmt = _pct if digits is None else (lambda x, d=digits: _num(x, d))
        rows.append([title, fmt(train[key]), *(fmt(r["structure"][key]) for r in results)])
    rows.append(
        [
            "character frequencies, distance",
            "0",
            *(_num(r["distance"]["char_freq_tv"]) for r in results),
        ]
    )
    return header, rows


def validation_rows(analysis: dict[str, Any]) -> list[list[str]]:
    """Rows (what, loss, bits/char, perplexity) for the validation table."""
    rows = []
    v = analysis["validation"]
    ck = analysis["checkpoint"]
    if v is not None:
        where = f"{ck['which']}/ checkpoint" if ck["which"] else "this checkpoint"
        rows.append(
            [
                f"{where}, step {ck['step']}",
                _num(v["loss"]),
                _num(v["bits_per_char"]),
                _num(v["perplexity"], 1),
            ]
        )
    h = analysis["history"]
    if h is not None:
        best = h["best_val_loss"]
        rows.append(
            [
                f"best during training, step {h['best_step']}",
                _num(best),
                _num(best / math.log(2)),
                _num(math.exp(min(best, 700)), 1),
            ]
        )
        if h["last_train_loss"] is not None:
            tl = h["last_train_loss"]
            rows.append(
                [
                    "training loss, last evaluation window",
                    _num(tl),
                    _num(tl / math.log(2)),
                    _num(math.exp(min(tl, 700)), 1),
                ]
            )
    u = analysis["uniform_loss"]
    rows.append(
        [
            f"uniform guess over {analysis['corpus']['vocabulary']} characters",
            _num(u),
            _num(u / math.log(2)),
            _num(math.exp(u), 1),
        ]
    )
    return rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    from charlstm.textutil import display_width

    widths = [max(display_width(c) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        padded = (c + " " * (w - display_width(c)) for c, w in zip(cells, widths, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), line(["─" * w for w in widths]), *map(line, rows)])


def format_table(analysis: dict[str, Any]) -> str:
    """The analysis as plain-text tables for the terminal."""
    c = analysis["corpus"]
    parts = [
        (
            f"{analysis['run']} ({analysis['checkpoint']['which'] or 'checkpoint'}, step "
            f"{analysis['checkpoint']['step']}) against {c['source']}: {c['training_chars']:,} "
            f"training characters"
        ),
        "",
        _text_table(
            ["validation", "loss (nats/char)", "bits/char", "perplexity"], validation_rows(analysis)
        ),
        "",
        _text_table(*memorisation_table(analysis)),
    ]
    if sentence := words_sentence(analysis):
        parts.append(sentence)
    base = analysis.get("base")
    if table := base_table(analysis):
        parts += ["", f"Against the base corpus {base['corpus']}:", _text_table(*table)]
    elif base:
        parts += ["", base["note"]]
    parts += ["", _text_table(*structure_table(analysis))]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------- documents
# A report is a list of blocks rendered twice, to Markdown and to HTML, so the two never disagree:
# ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", name, caption)
# | ("sample", title, text, spans)

DEFINITIONS = (
    "Longest copy: the longest substring of the generated text found anywhere in the training "
    "text. Copied ≥ K: the share of generated characters inside a substring of at least K "
    "characters found in the training text. Novel n-grams: the share of word n-grams that never "
    "occur in the training text. Lines reproduced: generated lines of ≥ 10 characters equal to a "
    "training line. Real words: the share of generated words (letters, joined by inner "
    "apostrophes and hyphens; case ignored) that the word list of the language (the wordfreq "
    "package) knows, or, for a language it does not know, that occur in the training text. "
    "Copies of the base corpus, for a run that starts from a base model: the same copy figures "
    "against the corpus the base model learned from (spans shorter than "
    f"{BASE_MIN_LENGTH} characters are not measured), and the share of characters in copies of "
    f"≥ {HIGHLIGHT_LENGTH} characters of either text. "
    "Structure distance: the mean total-variation distance between generated and "
    "training histograms of line length (characters, words, syllables), lines per stanza and "
    "line-final punctuation; 0 is the training text's shape, 1 shares nothing with it. "
    "Samples at each temperature are generated from a newline and analysed together, one stanza "
    "group each; loss is in nats per character on the validation split (the last part of the text)."
)


def _blocks(analysis: dict[str, Any], images: Sequence[str]) -> list[tuple]:
    c, ck, s = analysis["corpus"], analysis["checkpoint"], analysis["settings"]
    results = analysis["results"]
    what = (
        f"the text {s['text']}"
        if s["text"]
        else f"{s['samples']} samples of {s['length']:,} characters at each temperature "
        f"(seed {s['seed']})"
    )
    blocks: list[tuple] = [
        ("h", 1, f"What {analysis['name']} learned"),
        (
            "p",
            (
                f"Run {analysis['run']}, {ck['which'] or 'checkpoint'} at step {ck['step']}, "
                f"trained on {c['source']} ({c['training_chars']:,} training and "
                f"{c['validation_chars']:,} validation characters, {c['vocabulary']} distinct). "
                f"Analysed: {what}."
            ),
        ),
        ("h", 2, "Validation"),
        ("table", ["", "loss (nats/char)", "bits/char", "perplexity"], validation_rows(analysis)),
        ("h", 2, "Memorisation, novelty and real words"),
        ("table", *memorisation_table(analysis)),
    ]
    if sentence := words_sentence(analysis):
        blocks.append(("p", sentence))
    base = analysis.get("base")
    if base:
        blocks.append(("h", 2, f"Copies of the base corpus {base['corpus']}"))
        table = base_table(analysis)
        blocks.append(("table", *table) if table else ("p", base["note"]))
    blocks += [
        ("h", 2, "Verse structure"),
        ("table", *structure_table(analysis)),
    ]
    captions = {
        "loss": "Training and validation loss against steps and against seconds of training.",
        "lr": "The learning rate.",
        "temperature": "Copies, novelty, real words and structure against the temperature.",
        "lengths": "Line and stanza lengths, generated and training.",
    }
    if images:
        blocks.append(("h", 2, "Plots"))
        blocks += [("img", name, captions[name]) for name in images]
    shown = _shown_results(results)
    if shown:
        against = "the training text or the base corpus" if base else "the training text"
        blocks.append(
            (
                "h",
                2,
                f"Samples (copies of ≥ {HIGHLIGHT_LENGTH} characters of {against} highlighted)",
            )
        )
        for r in shown:
            e = r["excerpt"]
            spans = _union(e["copied_spans"], e.get("base_copied_spans", []))
            copied = sum(b - a for a, b in spans)
            title = f"{_label(r)}: {copied} of {len(e['text'])} characters copied"
            blocks.append(("sample", title, e["text"], spans))
    blocks += [("h", 2, "How these are measured"), ("p", DEFINITIONS)]
    return blocks


def _union(*span_lists: Sequence[Sequence[int]]) -> list[list[int]]:
    """The spans of several lists merged into sorted, disjoint spans."""
    merged: list[list[int]] = []
    for a, b in sorted(tuple(span) for spans in span_lists for span in spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _shown_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Three results to show samples of: the lowest, a middle and the highest temperature."""
    if len(results) <= 3:
        return results
    return [results[0], results[(len(results) - 1) // 2], results[-1]]


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|~])")


def _md_escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", text)


def _md_line(line: str, marks: list[bool]) -> str:
    """One line of a sample with its copied characters in bold (whitespace kept outside **)."""
    out, i = [], 0
    while i < len(line):
        j = i
        while j < len(line) and marks[j] == marks[i]:
            j += 1
        piece = line[i:j]
        if marks[i] and piece.strip():
            lead = piece[: len(piece) - len(piece.lstrip())]
            trail = piece[len(piece.rstrip()) :]
            out.append(f"{lead}**{_md_escape(piece.strip())}**{trail}")
        else:
            out.append(_md_escape(piece))
        i = j
    return "".join(out)


def _marks(text: str, spans: Sequence[Sequence[int]]) -> list[bool]:
    marks = [False] * len(text)
    for a, b in spans:
        marks[a:b] = [True] * (b - a)
    return marks


def _md_sample(text: str, spans: Sequence[Sequence[int]]) -> str:
    """A poem as Markdown: one paragraph per stanza, hard line breaks, copies in bold."""
    marks = _marks(text, spans)
    stanzas, lines, pos = [], [], 0
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped:
            lead = len(line) - len(line.lstrip())
            lines.append(_md_line(stripped, marks[pos + lead : pos + lead + len(stripped)]))
        elif lines:
            stanzas.append(lines)
            lines = []
        pos += len(line) + 1
    if lines:
        stanzas.append(lines)
    # A backslash at the end of a line is a hard line break in CommonMark.
    return "\n\n".join("\\\n".join(stanza) for stanza in stanzas)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def row(cells):
        return "| " + " | ".join(_md_escape(c) for c in cells) + " |"

    return "\n".join([row(header), "|" + "---|" * len(header), *map(row, rows)])


def render_markdown(analysis: dict[str, Any], images: Sequence[str]) -> str:
    """report.md: the blocks as Markdown, images as files in report/."""
    out = []
    for block in _blocks(analysis, images):
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + _md_escape(block[2]))
        elif kind == "p":
            out.append(_md_escape(block[1]))
        elif kind == "table":
            out.append(_md_table(block[1], block[2]))
        elif kind == "img":
            out.append(f"![{block[2]}]({REPORT_DIR}/{block[1]}.png)")
        elif kind == "sample":
            out.append(f"### {_md_escape(block[1])}\n\n{_md_sample(block[2], block[3])}")
    return "\n\n".join(out) + "\n"


def _html_sample(text: str, spans: Sequence[Sequence[int]]) -> str:
    out, pos = [], 0
    for a, b in spans:
        out.append(html.escape(text[pos:a]))
        out.append(f"<mark>{html.escape(text[a:b])}</mark>")
        pos = b
    out.append(html.escape(text[pos:]))
    return "".join(out)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; white-space: nowrap; }
img { max-width: 100%; }
pre.sample { white-space: pre-wrap; background: #f7f7f5; padding: 1rem; font-size: .95rem; }
mark { background: #ffd54f; }
figure { margin: 1rem 0; } figcaption { color: #555; font-size: .9rem; }
"""


def render_html(analysis: dict[str, Any], images: dict[str, bytes]) -> str:
    """report.html: the blocks as one self-contained page (PNGs embedded as data: URIs)."""
    body = []
    for block in _blocks(analysis, list(images)):
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in block[2]
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(images[block[1]]).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(block[2])}" '
                f'src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(block[2])}</figcaption></figure>"
            )
        elif kind == "sample":
            body.append(
                f"<h3>{html.escape(block[1])}</h3>"
                f'<pre class="sample">{_html_sample(block[2], block[3])}</pre>'
            )
    title = html.escape(f"What {analysis['name']} learned")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(analysis: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write report/*.png, report/analysis.json, report.md and report.html into the folder `out`.

    Every file is written atomically (temporary file, then rename), the HTML last, so a reader
    never sees half a report. Returns the paths written, by name.
    """
    from charlstm.analysis.plots import report_figures
    from charlstm.atomic import atomic_write_bytes, atomic_write_text

    out = Path(out)
    folder = out / REPORT_DIR
    try:
        images = report_figures(analysis)
        paths: dict[str, Path] = {}
        for name, png in images.items():
            paths[name] = folder / f"{name}.png"
            atomic_write_bytes(paths[name], png)
        paths["json"] = folder / "analysis.json"
        atomic_write_text(paths["json"], json.dumps(analysis, ensure_ascii=False, indent=1))
        paths["md"] = out / "report.md"
        atomic_write_text(paths["md"], render_markdown(analysis, list(images)))
        paths["html"] = out / "report.html"
        atomic_write_text(paths["html"], render_html(analysis, images))
    except OSError as exc:
        raise UserError(
            f"could not write the report into {str(out)!r} ({exc.strerror or exc}); "
            "choose a folder you can write to with --out"
        ) from None
    return paths


def report_folder(run: str | Path, out: str | Path | None = None) -> Path:
    """Where the report of RUN goes: `out` if given, else the run folder.

    `out` is required when RUN names a checkpoint file outside a run folder's best/ or last/.
    """
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {str(out)!r} is a file; give a folder for the report")
        return out
    run = Path(run)
    if run.is_file():
        if run_dir_of(run) is None:
            raise UserError(
                f"{str(run)!r} is a checkpoint file, not a run folder; say where the "
                "report goes with --out"
            )
        return run.parent.parent
    return run


def report_run(run: str | Path, out: str | Path | None = None, **options: Any) -> dict[str, Path]:
    """Analyse RUN (options as `analyze_run`) and write its report into `out` (default: the run
    folder); returns the paths written."""
    folder = report_folder(run, out)
    return write_report(analyze_run(run, **options), folder)
