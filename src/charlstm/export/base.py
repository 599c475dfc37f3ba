"""The base export: a trained run made into a base model the package can ship (runs/bases.py).

`export_base(run, out, name=..., language=...)` writes into `out`:

- ``base.safetensors``: a charlstm checkpoint of the run's best weights in fp16 (half the bytes;
  fine-tuning casts them back to float32, and the loss on held-out text moves in the fourth
  decimal), its vocabulary and configuration, and no optimizer state (a base is started from, never
  resumed);
- ``card.md``: the model card: the corpus and its sha256, what decontamination removed, characters
  seen, steps, the validation loss on held-out base text, the recipe's command, the machine it was
  trained on, and the licence.

The file's sha256 and size are printed: they are pinned in runs/bases.py, which checks them before
a base is read.
"""

from __future__ import annotations

import hashlib
import math
import platform
from datetime import date
from pathlib import Path
from typing import Any

import torch

from charlstm.atomic import atomic_write_text
from charlstm.data import basecorpus
from charlstm.errors import UserError
from charlstm.runs.bases import CARD_FILE, WEIGHTS_FILE
from charlstm.runs.checkpoint import read_checkpoint, save_checkpoint
from charlstm.runs.folder import RunFolder, find_checkpoint
from charlstm.runs.metrics import read_records


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _final(run: Path) -> dict[str, Any]:
    """The run's final record (the full-pass figures), or its last record."""
    records = read_records(RunFolder(run).metrics_file)
    finals = [r for r in records if r.get("final")]
    return (finals or records or [{}])[-1]


def export_base(
    run: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write `run`'s best weights as a shippable base named `name` (default: the corpus's
    language) into `out`; returns the file's path, sha256, size and the card's figures."""
    run, out = Path(run), Path(out)
    ck = read_checkpoint(find_checkpoint(run, prefer="best"))
    config = ck.run_config
    corpus = config.data.dataset
    if corpus not in basecorpus.BASE_CORPORA or config.data.text or config.data.prepared:
        raise UserError(
            f"{run} was not trained on a base corpus ({', '.join(basecorpus.BASE_CORPORA)}); "
            "train one with configs/base-LANG.toml"
        )
    language = basecorpus.get_base_corpus(corpus).language
    name = name or language
    recipe = (
        f"charlstm train --config configs/base-{language}.toml --out runs/base-{language} && "
        f"charlstm export runs/base-{language} --format base --out src/charlstm/bases/{name}"
    )
    weights = out / WEIGHTS_FILE
    if weights.exists() and not force:
        raise UserError(
            f"--out {out} already holds a base export ({WEIGHTS_FILE}); pass --force to replace "
            "it, or give another --out"
        )
    final = _final(run)
    built = basecorpus.built_meta(corpus) or {}
    steps = int(final.get("step", ck.meta["step"]))
    chars_seen = steps * config.data.batch_size * config.data.seq_len
    val = final.get("best_val_loss", final.get("val_loss"))
    card = {
        "name": name,
        "language": language,
        "corpus": corpus,
        "corpus_sha256": built.get("sha256"),
        "corpus_characters": built.get("characters"),
        "documents": len(built.get("documents", [])),
        "cut_lines_chars": built.get("cut_lines_chars"),
        "dropped": built.get("dropped", []),
        "steps": steps,
        "characters_seen": chars_seen,
        "val_loss": val,
        "val_fraction": config.data.val_fraction,
        "recipe": recipe,
        "trained_on": f"{_cpu_name()}, {config.train.threads or 'all'} thread(s), CPU",
        "torch": torch.__version__,
        "date": date.today().isoformat(),
    }
    tensors = {k: v.to(torch.float16) for k, v in ck.tensors.items() if k.startswith("model.")}
    meta = {k: ck.meta[k] for k in ("model", "vocab", "config", "step", "source") if k in ck.meta}
    meta["metrics"] = {"best_val_loss": val} if val is not None else {}
    meta["base"] = card
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(weights, tensors, meta)
    data = weights.read_bytes()
    card["sha256"], card["size"] = hashlib.sha256(data).hexdigest(), len(data)
    atomic_write_text(out / CARD_FILE, render_card(card, config))
    return {"path": weights, **card}


def render_card(card: dict[str, Any], config) -> str:
    """The model card as Markdown."""
    names = basecorpus.get_base_corpus(card["corpus"]).collections
    coll = [basecorpus.collection(c) for c in names]
    m = config.model
    val = card["val_loss"]
    val_text = f"{val:.4f} nats/char ({val / math.log(2):.3f} bits/char)" if val else "unknown"
    sources = "\n".join(
        f"- `{c.name}`: {c.description}; {len(c.members)} files, {c.size:,} bytes, "
        f"github.com/{c.repo} at commit {c.commit}; licence: {c.licence}"
        for c in coll
    )
    dropped = ", ".join(card["dropped"]) or "none"
    return f"""# charlstm base model `{card["name"]}` ({card["language"]})

A {m.cell.upper()} of {m.num_layers} × {m.hidden_size} units (embedding {m.embedding_size},
vocabulary {m.vocab_size}) that has learnt its language from a public-domain corpus, shipped so
that a run on a small text can start from it (`charlstm train --base {card["name"]}`, or `--base
auto`, the default, which decides from the text and the budget).

| | |
|---|---|
| corpus | `{card["corpus"]}`: {card["corpus_characters"] or 0:,} characters in \
{card["documents"]} documents, sha256 `{card["corpus_sha256"]}` |
| decontamination | lines sharing 50 characters with {", ".join(basecorpus.EXCLUDED)} cut \
({card["cut_lines_chars"]:,} characters); documents left out whole: {dropped} |
| training | {card["steps"]:,} steps of {config.data.batch_size} × {config.data.seq_len}: \
{card["characters_seen"]:,} characters seen |
| validation loss | {val_text} on the held-out last {card["val_fraction"]:.0%} of the corpus \
(full pass) |
| weights | fp16, {card.get("size", 0):,} bytes, sha256 `{card.get("sha256", "")}` |
| trained on | {card["trained_on"]}, torch {card["torch"]}, {card["date"]} |
| recipe | `{card["recipe"]}` |
| licence | the corpus is public domain; these weights: MIT, as charlstm |

## Sources

{sources}
"""
