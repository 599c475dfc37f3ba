"""End to end: the server on a loopback port, its page driven in headless Chromium.

Needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver) and the
`selenium` package; the test is skipped, with that reason, only when Chromium itself is missing.
It saves the page as screenshot.png (and screenshot-phone.png at a phone's width): in docs/ with
CHARLSTM_SCREENSHOTS=docs, else in the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import charlstm
from charlstm.serve.app import ServerConfig, create_app
from tests.helpers import make_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# The screenshots go to docs/ (where the README shows them) only when asked, so that a test run does
# not leave the working tree modified: CHARLSTM_SCREENSHOTS=docs pytest tests/test_browser.py
DOCS = Path(__file__).resolve().parents[1] / "docs"
SHOTS = os.environ.get("CHARLSTM_SCREENSHOTS")

pytestmark = [
    pytest.mark.slow,  # a real server, a real browser, and a model trained for a second
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="Chromium is not installed: apt-get install -y chromium chromium-driver",
    ),
]

# Without the networking flags Chromium tries to reach Google's services, which a closed network
# refuses; --no-sandbox because CI runs as root.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]

POEM = """She walks in beauty, like the night
Of cloudless climes and starry skies;
And all that's best of dark and bright
Meet in her aspect and her eyes;
Thus mellowed to that tender light
Which heaven to gaudy day denies.

One shade the more, one ray the less,
Had half impaired the nameless grace
Which waves in every raven tress,
Or softly lightens o'er her face;
Where thoughts serenely sweet express,
How pure, how dear their dwelling-place.

And on that cheek, and o'er that brow,
So soft, so calm, yet eloquent,
The smiles that win, the tints that glow,
But tell of days in goodness spent,
A mind at peace with all below,
A heart whose love is innocent!
"""


class Paced(torch.nn.Module):
    """The tiny model slowed to about 500 steps/s, like a larger one, so Stop lands mid-poem."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, idx, hidden=None):
        time.sleep(0.002)
        return self.inner(idx, hidden)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A model trained for a second on one poem, served by uvicorn on a free loopback port."""
    folder = tmp_path_factory.mktemp("browser")
    (folder / "poem.txt").write_text(POEM, encoding="utf-8")
    run = make_run(
        folder / "she-walks-in-beauty",
        folder / "poem.txt",
        val_fraction=0.2,
        batch_size=8,
        seq_len=32,
        embedding_size=16,
        hidden_size=64,
        max_steps=60,
        eval_interval=20,
    )
    model = charlstm.load(run)
    model.model = Paced(model.model)
    app = create_app([model], ServerConfig())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.add_argument("--window-size=900,1000")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


def wait(driver, condition, seconds: float = 20):
    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda d: condition())


def fit_window_to_page(driver, width: int) -> None:
    """Make the window as tall as the page, so that a screenshot shows all of it."""
    driver.set_window_size(width, 800)
    chrome = driver.execute_script("return window.outerHeight - window.innerHeight")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height + chrome)


def _shot_dir(tmp_path: Path) -> Path:
    folder = DOCS if SHOTS == "docs" else tmp_path
    folder.mkdir(exist_ok=True)
    return folder


def test_type_generate_watch_it_stream_then_stop(site, browser, tmp_path) -> None:
    """Type a start text, press Generate, watch the poem grow from that start text, press Stop; the
    server frees the stream's slot, and the page keeps the poem."""
    url, app = site
    browser.get(url)
    model_line = browser.find_element(By.ID, "model-line")
    wait(browser, lambda: "validation loss" in model_line.text)
    assert "she-walks-in-beauty" in model_line.text

    start = browser.find_element(By.ID, "start-text")
    start.clear()
    start.send_keys("She walks in beauty")
    browser.execute_script(
        "const s = document.getElementById('length'); s.value = 4000;"
        "s.dispatchEvent(new Event('input'));"
    )
    browser.find_element(By.ID, "generate").click()

    poem = browser.find_element(By.ID, "poem")
    stop = browser.find_element(By.ID, "stop")
    wait(browser, lambda: len(poem.text) > 320)
    assert poem.text.startswith("She walks in beauty")
    assert stop.is_enabled() and not browser.find_element(By.ID, "generate").is_enabled()
    stop.click()

    status = browser.find_element(By.ID, "status")
    wait(browser, lambda: status.text.startswith("stopped after"))
    wait(browser, lambda: app.state.server.used == 0, seconds=5)
    shown = poem.text
    time.sleep(0.3)
    assert poem.text == shown and len(shown) < len("She walks in beauty") + 4000
    assert browser.find_element(By.ID, "generate").is_enabled() and not stop.is_enabled()

    fit_window_to_page(browser, 900)
    browser.save_screenshot(str(_shot_dir(tmp_path) / "screenshot.png"))
    browser.set_window_size(390, 844)  # a phone: the controls stack and nothing scrolls sideways
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
    fit_window_to_page(browser, 390)
    browser.save_screenshot(str(_shot_dir(tmp_path) / "screenshot-phone.png"))


def test_an_invalid_request_shows_the_servers_reason(site, browser) -> None:
    """A field the server refuses comes back as its 422 reason on the page, not a silent failure."""
    url, _ = site
    browser.get(url)
    browser.execute_script(
        "const s = document.getElementById('temperature'); s.min = -1; s.value = -1;"
    )
    browser.find_element(By.ID, "generate").click()
    poem = browser.find_element(By.ID, "poem")
    wait(browser, lambda: "temperature" in poem.text)
    assert "greater than or equal to 0" in poem.text


def test_api_docs_render_without_a_cdn(site, browser) -> None:
    """/docs draws the OpenAPI document from assets the app serves itself."""
    url, _ = site
    browser.get(url + "/docs")
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".opblock"))
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "/v1/generate/stream" in text and "/healthz" in text
