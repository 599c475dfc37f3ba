"""The automatic configuration: what it chooses for small and large texts, that explicit settings
win, that the choice is written so that it repeats, and that calibration is cached."""

from __future__ import annotations

import math
import tomllib
from dataclasses import astuple

import pytest
import torch

from charlstm.config import RunConfig, load_toml
from charlstm.training import autoconfig, calibration
from charlstm.training.calibration import Calibration, Shape
from charlstm.training.schedule import learning_rate
from tests.helpers import invoke, read_metrics

CPU = torch.device("cpu")


class FakeCalibration:
    """Speeds from a formula instead of measurements: a fixed FLOP rate, plus a per-step cost
    that makes small batches slower per character, as on a real machine; a regularised step
    (dropouts, DropConnect, the weight average) trains at `regularised` of its plain speed.
    Nothing is cached and measuring costs nothing."""

    measure_seconds = 0.0

    def __init__(self, flops_per_s: float = 3e11, regularised: float = 0.7) -> None:
        self.flops_per_s = flops_per_s
        self.regularised = regularised
        self.asked: list[Shape] = []
        self.measured: list[str] = []
        self.seconds = 0.0

    def cached(self, shape: Shape) -> float | None:
        return None

    def stalls(self, shape: Shape) -> bool:
        return False

    def start_up(self) -> float:
        return 0.0

    def own_speed(self, shape: Shape, seconds_left: float | None = None) -> float:
        return self.speed(shape, seconds_left)

    def speed(self, shape: Shape, seconds_left: float | None = None) -> float:
        self.asked.append(shape)
        params = autoconfig.parameters(
            shape.cell,
            shape.hidden_size,
            shape.num_layers,
            shape.embedding_size,
            shape.vocab_size,
        )
        chars = shape.batch_size * shape.seq_len
        step_seconds = 2e-3 + 6 * params * chars / self.flops_per_s
        return chars / step_seconds * (self.regularised if shape.regularised else 1.0)


def _choose(n_train: int, budget: float | None, config: RunConfig | None = None, **kw):
    config = (config or RunConfig()).replace(max_time=budget)
    return autoconfig.choose(
        config,
        kw.pop("explicit", set()),
        n_train,
        n_train // 9,
        80,
        CPU,
        "fp32",
        2,
        calibration=kw.pop("calibration", FakeCalibration()),
        single_thread=kw.pop("single_thread", None),
    )


def _shape(c: RunConfig) -> Shape:
    m, d = c.model, c.data
    return Shape(m.cell, m.hidden_size, m.num_layers, m.embedding_size, 80, d.batch_size, d.seq_len)


def _own_shape(c: RunConfig) -> Shape:
    """The chosen configuration's own step: its shape with its regularisation."""
    m = c.model
    regs = (m.dropout, m.embedding_dropout, m.weight_drop, m.locked_dropout, c.optim.ema)
    return Shape(*astuple(_shape(c))[:7], *regs)


def test_a_small_text_gets_a_small_batch_and_heavy_regularisation():
    choice = _choose(11_000, 120.0)
    c = choice.config
    assert c.model.num_layers == 2
    assert c.data.batch_size * c.data.seq_len == 256
    assert c.model.dropout >= 0.4 and c.model.weight_drop > 0
    assert c.model.hidden_size <= 256
    assert c.optim.schedule == "cosine"


def test_a_text_of_a_few_tens_of_thousands_of_characters_gets_light_regularisation():
    """Rules v5: HEAVY only below 20 k characters (GPL-3, 32 k, did 3.6% better with LIGHT)."""
    c = _choose(32_000, 43.0).config
    assert (c.model.dropout, c.model.weight_drop, c.model.locked_dropout, c.optim.ema) == (
        0.2,
        0.1,
        True,
        0.0,
    )


def test_the_rate_is_6e_3_below_512_units_and_3e_3_from_there():
    small = _choose(1_000_000, 36.0).config
    assert small.model.hidden_size < 512 and small.optim.lr == 6e-3
    assert small.optim.min_lr == pytest.approx(6e-4)
    for width, lr in ((384, 6e-3), (512, 3e-3), (1024, 3e-3)):
        given = RunConfig().replace(hidden_size=width)
        chosen = _choose(50_000_000, 600.0, given, explicit={"hidden_size"}).config
        assert chosen.optim.lr == lr


