"""`analyze_run`, the report writer and their CLI commands, on a tiny model trained by the test.

The tiny model learns almost nothing, so the memorisation figures that matter are checked on
planted texts given with --text: an excerpt of the training text must come out ~100% copied, and
its words shuffled must not.
"""

from __future__ import annotations

import json
import math
import random
import re

import pytest

from charlstm.analysis import report as report_module
from charlstm.analysis.report import (
    _base_of,
    _md_sample,
    analyze_run,
    format_table,
    render_markdown,
    write_report,
)
from charlstm.config import RunConfig
from charlstm.data import basecorpus
from tests.helpers import (
    CORPUS_TEXT,
    TRAIN_CHARS,
    copy_run,
    invoke,
    one_line_error,
    train_args,
)

TRAIN_TEXT = CORPUS_TEXT[:TRAIN_CHARS]  # the training split of `trained_run`
SMALL = {"samples": 2, "length": 150, "temperatures": (0.2, 1.0), "seed": 3}
# A made-up base corpus: verse-shaped lines of another text, long enough to share 100 characters.
BASE_TEXT = "".join(
    f"Строка {n} чужого корпуса, которую модель прочла до своего текста.\n" for n in range(200)
)


@pytest.fixture
def run_dir(trained_run):
    """The shared tiny run: a 1 × 16 LSTM trained 20 steps on CORPUS_TEXT (tests only read it)."""
    return trained_run


@pytest.fixture
def planted(tmp_path):
    """A file holding 1,000 characters of the run's training text."""
    path = tmp_path / "planted.txt"
    path.write_text(TRAIN_TEXT[137:1137], encoding="utf-8")
    return path


def test_analyze_generated_samples(run_dir):
    """Generated samples give every figure per temperature, in range, JSON-able and reproducible."""
    a = analyze_run(run_dir, **SMALL)
    assert {
        "run",
        "checkpoint",
        "corpus",
        "validation",
        "uniform_loss",
        "history",
        "metrics",
        "settings",
        "training_structure",
        "results",
        "seconds",
    } <= set(a)
    assert a["checkpoint"]["which"] == "last" and a["checkpoint"]["step"] == 20
    assert a["corpus"]["training_chars"] == len(TRAIN_TEXT)
    v = a["validation"]
    assert 0 < v["loss"] < 2 * a["uniform_loss"]
    assert v["bits_per_char"] == pytest.approx(v["loss"] / math.log(2))
    assert a["history"]["last_step"] == 20 and a["history"]["evaluations"] == 4
    assert [r["temperature"] for r in a["results"]] == [0.2, 1.0]
    for r in a["results"]:
        assert r["chars"] == 2 * 150 + 2  # two samples joined by a blank line
        m = r["memorisation"]
        assert 0 <= m["longest_copy_length"] <= r["chars"]
        assert all(0 <= m["coverage"][k] <= 1 for k in (20, 50))
        assert m["coverage"][50] <= m["coverage"][20]
        assert 0 <= r["distance"]["structure_distance"] <= 1
        assert r["excerpt"]["text"] and r["structure"]["n_lines"] > 0
    json.dumps(a)
    again = analyze_run(run_dir, **SMALL)
    assert [r["excerpt"] for r in again["results"]] == [r["excerpt"] for r in a["results"]]
    assert "longest copy" in format_table(a) and "T = 0.2" in format_table(a)


def test_planted_training_excerpt_is_all_copied(run_dir, planted):
    """A training excerpt given as --text is 100% copied, with the whole excerpt as longest copy."""
    text = planted.read_text(encoding="utf-8")
    a = analyze_run(run_dir, text=text, text_label="planted")
    (r,) = a["results"]
    m = r["memorisation"]
    assert r["temperature"] is None and r["source"] == "planted"
    assert m["longest_copy_length"] == len(text) and m["longest_copy_text"] == text
    assert m["coverage"][50] == 1.0 and m["coverage"][20] == 1.0
    assert m["novel_ngram_share"][3] == 0.0
    assert m["lines_reproduced"] == m["lines_considered"] > 0
    assert r["excerpt"]["copied_spans"] == [[0, len(r["excerpt"]["text"])]]


def test_shuffled_words_have_no_long_copies(run_dir):
    """The training text's words in a shuffled order share almost no copies of 50 characters."""
    words = TRAIN_TEXT.split()
    random.Random(0).shuffle(words)
    lines = [" ".join(words[i : i + 6]) for i in range(0, len(words), 6)]
    a = analyze_run(run_dir, text="\n".join(lines), text_label="shuffled")
    m = a["results"][0]["memorisation"]
    assert m["coverage"][50] < 0.02 and m["longest_copy_length"] < 50


