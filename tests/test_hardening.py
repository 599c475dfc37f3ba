"""Safe to expose (issue #15, items 7 and 8): what `--force` may delete, study names and database
URLs, how a checkpoint is read, how a dataset is downloaded and checked, and what the processes of
a distributed job send each other.

Each test pins one guarantee the way an attacker (or an unlucky user) would probe it; every one of
them failed on the code before the issue was fixed.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import tracemalloc
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from charlstm.data import corpus as corpus_io
from charlstm.data import datasets
from charlstm.data.loading import prepare_data
from charlstm.errors import CheckpointError, UserError
from charlstm.model import CharRNN
from charlstm.runs import checkpoint as ckpt_io
from charlstm.runs.folder import RunFolder, checkpoint_path
from tests.helpers import (
    ROOT,
    copy_run,
    folder_files,
    invoke,
    one_line_error,
    tiny_config,
    train_args,
)

OLD_RUN = ROOT / "tests" / "data" / "run-before-redesign" / "run"

# ------------------------------------------------------------------------ --force (issue item 7)


def _user_files(folder: Path) -> dict[str, str]:
    """A user's own files under names a run also uses (the layout of the confirmed report)."""
    files = {
        "report/notes.txt": "my notes",
        "best/photo.txt": "a photo",
        "notes.txt": "more notes",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return files


def test_force_refuses_a_folder_that_is_not_a_run(tmp_path, corpus) -> None:
    """`train --out DIR --force` on a folder of the user's own files, even ones named like a run's
    (report/notes.txt, best/photo.txt, a config.toml of another program), deletes nothing and
    says why in one line."""
    folder = tmp_path / "mine"
    folder.mkdir()
    _user_files(folder)
    (folder / "config.toml").write_text('[paper]\ntitle = "my own config"\n')
    before = folder_files(folder)
    one_line_error(
        invoke(*train_args(corpus, folder, "--force")), "is not a charlstm run", "--force"
    )
    assert folder_files(folder) == before


def test_force_replaces_only_the_files_of_a_run(tmp_path, trained_run) -> None:
    """In a real run folder `--force` removes the run's own files (config, metrics, samples,
    checkpoints, the report's files) and nothing else: a user's files in best/ and report/ stay."""
    run = copy_run(trained_run, tmp_path / "run")
    mine = _user_files(run)
    (run / "report.md").write_text("# report")
    (run / "report").mkdir(exist_ok=True)
    (run / "report" / "loss.png").write_bytes(b"\x89PNG")
    (run / "report" / "analysis.json").write_text("{}")
    RunFolder(run).start_new(force=True)
    left = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    assert left == set(mine)
    assert all((run / name).read_text() == text for name, text in mine.items())


def test_force_unlinks_symlinks_and_never_follows_them(tmp_path, trained_run) -> None:
    """A run whose best/, report/, config.toml and samples.txt are symbolic links: `--force`
    removes the links, not what they point to, and never ends in a traceback."""
    run = copy_run(trained_run, tmp_path / "run")
    elsewhere = copy_run(trained_run, tmp_path / "elsewhere")
    (elsewhere / "best" / "photo.txt").write_text("a photo")
    (elsewhere / "report").mkdir()
    (elsewhere / "report" / "loss.png").write_bytes(b"\x89PNG")
    before = folder_files(elsewhere)
    shutil.rmtree(run / "best")
    for name in ("best", "report", "config.toml", "samples.txt"):
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(elsewhere / name, target_is_directory=(elsewhere / name).is_dir())
    RunFolder(run).start_new(force=True)
    assert folder_files(elsewhere) == before
    assert sorted(p.name for p in run.iterdir()) == []


def test_force_never_deletes_in_the_home_folder(tmp_path, trained_run, monkeypatch) -> None:
    """Even a home folder that holds a run's files is never cleared by `--force`."""
    home = copy_run(trained_run, tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    before = folder_files(home)
    with pytest.raises(UserError, match="your home folder"):
        RunFolder(Path("~").expanduser()).start_new(force=True)
    assert folder_files(home) == before


def test_force_never_deletes_in_the_root_folder() -> None:
    """`--out / --force` is refused before anything is looked at for deletion."""
    with pytest.raises(UserError, match="the root folder"):
        RunFolder(Path("/")).start_new(force=True)


def test_a_folder_holding_only_an_interrupted_first_write_counts_as_empty(tmp_path) -> None:
    """A run killed while writing its first config.toml leaves only charlstm's temporary file:
    starting again there (as `tune` does with a trial's folder) is not refused."""
    out = tmp_path / "trial-000"
    out.mkdir()
    (out / ".config.toml.x1y2z3.tmp").write_text("[data]")
    RunFolder(out).start_new(force=True)
    RunFolder(out).remove_stale_temps()
    assert list(out.iterdir()) == []


# -------------------------------------------------------------------- tune's studies (item 8)


@pytest.mark.parametrize("name", ["../../x", "a/b", "s?mode=ro", "", ".hidden", "x" * 101])
def test_study_names_that_leave_their_folder_are_refused(tmp_path, corpus, monkeypatch, name):
    """A study name becomes a file and a folder under runs/tune/: one that could point elsewhere
    (a separator, `..`) or change the database URL (`?`) is refused before anything is written."""
    from charlstm.experiments import tuning

    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    with pytest.raises(UserError, match="study name"):
        tuning.tune(
            tiny_config(corpus, max_steps=2),
            study_name=name,
            trials=1,
            budget=5,
            plots=False,
            progress=False,
            log=lambda msg: None,
        )
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_study_file_path_is_never_parsed_as_url_parameters(tmp_path) -> None:
    """`--storage PATH` with URL characters in it (`?`, `#`, `%`) is the SQLite file at exactly that
    path, not a shorter path with database parameters."""
    from charlstm.experiments import tuning

    path = tmp_path / "odd?mode=ro#x%41.db"
    tuning.open_storage(str(path), grace_period=20)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_database_urls_are_shown_without_their_password(tmp_path) -> None:
    """A storage URL's password never reaches a message or a log line."""
    from charlstm.experiments import tuning

    url = "postgresql://me:s3cret@127.0.0.1:1/db"  # loopback: nothing leaves this machine
    assert tuning.shown_storage(url) == "postgresql://me:***@127.0.0.1:1/db"
    with pytest.raises(UserError) as info:
        tuning.open_storage(url, grace_period=20)
    assert "s3cret" not in str(info.value) and "me:***@" in str(info.value)


# ----------------------------------------------------------------------- checkpoints (item 8)


def _big_checkpoint(tmp_path: Path, trained_run: Path, hidden: int = 512) -> Path:
    """A valid checkpoint of a wider model (about 4 MB), written by charlstm's own writer."""
    meta = dict(ckpt_io.read_checkpoint(checkpoint_path(trained_run, "best")).meta)
    meta["model"] = {**meta["model"], "hidden_size": hidden}
    model = CharRNN(ckpt_io.model_config_from_meta(meta))
    path = tmp_path / "big.safetensors"
    ckpt_io.save_checkpoint(path, {f"model.{k}": v for k, v in model.state_dict().items()}, meta)
    return path


def _peak_python_bytes(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_checkpoint_is_not_read_whole_into_memory(tmp_path, trained_run) -> None:
    """Loading maps the tensors instead of reading the file into a bytes object and copying it
    again: reading a 4 MB checkpoint allocates far less than 4 MB of Python memory."""
    path = _big_checkpoint(tmp_path, trained_run)
    size = path.stat().st_size
    ck = ckpt_io.read_checkpoint(path)  # warm up imports outside the measurement
    assert sum(t.numel() * t.element_size() for t in ck.tensors.values()) > 0.9 * size
    peak = _peak_python_bytes(lambda: ckpt_io.read_checkpoint(path))
    assert peak < size / 4, (peak, size)


def test_a_huge_header_is_refused_before_the_file_is_read(tmp_path) -> None:
    """A 64 MB file whose header claims 2^40 bytes is refused from its first bytes."""
    path = tmp_path / "hostile.safetensors"
    with open(path, "wb") as fh:
        fh.write((2**40).to_bytes(8, "little") + b'{"__metadata__":{}}')
        fh.truncate(64 * 2**20)  # sparse: no disk space used

    def read():
        with pytest.raises(CheckpointError, match="byte header"):
            ckpt_io.read_checkpoint(path)

    assert _peak_python_bytes(read) < 2**20


def _retyped(path: Path, dtype: torch.dtype, prefix: str = "model.") -> bytes:
    ck = ckpt_io.read_checkpoint(path)
    tensors = {k: v.to(dtype) if k.startswith(prefix) else v for k, v in ck.tensors.items()}
    return st_save(tensors, metadata={"charlstm": json.dumps(ck.meta)})


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.bool])
def test_model_weights_of_another_dtype_are_refused(tmp_path, trained_run, dtype) -> None:
    """Model weights must be float32, float16 or bfloat16; anything else is refused by name."""
    path = tmp_path / "retyped.safetensors"
    path.write_bytes(_retyped(checkpoint_path(trained_run, "best"), dtype))
    with pytest.raises(CheckpointError, match="dtype"):
        ckpt_io.read_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load(tmp_path, trained_run, dtype) -> None:
    path = tmp_path / "half.safetensors"
    path.write_bytes(_retyped(checkpoint_path(trained_run, "best"), dtype))
    assert ckpt_io.read_checkpoint(path).tensors["model.fc.weight"].dtype == dtype


def test_the_integer_state_of_a_last_checkpoint_still_loads(tmp_path) -> None:
    """A last/ checkpoint legitimately holds other dtypes: generator states (uint8), the weight
    average's counter and a distributed run's world size (int64), a bf16 hidden state. An old run's
    last/ and one with every process's generators both load, and they are the only exceptions."""
    old = ckpt_io.read_checkpoint(checkpoint_path(OLD_RUN, "last"))
    dtypes = {k: v.dtype for k, v in old.tensors.items()}
    assert dtypes["rng.torch"] == torch.uint8 and dtypes["ema.n_averaged"] == torch.int64
    tensors = {
        **old.tensors,
        "dist.world_size": torch.tensor([2]),
        "rng.rank1.cpu": torch.get_rng_state(),
    }
    path = tmp_path / "last.safetensors"
    path.write_bytes(st_save(tensors, metadata={"charlstm": json.dumps(old.meta)}))
    assert set(ckpt_io.read_checkpoint(path).tensors) == set(tensors)
    for name, value in [("rng.torch", torch.zeros(5056)), ("ema.n_averaged", torch.tensor(1.0))]:
        path.write_bytes(
            st_save({**tensors, name: value}, metadata={"charlstm": json.dumps(old.meta)})
        )
        with pytest.raises(CheckpointError, match="dtype"):
            ckpt_io.read_checkpoint(path)


# -------------------------------------------------------------------------- datasets (item 8)

BYRON = datasets.DATASETS["byron-ru"]


def _response(body: bytes, length: int | None, sent: list[int]):
    """A stand-in for urlopen's response that counts the bytes it hands out."""

    class Response(io.BytesIO):
        headers = {"Content-Length": str(length)} if length is not None else {}

        def read(self, n=-1):
            data = super().read(n)
            sent.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    return Response(body)


def _offline(tmp_path: Path, monkeypatch, urlopen) -> None:
    (tmp_path / "none").mkdir()
    monkeypatch.setenv("CHARLSTM_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


@pytest.mark.parametrize("declared", [True, False])
def test_a_download_stops_at_the_pinned_size(tmp_path, monkeypatch, declared) -> None:
    """A server that sends more than the pinned size (saying so in Content-Length or not) is cut
    off there: at most one block past the size is read, and nothing lands in the cache."""
    body = b"x" * (BYRON.size * 8)
    sent: list[int] = []
    _offline(
        tmp_path,
        monkeypatch,
        lambda *a, **k: _response(body, len(body) if declared else None, sent),
    )
    with pytest.raises(UserError, match="larger than its pinned size"):
        corpus_io.load_corpus("byron-ru", None)
    assert sum(sent) <= BYRON.size + 2**16
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_a_download_is_fsynced_before_it_is_renamed(tmp_path, monkeypatch) -> None:
    """The downloaded corpus reaches the disk (fsync) before it takes its name (rename)."""
    good = (ROOT.parent / "shared" / "data" / BYRON.filename).read_bytes()
    _offline(tmp_path, monkeypatch, lambda *a, **k: _response(good, len(good), []))
    calls: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), replace(a, b))[1])
    text, _ = corpus_io.load_corpus("byron-ru", None)
    assert text == corpus_io.decode_text(good)
    assert "fsync" in calls and calls.index("fsync") < calls.index("replace")