def test_a_large_text_gets_one_wide_unregularised_layer():
    choice = _choose(50_000_000, 600.0)
    c = choice.config
    assert c.model.num_layers == 1
    assert c.model.hidden_size >= 384
    assert c.model.dropout == c.model.weight_drop == c.optim.ema == 0
    assert c.data.batch_size * c.data.seq_len >= 4096


def test_more_budget_never_chooses_a_narrower_model():
    widths = [_choose(5_000_000, b).config.model.hidden_size for b in (30, 100, 300, 1000, 3000)]
    assert widths == sorted(widths)
    assert widths[-1] > widths[0]


def test_the_choice_feeds_the_model_enough_characters_per_parameter():
    fake = FakeCalibration()
    c = _choose(5_000_000, 300.0, calibration=fake).config
    shape = Shape("lstm", c.model.hidden_size, c.model.num_layers, 64, 80, c.data.batch_size, 64)
    seen = fake.speed(shape) * autoconfig.EFFICIENCY * 300 * (1 - autoconfig.EVAL_SHARE)
    params = autoconfig.parameters("lstm", c.model.hidden_size, c.model.num_layers, 64, 80)
    assert seen >= autoconfig.CHARS_PER_PARAM * params
    wider = autoconfig.WIDTHS[autoconfig.WIDTHS.index(c.model.hidden_size) + 1]
    shape = Shape("lstm", wider, c.model.num_layers, 64, 80, c.data.batch_size, 64)
    params = autoconfig.parameters("lstm", wider, c.model.num_layers, 64, 80)
    assert fake.speed(shape) * autoconfig.EFFICIENCY * 300 * (1 - autoconfig.EVAL_SHARE) < (
        autoconfig.CHARS_PER_PARAM * params
    )


def test_explicit_settings_win_and_the_rest_is_chosen_around_them():
    given = RunConfig().replace(hidden_size=96, dropout=0.1, lr=1e-3)
    c = _choose(2_000_000, 100.0, given, explicit={"hidden_size", "dropout", "lr"}).config
    assert (c.model.hidden_size, c.model.dropout, c.optim.lr) == (96, 0.1, 1e-3)
    assert c.optim.min_lr == pytest.approx(1e-4)  # a tenth of the rate the user gave
    assert c.data.batch_size != RunConfig().data.batch_size  # still chosen


def test_an_open_ended_run_gets_the_plateau_schedule_and_early_stopping():
    c = _choose(1_000_000, None).config
    assert c.optim.schedule == "plateau"
    assert c.train.early_stopping > 0


def test_the_explanation_says_what_was_chosen_and_why():
    choice = _choose(1_000_000, 100.0)
    c = choice.config
    text = choice.explanation
    assert text.startswith("1.0 M characters, 100 s, 2 threads at ")
    assert f"{c.model.num_layers}×{c.model.hidden_size}" in text
    assert f"batch {c.data.batch_size}×{c.data.seq_len}" in text


def test_a_time_budgets_cosine_decays_over_the_steps_it_expects():
    """The rate must not follow the clock: the choice gives the cosine the steps the budget is
    expected to hold, and says so; a step budget and an open-ended run need none."""
    choice = _choose(1_000_000, 100.0)
    c = choice.config
    assert c.model.dropout == c.model.weight_drop == 0  # a few passes: unregularised
    chars = autoconfig.DECAY_EFFICIENCY_PLAIN * 90.0 * FakeCalibration().speed(_shape(c))
    assert c.optim.decay_steps == int(chars / (c.data.batch_size * c.data.seq_len))
    # A regularised run's steps come from its own step, timed with its masks, DropConnect and
    # weight average: slower than the plain step the width was chosen by.
    fake = FakeCalibration()
    small = _choose(11_000, 100.0, calibration=fake).config
    own = _own_shape(small)
    assert own.regularised and own in fake.asked
    chars = autoconfig.DECAY_EFFICIENCY_OWN * 90.0 * FakeCalibration().speed(own)
    assert small.optim.decay_steps == int(chars / (small.data.batch_size * small.data.seq_len))
    assert (
        f"cosine to {c.optim.min_lr:.0e} over {c.optim.decay_steps:,} steps" in choice.explanation
    )
    steps_only = _choose(1_000_000, None, RunConfig().replace(max_steps=500)).config
    assert steps_only.optim.schedule == "cosine" and steps_only.optim.decay_steps is None
    assert _choose(1_000_000, None).config.optim.decay_steps is None  # plateau
    given = RunConfig().replace(schedule="plateau")
    assert _choose(1_000_000, 100.0, given, explicit={"schedule"}).config.optim.decay_steps is None


