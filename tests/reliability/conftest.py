"""Shared pieces of the reliability suite: a tiny corpus and model, CLI helpers, and the tally.

Every test here tries to break one of charlstm's guarantees (crash-safe checkpoints, exact resume,
graceful signals, numerical faults, safe loading, full disks, hostile input) and records what it
tried in the session's :class:`Tally`. At the end of the run the tally is printed as the figures the
README quotes: kills survived, resumes identical, hostile files rejected, bad inputs handled. The
counts are collected as the tests run, so a skipped or deselected test simply tries nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from charlstm.config import RunConfig
from charlstm.runs import checkpoint as ckpt_io
from charlstm.runs.folder import checkpoint_path

HERE = Path(__file__).parent

# A few lines of verse in two scripts, repeated: enough characters for a tiny model to train on,
# and no dependence on the downloadable corpora.
_VERSE = (
    "Мой дядя самых честных правил,\nКогда не в шутку занемог,\n"
    "Он уважать себя заставил\nИ лучше выдумать не мог.\n\n"
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date.\n\n"
)
CORPUS_TEXT = _VERSE * 8  # about 2,900 characters

# The smallest model that still has every moving part: dropout (so the torch RNG matters), Adam,
# the plateau schedule and carried hidden state. Saves are cheap, so tests can save often.
TINY = dict(
    hidden_size=16,
    embedding_size=8,
    num_layers=1,
    batch_size=4,
    seq_len=16,
    threads=1,
    device="cpu",
    sample_every=0,
    early_stopping=0,
    eval_streams=2,
)


def tiny_config(text: Path | str, **overrides) -> RunConfig:
    return RunConfig().replace(text=str(text), dataset=None, **{**TINY, **overrides})


def cli_flags(**overrides) -> list[str]:
    """`charlstm train` flags for the tiny model, with `overrides` by config field name."""
    flags = ["--no-progress"]
    for name, value in {**TINY, **overrides}.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore"
    )
    return env


def charlstm_cmd(*args: str | Path, helper: bool = False) -> list[str]:
    """The command line of a real `python -m charlstm` (or of the pausing-writer helper)."""
    entry = [str(HERE / "_pause_in_save.py")] if helper else ["-m", "charlstm"]
    return [sys.executable, *entry, *map(str, args)]


def run_charlstm(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        charlstm_cmd(*args), capture_output=True, text=True, timeout=timeout, env=subprocess_env()
    )


def last_tensors(run: Path) -> dict[str, torch.Tensor]:
    return ckpt_io.read_checkpoint(checkpoint_path(run, "last")).tensors


def assert_same_tensors(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = ""
) -> None:
    """Bitwise equality of every tensor whose name starts with `prefix`."""
    a = {k: v for k, v in a.items() if k.startswith(prefix)}
    b = {k: v for k, v in b.items() if k.startswith(prefix)}
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def one_line_error(text: str) -> str:
    """The single `charlstm: error:` line of a CLI's stderr; fails on a traceback or several lines."""
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("charlstm: error:")]
    assert len(lines) == 1, text
    return lines[0]


# ---------------------------------------------------------------------------------------- the tally


@dataclass
class Tally:
    """What the suite tried and how much of it held, by guarantee."""

    tried: Counter = field(default_factory=Counter)
    held: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, ok: bool) -> bool:
        with self.lock:
            self.tried[kind] += 1
            self.held[kind] += bool(ok)
        return ok

    def handled(self, ok: bool, valid: bool) -> bool:
        """One bad input tried: `ok` if it gave a valid result (`valid`) or the documented error."""
        self.note("bad_inputs_valid" if valid else "bad_inputs_refused", int(ok))
        return self.record("bad_inputs", ok)

    def note(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.notes[what] += n


TALLY = Tally()

SUMMARY = (
    ("kills", "kills survived"),
    ("resumes", "resumes identical"),
    ("hostile", "hostile files rejected"),
    ("bad_inputs", "bad inputs handled"),
)


@pytest.fixture(scope="session")
def tally() -> Tally:
    return TALLY


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not any(TALLY.tried.values()):
        return
    tr = terminalreporter
    tr.section("charlstm reliability")
    for kind, label in SUMMARY:
        line = f"{label}: {TALLY.held[kind]}/{TALLY.tried[kind]}"
        if kind == "bad_inputs" and TALLY.tried[kind]:
            line += (
                f" ({TALLY.notes['bad_inputs_valid']} gave a valid result, "
                f"{TALLY.notes['bad_inputs_refused']} a one-line UserError)"
            )
        if kind == "kills" and TALLY.tried[kind]:
            line += (
                f" ({TALLY.notes['kills_mid_write']} of them during a write; "
                f"{TALLY.notes['steps_lost']} saved steps lost)"
            )
        tr.write_line(line)


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "verse.txt"
    path.write_text(CORPUS_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus) -> Path:
    """A finished tiny run (best/ and last/), trained in-process; tests must not modify it."""
    from charlstm.training.orchestrate import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(
        tiny_config(corpus, max_steps=30, eval_interval=10), out, progress=False, log=lambda m: None
    )
    return out


@pytest.fixture(scope="session")
def trained_model(trained_run):
    import charlstm

    return charlstm.load(trained_run, device="cpu")
