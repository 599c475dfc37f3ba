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
from datetime import date
from pathlib import Path
from typing import Any

import torch

from charlstm.atomic import atomic_write_text
from charlstm.data import basecorpus
from charlstm.data.corpus import part_starts
from charlstm.data.loading import documents
from charlstm.errors import UserError
from charlstm.hardware import cpu_name
from charlstm.model import CharRNN
from charlstm.model.evaluation import evaluate_ids, streams_for
from charlstm.runs.bases import CARD_FILE, WEIGHTS_FILE
from charlstm.runs.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from charlstm.runs.folder import RunFolder, find_checkpoint
from charlstm.runs.metrics import read_records


def _final(run: Path) -> dict[str, Any]:
    """The run's final record (the full-pass figures), or its last record."""
    records = read_records(RunFolder(run).metrics_file)
    finals = [r for r in records if r.get("final")]
    return (finals or records or [{}])[-1]


def _phases(run: Path) -> list[dict[str, Any]]:
    """The run and the runs it was started from (`init_from`), first phase first: the corpus,
    steps, characters seen and validation loss of each."""
    phases = []
    while run is not None and run.is_dir():
        config = read_checkpoint(find_checkpoint(run, prefer="best")).run_config
        final = _final(run)
        steps = int(final.get("step", 0))
        phases.append(
            {
                "corpus": config.data.dataset,
                "steps": steps,
                "batch": f"{config.data.batch_size} × {config.data.seq_len}",
                "characters_seen": steps * config.data.batch_size * config.data.seq_len,
                "val_loss": final.get("val_loss"),  # at the last step
                "best_val_loss": final.get("best_val_loss"),
                "best_step": final.get("best_step"),
                "full_pass": bool(final.get("final")),
            }
        )
        run = Path(config.train.init_from) if config.train.init_from else None
    return phases[::-1]


def held_out_loss(ck: Checkpoint, corpus: str) -> tuple[float, int]:
    """(loss in nats/char, characters) of the weights on the held-out tail of the base corpus
    that the first phase split off (`BaseCorpus.held_out`, its validation split): text that no
    phase trained on."""
    spec = basecorpus.get_base_corpus(corpus)
    root = basecorpus.get_base_corpus(spec.derived_from) if spec.derived_from else spec
    text, starts = basecorpus.load(root.name)
    cut = len(text) - round(len(text) * spec.held_out)
    ids, rel = ck.vocab.encode_documents(documents(text[cut:], part_starts(starts, cut, len(text))))
    model = CharRNN(ck.model_config)
    model.load_state_dict({k: v.float() for k, v in ck.model_state().items()})
    with torch.no_grad():
        loss = evaluate_ids(model.eval(), ids, n_streams=streams_for(len(ids), 8), starts=rel)
    return loss, len(ids)


def export_base(
    run: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    which: str = "best",
    force: bool = False,
) -> dict[str, Any]:
    """Write `run`'s `which` weights (best/ or last/) as a shippable base named `name` (default:
    the corpus's language) into `out`; returns the file's path, sha256, size and the card's
    figures."""
    run, out = Path(run), Path(out)
    ck = read_checkpoint(find_checkpoint(run, prefer=which))
    config = ck.run_config
    corpus = config.data.dataset
    if corpus not in basecorpus.BASE_CORPORA or config.data.text or config.data.prepared:
        raise UserError(
            f"{run} was not trained on a base corpus ({', '.join(basecorpus.BASE_CORPORA)}); "
            "train one with configs/base-LANG.toml"
        )
    language = basecorpus.get_base_corpus(corpus).language
    name = name or language
    weights = out / WEIGHTS_FILE
    if weights.exists() and not force:
        raise UserError(
            f"--out {out} already holds a base export ({WEIGHTS_FILE}); pass --force to replace "
            "it, or give another --out"
        )
    phases = _phases(run)
    held, held_chars = held_out_loss(ck, corpus)
    commands = [f"charlstm train --config configs/{p['corpus']}.toml" for p in phases]
    folder = f"runs/base-{language}"  # the Makefile's names: base-ru-1, then base-ru
    for i in range(1, len(commands)):
        commands[i] += f" --init-from {folder}-{i}"
    commands = [
        c + (f" --out {folder}-{i + 1}" if i + 1 < len(commands) else f" --out {folder}")
        for i, c in enumerate(commands)
    ]
    commands.append(
        f"charlstm export {folder} --format base --which {which} --out src/charlstm/bases/{name}"
    )
    card = {
        "name": name,
        "language": language,
        "corpus": corpus,
        "phases": [{**p, **_built(p["corpus"])} for p in phases],
        "characters_seen": sum(p["characters_seen"] for p in phases),
        "held_out_loss": held,
        "held_out_characters": held_chars,
        "weights": f"{which}/ of the last phase (step {ck.meta['step']:,})",
        "recipe": f"make base-{language} (= {' && '.join(commands)})",
        "trained_on": f"{cpu_name()}, {config.train.threads or 'all'} thread(s), CPU",
        "torch": torch.__version__,
        "date": date.today().isoformat(),
    }
    tensors = {k: v.to(torch.float16) for k, v in ck.tensors.items() if k.startswith("model.")}
    meta = {k: ck.meta[k] for k in ("model", "vocab", "config", "step", "source") if k in ck.meta}
    meta["metrics"] = {"best_val_loss": held}
    meta["base"] = card
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(weights, tensors, meta)
    data = weights.read_bytes()
    card["sha256"], card["size"] = hashlib.sha256(data).hexdigest(), len(data)
    atomic_write_text(out / CARD_FILE, render_card(card, config))
    return {"path": weights, **card}