def test_with_decay_steps_the_rate_follows_the_step_unless_the_clock_is_far_behind():
    optim = RunConfig().replace(schedule="cosine", lr=1e-2, min_lr=1e-3, decay_steps=100).optim
    for behind in (0.0, 0.05, 0.1):  # the clock up to a tenth of the budget ahead: no difference
        assert learning_rate(0, behind, 1.0, optim) == pytest.approx(1e-2)
        assert learning_rate(50, 0.5 + behind, 1.0, optim) == pytest.approx(5.5e-3)
        assert learning_rate(100, 1.0, 1.0, optim) == pytest.approx(1e-3)
    assert learning_rate(400, 0.2, 1.0, optim) == pytest.approx(1e-3)  # the floor after
    # A machine far slower than measured: the clock takes over, and the run still anneals.
    assert learning_rate(10, 0.6, 1.0, optim) == pytest.approx(5.5e-3)
    assert learning_rate(10, 1.0, 1.0, optim) < learning_rate(10, 0.2, 1.0, optim)
    by_clock = RunConfig().replace(schedule="cosine", lr=1e-2, min_lr=1e-3).optim
    assert learning_rate(50, 1.0, 1.0, by_clock) == pytest.approx(1e-3)


def test_explicit_fields_are_those_that_differ_from_the_defaults():
    config = RunConfig().replace(hidden_size=64, max_time=10.0)
    assert autoconfig.explicit_fields(config) == {"hidden_size", "max_time"}


