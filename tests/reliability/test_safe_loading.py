"""Safe loading: a checkpoint from a stranger can be refused, never executed.

Each hostile file is put where a run's checkpoint belongs and offered to every door a user has: the
library (`read_checkpoint`, `charlstm.load`), `charlstm generate`, `charlstm evaluate` and
`charlstm train --resume`. Every door must answer with one line (a `CheckpointError`, exit status
2 from the CLI), and the pickles, whose unpickling would create a file, must leave no file behind.
Then hypothesis mutates a real checkpoint's header, metadata and resume state at random: each result
must load cleanly or be refused with a `CheckpointError`, never anything else.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

import charlstm
from charlstm.errors import CheckpointError, UserError
from charlstm.runs import checkpoint as ckpt_io
from charlstm.runs.folder import checkpoint_path
from charlstm.training.orchestrate import resume_config, train
from tests.helpers import TALLY, invoke, one_line_error, quiet

pytestmark = pytest.mark.reliability


class _CreatesFile:
    """Unpickling this object opens (so creates) `target`: a stand-in for arbitrary code."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _with_meta(data: bytes, change) -> bytes:
    """The checkpoint `data` with its charlstm metadata passed through `change(meta)`."""
    header, body = _split(data)
    meta = json.loads(header["__metadata__"]["charlstm"])
    change(meta)
    header["__metadata__"]["charlstm"] = json.dumps(meta)
    return _join(header, body)


def _with_tensors(path: Path, change) -> bytes:
    ck = ckpt_io.read_checkpoint(path)
    tensors = dict(ck.tensors)
    change(tensors)
    return st_save(tensors, metadata={"charlstm": json.dumps(ck.meta)})


