"""Training end to end on a tiny corpus: run folder, determinism, exact resume, early stopping,
the validation slice and the final full pass."""

import itertools
import math

import numpy as np
import pytest
import torch

from charlstm.api import load
from charlstm.config import ModelConfig
from charlstm.data.batching import stream_layout
from charlstm.errors import NonFiniteLoss, UserError
from charlstm.model import CharRNN, evaluation
from charlstm.model.evaluation import (
    Stretches,
    loss_sums,
    spread_slice,
    stream_heads,
    streams_for,
)
from charlstm.training.orchestrate import resume_config, train
from tests.helpers import (
    CORPUS_TEXT,
    TRAIN_CHARS,
    assert_same_tensors,
    checkpoint,
    read_metrics,
    tiny_config,
    weights,
)

VAL_TEXT = CORPUS_TEXT[TRAIN_CHARS:]  # the tiny corpus's validation split (221 predictions)


def test_run_folder_has_everything(corpus, tmp_path):
    """A run writes config.toml, metrics.jsonl, best/ and last/ checkpoints."""
    run = train(tiny_config(corpus, sample_every=2), tmp_path / "run", progress=False)
    for name in (
        "config.toml",
        "metrics.jsonl",
        "samples.txt",
        "best/checkpoint.safetensors",
        "last/checkpoint.safetensors",
    ):
        assert (run / name).exists(), name
    lines = read_metrics(run)
    scheduled = [x for x in lines if not x.get("final")]
    assert [x["step"] for x in scheduled] == [5, 10, 15, 20]
    assert all({"train_loss", "val_loss", "lr", "chars_per_s", "time"} <= set(x) for x in scheduled)
    assert lines[-1]["final"] and {"val_loss", "best_val_loss", "best_step"} <= set(lines[-1])


def test_training_lowers_validation_loss(corpus, tmp_path):
    config = tiny_config(corpus, max_steps=60, eval_interval=10)
    run = train(config, tmp_path / "run", progress=False)
    lines = read_metrics(run)
    assert lines[-1]["val_loss"] < lines[0]["val_loss"]


def test_same_seed_same_weights(corpus, tmp_path):
    a = train(tiny_config(corpus), tmp_path / "a", progress=False)
    b = train(tiny_config(corpus), tmp_path / "b", progress=False)
    assert_same_tensors(weights(a), weights(b))


@pytest.mark.parametrize(
    "batching, extra",
    [
        ("stream", {}),
        ("random", {}),
        ("stream", {"weight_drop": 0.5, "ema": 0.9, "warmup_steps": 4, "eval_chars": 40}),
    ],
)
def test_resume_equals_uninterrupted(corpus, tmp_path, batching, extra):
    """N steps, stop, resume to 2N: bitwise the same weights as going straight to 2N (including
    the weight average, weight drop's random masks and the warm-up)."""
    cfg = tiny_config(
        corpus, batching=batching, max_steps=24, eval_interval=5, dropout=0.2, num_layers=2, **extra
    )
    straight = train(cfg, tmp_path / "straight", progress=False)
    half = train(cfg.replace(max_steps=12), tmp_path / "half", progress=False)
    resumed = train(resume_config(half, {"max_steps": 24}), half, resume=True, progress=False)
    for which in ("last", "best"):
        assert_same_tensors(weights(straight, which), weights(resumed, which))


def test_best_checkpoint_is_kept_not_last(corpus, tmp_path):
    """With a learning rate that diverges, best/ holds the lowest validation loss seen."""
    run = train(
        tiny_config(corpus, max_steps=40, eval_interval=5, lr=0.3, early_stopping=0),
        tmp_path / "run",
        progress=False,
    )
    lines = read_metrics(run)
    best = checkpoint(run, "best").meta["metrics"]["val_loss"]
    assert best == pytest.approx(min(x["val_loss"] for x in lines))