def test_spinning_openmp_threads_are_another_machine_in_the_cache(monkeypatch):
    """Two spinning threads train 1.5 times faster than two passive ones: their speeds must not
    be read from a cache the passive default filled (one thread does not wait, so it shares)."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    passive = calibration.machine_key(CPU, "bf16", 2)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    active = calibration.machine_key(CPU, "bf16", 2)
    assert active != passive and "active" in active
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "30000")
    assert calibration.machine_key(CPU, "bf16", 2) not in (passive, active)
    monkeypatch.delenv("GOMP_SPINCOUNT")
    one = calibration.machine_key(CPU, "bf16", 1)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert calibration.machine_key(CPU, "bf16", 1) == one


def test_calibration_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLSTM_CACHE", str(tmp_path))
    calls = []

    def fake_measure(shape, device, precision, **kw):
        calls.append(shape)
        return 1234.5

    monkeypatch.setattr(calibration, "measure", fake_measure)
    shape = Shape("lstm", 32, 1, 8, 20, 4, 16)
    first = Calibration(CPU, "fp32", 1)
    assert first.speed(shape) == 1234.5 and first.measured == [shape.key()]
    second = Calibration(CPU, "fp32", 1)
    assert second.speed(shape) == 1234.5 and second.measured == []
    assert len(calls) == 1
    other_threads = Calibration(CPU, "fp32", 2)  # another machine key: measured anew
    other_threads.speed(shape)
    assert len(calls) == 2


@pytest.mark.parametrize("budget, timed", [(20.0, 0.125), (43.1, 0.2694), (600.0, 0.3)])
def test_a_short_budget_times_each_shape_for_less(tmp_path, monkeypatch, budget, timed):
    """About eight shapes, each timed for at most 0.3 s, stay within 5% of the budget."""
    monkeypatch.setenv("CHARLSTM_CACHE", str(tmp_path))
    asked = []

    def fake_measure(shape, device, precision, **kw):
        asked.append(kw["seconds"])
        return 50_000.0

    monkeypatch.setattr(calibration, "measure", fake_measure)
    config = RunConfig().replace(max_time=budget)
    autoconfig.choose(config, set(), 100_000, 10_000, 80, CPU, "fp32", 2)
    assert asked and all(s == pytest.approx(timed, rel=1e-3) for s in asked)


def test_all_threads_are_not_timed_where_a_probe_finds_them_waiting(tmp_path, monkeypatch):
    """A busy machine: all threads compute the probe's products ten times slower than one. No
    step of theirs is timed, and the run takes one thread; on a quiet machine they are timed."""
    monkeypatch.setenv("CHARLSTM_CACHE", str(tmp_path))
    timed = []

    def fake_measure(shape, device, precision, **kw):
        timed.append(torch.get_num_threads())
        return 50_000.0

    def fake_products(h, w, device, limit):
        many = torch.get_num_threads() > 1
        return min(limit, 1e-3 * (10 if many and busy else 1)) + (1e-9 if many and busy else 0)

    monkeypatch.setattr(calibration, "measure", fake_measure)
    monkeypatch.setattr(calibration, "_time_products", fake_products)
    config = RunConfig().replace(max_time=100.0)
    busy = True
    choice = autoconfig.choose(config, set(), 100_000, 10_000, 80, CPU, "fp32", 2)
    assert timed and set(timed) == {1} and choice.config.train.threads == 1
    busy = False
    timed.clear()
    monkeypatch.setenv("CHARLSTM_CACHE", str(tmp_path / "quiet"))
    autoconfig.choose(config, set(), 100_000, 10_000, 80, CPU, "fp32", 2)
    assert 2 in timed


def test_the_probe_tells_a_busy_machine_from_a_quiet_one(monkeypatch):
    """The real probe: products that take as long on all threads as on one do not stall; ten
    times as long do, and the probe stops at twice."""
    import time

    calls = []

    def fake_products(h, w, device, limit):
        calls.append(limit)
        return 1e-3 if torch.get_num_threads() == 1 else min(limit, ratio * 1e-3) + 1e-9

    monkeypatch.setattr(calibration, "_time_products", fake_products)
    calib = Calibration(CPU, "fp32", 2)
    shape = Shape("lstm", 32, 1, 8, 20, 4, 16)
    ratio = 1.0
    assert not calib.stalls(shape)
    ratio = 10.0
    assert calib.stalls(shape)
    assert calls[-1] == pytest.approx(calibration.STALL * 1e-3)
    assert not Calibration(CPU, "fp32", 1).stalls(shape)  # one thread has nothing to wait for
    start = time.perf_counter()
    monkeypatch.undo()
    Calibration(CPU, "fp32", 2).stalls(shape)  # and for real, in well under a second
    assert time.perf_counter() - start < 1.0


def test_a_damaged_cache_is_measured_again_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLSTM_CACHE", str(tmp_path))
    (tmp_path / "calibration.json").write_text("{not json")
    monkeypatch.setattr(calibration, "measure", lambda *a, **k: 99.0)
    assert Calibration(CPU, "fp32", 1).speed(Shape("lstm", 8, 1, 4, 10, 2, 8)) == 99.0


def test_a_real_measurement_is_positive_and_leaves_the_random_stream_alone():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    speed = calibration.measure(Shape("lstm", 16, 1, 8, 20, 4, 16), CPU, "fp32", seconds=0.01)
    assert speed > 0
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_train_with_auto_logs_the_choice_and_stores_a_config_that_repeats_it(tmp_path, corpus):
    out = tmp_path / "run"
    args = ["train", "--text", corpus, "--out", out, "--no-progress", "--max-time", "3"]
    result = invoke(*args, "--threads", "1", "--sample-every", "0")
    assert result.exit_code == 0, result.output
    assert "charlstm: auto: 2 k characters, 3 s, 1 thread at " in result.output
    stored = (out / "config.toml").read_text(encoding="utf-8")
    assert stored.startswith("# chosen by --auto on: 2 k characters")
    doc = tomllib.loads(stored)
    assert doc["train"]["auto"] == "off"
    config = load_toml(out / "config.toml")
    assert config.data.batch_size * config.data.seq_len == 256  # a small text's step
    assert config.model.num_layers == 2
    assert read_metrics(out)[-1]["final"]
    # The stored config trains the same model again with no choice made.
    again = invoke(
        "train",
        "--config",
        out / "config.toml",
        "--out",
        tmp_path / "again",
        "--no-progress",
        "--max-steps",
        "2",
    )
    assert again.exit_code == 0, again.output
    assert "auto:" not in again.output
    assert load_toml(tmp_path / "again" / "config.toml").model == config.model


@pytest.mark.slow
def test_auto_off_keeps_the_fixed_defaults(tmp_path, corpus):
    out = tmp_path / "run"
    result = invoke(
        "train",
        "--text",
        corpus,
        "--out",
        out,
        "--no-progress",
        "--max-steps",
        "2",
        "--auto",
        "off",
        "--threads",
        "1",
        "--sample-every",
        "0",
    )
    assert result.exit_code == 0, result.output
    assert "auto:" not in result.output
    config = load_toml(out / "config.toml")
    defaults = RunConfig()
    assert config.model.hidden_size == defaults.model.hidden_size
    assert config.data.batch_size == defaults.data.batch_size


def test_the_choice_reaches_every_process_as_json(tmp_path):
    """Under torchrun rank 0's choice is sent to the others as JSON bytes (never pickled)."""
    import torch.distributed as dist

    from charlstm.training import distributed

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ctx = distributed.Context(0, 1, 0, 1, "gloo", CPU)
        doc = [{"model": {"hidden_size": 384}}, "1.0 M characters → 1×384", 1.5]
        assert distributed.broadcast_json(doc, ctx) == doc
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_preset_trains_as_it_was_tuned_unless_it_asks_for_the_choice(tmp_path, corpus):
    preset = tmp_path / "p.toml"
    preset.write_text("hidden_size = 24\nnum_layers = 1\n", encoding="utf-8")
    common = ["--text", corpus, "--no-progress", "--max-steps", "2", "--threads", "1"]
    plain = invoke("train", "--config", preset, "--out", tmp_path / "a", *common)
    assert plain.exit_code == 0, plain.output
    assert "auto:" not in plain.output
    assert load_toml(tmp_path / "a" / "config.toml").data.batch_size == RunConfig().data.batch_size
    asked = invoke("train", "--config", preset, "--out", tmp_path / "b", "--auto", "on", *common)
    assert asked.exit_code == 0, asked.output
    assert "auto:" in asked.output
    chosen = load_toml(tmp_path / "b" / "config.toml")
    assert (chosen.model.hidden_size, chosen.model.num_layers) == (24, 1)  # the preset's keys