def test_report_files_are_self_contained(run_dir, planted, tmp_path):
    """report.html embeds its PNGs and loads nothing; report.md links PNGs that exist; copies are
    highlighted in both; the report can be written again from its own analysis.json."""
    a = analyze_run(run_dir, text=planted.read_text(encoding="utf-8"), text_label="planted")
    paths = write_report(a, tmp_path / "out")
    page = paths["html"].read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert "<mark>" in page
    md = paths["md"].read_text(encoding="utf-8")
    linked = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert {"report/loss.png", "report/lr.png", "report/lengths.png"} <= set(linked)
    for link in linked:
        assert (tmp_path / "out" / link).read_bytes().startswith(b"\x89PNG")
    assert "**" in md
    assert not list((tmp_path / "out").rglob("*.tmp"))
    reloaded = json.loads(paths["json"].read_text(encoding="utf-8"))  # int keys became strings
    write_report(reloaded, tmp_path / "again")
    assert (tmp_path / "again" / "report.md").read_text(encoding="utf-8") == md


def test_markdown_sample_bolds_copies_line_by_line():
    """Bold never spans a line break or starts with a space, and Markdown syntax is escaped."""
    text = "one *two*\nthree four\n\nfive"
    out = _md_sample(text, [(4, 15)])  # "*two*\nthree"
    assert out == "one **\\*two\\***\\\n**three** four\n\nfive"


def test_cli_analyze_and_report(run_dir, planted, tmp_path):
    """`analyze` prints tables or JSON; `report` writes into the run folder."""
    table = invoke("analyze", run_dir, "--samples", 1, "--length", 80, "--temperatures", "0.5,1")
    assert table.exit_code == 0, table.output
    assert "T = 0.5" in table.output and "structure distance" in table.output
    as_json = invoke("analyze", run_dir, "--text", planted, "--json", "--which", "best")
    assert as_json.exit_code == 0, as_json.output
    doc = json.loads(as_json.output.splitlines()[-1])
    assert doc["results"][0]["memorisation"]["coverage"]["50"] == 1.0
    words = doc["results"][0]["words"]
    planted_words = planted.read_text(encoding="utf-8").split()
    # Training words, all real but the two the excerpt cuts in half.
    assert set(words["made_up"]) <= {planted_words[0].strip(","), planted_words[-1].strip(",")}
    assert words["real"] >= words["words"] - 2
    assert doc["words"]["measure"] == "training text"
    assert doc["checkpoint"]["which"] == "best"
    run = copy_run(run_dir, tmp_path / "run")  # the report goes into the run folder
    rep = invoke("report", run, "--samples", 1, "--length", 80, "--temperatures", "0.2,0.5,1")
    assert rep.exit_code == 0, rep.output
    assert (run / "report.html").is_file()
    assert (run / "report" / "temperature.png").is_file()
    assert "real words" in (run / "report.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_train_report_flag(corpus, tmp_path):
    """`charlstm train --report` ends with the run's report."""
    out = tmp_path / "run"
    result = invoke(*train_args(corpus, out, "--report", max_steps=5))
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert "report = true" in (out / "config.toml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--text", "missing.txt"], "does not exist"),
        (["--temperatures", "hot"], "--temperatures"),
        (["--samples", "0"], "--samples"),
        (["--length", "-5"], "--length"),
        (["--temperatures", "-1"], "temperatures"),
        (["--threads", "0"], "--threads"),
    ],
)
@pytest.mark.parametrize("command", ["analyze", "report"])
def test_bad_options_are_one_line_errors(run_dir, tmp_path, command, args, needle):
    """Each bad option ends in one line on stderr and exit status 2, before any work is done."""
    fixed = [str(tmp_path / a) if a == "missing.txt" else a for a in args]
    one_line_error(invoke(command, run_dir, *fixed), needle)


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_not_a_run_is_a_one_line_error(tmp_path, command):
    """An empty folder, a missing folder and a stray file are refused in one line."""
    one_line_error(invoke(command, tmp_path), "not a charlstm run folder")
    one_line_error(invoke(command, tmp_path / "nope"), "does not exist")