def _built(corpus: str) -> dict[str, Any]:
    """What the build of `corpus` recorded, for the card."""
    meta = basecorpus.built_meta(corpus) or {}
    return {
        "corpus_sha256": meta.get("sha256"),
        "corpus_characters": meta.get("characters"),
        "documents": len(meta.get("documents", [])),
        "cut_lines_chars": meta.get("cut_lines_chars", 0),
        "dropped": meta.get("dropped", []),
    }


def render_card(card: dict[str, Any], config) -> str:
    """The model card as Markdown."""
    first = basecorpus.get_base_corpus(card["phases"][0]["corpus"])  # the corpus it started on
    coll = [basecorpus.collection(c) for c in first.collections]
    m = config.model
    held = card["held_out_loss"]
    sources = "\n".join(
        f"- `{c.name}`: {c.description}; {len(c.members)} files, {c.size:,} bytes, "
        f"github.com/{c.repo} at commit {c.commit}; licence: {c.licence}"
        for c in coll
    )
    phases = "\n".join(
        f"| {i + 1} | `{p['corpus']}`: {p['corpus_characters'] or 0:,} characters, "
        f"{p['documents']} documents, sha256 `{(p['corpus_sha256'] or '')[:16]}…` | "
        f"{p['steps']:,} × {p['batch']} = {p['characters_seen']:,} | "
        + (f"{p['val_loss']:.4f} at the last step" if p["val_loss"] is not None else "—")
        + (
            f", best {p['best_val_loss']:.4f} at step {p['best_step']:,}"
            if p["best_val_loss"] is not None and p["best_step"] != p["steps"]
            else ""
        )
        + (" (full passes)" if p["full_pass"] else " (scheduled slice)")
        + " |"
        for i, p in enumerate(card["phases"])
    )
    cut = card["phases"][0]
    dropped = ", ".join(cut["dropped"]) or "none"
    return f"""# charlstm base model `{card["name"]}` ({card["language"]})

A {m.cell.upper()} of {m.num_layers} × {m.hidden_size} units (embedding {m.embedding_size},
vocabulary {m.vocab_size}) that has learnt its language from a public-domain corpus, shipped so
that a run on a small text can start from it (`charlstm train --base {card["name"]}`, or `--base
auto`, the default, which decides from the text and the budget).

**Held-out loss: {held:.4f} nats/char ({held / math.log(2):.3f} bits/char)** on the
{card["held_out_characters"]:,} characters that the first phase held out of `{first.name}` (its
validation split; no phase trained on them).

| phase | corpus | steps × batch = characters seen | validation loss (the phase's split) |
|---|---|---|---|
{phases}

- Decontamination: every line sharing 50 characters with {", ".join(first.excluded)} was cut from
  `{first.name}` ({cut["cut_lines_chars"]:,} characters); documents left out whole: {dropped}.
  `benchmarks/base_contamination.py` measures the longest span left in common (docs/benchmarks.md).
- Weights: {card["weights"]}, fp16, {card.get("size", 0):,} bytes, sha256
  `{card.get("sha256", "")}`.
- Trained on: {card["trained_on"]}, torch {card["torch"]}, {card["date"]}.
- Recipe: `{card["recipe"]}`.
- Licence: the corpus is public domain; these weights: MIT, as charlstm.

## Sources

{sources}
"""
