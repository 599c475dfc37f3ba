"""Every error a user can meet, met through the path a user takes: one test per row of
docs/errors.md.

Each case below provokes one error: through the CLI (`CliRunner`: exit status 2 and exactly one
``charlstm: error:`` line, no traceback) where a user would meet it there, through the library
otherwise. The case checks that the message holds the documented words. Two more tests keep
docs/errors.md honest: its rows and these cases match one to one, and every error raised in the
core modules is documented.
"""

from __future__ import annotations

import ast
import errno
import math
import os
import re
import shutil
import socket
import struct
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import charlstm
from charlstm import atomic, hardware
from charlstm.config import RunConfig, toml_keys
from charlstm.data.batching import make_batcher
from charlstm.data.corpus import load_corpus
from charlstm.errors import UserError
from charlstm.generate.engine import Request
from charlstm.generate.sampling import SamplingParams
from charlstm.runs import checkpoint as ckpt_io
from charlstm.runs.folder import checkpoint_path
from charlstm.training import loop, orchestrate
from tests.helpers import (
    CORPUS_TEXT,
    TALLY,
    invoke,
    one_line_error,
    quiet,
    tiny_regularised_config,
    tiny_regularised_flags,
)

from .test_safe_loading import _join, _split, _with_meta, _with_tensors, hostile_files

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "errors.md"
VOCAB = len(set(CORPUS_TEXT))  # the tiny run's vocabulary size


@dataclass
class Env:
    tmp: Path
    corpus: Path
    run: Path  # a finished tiny run; cases that change it work on a copy
    monkeypatch: pytest.MonkeyPatch

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        return path

    def copy_run(self, name: str = "copy") -> Path:
        dest = self.tmp / name
        shutil.copytree(self.run, dest)
        return dest

    def hostile_run(self, name: str) -> Path:
        """A run folder whose best/ and last/ hold the hostile file `name` of test_safe_loading."""
        data = hostile_files(checkpoint_path(self.run, "last"), self.tmp / "sentinel")[name]
        return self.run_with(data)

    def run_with(self, data: bytes) -> Path:
        run = self.tmp / "hostile"
        for which in ("best", "last"):
            (run / which).mkdir(parents=True, exist_ok=True)
            checkpoint_path(run, which).write_bytes(data)
        return run


def cli(*args) -> str:
    """Run the CLI; it must exit 2 with one `charlstm: error:` line. Returns that line."""
    return one_line_error(invoke(*args), alone=False)


