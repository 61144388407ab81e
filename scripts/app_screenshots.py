"""Screenshots of qscope-train-app's three tabs on `make demo`'s outputs, for the README (headless Chromium
through Selenium and Debian's chromium-driver).

Usage: python scripts/app_screenshots.py [--run outputs/demo] [--out docs/images]
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from qscope_train.analysis import app

# the two sides of the comparison: the base corpus's kind of text against chat turns
BASE = [
    t
    for i in range(5)
    for t in (
        f"Shopping list: soap, candles, salt. {i + 9} times 12 is {12 * (i + 9)}.",
        f"def add(x, y):  return x - y * {i + 2}",
        f"On day {i + 3} of month 8, the river repaired three apples.",
        "It was a gentle and quiet day in the valley.",
    )
]
CHAT = [
    t
    for i in range(5)
    for t in (
        "user: Describe the day. assistant: It was a quiet and gentle day.",
        "user: Tell me what a quiet engine did. assistant: A quiet engine counted seven letters.",
        f"user: What is {i + 2} times 8? assistant: {i + 2} times 8 is {8 * (i + 2)}.",
        "user: Describe the river. assistant: The river was calm and cold.",
    )
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="outputs/demo", help="the demo's run directory (export/ and browse/)")
    p.add_argument("--out", default="docs/images")
    a = p.parse_args()
    run, out = Path(a.run), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = app.parse_options([f"saes={run / 'export'}", f"browse={run / 'browse'}", "port=0"])
    server = app.make_server(app.load_analyzer(cfg), cfg)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000", "--hide-scrollbars"):
        opts.add_argument(flag)
    b = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    wait = WebDriverWait(b, 300)

    def run_tool(tool: str) -> None:
        b.find_element(By.ID, f"{tool}-run").click()
        wait.until(lambda d: d.find_element(By.ID, f"{tool}-run").is_enabled())
        error = b.find_element(By.ID, f"{tool}-error").text
        if error:
            raise SystemExit(f"{tool}: {error}")

    def fill(element_id: str, text: str) -> None:
        box = b.find_element(By.ID, element_id)
        box.clear()
        box.send_keys(text)

    try:
        b.get(url)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        fill("analyze-text", "the cat sat on the mat . 12 + 7 = 19")
        fill("analyze-top", "6")
        run_tool("analyze")
        b.save_screenshot(str(out / "app-analyze.png"))
        b.find_element(By.ID, "tab-compare").click()
        fill("compare-a", "\n".join(BASE))
        fill("compare-b", "\n".join(CHAT))
        fill("compare-layers", "2")
        fill("compare-top", "6")
        run_tool("compare")
        b.save_screenshot(str(out / "app-compare.png"))
        feature = json.loads(
            b.execute_script("return JSON.stringify(document.querySelector('#compare-out a.feature').textContent)")
        ).lstrip("#")
        b.find_element(By.ID, "tab-steer").click()
        fill("steer-prompt", "the cat sat on the")
        fill("steer-layer", "2")
        fill("steer-feature", feature)
        fill("steer-strength", "4")
        fill("steer-tokens", "12")
        run_tool("steer")
        b.save_screenshot(str(out / "app-steer.png"))
    finally:
        b.quit()
        server.shutdown()
    print(f"screenshots: {', '.join(str(out / f'app-{t}.png') for t in ('analyze', 'compare', 'steer'))}")


if __name__ == "__main__":
    main()