def test_early_stopping_stops(corpus, tmp_path):
    run = train(
        tiny_config(corpus, max_steps=400, eval_interval=2, lr=0.5, early_stopping=2),
        tmp_path / "run",
        progress=False,
    )
    steps = [record["step"] for record in read_metrics(run)]
    assert max(steps) < 400


def test_nonfinite_loss_stops_and_keeps_checkpoint(corpus, tmp_path):
    cfg = tiny_config(corpus, max_steps=30)
    hook = lambda step, loss: loss * float("nan") if step >= 12 else loss
    with pytest.raises(NonFiniteLoss, match="step 12"):
        train(cfg, tmp_path / "run", progress=False, loss_hook=hook)
    assert checkpoint(tmp_path / "run").meta["step"] == 10


def test_resume_refuses_model_changes(trained_run):
    with pytest.raises(UserError, match="hidden_size"):
        resume_config(trained_run, {"hidden_size": 32})


def test_a_run_resumed_with_more_time_decays_over_its_new_budget(corpus, tmp_path):
    """The cosine's decay_steps follow --max-time on resume: twice the time, twice the steps, so
    a run that ended at the floor rate goes on from the middle of its cosine instead of idling
    there; --decay-steps given again wins, and the same budget changes nothing."""
    config = tiny_config(
        corpus, schedule="cosine", lr=1e-2, min_lr=1e-3, decay_steps=8, max_time=1000.0
    )
    run = train(config.replace(max_steps=10), tmp_path / "run", progress=False)
    assert read_metrics(run)[-1]["lr"] == pytest.approx(1e-3)  # its last steps at the floor
    assert resume_config(run, {"max_steps": 20}).optim.decay_steps == 8
    assert resume_config(run, {"max_time": 500.0}).optim.decay_steps == 4
    assert resume_config(run, {"max_time": 2000.0, "decay_steps": 12}).optim.decay_steps == 12
    assert resume_config(run, {"max_time": 1e6, "max_steps": 30}).optim.decay_steps == 30
    resumed = resume_config(run, {"max_time": 2000.0, "max_steps": 20})
    assert resumed.optim.decay_steps == 16
    train(resumed, run, resume=True, progress=False)
    lrs = {r["step"]: r["lr"] for r in read_metrics(run) if not r.get("final")}
    assert lrs[15] == pytest.approx(1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * 14 / 16)))
    assert lrs[15] > 1.1e-3 and lrs[20] == pytest.approx(1e-3)
    assert checkpoint(run, "last").meta["config"]["optim"]["decay_steps"] == 16


def test_save_load_gives_identical_logits(trained_run):
    model = load(trained_run, which="last")
    ck = checkpoint(trained_run, "last")
    fresh = CharRNN(ck.model_config)
    fresh.load_state_dict(ck.model_state())
    fresh.eval()
    x = torch.randint(0, len(model.vocab), (2, 30))
    assert torch.equal(model.model(x)[0], fresh(x)[0])


def test_generate_and_evaluate_from_python(corpus, trained_run):
    model = load(trained_run)
    a = model.generate(start_text="Ты ", length=50, temperature=0.8, seed=3, num_samples=2)
    b = model.generate(start_text="Ты ", length=50, temperature=0.8, seed=3, num_samples=2)
    assert a == b and all(s.startswith("Ты ") and len(s) == 53 for s in a)
    assert a[0] != a[1]
    greedy = model.generate(start_text="Ты ", length=20, temperature=0)
    assert greedy == model.generate(start_text="Ты ", length=20, temperature=0, seed=99)
    metrics = model.evaluate(corpus.read_text(encoding="utf-8")[:500])
    assert metrics["bits_per_char"] == pytest.approx(metrics["loss"] / 0.6931471805599453)