def test_measuring_stops_before_it_eats_a_short_budget():
    """On a machine seen for the first time, a 3 s run measures for at most about 5% of it."""

    class Slow(FakeCalibration):
        def speed(self, shape, seconds_left=None):
            if shape.key() not in self.measured:  # measured once, then cached
                self.seconds += 0.1  # each measurement costs a tenth of a second
                self.measured.append(shape.key())
            return super().speed(shape)

    slow = Slow(flops_per_s=1e13)  # fast enough that every width would fit
    choice = _choose(5_000_000, 3.0, calibration=slow)
    assert len(slow.measured) <= 3
    assert choice.config.model.hidden_size < autoconfig.WIDTHS[-1]


def test_a_small_model_takes_one_thread_where_one_is_faster():
    """One thread wins for a step too short to share; the speed and passes follow it."""
    fast_single = FakeCalibration(flops_per_s=3e11)
    slow_pair = FakeCalibration(flops_per_s=1e11)
    choice = _choose(11_000, 60.0, calibration=slow_pair, single_thread=fast_single)
    assert choice.config.train.threads == 1
    assert ", 1 thread at " in choice.explanation
    same = _choose(11_000, 60.0, calibration=fast_single, single_thread=slow_pair)
    assert same.config.train.threads is None  # all cores, as without the choice
    kept = _choose(
        11_000,
        60.0,
        RunConfig().replace(threads=2),
        explicit={"threads"},
        calibration=slow_pair,
        single_thread=fast_single,
    )
    assert kept.config.train.threads == 2


def test_a_large_validation_split_is_read_as_many_streams():
    """13 M validation characters: 256 streams (a thirty-second of the sequential steps of 8),
    and a slice of 512 characters per stream; a small split keeps the defaults."""
    big = autoconfig.choose(
        RunConfig().replace(max_time=200.0),
        set(),
        117_000_000,
        13_000_000,
        260,
        CPU,
        "fp32",
        2,
        calibration=FakeCalibration(),
    ).config.train
    assert (big.eval_streams, big.eval_chars) == (256, 256 * 512)
    small = _choose(1_000_000, 100.0).config.train
    defaults = RunConfig().train
    assert (small.eval_streams, small.eval_chars) == (defaults.eval_streams, defaults.eval_chars)


class Timed(FakeCalibration):
    """A FakeCalibration whose measurements cost time as real ones do: the time each is given,
    and a warm-up step and a timed one at the shape's speed. Read twice, a shape costs nothing
    the second time (the cache)."""

    def __init__(self, flops_per_s: float = 3e11, measure_seconds: float = 0.3) -> None:
        super().__init__(flops_per_s)
        self.measure_seconds = measure_seconds

    def cached(self, shape: Shape) -> float | None:
        return super().speed(shape) if shape.key() in self.measured else None

    def speed(self, shape: Shape, seconds_left: float | None = None) -> float:
        value = super().speed(shape)
        if shape.key() not in self.measured:
            self.measured.append(shape.key())
            self.seconds += self.measure_seconds + 2 * shape.batch_size * shape.seq_len / value
        return value


