"""What the tests share, as plain functions and constants (the fixtures built on them are in
tests/conftest.py).

- the tiny corpus (`CORPUS_TEXT`) and the tiny model, as a configuration (`tiny_config`) and as the
  same settings spelled as CLI flags (`tiny_flags`), in two variants: plain (nothing random but the
  batches and the initial weights) and regularised (every piece of state a resume must carry);
- run folders made by charlstm's own training (`make_run`), and readers of what they hold;
- the CLI through click's runner (`invoke`), and the check that an error is one line
  (`one_line_error`);
- real `python -m charlstm` processes (`charlstm_cmd`, `subprocess_env`), and an app behind a real
  uvicorn on a loopback port (`on_loopback`);
- the reliability suite's tally of what it tried.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from charlstm.config import RunConfig
from charlstm.runs.checkpoint import Checkpoint, read_checkpoint
from charlstm.runs.folder import checkpoint_path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# --------------------------------------------------------------------------------------- the corpus

# Verse in two scripts: enough characters for a tiny model to train on, and no dependence on the
# downloadable corpora.
POEM = (
    "Прощай, свободная стихия!\nВ последний раз передо мной\n"
    "Ты катишь волны голубые\nИ блещешь гордою красой.\n\n"
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n"
    "Rough winds do shake the darling buds of May,\n"
    "And summer's lease hath all too short a date.\n\n"
)
CORPUS_TEXT = POEM * 8  # 2,224 characters, 65 of them distinct
VAL_FRACTION = 0.1  # the default split: the run's training text is CORPUS_TEXT[:TRAIN_CHARS]
TRAIN_CHARS = len(CORPUS_TEXT) - round(len(CORPUS_TEXT) * VAL_FRACTION)

# ---------------------------------------------------------------------------------------- the model

# A model of a few thousand parameters on one CPU thread, printing no samples.
TINY: dict[str, Any] = {
    "embedding_size": 8,
    "hidden_size": 16,
    "num_layers": 1,
    "batch_size": 4,
    "seq_len": 16,
    "eval_interval": 5,
    "max_steps": 20,
    "threads": 1,
    "device": "cpu",
    "sample_every": 0,
    "auto": "off",  # the settings above as given: tests of the automatic choice say so
}
# Plain: no dropout, weight drop or weight average, fp32 and a quick rate, so that 20 steps visibly
# learn and the same seed gives the same weights on any CPU.
PLAIN: dict[str, Any] = {
    **TINY,
    "dropout": 0.0,
    "embedding_dropout": 0.0,
    "weight_drop": 0.0,
    "ema": 0.0,
    "lr": 1e-2,
    "precision": "fp32",
    "max_time": None,
}
# Regularised: dropout, weight drop and the weight average at their defaults, so that a resume must
# carry the torch RNG and the average too, and the precision the machine picks (bf16 autocast where
# the CPU has it). No early stopping, and a cheap evaluation so that tests can save often.
REGULARISED: dict[str, Any] = {**TINY, "precision": "auto", "early_stopping": 0, "eval_streams": 2}


def tiny_config(text: str | Path, **overrides: Any) -> RunConfig:
    """The plain tiny model trained on the file `text`; `overrides` by config field name."""
    return RunConfig().replace(text=str(text), dataset=None, **{**PLAIN, **overrides})


def tiny_regularised_config(text: str | Path, **overrides: Any) -> RunConfig:
    """The regularised tiny model trained on the file `text`; `overrides` by config field name."""
    return RunConfig().replace(text=str(text), dataset=None, **{**REGULARISED, **overrides})


def _flags(settings: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def tiny_flags(**overrides: Any) -> list[str]:
    """`tiny_config`'s settings as flags of `charlstm train`, `tune` and `compare`; `overrides` by
    config field name, and None leaves a flag out (the command's default or search applies)."""
    return _flags({**PLAIN, **overrides})


def tiny_regularised_flags(**overrides: Any) -> list[str]:
    """`tiny_regularised_config`'s settings as command-line flags (see `tiny_flags`)."""
    return _flags({**REGULARISED, **overrides})


def train_args(text: str | Path, out: str | Path, *more: Any, **overrides: Any) -> list[str]:
    """`charlstm train` of the plain tiny model on `text` into `out`, without a progress bar."""
    return ["train", "--text", text, "--out", out, "--no-progress", *tiny_flags(**overrides), *more]


# -------------------------------------------------------------------------------------- run folders


def quiet(message: str) -> None:
    """A `log` for `train` that prints nothing."""


def make_run(out: str | Path, text: str | Path, *, regularised: bool = False, **overrides) -> Path:
    """A run folder made by charlstm's own training: the tiny model trained on `text` (20 steps
    unless `overrides` say otherwise), quietly. Returns the folder."""
    import charlstm

    config = (tiny_regularised_config if regularised else tiny_config)(text, **overrides)
    return charlstm.train(config, out, progress=False, log=quiet)


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of `run` that a test may change (the shared `trained_run` must stay as it is)."""
    shutil.copytree(run, dest)
    return dest


def checkpoint(run: str | Path, which: str = "last") -> Checkpoint:
    """The validated `best` or `last` checkpoint of a run folder."""
    return read_checkpoint(checkpoint_path(run, which))


def weights(run: str | Path, which: str = "last") -> dict[str, torch.Tensor]:
    """The model weights of a run's checkpoint, by their `state_dict` names."""
    return checkpoint(run, which).model_state()


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl. Strict on purpose: a test's run ended cleanly, so a
    line that does not parse is a bug here (the library's reader would skip a torn last line)."""
    text = (Path(run) / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def folder_files(run: str | Path) -> dict[str, bytes]:
    """The bytes of every file under `run`, by relative path (to show that nothing changed)."""
    run = Path(run)
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def assert_same_tensors(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = ""
) -> None:
    """Bitwise equality of every tensor whose name starts with `prefix`."""
    a = {k: v for k, v in a.items() if k.startswith(prefix)}
    b = {k: v for k, v in b.items() if k.startswith(prefix)}
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


# ---------------------------------------------------------------------------------------- the CLI


def invoke(*args: Any):
    """`charlstm ARGS...` through click's runner (arguments may be paths or numbers)."""
    from click.testing import CliRunner

    from charlstm.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *needles: str, alone: bool = True) -> str:
    """Assert that a CLI call failed as a user error: exit status 2, no traceback, and exactly one
    `charlstm: error:` line on stderr holding every needle. With `alone` that line is all the
    command printed; otherwise warnings and log lines may come before it. Returns the line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in result.stderr.splitlines() if line.startswith("charlstm: error: ")]
    assert len(errors) == 1, result.output
    if alone:
        assert lines == errors, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------- processes


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a real charlstm process: one thread, unbuffered, no warnings."""
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore"
    )
    env.update(extra)
    return env


def charlstm_cmd(*args: Any, helper: bool = False) -> list[str]:
    """The command line of a real `python -m charlstm` (with `helper`, of the same CLI run by
    tests/reliability/_pause_in_save.py, whose disk writes can pause half-way)."""
    entry = [str(TESTS / "reliability" / "_pause_in_save.py")] if helper else ["-m", "charlstm"]
    return [sys.executable, *entry, *map(str, args)]


# ---------------------------------------------------------------------------------------- the tally


@dataclass
class Tally:
    """What the reliability suite tried and how much of it held, by guarantee; printed at the end
    of the run (tests/reliability/conftest.py) as the figures the README quotes."""

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


@contextlib.contextmanager
def on_loopback(
    app, *, header_timeout: float = 10.0, write_timeout: float | None = None, sndbuf: int = 0
) -> Iterator[tuple[Any, socket.socket]]:
    """`app` behind a real uvicorn on a free loopback port, with `charlstm serve`'s HTTP protocol
    (its header and write deadlines); yields (the uvicorn server, its listening socket). `sndbuf`
    fixes the send buffer of its sockets (no autotuning, which lets loopback buffer megabytes)."""
    import uvicorn

    from charlstm.serve import security

    listener = socket.socket()
    if sndbuf:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    listener.bind(("127.0.0.1", 0))
    timeouts = {} if write_timeout is None else {"write_timeout": write_timeout}
    http = security.protocol(header_timeout, **timeouts)
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", http=http))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        for _ in range(1000):
            if server.started:
                break
            time.sleep(0.01)
        assert server.started
        yield server, listener
    finally:
        server.should_exit = True
        thread.join(10)