def test_report_of_a_checkpoint_file_needs_out(run_dir, tmp_path):
    """A checkpoint copied out of its run folder has nowhere obvious to put the report."""
    ck = tmp_path / "model.safetensors"
    ck.write_bytes((run_dir / "last" / "checkpoint.safetensors").read_bytes())
    one_line_error(invoke("report", ck), "--out")
    ok = invoke("report", ck, "--out", tmp_path / "rep", "--samples", 1, "--length", 50)
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "rep" / "report.html").is_file()


@pytest.fixture
def fake_base(monkeypatch):
    """The tiny run as if it had started from the base "ru", whose corpus is BASE_TEXT."""
    monkeypatch.setattr(report_module, "_base_of", lambda config: "ru")
    meta = {"format_version": basecorpus.FORMAT_VERSION, "sha256": "0" * 64}
    monkeypatch.setattr(basecorpus, "built_meta", lambda name: meta if name == "base-ru" else None)
    monkeypatch.setattr(basecorpus, "load", lambda name, **kw: (BASE_TEXT, [0]))


def test_real_words_next_to_the_memorisation_figures(run_dir):
    """Each result has its real-word share; the tiny corpus mixes two languages, so the measure
    falls back to the training text's words, and the training text's own words are all real."""
    a = analyze_run(run_dir, **SMALL)
    assert a["words"]["measure"] == "training text" and a["words"]["how"] == "unknown"
    assert a["base"] is None
    for r in a["results"]:
        w = r["words"]
        assert w["measure"] == "training text" and w["words"] > 0
        assert 0 <= w["real_share"] <= 1 and w["real"] == round(w["real_share"] * w["words"])
        assert r["base_copies"] is None
        assert r["copied_any"] == r["memorisation"]["coverage"][50]  # no base: the training text
    table = format_table(a)
    assert "real words" in table and "occur in the training text" in table
    shuffled = TRAIN_TEXT.split()
    random.Random(0).shuffle(shuffled)
    given = analyze_run(run_dir, text=" ".join(shuffled) + " Qzxw Wqxz", text_label="words")
    w = given["results"][0]["words"]
    assert w["words"] == len(shuffled) + 2 and w["real"] == len(shuffled)
    assert w["made_up"] == ["Qzxw", "Wqxz"]


def test_base_corpus_copies(run_dir, fake_base):
    """With a base corpus at hand, a text made of 120 characters of it and 100 of the training
    text has both copies measured, and one figure for characters copied from either."""
    text = BASE_TEXT[300:420] + "§" + TRAIN_TEXT[500:600]  # "§" occurs in neither
    a = analyze_run(run_dir, text=text, text_label="mixed")
    assert a["words"]["measure"] == "ru" and a["words"]["how"] == "base"
    assert a["base"]["measured"] and a["base"]["characters"] == len(BASE_TEXT)
    (r,) = a["results"]
    b = r["base_copies"]
    assert b["longest_copy_length"] == 120 and b["longest_copy_text"] == BASE_TEXT[300:420]
    assert b["coverage"][50] == pytest.approx(120 / 221)
    assert r["memorisation"]["longest_copy_length"] == 100
    assert r["copied_any"] == pytest.approx(220 / 221)
    assert r["excerpt"]["base_copied_spans"] == [[0, 120]]
    assert r["excerpt"]["copied_spans"] == [[121, 221]]
    table = format_table(a)
    assert "Against the base corpus base-ru" in table and "longest copy of the base" in table
    md = render_markdown(a, [])
    assert "Copies of the base corpus base-ru" in md and "220 of 221 characters copied" in md
    json.dumps(a)


def test_base_corpus_not_built_is_one_line_not_a_failure(run_dir, fake_base, monkeypatch):
    """No base corpus: analyze says so and how to get it; the combined figure is unknown."""
    monkeypatch.setattr(basecorpus, "built_meta", lambda name: None)
    a = analyze_run(run_dir, text=TRAIN_TEXT[:300], text_label="excerpt")
    assert not a["base"]["measured"] and "basecorpus.load('base-ru')" in a["base"]["note"]
    assert a["results"][0]["base_copies"] is None and a["results"][0]["copied_any"] is None
    assert a["base"]["note"] in format_table(a).splitlines()


def test_base_of_a_run():
    """Only a shipped base's name names a base corpus."""
    assert _base_of(RunConfig().replace(base="ru")) == "ru"
    assert _base_of(RunConfig().replace(base="en")) == "en"
    for value in ("auto", "none", "runs/other"):
        assert _base_of(RunConfig().replace(base=value)) is None
