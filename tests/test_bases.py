"""Base models: the base corpus is built exactly and keeps out the benchmark texts, a shipped base
is checked before it is read, `--base` picks, declines or refuses as documented, and a fine-tuned
run records its base so that its config.toml repeats it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from charlstm.data import basecorpus
from charlstm.errors import CheckpointError, UserError
from charlstm.runs import bases as shipped
from charlstm.training import bases
from tests.helpers import checkpoint, invoke, make_run, one_line_error, quiet

RUSSIAN = (
    "Мой дядя самых честных правил,\nКогда не в шутку занемог,\nОн уважать себя заставил\n"
    "И лучше выдумать не мог.\nЕго пример другим наука;\nНо, боже мой, какая скука\n\n"
)
BENCHMARK = "Прощай, свободная стихия! В последний раз передо мной ты катишь волны голубые."


# ---------------------------------------------------------------------------------------- corpus


def test_span_hashes_are_equal_exactly_for_equal_windows():
    """Two windows of the text hash alike exactly when they are the same characters."""
    text = RUSSIAN * 2 + "ёлка"
    h = basecorpus.span_hashes(basecorpus._codes(text), 12)
    assert len(h) == len(text) - 11
    for i in range(0, len(h), 7):
        for j in range(0, len(h), 5):
            assert (h[i] == h[j]) == (text[i : i + 12] == text[j : j + 12])


def test_cut_copies_removes_the_lines_of_a_copy_even_in_another_layout():
    """A benchmark span in other case, spelling ("ё") and line breaks is still found, and only the
    lines that hold it go."""
    forbidden = basecorpus.Forbidden.of([BENCHMARK], span=20)
    doc = "Первая строка.\nПРОЩАЙ,   свободная\nстихия! В последний\nПоследняя строка.\n"
    kept, cut = basecorpus.cut_copies(doc, forbidden, span=20)
    assert kept == "Первая строка.\nПоследняя строка.\n"
    assert cut == len(doc) - len(kept)
    assert basecorpus.cut_copies(kept, forbidden, span=20) == (kept, 0)


def test_clean_cuts_the_gutenberg_licence_and_the_layout():
    raw = (
        "The Project Gutenberg EBook of X\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
        "\r\n   Chapter I  \r\n\r\n\r\n\r\n\tIt was a dark night.\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicence text"
    )
    assert basecorpus.clean(raw, "gutenberg") == "Chapter I\n\nIt was a dark night.\n"
    with pytest.raises(ValueError):
        basecorpus.clean(raw, "html")


@pytest.fixture()
def fake_collection(tmp_path, monkeypatch):
    """A collection of three files in $CHARLSTM_DATA/fake-coll, one of them a copy of the
    benchmark text, and a base corpus `base-fake` made of it that excludes a fake benchmark."""
    data = tmp_path / "data"
    files = {
        "a.txt": RUSSIAN * 3,
        "b.txt": ("Другая глава.\n" + BENCHMARK + "\nКонец главы.\n") * 1,
        "c.txt": "Совсем другой текст, без копий.\n" * 20,
    }
    members = []
    for name, text in files.items():
        raw = text.encode("utf-8")
        (data / "fake-coll").mkdir(parents=True, exist_ok=True)
        (data / "fake-coll" / name).write_bytes(raw)
        members.append(basecorpus.Member(name, len(raw), hashlib.sha256(raw).hexdigest(), "utf-8"))
    coll = basecorpus.Collection(
        "fake-coll", "o/r", "0" * 40, "ru", "plain", "public domain", "test", tuple(members)
    )
    bench = data / "bench.txt"
    bench.write_text(BENCHMARK, encoding="utf-8")
    monkeypatch.setenv("CHARLSTM_DATA", str(data))
    monkeypatch.setattr(basecorpus, "collection", lambda name: coll)
    base = basecorpus.BaseCorpus("base-fake", "ru", ("fake-coll",), "test", excluded=())
    monkeypatch.setitem(basecorpus.BASE_CORPORA, "base-fake", base)
    forbidden = basecorpus.Forbidden.of([BENCHMARK])
    return coll, forbidden


def test_build_leaves_out_a_copy_and_orders_documents_by_name(fake_collection):
    """The file that is mostly the benchmark text is left out whole; the others are kept, in the
    order of their names' sha256, and no 50-character span of the benchmark is left."""
    _, forbidden = fake_collection
    built = basecorpus.build("base-fake", allow_download=False, forbidden=forbidden)
    assert built.dropped == ["fake-coll/b.txt"]
    names = ["fake-coll/a.txt", "fake-coll/c.txt"]
    assert built.names == sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    assert not basecorpus.copied(built.text, forbidden).any()


