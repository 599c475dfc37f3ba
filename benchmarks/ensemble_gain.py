"""How much lower the validation loss of several runs averaged together is than each run's own.

A question about the ceiling of the automatic choice on a small text, not a feature: byron-ru's
runs stop early (their best is reached in a third of the budget), and a second core sits idle
while a one-thread run trains, so the obvious use of what is left is more models. This script
reads runs trained with the same settings and different seeds (e.g. by autoconfig_ab.py --keep)
and prints each one's full-pass validation loss and the loss of their average: the mean of their
predicted probabilities, read exactly as `charlstm evaluate` reads a run (same streams, documents
kept apart).

    python benchmarks/autoconfig_ab.py --name byron-ru --source "--dataset byron-ru" \\
        --budget 43.1 --pairs --keep /tmp/ens --variant "s1=--seed 1" --variant "s2=--seed 2" ...
    python benchmarks/ensemble_gain.py /tmp/ens/s1 /tmp/ens/s2 ...
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from charlstm.api import load
from charlstm.config import from_dict
from charlstm.data.loading import held_out
from charlstm.model.evaluation import evaluate_ids, streams_for


class Average(torch.nn.Module):
    """Runs every member on the same input and returns the log of their mean probabilities (as
    logits: a softmax of a log-probability vector gives it back), with all their states."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x, hidden=None):
        states = hidden or [None] * len(self.members)
        logs, new = [], []
        for member, state in zip(self.members, states, strict=True):
            logits, state = member(x, state)
            logs.append(torch.log_softmax(logits.float(), dim=-1))
            new.append(state)
        mean = torch.logsumexp(torch.stack(logs), dim=0) - math.log(len(logs))
        return mean, new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders trained on the same text")
    args = ap.parse_args()
    models = [load(r, which="best", device="cpu") for r in args.runs]
    vocab = models[0].vocab
    if any(m.vocab.chars != vocab.chars for m in models):
        raise SystemExit("the runs have different vocabularies: train them on the same text")
    config = from_dict(models[0].meta["config"])
    ids, starts, source = held_out(config, "validation", vocab)
    streams = streams_for(len(ids), config.train.eval_streams)

    def loss(model) -> float:
        return evaluate_ids(model, ids, n_streams=streams, starts=starts)

    each = [loss(m.model) for m in models]
    rows = []
    for k in range(2, len(models) + 1):  # the first k runs averaged, against their own mean
        own = sum(each[:k]) / k
        rows.append(
            {"runs": k, "averaged": loss(Average([m.model for m in models[:k]])), "own": own}
        )
    print(
        json.dumps(
            {"source": source, "runs": dict(zip(args.runs, each, strict=True)), "rows": rows}
        )
    )
    for r in rows:
        change = r["averaged"] / r["own"] - 1
        print(
            f"{r['runs']} runs averaged: {r['averaged']:.4f}, "
            f"their own mean {r['own']:.4f} ({change:+.1%})"
        )


if __name__ == "__main__":
    main()
