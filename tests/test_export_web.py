"""The web export (`charlstm.export.web`): the folder it writes, what it refuses to overwrite, and
the page itself in headless Chromium, opened from disk and from a static server on loopback,
generating the same text as Python.

The browser tests need Debian's `chromium` and `chromium-driver` (see tests/test_browser.py) and
are skipped, with that reason, only when Chromium itself is missing.
"""

from __future__ import annotations

import base64
import functools
import json
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import charlstm
from charlstm import atomic
from charlstm.bench.generation import random_model
from charlstm.errors import UserError
from charlstm.export.web import ASSETS, FILES, MANIFEST, export_web
from charlstm.serve.app import STATIC_DIR
from tests.helpers import CORPUS_TEXT, folder_files, invoke, make_run, one_line_error
from tests.test_browser import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS

# The browser tests are also slow: a real browser, and models trained for a moment.
needs_chromium = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="Chromium is not installed: apt-get install -y chromium chromium-driver",
)


def model_js(site: Path) -> dict:
    """The JSON that model.js assigns to window.CHARLSTM_MODEL."""
    text = (site / "model.js").read_text(encoding="ascii")
    return json.loads(text.split("window.CHARLSTM_MODEL = ", 1)[1].rstrip().removesuffix(";"))


# ------------------------------------------------------------------------------- the folder (fast)


def test_the_folder_holds_the_page_the_script_and_the_exact_weights(trained_run, tmp_path) -> None:
    """index.html, its stylesheet and scripts, model.js and the manifest; model.js holds the
    checkpoint's vocabulary, shapes and every weight bit for bit, as ASCII; the page apart from the
    weights stays small."""
    site = tmp_path / "site"
    written = export_web(trained_run, site)
    assert sorted(p.name for p in written) == sorted([*FILES, MANIFEST])
    assert sorted(p.name for p in site.iterdir()) == sorted([*FILES, MANIFEST])

    model = charlstm.load(trained_run)
    spec = model_js(site)
    assert spec["vocab"] == list(model.vocab.chars) and spec["name"] == trained_run.name
    assert (spec["cell"], spec["num_layers"], spec["hidden_size"]) == ("lstm", 1, 16)
    assert spec["val_loss"] == pytest.approx(model.val_loss)
    flat = np.frombuffer(base64.b64decode(spec["weights"]), dtype="<f4")
    state = model.model.state_dict()
    assert sorted(spec["tensors"]) == sorted(state)
    for name, (offset, shape) in spec["tensors"].items():
        expected = state[name].numpy()
        assert list(expected.shape) == shape
        assert np.array_equal(flat[offset : offset + expected.size].reshape(shape), expected), name

    page = sum((site / name).stat().st_size for name in FILES if name != "model.js")
    assert (site / "charlstm.js").stat().st_size < 12_000 and page < 30_000, page
    manifest = json.loads((site / MANIFEST).read_text(encoding="utf-8"))
    assert sorted(manifest["files"]) == sorted(FILES)


def test_the_cli_writes_the_page_and_says_where_to_open_it(trained_run, tmp_path) -> None:
    """`charlstm export RUN --format web --out DIR` writes the same folder and names index.html;
    the same command again is refused (exit 2, one line) until --force is given."""
    site = tmp_path / "site"
    result = invoke("export", trained_run, "--format", "web", "--out", site)
    assert result.exit_code == 0, result.output
    assert str(site / "index.html") in result.output
    assert sorted(p.name for p in site.iterdir()) == sorted([*FILES, MANIFEST])
    one_line_error(invoke("export", trained_run, "--format", "web", "--out", site), "--force")
    result = invoke("export", trained_run, "--format", "web", "--out", site, "--force")
    assert result.exit_code == 0, result.output


def test_the_page_looks_like_the_served_one() -> None:
    """The export ships the served page's stylesheet unchanged (change both together)."""
    exported = ASSETS / "style.css"
    assert exported.read_bytes() == (STATIC_DIR / "style.css").read_bytes()