@pytest.mark.slow
def test_quality_per_time_reports_the_roofline_against_the_peak_it_measured(corpus):
    """The benchmark's JSON: a validation loss, speeds, and a roofline figure that is the step's
    GFLOP/s over the median matrix-multiply peak measured between the step's timing slices."""
    from charlstm.bench.training import quality_per_time

    result = quality_per_time(tiny_config(corpus, max_steps=None), budget=1.0, speed_seconds=0.6)
    assert result["val_loss"] > 0 and result["steps"] > 0
    low, high = result["matmul_gflops_range"]
    assert 0 < low <= result["matmul_gflops"] <= high
    assert result["roofline"] == pytest.approx(
        result["step_gflops"] / result["matmul_gflops"], abs=1e-3
    )
    assert result["library_chars_per_s"] > 0 and result["bare_chars_per_s"] > 0


# ------------------------------------------------------------------- the slice and the full pass


@pytest.fixture
def short_stretches(monkeypatch):
    """Slices of stretches short enough for the tiny corpus's 221 validation predictions: 8
    scored characters after 4 of warm-up."""
    monkeypatch.setattr(evaluation, "SLICE_STRETCH", 8)
    monkeypatch.setattr(evaluation, "SLICE_WARMUP", 4)


def test_the_slice_is_short_stretches_spread_over_the_whole_text():
    """ceil(n / 128) stretches of 128 scored characters after 64 of warm-up, one in the middle
    of each of as many equal parts of the text; 0, or a slice that would read as much as the
    text, means the whole text (None)."""
    reading = spread_slice(100_001, 16_384)
    K = 16_384 // 128
    assert (len(reading.starts), reading.length, reading.warmup) == (K, 192, 64)
    spacing = 100_000 / K
    assert np.allclose(reading.starts, np.arange(K) * spacing + (spacing - 192) / 2, atol=1)
    assert reading.starts[0] > 0 and reading.starts[-1] + 192 < 100_000  # the middle of each part
    assert len(spread_slice(100_001, 16_385).starts) == K + 1  # at least n scored
    assert spread_slice(100_001, 0) is None
    assert spread_slice(24_577, 16_384) is None  # 128 × 192 = 24,576: all of it, or more
    assert spread_slice(24_578, 16_384) is not None


def test_the_heads_of_the_streams_are_about_n_chars_or_everything():
    """The slice of older runs: ceil(n/S) columns of each of the S streams; 0, or a slice as
    large as the text, means the whole text (None)."""
    S, L = stream_layout(10_001, 8)
    assert (S, L) == (8, 1250)
    assert stream_heads(10_001, 8, 800).length == 100
    assert stream_heads(10_001, 8, 801).length == 101
    assert list(stream_heads(10_001, 8, 800).starts) == [r * L for r in range(S)]
    assert stream_heads(10_001, 8, 0) is None
    assert stream_heads(10_001, 8, 10_000) is None


def test_a_long_split_is_read_in_more_streams_and_a_short_one_as_configured():
    assert streams_for(1, 8) == 8
    assert streams_for(400_000, 8) == 8  # up to 8 × 50 k: as configured
    assert streams_for(1_600_000, 32) == 32
    assert streams_for(1_000_000, 8) == 16  # 20 streams of 50 k fit: the power of two below
    assert streams_for(13_000_000, 8) == 256  # the Linux C files' validation split
    assert streams_for(10**9, 8) == 256
    assert streams_for(120_000, 1) == 2
    assert streams_for(10**9, 512) == 512  # more than the cap, given: kept


def test_every_reader_of_a_long_split_reads_it_in_the_same_streams(corpus, tmp_path, monkeypatch):
    """Training's final figure, `charlstm evaluate RUN` and the report read a split longer than
    eval_streams × STREAM_CHARS in the same, larger number of streams (a shorter STREAM_CHARS
    stands in for a 13 M-character split)."""
    from charlstm.analysis.report import analyze_run
    from charlstm.model.evaluation import split_metrics

    monkeypatch.setattr(evaluation, "STREAM_CHARS", 20)
    cfg = tiny_config(corpus, eval_streams=1, max_steps=6, eval_interval=3)
    run = train(cfg, tmp_path / "run", progress=False)
    model = load(run, which="last", device="cpu")
    val_ids = model.vocab.encode(VAL_TEXT)
    streams = streams_for(len(val_ids), 1)
    assert streams > 1
    final = read_metrics(run)[-1]
    assert final["final"]
    many = evaluation.evaluate_ids(model.model, val_ids, n_streams=streams)
    one = evaluation.evaluate_ids(model.model, val_ids, n_streams=1)
    assert final["val_loss"] == pytest.approx(many, rel=1e-6)
    assert many != pytest.approx(one, rel=1e-4)
    assert split_metrics(model.model, cfg, "validation", model.vocab)["loss"] == pytest.approx(
        many, rel=1e-6
    )
    report = analyze_run(run, text="a line\n", which="last", device="cpu")
    assert report["validation"]["loss"] == pytest.approx(many, rel=1e-6)