def test_the_bytes_checked_are_the_bytes_trained_on(tmp_path, monkeypatch) -> None:
    """A local copy that changes after its sha256 was checked (another process writing it) cannot
    slip in: the text comes from the bytes that were hashed, read once."""
    good = (ROOT.parent / "shared" / "data" / BYRON.filename).read_bytes()
    folder = tmp_path / "data"
    folder.mkdir()
    copy = folder / BYRON.filename
    copy.write_bytes(good)
    monkeypatch.setenv("CHARLSTM_DATA", str(folder))
    real_open = io.open

    class SwappedAfterClose:
        """The file as opened; once closed, someone replaces the copy's contents."""

        def __init__(self, fh) -> None:
            self.fh = fh

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __iter__(self):
            return iter(self.fh)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()
            return False

        def close(self) -> None:
            self.fh.close()
            with real_open(copy, "wb") as out:
                out.write(b"EVIL\n" * 100)

    def opening(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        swapped = isinstance(file, str | os.PathLike) and Path(file) == copy and "r" in mode
        return SwappedAfterClose(fh) if swapped else fh

    monkeypatch.setattr(io, "open", opening)
    monkeypatch.setattr(builtins, "open", opening)
    text, _ = corpus_io.load_corpus("byron-ru", None)
    monkeypatch.undo()
    assert text == corpus_io.decode_text(good)


# ----------------------------------------------------------------------- distributed (item 8)


def test_processes_exchange_tensors_never_pickles(tmp_path, corpus, monkeypatch) -> None:
    """A distributed run's processes compare their job and gather generator states as tensors:
    the pickle-based collectives (which unpickle what a peer sends) are never called. Two ranks
    are simulated by a stand-in for `all_gather`; a peer with another job is still refused."""
    import torch.distributed as dist

    from charlstm.training import distributed

    for name in ("all_gather_object", "broadcast_object_list", "gather_object"):
        monkeypatch.setattr(dist, name, lambda *a, **k: pytest.fail("a pickle was exchanged"))
    peer_rng = torch.Generator().manual_seed(7).get_state()
    peers: dict[int, torch.Tensor] = {}  # a tensor's size → what rank 1 sends

    def all_gather(parts, local, *args, **kwargs):
        parts[0].copy_(local)
        parts[1].copy_(peers.get(local.numel(), local))

    monkeypatch.setattr(dist, "all_gather", all_gather)
    config = tiny_config(corpus)
    data = prepare_data(config)
    ctx = distributed.Context(0, 2, 0, 2, "gloo", torch.device("cpu"))
    run = distributed.DistributedRun(config, RunFolder(tmp_path), data, lambda m: None, False, ctx)
    peers[peer_rng.numel()] = peer_rng
    extra = run.extra_tensors()
    assert torch.equal(extra["rng.rank1.cpu"], peer_rng)
    assert extra["dist.world_size"].tolist() == [2]
    peers[32] = torch.zeros(32, dtype=torch.uint8)  # another job's digest
    with pytest.raises(UserError, match="disagree"):
        run._check_same_job(data)


def test_no_source_file_uses_a_pickle_based_collective() -> None:
    """Nothing in charlstm calls torch.distributed's *_object collectives."""
    words = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
    users = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "src" / "charlstm").rglob("*.py")
        if any(w in p.read_text(encoding="utf-8") for w in words)
    ]
    assert users == []