def lib(call: Callable[[], object]) -> str:
    """Call the library; it must raise a one-line `UserError`. Returns its message."""
    with pytest.raises(UserError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def train_cli(env: Env, *args, text: Path | None = None) -> str:
    return cli(
        "train",
        "--text",
        text or env.corpus,
        "--out",
        env.tmp / "out",
        "--no-progress",
        *tiny_regularised_flags(max_steps=3),
        *args,
    )


def generate_cli(run: Path, *args) -> str:
    return cli("generate", run, "--length", "5", "--device", "cpu", *args)


def export_onnx_cli(env: Env, out: Path, twice: bool = False) -> str:
    """`charlstm export RUN --format onnx --out OUT` (after a first, successful one if `twice`)."""
    if twice:
        assert invoke("export", env.run, "--format", "onnx", "--out", out).exit_code == 0
    return cli("export", env.run, "--format", "onnx", "--out", out)


def export_web_cli(env: Env, out: Path, *args) -> str:
    """`charlstm export RUN --format web --out OUT`, which must fail."""
    return cli("export", env.run, "--format", "web", "--out", out, *args)


def _folder_with(env: Env, name: str) -> Path:
    """A folder holding a file of the user's, notes.txt."""
    (env.tmp / name).mkdir()
    env.file(f"{name}/notes.txt", "mine")
    return env.tmp / name


def _export_web_into_a_file(env: Env) -> str:
    """(From Python: the CLI's --out refuses a file with a usage error before charlstm runs.)"""
    from charlstm.export.web import export_web

    return lib(lambda: export_web(env.run, env.file("page.html", "<p>mine</p>")))


def _changed_web_export(env: Env) -> Path:
    """A web export whose index.html the user has edited since."""
    from charlstm.export.web import export_web

    export_web(env.run, env.tmp / "site")
    env.file("site/index.html", "<p>my own page</p>")
    return env.tmp / "site"


def _files(env: Env, folder: str, contents: list) -> Path:
    """A folder of files 0.txt, 1.txt, ... holding `contents` (text or bytes)."""
    for i, content in enumerate(contents):
        env.file(f"{folder}/{i}.txt", content)
    return env.tmp / folder


def _held_out(env: Env, which: str):
    from charlstm.data.loading import held_out

    ck = ckpt_io.read_checkpoint(checkpoint_path(env.run, "best"))
    return held_out(ck.run_config, which, ck.vocab)


def _prepared_other_vocabulary(env: Env) -> str:
    from charlstm.data import prepared
    from charlstm.data.loading import prepare_data

    prepared.prepare(env.corpus, env.tmp / "p", progress=False)
    prepared.prepare(env.file("other.txt", "abc abd\n" * 200), env.tmp / "q", progress=False)
    config = tiny_regularised_config(env.corpus, prepared=str(env.tmp / "q"))
    vocab = prepared.open_prepared(env.tmp / "p").vocab
    return lib(lambda: prepare_data(config, vocab))


def _prepare(env: Env) -> Path:
    from charlstm.data import prepared

    prepared.prepare(env.corpus, env.tmp / "p", progress=False)
    return env.tmp / "p"


def _prepared_docs_damaged(env: Env) -> str:
    from charlstm.data import prepared

    prepared.prepare(_files(env, "two", [CORPUS_TEXT, CORPUS_TEXT]), env.tmp / "p", progress=False)
    docs = env.tmp / "p" / "docs.bin"
    docs.write_bytes(docs.read_bytes()[:-1] + b"\x01")
    return cli("train", "--prepared", env.tmp / "p", "--out", env.tmp / "o", "--no-progress")


def toml(env: Env, text: str) -> Path:
    return env.file("preset.toml", text)


def _val_nan(meta):
    meta["metrics"]["val_loss"] = math.nan


def _bad_dtype(env: Env) -> bytes:
    header, body = _split(checkpoint_path(env.run, "last").read_bytes())
    header["model.fc.bias"] = {**header["model.fc.bias"], "dtype": "XX"}
    return _join(header, body)


def _unreadable_header() -> bytes:
    return struct.pack("<Q", 9) + b"{not json"


def _full_disk(env: Env) -> None:
    def write(fh, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    env.monkeypatch.setattr(atomic, "_write_all", write)


def _fail_checkpoint_writes(env: Env) -> None:
    original = atomic._write_all
    calls = {"n": 0}

    def write(fh, data):
        calls["n"] += 1
        if calls["n"] == 1:  # config.toml goes through; the first checkpoint does not
            return original(fh, data)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    env.monkeypatch.setattr(atomic, "_write_all", write)


def _corrupt_weights_after(env: Env, step: int) -> None:
    step_once = loop.Run.train_step

    def corrupting(self, batch):
        loss = step_once(self, batch)
        if self.state.progress.step == step:
            with torch.no_grad():
                self.model.fc.weight[0, 0] = math.inf
        return loss

    env.monkeypatch.setattr(loop.Run, "train_step", corrupting)


def _no_tensorboard(env: Env) -> None:
    """As on a machine without the tensorboard package: every import of it fails."""
    for name in ("tensorboard", "torch.utils.tensorboard"):
        env.monkeypatch.setitem(sys.modules, name, None)


def _offline(env: Env, urlopen=None) -> None:
    empty = env.tmp / "no-data"
    empty.mkdir(exist_ok=True)
    env.monkeypatch.setenv("CHARLSTM_DATA", str(empty))
    env.monkeypatch.setenv("XDG_CACHE_HOME", str(env.tmp / "cache"))
    if urlopen:
        env.monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


def _wrong_bytes(*args, **kwargs):
    class Response(BytesIO):
        headers: ClassVar[dict[str, str]] = {"Content-Length": "5"}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    return Response(b"wrong")


def _resume_after_text_change(env: Env) -> str:
    text = env.file("growing.txt", env.corpus.read_text())
    run = env.tmp / "growing-run"
    orchestrate.train(
        tiny_regularised_config(text, max_steps=3, eval_interval=3), run, progress=False, log=quiet
    )
    text.write_text(text.read_text() + "☃ new characters ✓")
    return cli("train", "--resume", run, "--max-steps", "6", "--no-progress")


def _stopped_before_first_checkpoint(env: Env) -> str:
    """The error, then the command it suggests must work."""
    run = env.tmp / "early"
    orchestrate.train(
        tiny_regularised_config(env.corpus, max_steps=3, eval_interval=3),
        run,
        progress=False,
        log=quiet,
    )
    shutil.rmtree(run / "best")
    shutil.rmtree(run / "last")  # as if killed before the first save
    line = cli("train", "--resume", run, "--no-progress")
    command = line.split("start it again with: charlstm ")[1].split()
    result = invoke(*command, "--no-progress")
    assert result.exit_code == 0, result.output
    return line


def _sparse_file(env: Env) -> Path:
    path = env.tmp / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.truncate(ckpt_io.MAX_FILE_BYTES + 1)  # sparse: no disk space used
    return path


def _train_into(env: Env, out: Path) -> list:
    return ["train", "--text", env.corpus, "--out", out, "--no-progress"] + list(
        tiny_regularised_flags(max_steps=2)
    )


def _force_into_home(env: Env) -> str:
    """`--out ~ --force`, with a home folder that even holds a run's files."""
    home = env.copy_run("home")
    env.monkeypatch.setenv("HOME", str(home))
    return cli(*_train_into(env, Path("~").expanduser()), "--force")


def _force_with_a_folder_in_the_way(env: Env) -> str:
    run = env.copy_run()
    (run / "config.toml").unlink()
    (run / "config.toml").mkdir()
    return cli(*_train_into(env, run), "--force")


def _oversized(*args, **kwargs):
    class Response(BytesIO):
        headers: ClassVar[dict[str, str]] = {"Content-Length": str(10**9)}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    return Response(b"")


def _float64_weights(env: Env) -> bytes:
    return _with_tensors(
        checkpoint_path(env.run, "best"), lambda t: t.update({k: v.double() for k, v in t.items()})
    )


def _tune_cli(env: Env, *args) -> str:
    return cli("tune", "--study", "s", "--text", env.corpus, "--out", env.tmp / "tune", *args)


def _sqlalchemy_without_quoting(env: Env) -> None:
    """As with an SQLAlchemy release whose URLs do not quote a database path."""
    from sqlalchemy.engine import URL

    env.monkeypatch.setattr(
        URL, "render_as_string", lambda self, hide_password=True: f"sqlite:///{self.database}"
    )


def _read_error(env: Env) -> str:
    path = env.file("unreadable.txt", "text")

    def refuse(self):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    env.monkeypatch.setattr(Path, "read_bytes", refuse)
    return lib(lambda: charlstm.data.corpus.read_text(path))


def _start_file_read_error(env: Env) -> str:
    """--start-file names a file that cannot be read (the start file is read before the model)."""
    path = env.file("unreadable-start.txt", "Ты ")

    def refuse(self):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    env.monkeypatch.setattr(Path, "read_bytes", refuse)
    return generate_cli(env.run, "--start-file", path)


def _no_state(env: Env) -> str:
    run = env.copy_run()
    path = checkpoint_path(run, "last")
    path.write_bytes(_with_meta(path.read_bytes(), lambda m: m.pop("resume")))
    return cli("train", "--resume", run, "--max-steps", "40", "--no-progress")


def _damaged_state(env: Env) -> str:
    run = env.copy_run()
    path = checkpoint_path(run, "last")
    path.write_bytes(
        _with_meta(path.read_bytes(), lambda m: m["resume"]["counters"].__setitem__("step", "x"))
    )
    return cli("train", "--resume", run, "--max-steps", "40", "--no-progress")


def _bf16_missing(env: Env) -> str:
    env.monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    return train_cli(env, "--precision", "bf16")


def _cuda_missing(env: Env) -> str:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    return train_cli(env, "--device", "cuda")


def _registered_base(env: Env, sha256: str | None = None):
    """The tiny run's best weights registered as the shipped base `ru` (in a temporary folder),
    pinned to their own sha256 unless `sha256` says otherwise."""
    import dataclasses
    import hashlib

    from charlstm.runs import bases as shipped

    folder = env.tmp / "base"
    folder.mkdir(exist_ok=True)
    data = checkpoint_path(env.run, "best").read_bytes()
    (folder / shipped.WEIGHTS_FILE).write_bytes(data)
    base = dataclasses.replace(
        shipped.get_base("ru"),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size=len(data),
        location=folder,
    )
    env.monkeypatch.setitem(shipped.BASES, "ru", base)
    return base


def _base_recorded_other(env: Env) -> str:
    _registered_base(env)
    stored = toml(env, 'base = "ru"\nbase_sha256 = "' + "f" * 64 + '"')
    return train_cli(env, "--config", stored)


def _base_corpus_offline(env: Env) -> str:
    from charlstm.data import basecorpus

    coll = basecorpus.collection("ruslit")
    env.monkeypatch.setenv("CHARLSTM_DATA", str(env.tmp / "empty"))
    return lib(lambda: basecorpus.member_bytes(coll, coll.members[0], allow_download=False))


def _export_base_exists(env: Env) -> str:
    from charlstm.data import basecorpus
    from charlstm.export.base import export_base
    from charlstm.runs import bases as shipped

    run = env.copy_run()
    # a run that says it trained on a base corpus (the export checks the name before the folder)
    env.monkeypatch.setitem(basecorpus.BASE_CORPORA, "fake", basecorpus.get_base_corpus("base-ru"))
    env.monkeypatch.setattr(
        "charlstm.runs.checkpoint.Checkpoint.run_config",
        property(lambda self: RunConfig().replace(dataset="fake", text=None)),
    )
    out = env.tmp / "exported"
    out.mkdir()
    (out / shipped.WEIGHTS_FILE).write_bytes(b"earlier")
    return lib(lambda: export_base(run, out))


def _base_corpus_unknown(env: Env) -> str:
    from charlstm.data import basecorpus

    return lib(lambda: basecorpus.load("x"))


def _base_export_not_base_corpus(env: Env) -> str:
    from charlstm.export.base import export_base

    return lib(lambda: export_base(env.run, env.tmp / "exported"))


# id → (what provokes it, words the message must hold). The ids are the rows of docs/errors.md.
CASES: dict[str, tuple[Callable[[Env], str], str]] = {
    # -- base models ---------------------------------------------------------------------------
    "base-unknown": (
        lambda e: train_cli(e, "--base", "klingon"),
        "unknown base 'klingon'; the bases are ru, en",
    ),
    "base-with-init-from": (
        lambda e: train_cli(e, "--base", "ru", "--init-from", e.run),
        "give --base or --init-from/--pretrain, not both",
    ),
    "base-damaged": (
        lambda e: (_registered_base(e, sha256="0" * 64), train_cli(e, "--base", "ru"))[1],
        "does not match its pinned sha256",
    ),
    "base-recorded-other": (_base_recorded_other, "the run was trained from base ru with sha256"),
    "base-corpus-offline": (_base_corpus_offline, "of the collection ruslit"),
    "base-corpus-unknown": (_base_corpus_unknown, "unknown base corpus 'x'"),
    "export-base-exists": (_export_base_exists, "already holds a base export"),
    "base-export-not-base-corpus": (
        _base_export_not_base_corpus,
        "was not trained on a base corpus",
    ),
    # -- configuration ------------------------------------------------------------------------
    "config-key-empty": (
        lambda e: lib(lambda: RunConfig().replace(hidden_size=None)),
        "config key 'hidden_size' cannot be empty",
    ),
    "config-key-not-finite": (
        lambda e: train_cli(e, "--lr", "nan"),
        "config key 'lr' must be a finite number",
    ),
    "config-key-wrong-type": (
        lambda e: train_cli(e, "--config", toml(e, 'hidden_size = "big"')),
        "config key 'hidden_size' must be int, got 'big'",
    ),
    "config-unknown-key": (
        lambda e: lib(lambda: RunConfig().replace(hiden_size=3)),
        "unknown config key 'hiden_size' (did you mean 'hidden_size'?)",
    ),
    "config-unknown-section-key": (
        lambda e: train_cli(e, "--config", toml(e, "[model]\nhiden_size = 3")),
        "unknown key model.hiden_size in",
    ),
    "config-unknown-toml-key": (
        lambda e: train_cli(e, "--config", toml(e, "hiden_size = 3")),
        "unknown key 'hiden_size' in",
    ),
    "bench-set-no-equals": (
        lambda e: cli("bench", "train", "--budget", "1", "--set", "lr"),
        "--set takes KEY=VALUE, got 'lr'",
    ),
    "config-file-missing": (
        lambda e: train_cli(e, "--config", e.tmp / "nope.toml"),
        "does not exist; check the path given to --config",
    ),
    "config-preset-unreadable": (
        lambda e: lib(lambda: toml_keys(e.tmp / "gone.toml")),
        "cannot read the preset",
    ),
    "config-invalid-toml": (
        lambda e: train_cli(e, "--config", toml(e, "hidden_size = = 3")),
        "is not valid TOML",
    ),
    "config-choice": (
        lambda e: train_cli(e, "--config", toml(e, 'cell = "transformer"')),
        "cell must be one of lstm, gru, rnn, got 'transformer'",
    ),
    "cli-choice": (
        lambda e: _click_usage("train", "--cell", "transformer"),
        "Invalid value for '--cell': 'transformer' is not one of 'lstm', 'gru', 'rnn'",
    ),
    "config-not-positive": (
        lambda e: train_cli(e, "--hidden-size", "0"),
        "hidden_size must be positive, got 0",
    ),
    "config-probability": (
        lambda e: train_cli(e, "--dropout", "1.5"),
        "dropout must be in [0, 1), got 1.5",
    ),
    "config-ema": (lambda e: train_cli(e, "--ema", "1"), "ema must be in [0, 1)"),
    "config-weight-decay": (
        lambda e: train_cli(e, "--weight-decay", "-1"),
        "weight_decay must be >= 0",
    ),
    "config-plateau-factor": (
        lambda e: train_cli(e, "--plateau-factor", "2"),
        "plateau_factor must be in (0, 1)",
    ),
    "config-eval-chars": (
        lambda e: train_cli(e, "--eval-chars", "-1"),
        "eval_chars must be >= 0",
    ),
    "config-negative-count": (
        lambda e: train_cli(e, "--early-stopping", "-1"),
        "early_stopping, skip_nonfinite and sample_every must be >= 0",
    ),
    "lr-too-large": (
        lambda e: train_cli(e, "--lr", "1e38"),
        "is far beyond any rate Adam trains with",
    ),
    "cli-unknown-option": (
        lambda e: _click_usage("train", "--hiden-size", "3"),
        "No such option '--hiden-size'",
    ),
    "cli-resume-with-config": (
        lambda e: cli("train", "--resume", e.run, "--config", toml(e, "")),
        "--config cannot be combined with --resume",
    ),
    "cli-resume-other-out": (
        lambda e: cli("train", "--resume", e.run, "--out", e.tmp / "x"),
        "--out cannot differ from --resume",
    ),
    "cli-temperatures": (
        lambda e: generate_cli(e.run, "--temperatures", "warm,cold"),
        "--temperatures takes numbers separated by commas",
    ),
    # -- the text -------------------------------------------------------------------------------
    "text-missing": (
        lambda e: train_cli(e, text=e.tmp / "missing.txt"),
        "does not exist; check the path given to --text",
    ),
    "text-is-folder": (  # training and evaluate take a folder (its files); analyze reads one text
        lambda e: cli("analyze", e.run, "--text", e.tmp),
        "is a folder, not a file; give the path of one file to --text",
    ),
    "text-unreadable": (_read_error, "cannot read"),
    "text-empty": (
        lambda e: train_cli(e, text=e.file("empty.txt", b"")),
        "is empty; give a file with some text",
    ),
    "text-empty-whitespace": (
        lambda e: train_cli(e, text=e.file("blank.txt", " \n\t\n")),
        "is empty",
    ),
    "text-whitespace": (
        lambda e: train_cli(e, text=e.file("blank.txt", "\u3000 \u3000\n")),
        "holds only whitespace",
    ),
    "text-binary": (
        lambda e: train_cli(e, text=e.file("data.bin", b"\x00\x01\x02" * 100)),
        "looks binary (100 NUL",
    ),
    "text-not-utf8": (
        lambda e: train_cli(e, text=e.file("cp1251.txt", "Мой дядя".encode("cp1251"))),
        "is not valid utf-8: byte 0xcc at byte offset 0 cannot be decoded",
    ),
    "text-not-utf8-offset": (
        lambda e: train_cli(e, text=e.file("mixed.txt", b"plain ascii then \xff")),
        "byte 0xff at byte offset 17",
    ),
    "text-unknown-encoding": (
        lambda e: train_cli(e, "--encoding", "klingon"),
        "unknown encoding 'klingon'",
    ),
    "text-lone-surrogate": (
        lambda e: train_cli(
            e, "--encoding", "unicode_escape", text=e.file("escaped.txt", "abc \\ud800 def " * 10)
        ),
        "decodes to a lone surrogate U+D800 at character 4",
    ),
    "text-val-fraction": (
        lambda e: train_cli(e, "--val-fraction", "1.5"),
        "val_fraction must be in [0, 1)",
    ),
    "text-too-short-for-split": (
        lambda e: train_cli(e, text=e.file("short.txt", "abcdefghij")),
        "too few for a validation split",
    ),
    "text-no-validation": (
        lambda e: train_cli(e, "--val-fraction", "0"),
        "the validation text needs at least 2",
    ),
    "text-shorter-than-window": (
        lambda e: train_cli(e, text=e.file("line.txt", "a short line of text\n" * 4)),
        "stream batching with --batch-size 4 and --seq-len 16 needs at least",
    ),
    "text-shorter-than-random-window": (
        lambda e: train_cli(e, "--batching", "random", "--seq-len", "9000"),
        "windows of --seq-len 9000 need at least",
    ),
    # -- many files, the test split --------------------------------------------------------------
    "text-empty-path": (
        lambda e: train_cli(e, "--text", "", text=e.corpus),
        "--text was given an empty path",
    ),
    "text-no-match": (
        lambda e: train_cli(e, text=e.tmp / "nowhere" / "*.txt"),
        "no file matches --text",
    ),
    "text-folder-without-files": (
        lambda e: train_cli(e, text=e.file("hidden/.only", "x").parent),
        "holds no files (hidden ones are left out)",
    ),
    "text-files-all-empty": (
        lambda e: train_cli(e, text=_files(e, "empties", ["", ""])),
        "every file is empty",
    ),
    "text-files-whitespace": (
        lambda e: train_cli(e, text=_files(e, "blanks", [" \n", "\t\n"])),
        "holds only whitespace; give files with text in them",
    ),
    "text-bad-file-in-folder": (
        lambda e: train_cli(e, text=_files(e, "mixed", [CORPUS_TEXT, "Мой".encode("cp1251")])),
        "1.txt' is not valid utf-8",
    ),
    "text-documents-too-few-windows": (
        lambda e: train_cli(e, "--val-fraction", "0.5", text=_files(e, "few", ["abcdefghij"] * 3)),
        "but stream batching needs one per row of --batch-size 4",
    ),
    "text-documents-shorter-than-random-window": (
        lambda e: train_cli(
            e, "--batching", "random", text=_files(e, "short", ["abcdefghijklmn\n"] * 6)
        ),
        "so no random window fits in one",
    ),
    "config-text-no-file": (
        lambda e: lib(lambda: RunConfig().replace(text=[])),
        "text names no file",
    ),
    "config-test-fraction": (
        lambda e: train_cli(e, "--test-fraction", "0.95"),
        "test_fraction must be in [0, 1) and leave text to train on",
    ),
    "text-too-short-for-test-split": (
        lambda e: train_cli(e, "--test-fraction", "0.0001"),
        "too few for a test split",
    ),
    "evaluate-no-test-split": (
        lambda e: lib(lambda: _held_out(e, "test")),
        "the run has no test split; train with --test-fraction",
    ),
    "evaluate-split-name": (
        lambda e: lib(lambda: _held_out(e, "train")),
        "the split must be one of validation, test",
    ),
    "prepared-other-vocabulary": (_prepared_other_vocabulary, "different vocabulary"),
    "prepared-fine-tuning": (
        lambda e: cli(
            *["train", "--prepared", _prepare(e), "--init-from", e.run, "--out", e.tmp / "o"],
            "--no-progress",
        ),
        "cannot fine-tune on a prepared corpus",
    ),
    "prepared-docs-damaged": (_prepared_docs_damaged, "docs.bin does not match its sha256"),
    "text-none": (
        lambda e: cli(
            "train",
            "--dataset",
            "",
            "--out",
            e.tmp / "o",
            "--no-progress",
            *tiny_regularised_flags(max_steps=2),
        ),
        "no training text: give --text FILE or --dataset NAME",
    ),
    "batching-kind": (
        lambda e: lib(lambda: make_batcher("zigzag", [1, 2, 3], 1, 1, 0)),
        "batching must be 'stream' or 'random'",
    ),
    # -- named datasets -------------------------------------------------------------------------
    "dataset-unknown": (
        lambda e: cli("train", "--dataset", "nope", "--out", e.tmp / "o"),
        "unknown dataset 'nope'",
    ),
    "dataset-corrupt-copy": (
        lambda e: (
            _offline(e),
            e.file("no-data/byron_ru.txt", "not byron"),
            cli("train", "--dataset", "byron-ru", "--out", e.tmp / "o"),
        )[2],
        "does not match the pinned sha256 of byron-ru",
    ),
    "dataset-no-local-copy": (
        lambda e: (_offline(e), lib(lambda: load_corpus("byron-ru", None, allow_download=False)))[
            1
        ],
        "no local copy of byron-ru",
    ),
    "dataset-download-failed": (
        lambda e: (
            _offline(e, _no_network),
            cli("train", "--dataset", "byron-ru", "--out", e.tmp / "o"),
        )[1],
        "cannot download byron-ru",
    ),
    "dataset-download-mismatch": (
        lambda e: (
            _offline(e, _wrong_bytes),
            cli("train", "--dataset", "byron-ru", "--out", e.tmp / "o"),
        )[1],
        "does not match its pinned sha256",
    ),
    "dataset-download-too-large": (
        lambda e: (
            _offline(e, _oversized),
            cli("train", "--dataset", "byron-ru", "--out", e.tmp / "o"),
        )[1],
        "is larger than its pinned size (22,521 bytes); nothing was kept",
    ),
    # -- hardware -------------------------------------------------------------------------------
    "device-cuda-missing": (
        _cuda_missing,
        "--device cuda was asked for but no CUDA GPU is visible",
    ),
    "device-unknown": (
        lambda e: lib(lambda: hardware.pick_device("tpu")),
        "device must be auto, cpu or cuda",
    ),
    "precision-unknown": (
        lambda e: lib(lambda: hardware.pick_precision("fp8", torch.device("cpu"))),
        "precision must be auto, fp32 or bf16",
    ),
    "precision-bf16-missing": (
        _bf16_missing,
        "--precision bf16 was asked for but this CPU has no native bf16",
    ),
    # -- run folders and training ---------------------------------------------------------------
    # (the CLI's --out refuses a file itself, with click's usage error)
    "out-is-file": (
        lambda e: lib(
            lambda: charlstm.train(tiny_regularised_config(e.corpus), e.corpus, progress=False)
        ),
        "is a file; give a folder path",
    ),
    "out-holds-run": (
        lambda e: cli(
            "train",
            "--text",
            e.corpus,
            "--out",
            e.run,
            "--no-progress",
            *tiny_regularised_flags(max_steps=2),
        ),
        "holds a run; continue it with --resume, choose another --out, or pass --force",
    ),
    "out-not-empty": (
        lambda e: (
            e.file("notes.txt", "mine"),
            cli(
                "train",
                "--text",
                e.corpus,
                "--out",
                e.tmp,
                "--no-progress",
                *tiny_regularised_flags(max_steps=2),
            ),
        )[1],
        "is not empty and is not a charlstm run",
    ),
    "out-force-protected": (
        _force_into_home,
        "is your home folder; --force never deletes anything",
    ),
    "out-force-not-a-run": (
        lambda e: (
            e.file("mine/notes.txt", "mine"),
            cli(*_train_into(e, e.tmp / "mine"), "--force"),
        )[1],
        "is not a charlstm run (no config.toml or checkpoint that charlstm wrote), so --force",
    ),
    "out-force-in-the-way": (
        _force_with_a_folder_in_the_way,
        "holds 'config.toml' as a folder where a run keeps a file; --force leaves it alone",
    ),
    "out-cannot-create": (
        lambda e: cli(
            "train",
            "--text",
            e.corpus,
            "--out",
            e.corpus / "sub",
            "--no-progress",
            *tiny_regularised_flags(max_steps=2),
        ),
        "cannot create --out",
    ),
    "run-write-failed": (lambda e: (_full_disk(e), train_cli(e))[1], "could not write "),
    "resume-folder-missing": (
        lambda e: cli("train", "--resume", e.tmp / "nowhere"),
        "does not exist; give a folder",
    ),
    "resume-not-a-run": (
        lambda e: cli("train", "--resume", e.tmp),
        "is not a charlstm run folder (no last/ checkpoint)",
    ),
    "resume-before-first-checkpoint": (
        _stopped_before_first_checkpoint,
        "stopped before its first checkpoint, so there is nothing to resume",
    ),
    "resume-model-change": (
        lambda e: cli("train", "--resume", e.run, "--hidden-size", "32"),
        "cannot change the model's hidden_size when resuming",
    ),
    "resume-text-changed": (_resume_after_text_change, "has characters the run's vocabulary lacks"),
    "resume-no-state": (_no_state, "holds no training state"),
    "resume-damaged-state": (_damaged_state, "holds damaged training state"),
    "nonfinite-loss": (
        lambda e: lib(
            lambda: orchestrate.train(
                tiny_regularised_config(e.corpus, max_steps=9, eval_interval=3),
                e.tmp / "nan",
                loss_hook=lambda step, loss: loss * math.nan,
                progress=False,
                log=quiet,
            )
        ),
        "the loss or gradient became non-finite at step 0 (1 time(s), 0 allowed)",
    ),
    # (without a moving average, so that the evaluated weights are the corrupted ones)
    "nonfinite-validation": (
        lambda e: (
            _corrupt_weights_after(e, 5),
            train_cli(e, "--max-steps", "9", "--eval-interval", "3", "--ema", "0"),
        )[1],
        "the validation loss became non-finite at step 6",
    ),
    "nonfinite-weights": (
        lambda e: (
            _corrupt_weights_after(e, 7),
            train_cli(e, "--max-steps", "8", "--eval-interval", "3", "--ema", "0"),
        )[1],
        "the weights became non-finite by step 8",
    ),
    "tensorboard-missing": (
        lambda e: (_no_tensorboard(e), train_cli(e, "--tensorboard", e.tmp / "tb"))[1],
        "--tensorboard needs the tensorboard package, which is not installed",
    ),
    "tensorboard-folder-in-use": (
        lambda e: (
            e.file("tb/out/events.out.tfevents.1700000000.host.1.0", b"old"),
            train_cli(e, "--tensorboard", e.tmp / "tb"),
        )[1],
        "already holds another run's event files",
    ),
    "tensorboard-cannot-write": (
        lambda e: train_cli(e, "--tensorboard", e.corpus),
        "could not write TensorBoard events to",
    ),
    # -- checkpoints ----------------------------------------------------------------------------
    "run-missing": (lambda e: generate_cli(e.tmp / "nowhere"), "run folder"),
    "not-a-run": (
        lambda e: generate_cli(e.tmp),
        "is not a charlstm run folder (no best/ or last/ checkpoint)",
    ),
    "ckpt-no-file": (
        lambda e: lib(lambda: ckpt_io.read_checkpoint(e.tmp / "none.safetensors")),
        "no checkpoint file at",
    ),
    "ckpt-too-large": (
        lambda e: generate_cli(_sparse_file(e)),
        "larger than any charlstm checkpoint",
    ),
    "ckpt-truncated": (
        lambda e: generate_cli(e.hostile_run("truncated-at-7")),
        "is truncated (7 bytes)",
    ),
    "ckpt-truncated-header": (
        lambda e: generate_cli(e.hostile_run("truncated-at-100")),
        "is truncated (header cut short)",
    ),
    "ckpt-truncated-tensors": (
        lambda e: generate_cli(e.run_with(checkpoint_path(e.run, "last").read_bytes()[:-1])),
        "bytes); use an intact copy",
    ),
    "ckpt-pickle": (
        lambda e: generate_cli(e.hostile_run("pickle-protocol-4")),
        "is a pickle (torch.save) file; charlstm never unpickles",
    ),
    "ckpt-torch-save": (
        lambda e: generate_cli(e.hostile_run("torch-save-zip")),
        "is a pickle (torch.save) file",
    ),
    "ckpt-not-safetensors": (
        lambda e: generate_cli(e.hostile_run("text-file")),
        "is not a charlstm checkpoint (not a safetensors file)",
    ),
    "ckpt-huge-header": (
        lambda e: generate_cli(e.hostile_run("huge-header-2^40")),
        "claims a 1,099,511,627,776-byte header",
    ),
    "ckpt-unreadable-header": (
        lambda e: generate_cli(e.run_with(_unreadable_header())),
        "is not a safetensors file (unreadable header)",
    ),
    "ckpt-malformed-st-metadata": (
        lambda e: generate_cli(e.hostile_run("metadata-not-a-string")),
        "has malformed safetensors metadata",
    ),
    "ckpt-malformed-entry": (
        lambda e: generate_cli(e.hostile_run("string-offsets")),
        "has a malformed entry for tensor 'model.fc.bias'",
    ),
    "ckpt-not-charlstm": (
        lambda e: generate_cli(e.hostile_run("plain-safetensors")),
        "is a safetensors file but not a charlstm checkpoint",
    ),
    "ckpt-unreadable-metadata": (
        lambda e: generate_cli(e.hostile_run("metadata-not-json")),
        "has unreadable charlstm metadata",
    ),
    "ckpt-invalid-safetensors": (
        lambda e: generate_cli(e.run_with(_bad_dtype(e))),
        "is not a valid safetensors file",
    ),
    "ckpt-format-tag": (
        lambda e: generate_cli(e.hostile_run("foreign-format-tag")),
        "wrong format tag",
    ),
    "ckpt-format-version": (
        lambda e: generate_cli(e.hostile_run("future-format-version")),
        "has checkpoint format version 99; this charlstm reads version 1",
    ),
    "ckpt-lacks-key": (
        lambda e: generate_cli(e.hostile_run("missing-vocab")),
        "metadata lacks 'vocab'",
    ),
    "ckpt-metadata-not-table": (
        lambda e: generate_cli(e.hostile_run("model-not-a-table")),
        "has malformed metadata (model, config or metrics is not a table)",
    ),
    "ckpt-invalid-config": (
        lambda e: generate_cli(e.hostile_run("unknown-cell")),
        "has an invalid configuration (cell must be one of",
    ),
    "ckpt-malformed-vocab": (
        lambda e: generate_cli(e.hostile_run("lone-surrogate-in-vocab")),
        "has a malformed vocabulary",
    ),
    "ckpt-repeated-vocab": (
        lambda e: generate_cli(e.hostile_run("repeated-vocab")),
        "has a vocabulary with repeated characters",
    ),
    "ckpt-vocab-size": (
        lambda e: generate_cli(e.hostile_run("vocab-size-mismatch")),
        "characters but the model expects",
    ),
    "ckpt-too-many-layers": (
        lambda e: generate_cli(e.hostile_run("million-layers")),
        "declares 10000000 layers but holds only",
    ),
    "ckpt-cannot-build": (
        lambda e: generate_cli(e.hostile_run("huge-hidden-size")),
        "describes a model that cannot be built",
    ),
    "ckpt-weights-mismatch": (
        lambda e: generate_cli(e.hostile_run("missing-tensor")),
        "weights do not match the model (missing ['fc.bias']",
    ),
    "ckpt-wrong-shape": (
        lambda e: generate_cli(e.hostile_run("wrong-shape-tensor")),
        f"tensor fc.weight has shape ({VOCAB + 1}, 16), the configuration says ({VOCAB}, 16)",
    ),
    "ckpt-nonfinite": (
        lambda e: generate_cli(e.hostile_run("nan-weights")),
        "holds non-finite or non-float",
    ),
    "ckpt-dtype": (
        lambda e: generate_cli(e.run_with(_float64_weights(e))),
        "has dtype F64; a charlstm checkpoint holds float32, float16 or bfloat16 there",
    ),
    "ckpt-invalid-step": (
        lambda e: generate_cli(e.hostile_run("negative-step")),
        "has an invalid step count",
    ),
    "ckpt-metric-not-finite": (
        lambda e: generate_cli(
            e.run_with(_with_meta(checkpoint_path(e.run, "best").read_bytes(), _val_nan))
        ),
        "metric val_loss is not finite",
    ),
    "ckpt-write-failed": (
        lambda e: (_fail_checkpoint_writes(e), train_cli(e, "--eval-interval", "3"))[1],
        "the previous checkpoint is intact; free some disk space and resume with --resume",
    ),
    # -- hyperparameter search ------------------------------------------------------------------
    "tune-study-name": (
        lambda e: cli("tune", "--study", "../../x", "--text", e.corpus, "--no-progress"),
        "study name '../../x' may hold only letters, digits, '.', '_' and '-'",
    ),
    "tune-storage": (
        # (a loopback port, and no PostgreSQL driver here: nothing leaves this machine)
        lambda e: _tune_cli(e, "--storage", "postgresql://me:s3cret@127.0.0.1:1/db"),
        "cannot open the study storage 'postgresql://me:***@127.0.0.1:1/db'",
    ),
    "tune-storage-path": (
        lambda e: (_sqlalchemy_without_quoting(e), _tune_cli(e, "--storage", e.tmp / "a?b.db"))[1],
        "cannot be named in a database URL by this SQLAlchemy",
    ),
    # -- generation and evaluation --------------------------------------------------------------
    "temperature-negative": (
        lambda e: generate_cli(e.run, "--temperature", "-1"),
        "temperature must be a finite number >= 0, got -1.0",
    ),
    "temperature-nan": (
        lambda e: generate_cli(e.run, "--temperature", "nan"),
        "temperature must be a finite number >= 0, got nan",
    ),
    "temperature-tiny": (
        lambda e: generate_cli(e.run, "--temperature", "1e-300"),
        "temperature must be 0 (greedy) or at least 1e-100",
    ),
    "top-k-negative": (
        lambda e: generate_cli(e.run, "--top-k", "-1"),
        "top_k must be a whole number >= 0",
    ),
    "top-k-vocabulary": (
        lambda e: generate_cli(e.run, "--top-k", str(VOCAB + 1)),
        f"top_k must be at most the vocabulary size {VOCAB}, got {VOCAB + 1}; 0 disables it",
    ),
    "top-p-zero": (
        lambda e: generate_cli(e.run, "--top-p", "0"),
        "top_p must be in (0, 1], got 0.0",
    ),
    "top-p-above-one": (
        lambda e: generate_cli(e.run, "--top-p", "1.5"),
        "top_p must be in (0, 1], got 1.5",
    ),
    "repetition-penalty": (
        lambda e: generate_cli(e.run, "--repetition-penalty", "0.5"),
        "repetition_penalty must be between 1 and",
    ),
    "repetition-window": (
        lambda e: lib(lambda: SamplingParams(repetition_window=0)),
        "repetition_window must be >= 1",
    ),
    "stop-empty": (lambda e: generate_cli(e.run, "--stop", ""), "stop strings must not be empty"),
    "max-lines": (
        lambda e: generate_cli(e.run, "--max-lines", "0"),
        "max_lines must be >= 1, got 0",
    ),
    "length": (lambda e: generate_cli(e.run, "--length", "0"), "length must be >= 1, got 0"),
    "num-samples": (
        lambda e: generate_cli(e.run, "--num-samples", "0"),
        "num_samples must be >= 1",
    ),
    "start-text-empty": (
        lambda e: generate_cli(e.run, "--start-text", ""),
        "start_text must not be empty",
    ),
    "start-text-unknown": (
        lambda e: generate_cli(e.run, "--start-text", "snow ☃"),
        "the text has characters the model never saw: '☃'; remove them or pass --unknown skip",
    ),
    "start-text-all-unknown": (
        lambda e: generate_cli(e.run, "--start-text", "☃", "--unknown", "skip"),
        "the start text has no character the model knows",
    ),
    "start-file-both": (
        lambda e: generate_cli(
            e.run, "--start-text", "a", "--start-file", e.file("start.txt", "Ты ")
        ),
        "give --start-text or --start-file, not both",
    ),
    "start-file-missing": (
        lambda e: generate_cli(e.run, "--start-file", e.tmp / "nowhere.txt"),
        "does not exist; check the path given to --start-file",
    ),
    "start-file-folder": (
        lambda e: generate_cli(e.run, "--start-file", e.tmp),
        "is a folder, not a file; give the path of one file to --start-file",
    ),
    "start-file-unreadable": (_start_file_read_error, "cannot read start file"),
    "start-file-empty": (
        lambda e: generate_cli(e.run, "--start-file", e.file("empty-start.txt", b"")),
        "is empty; give a file with some text in it",
    ),
    "start-file-not-utf8": (
        lambda e: generate_cli(
            e.run, "--start-file", e.file("start1251.txt", "Мой дядя".encode("cp1251"))
        ),
        "is not valid utf-8: byte 0xcc at byte offset 0",
    ),
    "start-file-unknown": (
        lambda e: generate_cli(e.run, "--start-file", e.file("snow.txt", "snow ☃")),
        "the text has characters the model never saw: '☃'",
    ),
    "unknown-policy": (
        lambda e: lib(lambda: charlstm.load(e.run, device="cpu").generate(" ", unknown="ignore")),
        "unknown-character policy 'ignore' is not one of",
    ),
    "one-seed-per-stream": (
        lambda e: lib(
            lambda: list(charlstm.load(e.run, device="cpu").stream(["a", "b"], seeds=[1]))
        ),
        "give one seed per stream",
    ),
    "prompt-empty": (
        lambda e: lib(lambda: Request(prompt=[], length=5)),
        "the start text is empty after removing unknown characters",
    ),
    "evaluate-too-short": (
        lambda e: cli("evaluate", e.run, "--text", e.file("one.txt", "П")),
        "the text to evaluate needs at least 2 known characters",
    ),
    "evaluate-unknown": (
        lambda e: cli("evaluate", e.run, "--text", e.file("snow.txt", "☃☃☃ snow")),
        "the text has characters the model never saw",
    ),
    # -- exporting ------------------------------------------------------------------------------
    "onnx-missing": (
        lambda e: (
            e.monkeypatch.setitem(sys.modules, "onnxruntime", None),
            export_onnx_cli(e, e.tmp / "onnx"),
        )[1],
        "(onnxruntime is missing); install them with pip install 'charlstm[onnx]'",
    ),
    "export-onnx-exists": (
        lambda e: export_onnx_cli(e, e.tmp / "onnx", twice=True),
        "already holds an ONNX export (model.onnx, model.json); pass --force",
    ),
    "export-onnx-write-failed": (
        lambda e: (_full_disk(e), export_onnx_cli(e, e.tmp / "onnx"))[1],
        "; free some disk space and export again",
    ),
    "onnx-export-invalid": (
        lambda e: generate_cli(e.file("model.json", "{}").parent, "--engine", "onnx"),
        "is not a valid charlstm ONNX export (",
    ),
    "generate-onnx-export": (
        lambda e: generate_cli(e.file("model.onnx", b"").parent),
        "is an ONNX export (charlstm export --format onnx), not a run folder; generate from it",
    ),
    "engine-onnx-device": (
        lambda e: generate_cli(e.run, "--engine", "onnx", "--device", "cuda"),
        "--engine onnx runs on the CPU",
    ),
    "export-web-not-empty": (
        lambda e: export_web_cli(e, _folder_with(e, "site")),
        "is not empty; give a new or empty folder, or pass --force to replace the files of an",
    ),
    "export-web-no-earlier-export": (
        lambda e: export_web_cli(e, _folder_with(e, "site"), "--force"),
        "holds no earlier web export (charlstm-web.json is missing); --force replaces only",
    ),
    "export-web-changed": (
        lambda e: export_web_cli(e, _changed_web_export(e), "--force"),
        "holds index.html, which the earlier web export did not write or which was changed",
    ),
    "export-web-out-is-file": (
        _export_web_into_a_file,
        "is a file; give a folder for the web page",
    ),
    "export-web-cannot-create": (
        lambda e: export_web_cli(e, e.file("a-file", "x") / "site"),
        "cannot create --out",
    ),
    "export-web-write-failed": (
        lambda e: (_full_disk(e), export_web_cli(e, e.tmp / "site"))[1],
        "; free some disk space and export again with --force",
    ),
    "serve-cannot-listen": (
        lambda e: _serve_on_a_busy_port(e),
        "could not listen on 127.0.0.1:",
    ),
    "serve-top-k-vocabulary": (
        lambda e: _served_request_error(e, {"start_text": "a", "top_k": VOCAB + 1}),
        f"top_k: must be at most {VOCAB}, the vocabulary size of model ",
    ),
}


def _served_request_error(env: Env, body: dict) -> str:
    """POST /v1/generate to a server of the tiny run (in process): its one 422 as `field: reason`.
    Served beside a model with a larger vocabulary, so that the run's own check answers."""
    import asyncio

    import httpx

    from charlstm.config import ModelConfig
    from charlstm.data.vocabulary import Vocabulary
    from charlstm.generate.textmodel import TextModel
    from charlstm.model import CharRNN
    from charlstm.serve.app import create_app

    model = charlstm.load(env.run, device="cpu")
    chars = sorted(set(CORPUS_TEXT) | set("0123456789"))
    net = CharRNN(ModelConfig(embedding_size=2, hidden_size=4, num_layers=1, vocab_size=len(chars)))
    larger = TextModel(net, Vocabulary(tuple(chars)), {}, env.tmp / "larger", model.device)
    app = create_app([model, larger])

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.post("/v1/generate", json=body)

    r = asyncio.run(post())
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    return f"{error['field']}: {error['reason']}"


def _serve_on_a_busy_port(env: Env) -> str:
    """`charlstm serve` on a port another socket holds (on loopback only)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        return cli("serve", env.run, "--port", str(held.getsockname()[1]))


def _click_usage(*args) -> str:
    """click's own usage errors: exit 2 and an `Error:` line (with a usage hint above it)."""
    result = invoke(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    return next(line for line in result.stderr.splitlines() if line.startswith("Error:"))


@pytest.fixture
def env(tmp_path, trained_run, corpus, monkeypatch) -> Env:
    return Env(tmp_path, corpus, trained_run, monkeypatch)


@pytest.mark.parametrize("case", sorted(CASES))
def test_error(env, case) -> None:
    """The error of this docs/errors.md row, provoked the way a user would meet it."""
    provoke, words = CASES[case]
    ok = False
    try:
        message = provoke(env)
        assert words in message, message
        ok = True
    finally:
        TALLY.handled(ok, valid=False)


# ---------------------------------------------------------------------------------------- the doc

ROW = re.compile(
    r"^\|\s*`([a-z0-9-]+)`\s*\|(.*)\|\s*`test_errors\.py::test_error\[([a-z0-9-]+)\]`\s*\|\s*$"
)
# Modules whose every raised error must have a row. Errors of features that other people are still
# building (the commands and settings below) are left to their owners to document.
CORE = [
    "generate/textmodel",
    "data/batching",
    "runs/checkpoint",
    "runs/folder",
    "cli",
    "config",
    "data/corpus",
    "data/datasets",
    "generate/engine",
    "hardware",
    "generate/sampling",
    "training/loop",
    "training/orchestrate",
    "training/tensorboard",
    "data/loading",
    "data/vocabulary",
    "export/onnx",
    "export/base",
    "runs/bases",
    "training/bases",
    "data/basecorpus",
]
PENDING_FUNCTIONS = {  # module → functions whose errors are not listed yet
    "cli": {"bench_generate", "prepare", "_run_analysis", "compare", "tune", "_int_list"},
    "config": {"parse_duration"},
    "generate/engine": {
        "__init__",
        "begin_step",
    },  # the engine's internal switches (compiled path, step size)
}
# config: transfer learning
PENDING = ("freeze_layers", "init_from or pretrain", "pretrain_config")


def _doc_rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            assert match[1] == match[3], f"row {match[1]} names the test of {match[3]}"
            assert match[1] not in rows, f"row {match[1]} twice"
            rows[match[1]] = match[2]
    return rows


def test_every_row_of_errors_md_has_a_test_and_every_test_a_row() -> None:
    """docs/errors.md and the cases above list the same errors."""
    rows = _doc_rows()
    assert sorted(rows) == sorted(CASES)


def _literal_parts(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        text = "".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values)
        return text.split("\0")
    if isinstance(node, ast.BinOp):
        return _literal_parts(node.left) + _literal_parts(node.right)
    return []


def test_every_error_raised_in_the_core_modules_is_documented() -> None:
    """Each `UserError`, `CheckpointError` or `NonFiniteLoss` raised in the core modules has its
    message in docs/errors.md (its longest literal part, in backticks, as the doc shows it)."""
    doc = DOC.read_text(encoding="utf-8")
    missing = []
    for module in CORE:
        path = ROOT / "src" / "charlstm" / f"{module}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        owner = {}  # raise call → innermost function around it
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    owner[node] = fn.name  # inner functions are walked later and win
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.args
                and node.func.id in ("UserError", "CheckpointError", "NonFiniteLoss")
            ):
                continue
            if owner.get(node) in PENDING_FUNCTIONS.get(module, ()):
                continue
            parts = _literal_parts(node.args[0])
            part = max(parts, key=len, default="").strip()
            if part and part not in doc and not any(p in "".join(parts) for p in PENDING):
                missing.append(f"{module}.py:{node.lineno}: {part!r}")
    assert not missing, "errors without a row in docs/errors.md:\n" + "\n".join(missing)