def test_the_heads_of_the_streams_are_read_as_the_full_pass_reads_them():
    """The older slice's sums are, row by row, those of a full pass over each row's first
    columns: S evenly spaced stretches of the text, each from a fresh state."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=11, embedding_size=4, hidden_size=8, num_layers=1))
    ids = np.random.default_rng(0).integers(0, 11, 1001)
    S, L = stream_layout(len(ids), 4)
    heads = stream_heads(len(ids), 4, 37 * S)
    total, count = loss_sums(model, ids, window=16, reading=heads)
    assert count == S * 37
    parts = [loss_sums(model, ids[r * L : r * L + 38], n_streams=1) for r in range(S)]
    assert total == pytest.approx(sum(t for t, _ in parts), rel=1e-5)
    assert count == sum(c for _, c in parts)


def test_a_stretch_scores_only_what_comes_after_its_warm_up():
    """Each stretch is read from a fresh state; its first `warmup` predictions build the state
    up and are not scored: its sum is that of the whole stretch less that of its warm-up."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=11, embedding_size=4, hidden_size=8, num_layers=1))
    ids = np.random.default_rng(0).integers(0, 11, 1001)
    reading = Stretches(np.array([3, 250, 600, 807]), length=45, warmup=12)
    total, count = loss_sums(model, ids, window=16, reading=reading)
    assert count == 4 * (45 - 12)
    whole = [loss_sums(model, ids[s : s + 46], n_streams=1)[0] for s in reading.starts]
    warm = [loss_sums(model, ids[s : s + 13], n_streams=1)[0] for s in reading.starts]
    assert total == pytest.approx(sum(whole) - sum(warm), rel=1e-5)
    halves = [loss_sums(model, ids, reading=reading.rows(slice(r, None, 2))) for r in (0, 1)]
    assert sum(t for t, _ in halves) == pytest.approx(total, rel=1e-6)  # rows add up


def test_scheduled_evaluations_read_the_slice_and_the_end_reads_the_whole_split(
    corpus, tmp_path, short_stretches
):
    """With a slice smaller than the split, scheduled records carry slice figures; the final record
    and best/ carry full-pass figures of the final and best weights, and every record says
    which it carries."""
    run = train(tiny_config(corpus, eval_chars=32), tmp_path / "run", progress=False)
    lines = read_metrics(run)
    final, last_scheduled = lines[-1], lines[-2]
    assert final["final"] and final["step"] == last_scheduled["step"] == 20
    assert [x["val_scope"] for x in lines] == ["slice"] * 4 + ["full"]
    assert checkpoint(run, "best").meta["metrics"]["val_scope"] == "full"
    full_last = load(run, which="last").evaluate(VAL_TEXT)["loss"]
    assert final["val_loss"] == pytest.approx(full_last, rel=1e-6)
    assert last_scheduled["val_loss"] != pytest.approx(full_last, rel=1e-3)  # the slice's figure
    best = checkpoint(run, "best").meta
    full_best = load(run, which="best").evaluate(VAL_TEXT)["loss"]
    assert best["metrics"]["val_loss"] == pytest.approx(full_best, rel=1e-6)
    assert final["best_val_loss"] == pytest.approx(full_best, rel=1e-6)
    assert final["best_step"] == best["step"]
    assert full_best <= full_last


