"""The report's plots, drawn with matplotlib into PNG bytes (no display, no pyplot state).

Each function takes the dict of `charlstm.analysis.report.analyze_run` and returns one PNG, or None
when the analysis has nothing to draw (a run without metrics.jsonl has no curves; a given text has
no temperature sweep). Figures are built with `matplotlib.figure.Figure` directly, which renders
with the Agg canvas and never touches a GUI backend or pyplot's global figure list.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

DPI = 100
LINE_CHAR_BIN = 5  # characters per bar of the line-length histogram
LINE_CHAR_MAX = 120  # longer lines share the last bar
STANZA_MAX = 24  # longer stanzas share the last bar


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _int_keys(hist: dict) -> dict[int, int]:
    """A histogram with int keys (they are strings after a JSON round trip)."""
    return {int(k): v for k, v in hist.items()}


def loss_curves(analysis: dict[str, Any]) -> bytes | None:
    """Training and validation loss against steps (left) and seconds of training (right)."""
    records = analysis["metrics"]
    train = [r for r in records if isinstance(r.get("train_loss"), int | float)]
    val = [r for r in records if isinstance(r.get("val_loss"), int | float)]
    if not val:
        return None
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    best = min(val, key=lambda r: r["val_loss"])
    for ax, x, xlabel in ((axes[0], "step", "step"), (axes[1], "time", "seconds of training")):
        if train:
            ax.plot([r[x] for r in train], [r["train_loss"] for r in train], label="training")
        ax.plot([r[x] for r in val], [r["val_loss"] for r in val], marker=".", label="validation")
        ax.plot(
            [best[x]], [best["val_loss"]], "o", color="C3", label=f"best {best['val_loss']:.3f}"
        )
        ax.axhline(
            analysis["uniform_loss"],
            color="grey",
            ls="--",
            lw=1,
            label=f"uniform guess {analysis['uniform_loss']:.2f}",
        )
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss, nats/char")
    axes[0].legend()
    fig.suptitle("Loss")
    return _png(fig)


def learning_rate(analysis: dict[str, Any]) -> bytes | None:
    """The learning rate at each evaluation, on a log scale."""
    records = [
        r for r in analysis["metrics"] if isinstance(r.get("lr"), int | float) and r["lr"] > 0
    ]
    if not records:
        return None
    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.subplots()
    ax.step([r["step"] for r in records], [r["lr"] for r in records], where="post")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def temperature_sweep(analysis: dict[str, Any]) -> bytes | None:
    """Copies, novelty and real words (left), longest copy (middle), structure distance (right)
    against T."""
    results = [r for r in analysis["results"] if r["temperature"] is not None]
    if not results:
        return None
    temps = [r["temperature"] for r in results]

    def memo(key: str, sub: int) -> list[float | None]:
        out = []
        for r in results:
            table = r["memorisation"][key]
            out.append(table[sub] if sub in table else table[str(sub)])
        return out

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for k in analysis["settings"]["copy_lengths"]:
        ax1.plot(temps, memo("coverage", k), marker="o", label=f"characters in copies ≥ {k}")
    ax1.plot(temps, memo("novel_ngram_share", 4), marker="s", label="novel word 4-grams")
    if all("words" in r for r in results):  # analyses written before real words have none
        real = [r["words"]["real_share"] for r in results]
        ax1.plot(temps, real, marker="^", label="real words")
    ax1.set_ylim(-0.03, 1.03)
    ax1.set_ylabel("share")
    ax1.set_title("copied, novel and real")
    ax1.legend(fontsize="small")
    longest = [max(r["memorisation"]["longest_copy_length"], 1) for r in results]
    ax2.plot(temps, longest, marker="o")
    for t, n in zip(temps, longest, strict=True):
        ax2.annotate(
            f"{n:,}",
            (t, n),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize="small",
        )
    ax2.set_yscale("log")  # from a few characters (novel) to thousands (recited)
    ax2.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax2.yaxis.set_major_formatter(ScalarFormatter())
    ax2.yaxis.set_minor_formatter(NullFormatter())
    ax2.margins(y=0.15)  # room for the labels above the points
    ax2.set_ylabel("characters")
    ax2.set_title("longest copy")
    ax3.plot(
        temps,
        [r["distance"]["structure_distance"] for r in results],
        marker="o",
        label="structure (lines, stanzas, endings)",
    )
    ax3.plot(
        temps,
        [r["distance"]["char_freq_tv"] for r in results],
        marker="s",
        label="character frequencies",
    )
    ax3.set_ylim(bottom=0)
    ax3.set_ylabel("distance from training text")
    ax3.set_title("shape")
    ax3.legend(fontsize="small")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("temperature")
        ax.grid(alpha=0.3)
    return _png(fig)


def _binned(hist: dict[int, int], width: int, top: int) -> dict[int, float]:
    """Normalised histogram in bins of `width`, everything >= `top` in the last bin."""
    total = sum(hist.values())
    out: dict[int, float] = {}
    for value, count in hist.items():
        b = min(value, top) // width * width
        out[b] = out.get(b, 0.0) + count / total
    return out


def _histogram_panel(
    ax, training: dict, results: list[dict[str, Any]], key: str, width: int, top: int, xlabel: str
) -> None:
    train = _binned(_int_keys(training[key]), width, top) if training[key] else {}
    if train:
        ax.bar(
            list(train),
            list(train.values()),
            width=width,
            align="edge",
            color="0.75",
            label="training",
        )
    for i, r in enumerate(results):
        hist = _int_keys(r["structure"][key])
        if not hist:
            continue
        gen = _binned(hist, width, top)
        xs = list(range(0, top + width, width))
        ys = [gen.get(x, 0.0) for x in xs]
        t = r["temperature"]
        ax.step(
            xs + [xs[-1] + width],
            ys + [ys[-1]],
            where="post",
            color=f"C{i}",
            label=r["source"] if t is None else f"T = {t:g}",
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def length_histograms(analysis: dict[str, Any]) -> bytes:
    """Line length in characters (left), stanza length in lines (right): generated and training."""
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    training, results = analysis["training_structure"], analysis["results"]
    _histogram_panel(
        ax1,
        training,
        results,
        "line_chars",
        LINE_CHAR_BIN,
        LINE_CHAR_MAX,
        f"line length, characters (last bar: ≥ {LINE_CHAR_MAX})",
    )
    _histogram_panel(
        ax2,
        training,
        results,
        "stanza_lines",
        1,
        STANZA_MAX,
        f"stanza length, lines (last bar: ≥ {STANZA_MAX})",
    )
    return _png(fig)


def report_figures(analysis: dict[str, Any]) -> dict[str, bytes]:
    """The report's PNGs by name, in order of appearance; figures with nothing to draw left out."""
    figures = {
        "loss": loss_curves(analysis),
        "lr": learning_rate(analysis),
        "temperature": temperature_sweep(analysis),
        "lengths": length_histograms(analysis),
    }
    return {name: png for name, png in figures.items() if png is not None}