def test_a_folder_that_is_not_empty_is_refused_and_left_alone(trained_run, tmp_path) -> None:
    """Without force, a folder holding anything (even an earlier export) is refused with a one-line
    error naming --force; a file given as the folder is refused too; nothing changes."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="is not empty;.*--force") as info:
        export_web(trained_run, site)
    assert "\n" not in str(info.value)
    assert folder_files(site) == {"notes.txt": b"mine"}

    a_file = tmp_path / "page.html"
    a_file.write_text("<p>mine</p>", encoding="utf-8")
    with pytest.raises(UserError, match="is a file; give a folder"):
        export_web(trained_run, a_file)
    assert a_file.read_text(encoding="utf-8") == "<p>mine</p>"


def test_force_replaces_only_an_earlier_exports_own_files(trained_run, tmp_path) -> None:
    """With force, a folder without an earlier export is refused; over an earlier export the files
    it wrote are replaced and the user's own files beside them are kept; a file of the export that
    the user changed since is refused by name, and nothing changes."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.html").write_text("<p>my own page</p>", encoding="utf-8")
    with pytest.raises(UserError, match="holds no earlier web export"):
        export_web(trained_run, other, force=True)
    assert folder_files(other) == {"index.html": b"<p>my own page</p>"}

    site = tmp_path / "site"
    export_web(trained_run, site)
    (site / "notes.txt").write_text("mine", encoding="utf-8")
    (site / "model.js").write_text("stale", encoding="utf-8")  # as if the user edited it
    before = folder_files(site)
    with pytest.raises(UserError, match="holds model.js, which the earlier web export did not"):
        export_web(trained_run, site, force=True)
    assert folder_files(site) == before

    (site / "model.js").unlink()
    export_web(trained_run, site, force=True)
    export_web(trained_run, site, force=True)  # and again over its own output
    assert (site / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert model_js(site)["name"] == trained_run.name


def test_a_failed_write_leaves_whole_files_and_force_finishes_the_job(
    trained_run, tmp_path, monkeypatch
) -> None:
    """A disk that fills up half-way through an export over an earlier one: a one-line error, every
    file is either the earlier export's or the new one's (never cut short), no temporary file is
    left, and the same export with force then completes."""
    site = tmp_path / "site"
    export_web(random_model(vocab_size=20, embedding_size=4, hidden_size=8), site)
    earlier = folder_files(site)
    original = atomic._write_all

    def fail_on_model_js(fh, data):
        if data.startswith(b"// The model "):  # model.js, after the manifest and the page files
            raise OSError(28, "No space left on device")
        original(fh, data)

    monkeypatch.setattr(atomic, "_write_all", fail_on_model_js)
    with pytest.raises(UserError, match="could not write .*model.js.*export again with --force"):
        export_web(trained_run, site, force=True)
    assert sorted(folder_files(site)) == sorted(earlier)
    assert folder_files(site)["model.js"] == earlier["model.js"]

    monkeypatch.setattr(atomic, "_write_all", original)
    export_web(trained_run, site, force=True)
    assert model_js(site)["name"] == trained_run.name


# ---------------------------------------------------------------------------- the page (Chromium)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders of each cell, trained for a moment on the tiny corpus: a 2 × 64 LSTM that has
    learned the verse (its greedy text is the poem, not a repeated space), a 2-layer GRU and a
    3-layer RNN."""
    folder = tmp_path_factory.mktemp("webruns")
    text = folder / "poems.txt"
    text.write_text(CORPUS_TEXT, encoding="utf-8")
    fit = {"batch_size": 8, "seq_len": 32, "eval_interval": 50}
    return {
        "lstm": make_run(
            folder / "verse",
            text,
            embedding_size=16,
            hidden_size=64,
            num_layers=2,
            max_steps=150,
            **fit,
        ),
        "gru": make_run(folder / "gru", text, cell="gru", num_layers=2, max_steps=40, **fit),
        "rnn": make_run(folder / "rnn", text, cell="rnn", num_layers=3, max_steps=40, **fit),
    }


@pytest.fixture(scope="module")
def sites(runs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("websites")
    built = {cell: folder / cell for cell in runs}
    for cell, run in runs.items():
        export_web(run, built[cell])
    # A 2 × 256 LSTM (random weights): slow enough in the browser for Stop to land mid-text.
    built["big"] = folder / "big"
    export_web(random_model(hidden_size=256, num_layers=2), built["big"])
    return built


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('profile')}")
    options.add_argument("--window-size=900,1000")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def static_server(sites):
    """A plain static file server on a free loopback port over the exported folders; it records
    every path asked for."""
    asked: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            asked.append(self.path)

    root = sites["lstm"].parent
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    thread.join(10)


def wait(driver, condition, seconds: float = 20):
    return WebDriverWait(driver, seconds, poll_frequency=0.02).until(lambda d: condition())


def text_of(driver, element_id: str) -> str:
    """An element's textContent: exactly the characters, with no rendering of white space."""
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait(driver, lambda: text_of(driver, "model-line").startswith("Model "))


def generate_on_page(driver, start: str, temperature: float, length: int) -> None:
    """Type the start text, set both sliders as a user drags them, and press Generate."""
    box = driver.find_element(By.ID, "start-text")
    box.clear()
    box.send_keys(start)
    driver.execute_script(
        "for (const [id, v] of [['temperature', arguments[0]], ['length', arguments[1]]]) {"
        "  const s = document.getElementById(id); s.value = v;"
        "  s.dispatchEvent(new Event('input')); }",
        temperature,
        length,
    )
    driver.find_element(By.ID, "generate").click()


# The page's model fed `ids` one at a time from a fresh state: the logits after each, (T, V).
STEP_LOGITS = """
const m = window.charlstmPage.model, state = m.state(), logits = new Float64Array(m.V), out = [];
for (const id of arguments[0]) { m.step(state, id, logits); out.push(Array.from(logits)); }
return out;
"""


def page_generate(driver, start: str, length: int, temperature: float, seed: int) -> str:
    """The page's generator called from a script (window.charlstmPage.generate), without the DOM."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.charlstmPage.generate(arguments[0], {length: arguments[1],"
        " temperature: arguments[2], seed: arguments[3]}).then(done, (e) => done('error: ' + e));",
        start,
        length,
        temperature,
        seed,
    )


@pytest.mark.slow
@needs_chromium
@pytest.mark.parametrize("where", ["file", "http"])
def test_greedy_text_on_the_page_equals_pythons(where, runs, sites, browser, static_server) -> None:
    """Opened from disk (file://) and from a static server on loopback, the page shows the model's
    name; a start text at temperature 0 gives, character for character, what
    charlstm.load(run).generate(start, length, temperature=0) gives (400 characters of verse in
    Latin and Cyrillic); and the page asked for nothing outside its own folder."""
    url, asked = static_server
    site = sites["lstm"]
    page = site.resolve().as_uri() + "/index.html" if where == "file" else f"{url}/lstm/index.html"
    open_page(browser, page)
    assert runs["lstm"].name in text_of(browser, "model-line")

    start, length = "Shall I", 400
    expected = charlstm.load(runs["lstm"]).generate(start, length, temperature=0)[0]
    assert "Прощай" in expected  # the greedy text runs on into the Russian stanza
    generate_on_page(browser, start, 0.0, length)
    wait(browser, lambda: "characters in" in text_of(browser, "status"))
    assert text_of(browser, "poem") == expected
    assert text_of(browser, "status").startswith(f"{length} characters in")

    # Offline: the page's policy lets it load only its own files and connect nowhere.
    blocked = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {mode: 'no-cors'}).then(() => done('fetched'), (e) => done(e.name));",
        f"{url}/lstm/model.js",
    )
    assert blocked == "TypeError"
    if where == "http":
        assert sorted(set(asked)) == sorted(f"/lstm/{name}" for name in FILES), asked


@pytest.mark.slow
@needs_chromium
def test_every_cell_and_a_seed_give_pythons_text(runs, sites, browser) -> None:
    """For an LSTM, a GRU and an RNN of 2-3 layers, the page's model step gives PyTorch's logits
    within 1e-5 over 1,000 steps of random characters, and its generator gives Python's text both
    greedily and when sampling at temperature 0.8 with a seed (the same splitmix64 draws)."""
    for cell in ("lstm", "gru", "rnn"):
        open_page(browser, sites[cell].resolve().as_uri() + "/index.html")
        model = charlstm.load(runs[cell])
        ids = np.random.default_rng(0).integers(0, len(model.vocab), 1000).tolist()
        logits = browser.execute_script(STEP_LOGITS, ids)
        with torch.no_grad():
            expected_logits = model.model(torch.tensor([ids]))[0][0].double().numpy()
        assert np.abs(np.array(logits) - expected_logits).max() < 1e-5, cell
        for temperature, seed in ((0.0, 0), (0.8, 7), (0.8, 2**40 + 3)):
            expected = model.generate("And ", 300, temperature=temperature, seed=seed)[0]
            got = page_generate(browser, "And ", 300, temperature, seed)
            assert got == expected, (cell, temperature, seed)


@pytest.mark.slow
@needs_chromium
def test_stop_ends_the_text_where_it_is(sites, browser) -> None:
    """On a 2 × 256 model, 4,000 characters take seconds; Stop, pressed once some have appeared,
    ends the generation there: the status says so, the text stops growing and Generate is back."""
    open_page(browser, sites["big"].resolve().as_uri() + "/index.html")
    generate_on_page(browser, "a", 0.5, 4000)
    wait(browser, lambda: len(text_of(browser, "poem")) > 50)
    browser.find_element(By.ID, "stop").click()
    wait(browser, lambda: text_of(browser, "status").startswith("stopped after"))
    shown = text_of(browser, "poem")
    assert len(shown) < 1 + 4000
    assert text_of(browser, "status").startswith(f"stopped after {len(shown) - 1} characters")
    assert text_of(browser, "poem") == shown
    assert browser.find_element(By.ID, "generate").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()


@pytest.mark.slow
@needs_chromium
def test_unknown_characters_are_dropped_and_a_start_text_of_none_is_refused(
    runs, sites, browser
) -> None:
    """As the served page asks (unknown="skip"): characters the model never saw are dropped and line
    ends normalised, and the rest continues as in Python; a start text with no known character is
    refused with Python's message; a folder without model.js says what is missing."""
    open_page(browser, sites["lstm"].resolve().as_uri() + "/index.html")
    model = charlstm.load(runs["lstm"])
    for start in ("Shall ☃ I", "\ufeffShall\r\nI\rThou ☃"):
        with pytest.warns(UserWarning, match="dropping characters"):
            expected = model.generate(start, 50, temperature=0, unknown="skip")[0]
        assert page_generate(browser, start, 50, 0.0, 0) == expected
    generate_on_page(browser, "Shall ☃ I", 0.0, 50)
    wait(browser, lambda: "characters in" in text_of(browser, "status"))
    assert text_of(browser, "poem") == model.generate("Shall  I", 50, temperature=0)[0]

    generate_on_page(browser, "☃☃", 0.0, 50)
    wait(browser, lambda: "no character the model knows" in text_of(browser, "poem"))

    broken = sites["lstm"].parent / "broken"
    shutil.copytree(sites["lstm"], broken)
    (broken / "model.js").unlink()
    browser.get(broken.resolve().as_uri() + "/index.html")
    wait(browser, lambda: "model.js is missing" in text_of(browser, "model-line"))
    assert not browser.find_element(By.ID, "generate").is_enabled()