def test_a_split_no_larger_than_the_slice_is_read_whole_and_says_so(corpus, tmp_path):
    """The default slice (16,384 characters) covers the tiny corpus's split: every figure is a
    full pass, the final record's included."""
    run = train(tiny_config(corpus), tmp_path / "run", progress=False)
    lines = read_metrics(run)
    assert [x["val_scope"] for x in lines] == ["full"] * 5
    full_last = load(run, which="last").evaluate(VAL_TEXT)["loss"]
    assert lines[-2]["val_loss"] == pytest.approx(full_last, rel=1e-6)


def test_the_full_pass_replaces_a_best_the_slice_chose_when_the_final_weights_read_better(
    corpus, tmp_path, monkeypatch
):
    """A slice that ranks step 5 first (here: told to) chooses best/ during the run; at the end the
    whole split ranks the final weights first, and best/ becomes them."""
    from charlstm.training.loop import Run

    real = Run.evaluate

    def slice_prefers_step_5(self, model=None, *, full=False):
        val = real(self, model, full=full)
        return val if full or self.state.progress.step <= 5 else val + 10.0

    monkeypatch.setattr(Run, "evaluate", slice_prefers_step_5)
    run = train(tiny_config(corpus, eval_chars=30), tmp_path / "run", progress=False)
    scheduled = [x for x in read_metrics(run) if not x.get("final")]
    assert min(scheduled, key=lambda x: x["val_loss"])["step"] == 5
    final = read_metrics(run)[-1]
    assert final["best_step"] == checkpoint(run, "best").meta["step"] == 20
    assert_same_tensors(weights(run, "best"), weights(run, "last"))
    assert final["best_val_loss"] == final["val_loss"]


# ------------------------------------------------------------------------------ the weight average


def test_the_average_decay_warms_up_to_ema():
    """The decay is small after few updates (the average follows the weights), rises steadily
    and stops at `ema`."""
    from charlstm.training.loop import ema_decay

    decays = [ema_decay(0.999, n) for n in range(20_000)]
    assert decays[1] == pytest.approx(2 / 11) and decays[10] == pytest.approx(0.55)
    assert all(a <= b for a, b in itertools.pairwise(decays))
    assert max(decays) == decays[-1] == 0.999
    assert ema_decay(0.5, 1000) == 0.5  # a low decay is never raised