@pytest.mark.parametrize("n_train, budget", [(1_000_000, 90.0), (5_000_000, 30.0), (11_000, 20.0)])
def test_a_cold_cache_is_measured_within_its_share_of_the_budget(n_train, budget):
    """Both thread counts of every shape the search asks for, the refined batch and the
    regularised step: what measuring costs stays within CALIBRATION_SHARE of the budget."""
    pair, single = Timed(flops_per_s=2e11), Timed(flops_per_s=3e11)
    choice = _choose(n_train, budget, calibration=pair, single_thread=single)
    assert choice.seconds == pair.seconds + single.seconds > 0
    assert choice.seconds <= autoconfig.CALIBRATION_SHARE * budget


def test_widths_that_cannot_fit_at_a_narrower_ones_speed_are_not_measured(monkeypatch):
    """A wider layer is never faster per character: the search skips measuring the widths a
    narrower one's speed already rules out, and chooses what measuring them would choose."""
    lazy = Timed()
    chosen = _choose(5_000_000, 300.0, calibration=lazy).config.model.hidden_size
    monkeypatch.setattr(autoconfig, "SPEED_NOISE", math.inf)  # every width measured
    eager = Timed()
    assert _choose(5_000_000, 300.0, calibration=eager).config.model.hidden_size == chosen
    assert set(lazy.measured) < set(eager.measured)
    assert lazy.seconds < eager.seconds


def test_all_threads_are_not_timed_for_a_step_smaller_than_one_where_one_thread_won():
    """One thread beat all at the first width the search asked for: no narrower width, and no
    smaller batch of it, is timed on all threads again."""
    pair, single = Timed(flops_per_s=1e11), Timed(flops_per_s=3e11)
    choice = _choose(1_000_000, 90.0, calibration=pair, single_thread=single)
    assert choice.config.train.threads == 1
    first = pair.asked[0]
    assert len(single.measured) > 1
    assert all(not autoconfig._within(s, first) or s == first for s in pair.asked)


def test_the_own_step_stands_in_for_the_plain_one_only_if_measuring_has_time_for_it():
    """The regularised step is the last measurement; with no time left for it, the plain step's
    speed stands in at the share small regularised runs reached of it (DECAY_EFFICIENCY)."""
    costly = Timed(measure_seconds=2.0)  # a 100 s budget allows 5 s: two measurements
    c = _choose(11_000, 100.0, calibration=costly).config
    assert c.model.dropout > 0 and len(costly.measured) == 2
    assert not any(s.regularised for s in costly.asked)  # the own step was not timed
    chars = autoconfig.DECAY_EFFICIENCY * 90.0 * FakeCalibration().speed(_shape(c))
    assert c.optim.decay_steps == int(chars / (c.data.batch_size * c.data.seq_len))


def test_a_plain_step_keeps_its_cache_key_and_a_regularised_one_has_its_own():
    """Caches written before rules v8 stay valid for the plain shapes; the own step is apart."""
    plain = Shape("lstm", 32, 1, 8, 20, 4, 16)
    assert plain.key() == "lstm-1x32-e8-v20-b4x16" and not plain.regularised
    heavy = Shape("lstm", 32, 1, 8, 20, 4, 16, 0.5, 0.2, 0.6, False, 0.9998)
    light = Shape("lstm", 32, 1, 8, 20, 4, 16, 0.2, 0.05, 0.1, True)
    assert len({plain.key(), heavy.key(), light.key()}) == 3
    assert heavy.plain() == light.plain() == plain


def test_a_regularised_step_is_measured_with_its_masks_and_average():
    """A real measurement of a step with dropouts, DropConnect and the weight average, alone and
    against its plain step in turn; neither changes the random stream."""
    shape = Shape("lstm", 16, 2, 8, 20, 4, 16, 0.5, 0.2, 0.6, True, 0.999)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    assert calibration.measure(shape, CPU, "fp32", seconds=0.01) > 0
    assert 0 < calibration.measure_relative(shape, CPU, "fp32", seconds=0.01)
    assert torch.equal(torch.rand(3), expected)