def hostile_files(good: Path, sentinel: Path) -> dict[str, bytes]:
    """name → bytes of a file that must be refused. `good` is a real last/ checkpoint."""
    data = good.read_bytes()
    header, body = _split(data)
    n = struct.unpack("<Q", data[:8])[0]
    files: dict[str, bytes] = {}
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        files[f"pickle-protocol-{proto}"] = pickle.dumps(
            {"model": _CreatesFile(sentinel)}, protocol=proto
        )
    for zipped in (True, False):
        buf = io.BytesIO()
        torch.save(
            {"model.fc.weight": torch.zeros(2), "x": _CreatesFile(sentinel)},
            buf,
            _use_new_zipfile_serialization=zipped,
        )
        files[f"torch-save-{'zip' if zipped else 'legacy'}"] = buf.getvalue()
    for cut in (0, 7, 8, 9, 100, 8 + n - 1, 8 + n, len(data) // 2, len(data) - 1):
        files[f"truncated-at-{cut}"] = data[:cut]
    files["huge-header-2^40"] = struct.pack("<Q", 2**40) + b'{"__metadata__":{}}'
    files["huge-header-2^64-1"] = struct.pack("<Q", 2**64 - 1) + b"{" + b"\0" * 64
    files["text-file"] = "Мой дядя самых честных правил\n".encode() * 10
    files["empty-json-header"] = _join({}, b"")

    def wrong_shape(t):
        t["model.fc.weight"] = torch.zeros(
            t["model.fc.weight"].shape[0] + 1, t["model.fc.weight"].shape[1]
        )

    def transposed(t):
        t["model.fc.weight"] = t["model.fc.weight"].T.contiguous()

    files["wrong-shape-tensor"] = _with_tensors(good, wrong_shape)
    files["transposed-tensor"] = _with_tensors(good, transposed)
    files["integer-tensor"] = _with_tensors(
        good, lambda t: t.__setitem__("model.fc.bias", t["model.fc.bias"].to(torch.int32))
    )
    files["nan-weights"] = _with_tensors(
        good,
        lambda t: t.__setitem__("model.fc.bias", torch.full_like(t["model.fc.bias"], float("nan"))),
    )
    files["missing-tensor"] = _with_tensors(good, lambda t: t.pop("model.fc.bias"))
    files["extra-model-tensor"] = _with_tensors(
        good, lambda t: t.__setitem__("model.spy", torch.zeros(1))
    )
    files["plain-safetensors"] = st_save({"w": torch.zeros(3)})

    def set_key(key, value):
        return lambda m: m.__setitem__(key, value)

    def set_model(key, value):
        return lambda m: m["model"].__setitem__(key, value)

    files["future-format-version"] = _with_meta(data, set_key("format_version", 99))
    files["foreign-format-tag"] = _with_meta(data, set_key("format", "something-else"))
    files["vocab-size-mismatch"] = _with_meta(data, lambda m: m["vocab"].append("\u2603"))
    files["repeated-vocab"] = _with_meta(data, lambda m: m["vocab"].__setitem__(1, m["vocab"][0]))
    files["lone-surrogate-in-vocab"] = _with_meta(
        data, lambda m: m["vocab"].__setitem__(0, "\ud800")
    )
    files["empty-vocab"] = _with_meta(
        data, lambda m: (m.__setitem__("vocab", []), set_model("vocab_size", 0)(m))
    )
    files["million-layers"] = _with_meta(data, set_model("num_layers", 10**7))
    files["huge-hidden-size"] = _with_meta(data, set_model("hidden_size", 10**12))
    files["unknown-cell"] = _with_meta(data, set_model("cell", "transformer"))
    files["model-not-a-table"] = _with_meta(data, set_key("model", "xy"))
    files["metrics-a-list"] = _with_meta(data, set_key("metrics", [1, 2]))
    files["negative-step"] = _with_meta(data, set_key("step", -3))
    files["missing-vocab"] = _with_meta(data, lambda m: m.pop("vocab"))
    files["metadata-not-json"] = _join({**header, "__metadata__": {"charlstm": "{not json"}}, body)
    files["metadata-not-a-string"] = _join({**header, "__metadata__": {"charlstm": 5}}, body)
    files["string-offsets"] = _join(
        {**header, "model.fc.bias": {**header["model.fc.bias"], "data_offsets": ["0", "x"]}}, body
    )
    files["offsets-past-the-end"] = _join(
        {**header, "model.fc.bias": {**header["model.fc.bias"], "data_offsets": [0, 10**15]}}, body
    )
    files["deeply-nested-header"] = struct.pack("<Q", 200_002) + b"[" * 100_001 + b"]" * 100_001
    nested = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    files["deeply-nested-object"] = struct.pack("<Q", len(nested)) + nested
    return files


@pytest.fixture(scope="module")
def good_checkpoint(trained_run) -> Path:
    return checkpoint_path(trained_run, "last")


def _doors(run: Path, corpus: Path) -> dict[str, object]:
    """Every way a user can open `run`; each returns the CLI's stderr or raises in the library."""

    def cli(*args):
        return one_line_error(invoke(*args))

    return {
        "read_checkpoint": lambda: ckpt_io.read_checkpoint(checkpoint_path(run, "best")),
        "charlstm.load": lambda: charlstm.load(run, device="cpu"),
        "generate": lambda: cli("generate", run, "--length", "5", "--device", "cpu"),
        "evaluate": lambda: cli("evaluate", run, "--text", corpus, "--json"),
        "train --resume": lambda: cli(
            "train", "--resume", run, "--max-steps", "99", "--no-progress"
        ),
    }


def test_hostile_checkpoints_are_refused_and_never_executed(
    tmp_path, good_checkpoint, corpus
) -> None:
    """Pickles and torch.save files (whose loading would create a file), truncated files, wrong
    shapes, huge headers and malformed metadata: every door refuses each in one line, and the
    file the pickles would create never appears."""
    sentinel = tmp_path / "pwned"
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_CreatesFile(control)))  # the payload is live: unpickling runs it
    assert control.exists()
    failures = []
    for name, data in hostile_files(good_checkpoint, sentinel).items():
        run = tmp_path / name
        for which in ("best", "last"):
            (run / which).mkdir(parents=True)
            checkpoint_path(run, which).write_bytes(data)
        (run / "config.toml").write_text("")
        refused = True
        for door, open_run in _doors(run, corpus).items():
            try:
                open_run()
                if door in ("read_checkpoint", "charlstm.load"):
                    refused = False
                    failures.append(f"{name}: {door} accepted it")
            except CheckpointError as exc:
                assert "\n" not in str(exc)
            except AssertionError as exc:
                refused = False
                failures.append(f"{name}: {door}: {exc}")
            except Exception as exc:  # noqa: BLE001 (any other exception is what this test reports)
                refused = False
                failures.append(f"{name}: {door} raised {type(exc).__name__}: {exc}")
        TALLY.record("hostile", refused and not sentinel.exists())
    assert not sentinel.exists(), "a hostile pickle was unpickled"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "layout", ["missing", "empty", "unrelated-files", "empty-checkpoint-folders", "text-file"]
)
def test_a_folder_that_is_not_a_run_is_refused(tmp_path, corpus, layout) -> None:
    """A missing path, an empty folder, a folder of other files, best/ and last/ without checkpoint
    files, or a text file given as the run: one-line errors from every door, never a traceback."""
    run = tmp_path / "not-a-run"
    if layout != "missing":
        run.mkdir()
    if layout == "unrelated-files":
        (run / "notes.txt").write_text("hello")
        (run / "weights.bin").write_bytes(b"\x00" * 64)
    if layout == "empty-checkpoint-folders":
        (run / "best").mkdir()
        (run / "last").mkdir()
    if layout == "text-file":
        run.rmdir()
        run.write_text("not a checkpoint\n" * 5)
    ok = False
    try:
        for door, open_run in _doors(run, corpus).items():
            if door == "train --resume" and layout == "text-file":
                continue  # click itself refuses a file for --resume (exit 2, see test_errors)
            if door in ("read_checkpoint", "charlstm.load"):
                with pytest.raises(CheckpointError):
                    open_run()
            else:
                open_run()  # asserts exit status 2 and a single error line
        ok = True
    finally:
        TALLY.record("hostile", ok)