def test_a_damaged_member_is_an_error_naming_it(fake_collection, tmp_path):
    coll, _ = fake_collection
    (tmp_path / "data" / "fake-coll" / "c.txt").write_text("altered", encoding="utf-8")
    with pytest.raises(UserError, match="c.txt does not match the pinned sha256"):
        basecorpus.member_bytes(coll, coll.members[2], allow_download=False)


def test_the_built_corpus_is_cached_and_checked(fake_collection, monkeypatch):
    """The second load reads the cache; a cache whose text was altered is rebuilt, not used."""
    monkeypatch.setattr(basecorpus, "excluded_texts", lambda base, allow_download=True: [BENCHMARK])
    text, starts = basecorpus.load("base-fake", allow_download=False, log=quiet)
    assert basecorpus.built_meta("base-fake")["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    cached = basecorpus.corpus_dir() / "base-fake.txt"
    cached.write_text("tampered", encoding="utf-8")
    again, again_starts = basecorpus.load("base-fake", allow_download=False, log=quiet)
    assert again == text and np.array_equal(again_starts, starts)


def test_the_shipped_manifests_pin_every_file():
    """Each shipped collection names a commit, and every file a size, a sha256 and an encoding."""
    for name in basecorpus.collection_names():
        coll = basecorpus.collection(name)
        assert len(coll.commit) == 40 and coll.members
        assert all(len(m.sha256) == 64 and m.size > 0 and m.encoding for m in coll.members)
        assert coll.url(coll.members[0]).startswith(
            f"https://raw.githubusercontent.com/{coll.repo}/"
        )


# ---------------------------------------------------------------------------------------- shipped


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny run on Russian verse, standing in for a shipped base (its best/ checkpoint as fp16
    weights in a base folder, as `export --format base` writes them)."""
    from charlstm.runs.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("base")
    text = folder / "verse.txt"
    text.write_text(RUSSIAN * 20, encoding="utf-8")
    run = make_run(folder / "run", text, max_steps=10)
    ck = checkpoint(run, "best")
    out = folder / "tiny"
    out.mkdir()
    tensors = {k: v.half() for k, v in ck.tensors.items() if k.startswith("model.")}
    meta = {k: ck.meta[k] for k in ("model", "vocab", "config", "step")}
    save_checkpoint(out / shipped.WEIGHTS_FILE, tensors, meta)
    return out / shipped.WEIGHTS_FILE


@pytest.fixture()
def registered(tiny_base, monkeypatch):
    """The tiny base registered as the only shipped base, `tiny`."""
    data = tiny_base.read_bytes()
    base = shipped.ShippedBase(
        "tiny",
        "ru",
        "base-fake",
        hashlib.sha256(data).hexdigest(),
        len(data),
        "tiny test base",
        location=tiny_base.parent,
    )
    monkeypatch.setattr(shipped, "BASES", {"tiny": base})
    return base


def test_a_shipped_base_is_read_after_its_digest(registered):
    ck = shipped.read_base("tiny")
    assert all(v.dtype.is_floating_point for v in ck.model_state().values())
    assert str(next(iter(ck.model_state().values())).dtype) == "torch.float16"


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_damaged_base_is_one_line_naming_the_file_and_saying_to_reinstall(
    registered, tmp_path, monkeypatch, damage
):
    folder = tmp_path / "copy"
    folder.mkdir()
    data = bytearray(registered.path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    if damage != "missing":
        (folder / shipped.WEIGHTS_FILE).write_bytes(bytes(data))
    monkeypatch.setitem(shipped.BASES, "tiny", dataclasses.replace(registered, location=folder))
    with pytest.raises(CheckpointError) as info:
        shipped.read_base("tiny")
    message = str(info.value)
    assert "\n" not in message and "reinstall" in message and str(folder) in message


def test_an_unknown_base_lists_the_bases(registered):
    with pytest.raises(UserError, match="the bases are tiny"):
        shipped.get_base("klingon")


# ---------------------------------------------------------------------------------------- choice


def test_coverage_and_probe_slice():
    from charlstm.data.vocabulary import Vocabulary

    v = Vocabulary.from_text("абв")
    assert bases.coverage(v, "аабг") == 0.75
    text = "".join(chr(0x430 + i % 32) for i in range(50_000))
    probe = bases.probe_slice(text)
    assert len(probe) == bases.PROBE_CHARS
    assert probe[: bases.PROBE_STRETCH] == text[: bases.PROBE_STRETCH]
    assert probe[-bases.PROBE_STRETCH :] == text[-bases.PROBE_STRETCH :]


def test_auto_declines_a_text_in_another_script(registered, tiny_config_factory):
    """An English-only text is not covered by the Russian base: from scratch, and why."""
    config = tiny_config_factory(base="auto")
    decision = bases.decide(config, "The quick brown fox jumps over the lazy dog. " * 50, 2000)
    assert not decision.used and "covers" in decision.reason


def test_auto_declines_a_text_the_base_reads_badly(registered, tiny_config_factory, monkeypatch):
    monkeypatch.setattr(bases, "LANGUAGE_LOSS", 0.01)
    decision = bases.decide(tiny_config_factory(base="auto"), RUSSIAN * 10, 500)
    assert not decision.used and "no base's language" in decision.reason


def test_auto_takes_the_base_for_a_small_text_in_its_language(
    registered, tiny_config_factory, monkeypatch
):
    """The tiny base has seen little, so its language threshold is raised to what it reads."""
    monkeypatch.setattr(bases, "LANGUAGE_LOSS", 10.0)
    decision = bases.decide(tiny_config_factory(base="auto"), RUSSIAN * 10, 500)
    assert decision.used and decision.name == "tiny" and decision.sha256 == registered.sha256


def test_the_probe_stops_at_its_first_look_when_the_language_is_another(registered, monkeypatch):
    """A text that reads far above LANGUAGE_LOSS on PROBE_FIRST characters is not read further;
    one in the base's language is read to PROBE_CHARS."""
    lengths = []
    real = bases.base_loss

    def counted(ck, text):
        lengths.append(len(text))
        return real(ck, text)

    monkeypatch.setattr(bases, "base_loss", counted)
    text = RUSSIAN * (1 + 3 * bases.PROBE_CHARS // len(RUSSIAN))
    monkeypatch.setattr(bases, "LANGUAGE_LOSS", -1.0)  # every loss is "another language"
    assert bases.probe("tiny", text).loss is not None and lengths == [bases.PROBE_FIRST]
    lengths.clear()
    monkeypatch.setattr(bases, "LANGUAGE_LOSS", 10.0)
    assert bases.probe("tiny", text).loss is not None
    assert lengths == [bases.PROBE_FIRST, bases.PROBE_CHARS]


def test_a_large_text_with_a_long_budget_trains_from_scratch():
    assert not bases.prefers_scratch(20_000, 60.0)
    # measured: tinyshakespeare's 1.0 M training characters in 521 s fine-tune better (1.4043)
    # than they train from scratch (1.4600)
    assert not bases.prefers_scratch(1_003_854, 521.4)
    assert bases.prefers_scratch(2_000_000, 3600.0)
    assert not bases.prefers_scratch(2_000_000, 60.0)
    assert bases.prefers_scratch(2_000_000, None)


@pytest.fixture()
def tiny_config_factory(corpus):
    from tests.helpers import tiny_config

    def make(**overrides):
        return tiny_config(corpus, **overrides)

    return make


# ---------------------------------------------------------------------------------------- runs


def _base_flags() -> list[str]:
    """The tiny run's settings without its shape (a fine-tuned run takes the base's)."""
    return [
        "--max-steps",
        "6",
        "--eval-interval",
        "3",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--sample-every",
        "0",
        "--no-progress",
        "--max-time",
        "30",
    ]


@pytest.mark.slow
def test_train_with_a_named_base_records_it_and_repeats_from_its_config(
    registered, corpus, tmp_path, monkeypatch
):
    """`--base tiny` fine-tunes from the base (its weights, its shape), reading the text once for
    the base's probe and the run; config.toml records its name and sha256, and `--config
    RUN/config.toml` trains the same run again."""
    from charlstm.data import corpus as corpus_module

    reads, real_read = [], corpus_module.read_documents

    def counted(*args, **kwargs):
        reads.append(args[0])
        return real_read(*args, **kwargs)

    monkeypatch.setattr(corpus_module, "read_documents", counted)
    out = tmp_path / "run"
    result = invoke("train", "--text", corpus, "--out", out, "--base", "tiny", *_base_flags())
    assert result.exit_code == 0, result.output
    assert len(reads) == 1
    assert "base: tiny" in result.output
    stored = (out / "config.toml").read_text(encoding="utf-8")
    assert 'base = "tiny"' in stored and registered.sha256 in stored
    ck = checkpoint(out, "best")
    assert ck.model_config.hidden_size == shipped.read_base("tiny").model_config.hidden_size
    again = tmp_path / "again"
    result = invoke("train", "--config", out / "config.toml", "--out", again, "--no-progress")
    assert result.exit_code == 0, result.output
    assert (
        json.loads((again / "metrics.jsonl").read_text().splitlines()[-1])["best_val_loss"]
        == (json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["best_val_loss"])
    )


@pytest.mark.slow
def test_a_config_recorded_with_another_base_is_refused(registered, corpus, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--text", corpus, "--out", out, "--base", "tiny", *_base_flags())
    assert result.exit_code == 0, result.output
    toml = (out / "config.toml").read_text(encoding="utf-8")
    altered = tmp_path / "altered.toml"
    altered.write_text(toml.replace(registered.sha256, "f" * 64), encoding="utf-8")
    result = invoke("train", "--config", altered, "--out", tmp_path / "x", "--no-progress")
    one_line_error(result, "sha256", alone=False)


def test_base_with_init_from_or_pretrain_is_a_usage_error(corpus, tmp_path, trained_run):
    for flags in (["--init-from", trained_run], ["--pretrain", "onegin-ru"]):
        result = invoke("train", "--text", corpus, "--out", tmp_path / "x", "--base", "ru", *flags)
        one_line_error(result, "--base")


def test_an_unknown_base_name_is_a_usage_error_listing_the_bases(registered, corpus, tmp_path):
    result = invoke("train", "--text", corpus, "--out", tmp_path / "x", "--base", "klingon")
    one_line_error(result, "tiny", alone=False)


def test_the_bases_command_lists_and_checks_them(registered):
    result = invoke("bases")
    assert result.exit_code == 0 and "tiny" in result.output and "intact" in result.output


def test_auto_off_or_a_given_shape_never_probes_a_base(registered, tiny_config_factory):
    """--base auto (the default) decides only for the automatic configuration, and not when the
    user gave the network's shape: both train from scratch without reading a base."""
    from charlstm.config import RunConfig
    from charlstm.training.orchestrate import _base_decision

    assert RunConfig().train.base == "auto"
    off, read = _base_decision(tiny_config_factory(auto="off"), set())
    assert not off.used and "--auto off" in off.reason and read is None
    shaped, read = _base_decision(tiny_config_factory(auto="on"), {"hidden_size"})
    assert not shaped.used and "--hidden-size" in shaped.reason and read is None


@pytest.mark.slow
def test_a_fine_tuned_run_generates_analyses_serves_and_exports_as_any_run(
    registered, corpus, tmp_path
):
    """A run started from a base is a run like any other: generation, analysis, the report, the
    server and both exports read it."""
    from fastapi.testclient import TestClient

    import charlstm
    from charlstm.analysis.report import analyze_run, report_run
    from charlstm.export.onnx import export_onnx
    from charlstm.export.web import export_web
    from charlstm.serve.app import create_app

    run = tmp_path / "run"
    result = invoke("train", "--text", corpus, "--out", run, "--base", "tiny", *_base_flags())
    assert result.exit_code == 0, result.output
    model = charlstm.load(run, device="cpu")
    text = model.generate(start_text="Мой ", length=40, temperature=0.5, seed=1)[0]
    assert len(text) >= 40
    analysis = analyze_run(run, samples=1, length=60, temperatures=[0.5])
    assert analysis["results"][0]["temperature"] == 0.5
    assert report_run(run, out=tmp_path / "report", samples=1, length=60)["html"].is_file()
    with TestClient(create_app([model]), base_url="http://localhost") as client:
        answer = client.post("/v1/generate", json={"start_text": "Мой ", "length": 20, "seed": 1})
        assert answer.status_code == 200, answer.text
    assert export_onnx(run, tmp_path / "onnx")["max_abs_diff"] < 1e-3
    assert (tmp_path / "web" / "index.html") in export_web(run, tmp_path / "web")


def test_the_fine_tuning_rate_falls_with_the_passes():
    """1e-3 for a text seen a few times, 1e-4 for one seen dozens of times, in between on a log
    scale (what onegin-ru and byron-ru measured), rounded to two digits."""
    assert bases.finetune_lr(1.0) == bases.finetune_lr(bases.FAST_PASSES) == 1e-3
    assert bases.finetune_lr(500.0) == bases.finetune_lr(bases.SLOW_PASSES) == 1e-4
    middle = bases.finetune_lr(math.sqrt(bases.FAST_PASSES * bases.SLOW_PASSES))
    assert middle == pytest.approx(math.sqrt(1e-3 * 1e-4), rel=0.02)
    rates = [bases.finetune_lr(p) for p in (5, 10, 20, 30)]
    assert rates == sorted(rates, reverse=True)
    assert bases.finetune_settings(10.0)["min_lr"] == pytest.approx(bases.finetune_lr(10.0) / 10)