def test_the_warmed_up_average_follows_weights_that_move():
    """Weights that move steadily from 0 to 100 in 100 updates: the warmed-up average ends near
    them, the plain 0.999 average near its start."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from charlstm.training.loop import ema_update

    w = torch.nn.Linear(1, 1, bias=False)
    warm = AveragedModel(w, multi_avg_fn=ema_update(0.999))
    plain = AveragedModel(w, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    for t in range(101):
        with torch.no_grad():
            w.weight.fill_(float(t))
        warm.update_parameters(w)
        plain.update_parameters(w)
    assert plain.module.weight.item() < 10  # about 4.9: 95 behind
    assert warm.module.weight.item() > 85  # about 89.9: 10 behind
    assert int(warm.n_averaged) == 101


def test_a_short_run_with_a_slow_average_keeps_the_better_of_it_and_the_raw_weights(
    corpus, tmp_path
):
    """ema 0.999 over 20 steps: best/ is never worse on the whole split than the raw final
    weights (last/'s), and the final record and best/'s meta say which weights it holds."""
    run = train(tiny_config(corpus, ema=0.999), tmp_path / "run", progress=False)
    final = read_metrics(run)[-1]
    raw = load(run, which="last").evaluate(VAL_TEXT)["loss"]  # last/'s model.* are the raw weights
    best = load(run, which="best").evaluate(VAL_TEXT)["loss"]
    assert final["raw_val_loss"] == pytest.approx(raw, rel=1e-6)
    assert best <= raw + 1e-9
    assert final["best_val_loss"] == pytest.approx(best, rel=1e-6)
    assert final["weights"] == checkpoint(run, "best").meta["metrics"]["weights"]
    assert final["weights"] in ("ema", "raw")


# --------------------------------------------------------------------------------- the ETA


def test_time_left_is_the_budget_that_ends_first():
    """Seconds left of max_time, or steps left at the measured speed, whichever is sooner; None
    without a budget or, for a step budget alone, before any speed is known."""
    from charlstm.config import TrainConfig
    from charlstm.training.state import Progress

    p = Progress(step=100, elapsed=30.0)
    assert p.time_left(TrainConfig(max_time=90.0), 0.5) == 60.0
    assert p.time_left(TrainConfig(max_time=None, max_steps=300), 0.5) == 100.0
    assert p.time_left(TrainConfig(max_time=90.0, max_steps=300), 0.1) == pytest.approx(20.0)
    assert p.time_left(TrainConfig(max_time=90.0, max_steps=300), 1.0) == 60.0
    assert p.time_left(TrainConfig(max_time=None, max_steps=300), None) is None
    assert p.time_left(TrainConfig(max_time=None, max_steps=None), 0.5) is None
    assert Progress(step=400, elapsed=99.0).time_left(TrainConfig(max_time=90.0), 1.0) == 0.0


def test_the_bar_postfix_shows_the_eta_beside_the_last_evaluation():
    from charlstm.training.loop import _clock, _Eta

    eta = _Eta(eval_interval=50)
    assert eta.seconds_per_step() is None and eta.postfix(None) == ""
    eta.times.extend([10.0, 10.5, 11.0])
    assert eta.seconds_per_step() == 0.5
    assert eta.postfix(125.0) == "ETA 2:05"
    eta.status = "val 1.234"
    assert eta.postfix(3725.4) == "val 1.234 | ETA 1:02:05"
    assert eta.postfix(None) == "val 1.234"
    assert _clock(9.4) == "0:09"


def test_the_progress_bar_runs_with_and_without_a_budget(corpus, tmp_path):
    """progress=True: a run with a step budget, and one with no budget at all (stopped from
    on_eval), both train and save."""

    class Enough(Exception):
        pass

    def stop_at_10(step, val):
        if step >= 10:
            raise Enough

    train(tiny_config(corpus, max_steps=10), tmp_path / "budget", progress=True)
    with pytest.raises(Enough):
        train(
            tiny_config(corpus, max_steps=None, max_time=None),
            tmp_path / "none",
            progress=True,
            on_eval=stop_at_10,
        )
    assert checkpoint(tmp_path / "none").meta["step"] == 10


def test_a_run_resumes_with_the_slice_it_began_with(corpus, tmp_path, short_stretches):
    """last/ records which slice scheduled evaluations read; a last/ that records none was
    written before the spread slice and keeps reading the heads of the streams, so that early
    stopping and best/ go on comparing figures of the same characters."""
    from charlstm.data.loading import prepare_data
    from charlstm.errors import CheckpointError
    from charlstm.runs.folder import RunFolder
    from charlstm.training.loop import Run
    from tests.helpers import quiet

    config = tiny_config(corpus, eval_chars=32, max_steps=10)
    run_dir = train(config, tmp_path / "r", progress=False)
    ck = checkpoint(run_dir, "last")
    assert ck.meta["resume"]["slice"] == "spread"
    config = resume_config(run_dir, {"max_steps": 20})
    data = prepare_data(config, ck.vocab)
    run = Run(config, RunFolder(run_dir), data, quiet, False)
    run.restore(ck)
    n = len(data.val_ids)
    assert run.eval_slice() == spread_slice(n, 32) and run.val_scope == "slice"
    del ck.meta["resume"]["slice"]  # as a run folder written before it
    run.restore(ck)
    heads = stream_heads(n, run.val_streams, 32)
    assert run.slice == "heads" and run.eval_slice() == heads
    assert run.evaluate() == pytest.approx(
        evaluation.evaluate_ids(run.eval_model, data.val_ids, reading=heads), rel=1e-6
    )
    ck.meta["resume"]["slice"] = "middle"
    with pytest.raises(CheckpointError, match="damaged training state"):
        run.restore(ck)