def test_resume_state_damaged_in_a_valid_checkpoint_is_refused(
    tmp_path, trained_run, corpus
) -> None:
    """The weights and schema may be fine while the training state inside last/ is damaged (a
    wrong-shape Adam moment or hidden state, counters of the wrong type): resuming must refuse it
    with one line before any step runs, and never crash mid-training."""
    good = checkpoint_path(trained_run, "last")

    def optim_shape(t):
        key = next(k for k in t if k.startswith("optim.") and k.endswith("exp_avg"))
        t[key] = torch.zeros(3, 3)

    def hidden_shape(t):
        t["hidden.0"] = torch.zeros(5, 5, 5)

    cases = {
        "optimizer-moment-shape": _with_tensors(good, optim_shape),
        "hidden-state-shape": _with_tensors(good, hidden_shape),
        "rng-state": _with_tensors(
            good, lambda t: t.__setitem__("rng.torch", torch.zeros(3, dtype=torch.uint8))
        ),
        "counters-wrong-type": _with_meta(
            good.read_bytes(), lambda m: m["resume"]["counters"].__setitem__("step", "five")
        ),
        "counters-unknown-key": _with_meta(
            good.read_bytes(), lambda m: m["resume"]["counters"].__setitem__("spy", 1)
        ),
        "batcher-state": _with_meta(
            good.read_bytes(), lambda m: m["resume"].__setitem__("batcher", {})
        ),
        "no-resume-state": _with_meta(good.read_bytes(), lambda m: m.pop("resume")),
    }
    failures = []
    for name, data in cases.items():
        run = tmp_path / name
        shutil.copytree(trained_run, run)
        checkpoint_path(run, "last").write_bytes(data)
        before = checkpoint_path(run, "last").read_bytes()
        ok = False
        try:
            train(
                resume_config(run, {"max_steps": 40}),
                run,
                resume=True,
                progress=False,
                log=quiet,
            )
            failures.append(f"{name}: resumed from damaged state")
        except UserError as exc:
            ok = "\n" not in str(exc)
        except Exception as exc:  # noqa: BLE001 (any other exception is what this test reports)
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        ok = ok and checkpoint_path(run, "last").read_bytes() == before
        TALLY.record("hostile", ok)
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_checkpoints_load_or_are_refused(tmp_path, good_checkpoint, data) -> None:
    """A real checkpoint with random damage (metadata values replaced, header bytes flipped, tensor
    entries renamed or re-typed, the file cut) either loads as a valid model or raises
    `CheckpointError`; no other exception ever escapes `read_checkpoint`."""
    raw = good_checkpoint.read_bytes()
    header, body = _split(raw)
    how = data.draw(
        st.sampled_from(["meta", "model-meta", "resume", "header-bytes", "entry", "cut"])
    )
    if how in ("meta", "model-meta", "resume"):
        meta = json.loads(header["__metadata__"]["charlstm"])
        target = meta if how == "meta" else meta["model"] if how == "model-meta" else meta["resume"]
        key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=4))
        if data.draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = data.draw(json_values)
        header["__metadata__"]["charlstm"] = json.dumps(meta)
        blob = _join(header, body)
    elif how == "header-bytes":
        n = struct.unpack("<Q", raw[:8])[0]
        blob = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, 8 + n - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    elif how == "entry":
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        entry = dict(header[name])
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        entry[field] = data.draw(json_values | st.sampled_from(["F16", "I64", "BOOL", "F64"]))
        header[name] = entry
        blob = _join(header, body)
    else:
        blob = raw[: data.draw(st.integers(0, len(raw) - 1))]
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(blob)
    ok = valid = False
    try:
        ck = ckpt_io.read_checkpoint(path)
        model = charlstm.load(path, device="cpu")  # a file that validates must also work
        model.generate(ck.vocab.chars[0], length=3, seed=1)
        ok = valid = True
    except CheckpointError as exc:
        ok = "\n" not in str(exc)
    finally:
        TALLY.handled(ok, valid)
    assert ok


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    key=st.sampled_from(["counters", "optimizer", "plateau", "batcher", "threads"]),
    value=json_values,
)
def test_fuzzed_resume_state_resumes_or_is_refused(
    tmp_path_factory, trained_run, key, value
) -> None:
    """The training state of last/ replaced by random JSON: `--resume` either trains on or refuses
    with a `UserError`, before touching the checkpoint; it never crashes."""
    run = tmp_path_factory.mktemp("fuzz-resume") / "run"
    shutil.copytree(trained_run, run)
    path = checkpoint_path(run, "last")
    path.write_bytes(_with_meta(path.read_bytes(), lambda m: m["resume"].__setitem__(key, value)))
    ok = valid = False
    try:
        train(
            resume_config(run, {"max_steps": 32}),
            run,
            resume=True,
            progress=False,
            log=quiet,
        )
        ok = valid = True
    except UserError as exc:
        ok = "\n" not in str(exc)
    finally:
        TALLY.handled(ok, valid)
    assert ok
