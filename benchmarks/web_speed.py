"""Generation speed of the exported web page (`charlstm export --format web`) in headless Chromium.

    python benchmarks/web_speed.py [RUN] [--seconds 3] [--repeats 3]

Without RUN, two randomly initialised models (speed does not depend on the weights): the lab's shape
(embedding 35, 2 × 85 LSTM, vocabulary 74) and the same with 2 × 256. Each is exported to a
temporary folder and opened from disk (file://) in Debian's headless Chromium, as a user would open
it. Per model it prints:

- the size of model.js and the time from opening the page to the model being ready;
- the page's model and sampler alone (no DOM), greedy and at temperature 0.5: characters/s over
  at least `--seconds`, the best of `--repeats`, timed inside the page;
- the page as a user sees it: Generate pressed for 4,000 characters at temperature 0.5, the rate its
  status line reports (the text drawn on screen slice by slice, ~16 ms of generation per slice);
- charlstm's own engine on the same model in Python, 1 stream, for comparison.

and one JSON line at the end. Nothing is fetched: the page is on disk and Chromium's background
networking is off.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import charlstm
from charlstm.bench.generation import random_model
from charlstm.export.web import export_web

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# The page's model stepped for at least `seconds`, 200 characters at a time: [characters, ms].
TIMED = """
const [seconds, temperature] = [arguments[0], arguments[1]];
const m = window.charlstmPage.model, stream = m.stream([0], {temperature, seed: 1});
let n = 0, ms = 0;
const t0 = performance.now();
do {
  for (let i = 0; i < 200; i++) stream.next();
  n += 200;
  ms = performance.now() - t0;
} while (ms < seconds * 1000);
return [n, ms];
"""


def browser(profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))


def text_of(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def measure(driver, site: Path, seconds: float, repeats: int) -> dict:
    t0 = time.perf_counter()
    driver.get(site.resolve().as_uri() + "/index.html")
    WebDriverWait(driver, 60, 0.01).until(lambda d: text_of(d, "model-line").startswith("Model "))
    ready_ms = (time.perf_counter() - t0) * 1000
    out = {"model_js_bytes": (site / "model.js").stat().st_size, "page_ready_ms": ready_ms}
    rates: dict[str, list[float]] = {"greedy": [], "t0.5": []}
    for _ in range(repeats):  # the two alternate, so that both see the same load
        for name, temperature in (("greedy", 0.0), ("t0.5", 0.5)):
            n, ms = driver.execute_script(TIMED, seconds, temperature)
            rates[name].append(n / (ms / 1000))
    for name, r in rates.items():
        out[f"engine_{name}_chars_per_s"] = max(r)
    # The page as a user drives it: 4,000 characters at temperature 0.5, the status line's rate
    # (the best of `repeats`). WebDriver looks at the page only every 0.25 s: its scripts run on the
    # page's thread, and polling faster slows the page it measures.
    driver.execute_script(
        "for (const [id, v] of [['temperature', 0.5], ['length', 4000]]) {"
        "  const s = document.getElementById(id); s.value = v;"
        "  s.dispatchEvent(new Event('input')); }"
    )
    page = []
    for _ in range(repeats):
        driver.execute_script("document.getElementById('status').textContent = ''")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 120, 0.25).until(lambda d: "characters in" in text_of(d, "status"))
        status = text_of(driver, "status")
        page.append(int(re.search(r"\(([\d,]+) characters/s\)", status)[1].replace(",", "")))
    out["page_chars_per_s"] = max(page)
    return out


def python_speed(model: charlstm.TextModel, seconds: float, repeats: int) -> float:
    """charlstm's own engine, 1 stream, temperature 0.5 (what `charlstm generate` runs), on as many
    characters as it makes in about `seconds`."""
    t0 = time.perf_counter()
    model.generate(" ", 2000, temperature=0.5, seed=1)  # also loads the compiled kernels
    chars = 2000
    while time.perf_counter() - t0 < seconds / 4:
        t0 = time.perf_counter()
        chars *= 2
        model.generate(" ", chars, temperature=0.5, seed=1)
    chars = int(chars * seconds / max(time.perf_counter() - t0, 1e-3))
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(" ", chars, temperature=0.5, seed=1)
        best = max(best, chars / (time.perf_counter() - t0))
    return best


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", help="a run folder (default: two random models)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.run:
        models = {Path(args.run).name: charlstm.load(args.run, device="cpu")}
    else:
        models = {
            "lab (E35, 2x85, V74)": random_model(),
            "2x256 (E35, V74)": random_model(hidden_size=256),
        }
    results = {}
    with tempfile.TemporaryDirectory(prefix="charlstm-web-") as tmp:
        driver = browser(Path(tmp) / "profile")
        driver.set_script_timeout(600)
        try:
            version = driver.capabilities.get("browserVersion", "?")
            for i, (name, model) in enumerate(models.items()):
                site = Path(tmp) / f"site{i}"
                export_web(model, site)
                results[name] = measure(driver, site, args.seconds, args.repeats)
                results[name]["python_chars_per_s"] = python_speed(
                    model, args.seconds, args.repeats
                )
        finally:
            driver.quit()
    print(f"Chromium {version} headless, page opened from disk; best of {args.repeats} runs")
    print(
        f"{'model':<22} {'model.js':>9} {'ready':>7} {'greedy c/s':>11} {'T=0.5 c/s':>10} "
        f"{'page c/s':>9} {'Python c/s':>11}"
    )
    for name, r in results.items():
        print(
            f"{name:<22} {r['model_js_bytes'] / 1024:>7.0f}KB {r['page_ready_ms']:>5.0f}ms "
            f"{r['engine_greedy_chars_per_s']:>11,.0f} {r['engine_t0.5_chars_per_s']:>10,.0f} "
            f"{r['page_chars_per_s']:>9,} {r['python_chars_per_s']:>11,.0f}"
        )
    print(json.dumps({"chromium": version, "seconds": args.seconds, "models": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