def test_the_own_step_is_its_plain_speed_times_how_much_slower_it_ran_beside_it(
    tmp_path, monkeypatch
):
    """The plain speed comes from the cache when it is there; the ratio is timed now, the two
    steps in turn; the product is cached under the regularised step's own key."""
    monkeypatch.setenv("CHARLSTM_CACHE", str(tmp_path))
    measured = []
    monkeypatch.setattr(calibration, "measure", lambda s, *a, **k: measured.append(s) or 1000.0)
    monkeypatch.setattr(calibration, "measure_relative", lambda s, *a, **k: 0.8)
    own = Shape("lstm", 32, 1, 8, 20, 4, 16, 0.2, 0.05, 0.1, True)
    calib = Calibration(CPU, "fp32", 1)
    assert calib.own_speed(own) == pytest.approx(800.0)
    assert measured == [own.plain()] and calib.measured == [own.plain().key(), own.key()]
    again = Calibration(CPU, "fp32", 1)
    assert again.own_speed(own) == 800.0 and again.measured == []  # both cached


def test_a_measurement_takes_no_step_after_its_deadline(monkeypatch):
    """A warm-up that ends past the deadline is the whole measurement (its own speed); without a
    deadline the warm-up is followed by timed steps."""
    import time

    from charlstm.model.network import CharRNN

    calls = []
    forward = CharRNN.forward
    monkeypatch.setattr(CharRNN, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    shape = Shape("lstm", 16, 1, 8, 20, 4, 16)
    assert calibration.measure(shape, CPU, "fp32", seconds=0.01, deadline=time.perf_counter()) > 0
    assert len(calls) == 1
    calls.clear()
    calibration.measure(shape, CPU, "fp32", seconds=0.01)
    assert len(calls) >= 2


def test_each_measurement_is_told_the_time_measuring_has_left():
    """The allowance less what measuring has spent, so that a step that runs long (all threads on
    a busy machine) ends the measurement; the shape the run trains is measured in full."""

    class Told(Timed):
        def __init__(self) -> None:
            super().__init__(measure_seconds=0.3)
            self.told: list[tuple[float | None, float]] = []

        def speed(self, shape: Shape, seconds_left: float | None = None) -> float:
            if shape.key() not in self.measured:
                self.told.append((seconds_left, self.seconds))
            return super().speed(shape, seconds_left)

    told = Told()
    _choose(1_000_000, 90.0, calibration=told)
    allowance = autoconfig.CALIBRATION_SHARE * 90.0
    assert told.told and all(
        left is None or left == pytest.approx(allowance - spent) for left, spent in told.told
    )
    assert any(left is not None for left, _ in told.told)


def test_starting_torch_is_counted_against_the_budget_but_not_as_measuring():
    """Adam's first step in a process imports torch._dynamo (seconds): a run pays it whether it
    measures or not, so it is said apart, counted in the time the choice took, and leaves the
    allowance to the measurements."""

    class Starting(Timed):
        def start_up(self) -> float:
            self.started = getattr(self, "started", 0) + 1
            return 3.0 if self.started == 1 else 0.0

    plain, starting = Timed(), Starting()
    a = _choose(1_000_000, 90.0, calibration=plain)
    b = _choose(1_000_000, 90.0, calibration=starting)
    assert starting.measured == plain.measured  # the same measurements, within the same share
    assert b.seconds == pytest.approx(a.seconds + 3.0)
    assert "after 3.0 s of starting torch)" in b.explanation
    assert "starting torch" not in a.explanation


def test_the_own_steps_ratio_is_timed_over_several_rounds_of_both_steps():
    """A warm-up of each, then RELATIVE_ROUNDS rounds of one step of each in turn, however short
    the time given: the ratio is one figure, and one step of a wide model is noise."""
    calls: list[str] = []
    steps = [lambda: calls.append("own"), lambda: calls.append("plain")]
    timed = calibration._timed_steps(steps, 0.0, 10, None, least=calibration.RELATIVE_ROUNDS)
    assert len(timed) == 2
    assert calls == ["own", "plain"] * (1 + calibration.RELATIVE_ROUNDS)
    calls.clear()
    calibration._timed_steps(steps, 0.0, 10, 0.0, least=calibration.RELATIVE_ROUNDS)
    assert calls == ["own", "plain"]  # past the deadline: the warm-ups are the timing
