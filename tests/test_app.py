"""qscope-train-app: its options, its JSON tools and their errors, and each tab used in headless Chromium
(Debian's chromium and chromium-driver, driven by Selenium; .ci/run installs both)."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request

import pytest
from conftest import random_release

from qscope_train.analysis import app
from qscope_train.errors import InputError
from qscope_train.release import save_tensors

CATS = [f"the cat number {i} sat on the mat and purred" for i in range(12)]
CODE = [f"def f{i}(x, y): return x + y * {i}" for i in range(12)]


@pytest.fixture(scope="module")
def served(fixtures_dir, tmp_path_factory):
    """The app on a free port over two random SAEs exported beside sidecars that name the tiny model, with a
    browse site; yields (base URL, the SAE directory)."""
    saes = tmp_path_factory.mktemp("saes")
    for layer in (1, 2):
        t = random_release(d_model=64, d_sae=256, seed=layer)
        t["W_dec"] /= t["W_dec"].norm(dim=0, keepdim=True)
        t["W_enc"] = t["W_dec"].T.clone()
        save_tensors(saes / f"layer{layer}.sae.pt", t)
        (saes / f"layer{layer}.json").write_text(json.dumps({"model": str(fixtures_dir / "tiny-qwen3"), "k": 8}))
    site = tmp_path_factory.mktemp("browse")
    (site / "index.html").write_text("<html><body>index</body></html>")
    (site / "feature.html").write_text("<html><body id='feature-page'>feature</body></html>")
    (site.parent / "secret.txt").write_text("not served")
    cfg = app.parse_options([f"saes={saes}", f"browse={site}", "port=0"])
    server = app.make_server(app.load_analyzer(cfg), cfg)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", saes
    server.shutdown()
    server.server_close()


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_options_are_key_value_and_bad_ones_name_themselves(tmp_path):
    with pytest.raises(InputError, match="saes=.* is required"):
        app.parse_options([])
    with pytest.raises(InputError, match="unknown option 'prot'"):
        app.parse_options(["saes=x", "prot=1"])
    with pytest.raises(InputError, match="port=.*'abc'"):
        app.parse_options(["saes=x", "port=abc"])
    with pytest.raises(InputError, match="no index.html"):
        app.parse_options(["saes=x", f"browse={tmp_path}"])
    cfg = app.parse_options(["saes=x", "port=0", "layers=1,2", "dtype=bfloat16"])
    assert (cfg.port, cfg.layers, cfg.dtype.value) == (0, "1,2", "bfloat16")
    with pytest.raises(InputError, match="give model="):
        app.model_from_sidecars(str(tmp_path))


def test_tools_answer_json_and_bad_requests_get_a_message(served):
    url, _ = served
    status, out = _post(url + "/api/analyze", {"text": CATS[0], "top": 3, "layers": [2]})
    assert status == 200 and list(out["layers"]) == ["2"] and len(out["tokens"]) > 3
    bad = [
        ("/api/analyze", {"text": "   "}, "empty"),
        ("/api/analyze", {"text": "a cat", "layers": [5]}, "no SAE for layer 5"),
        ("/api/analyze", {"text": "a cat", "top": "many"}, "top must be an integer"),
        ("/api/steer", {"prompt": "a cat", "layer": 1, "feature": 256}, "feature 256 is out of range"),
        ("/api/steer", {"prompt": "a cat", "layer": 1}, "feature is required"),
        ("/api/steer", {"prompt": "", "layer": 1, "feature": 3}, "empty"),
        ("/api/steer", {"prompt": "a cat", "layer": 1, "feature": 3, "mode": "push"}, "mode must be"),
        ("/api/compare", {"a": "one text", "b": "x\ny"}, "a: give at least two texts"),
        ("/api/nothing", {}, "no tool at /api/nothing"),
    ]
    for path, body, message in bad:
        status, out = _post(url + path, body)
        assert status in (400, 404) and message in out["error"], (path, out)
    status, out = _post(url + "/api/analyze", b"{not json")
    assert status == 400 and "not JSON" in out["error"]
    # still serving; a comparison side may be far longer than one text field
    assert _post(url + "/api/analyze", {"text": CATS[1]})[0] == 200
    many = "\n".join(f"{CATS[i % 12]} and then the {i}th bird flew over the quiet river" for i in range(300))
    assert len(many) > app.MAX_TEXT_CHARS
    status, out = _post(url + "/api/compare", {"a": many, "b": "\n".join(CODE), "max_tokens": 16})
    assert status == 200 and out["texts"] == [300, 12]


def test_the_browse_site_is_served_and_nothing_beside_it(served):
    url, _ = served
    with urllib.request.urlopen(url + "/browse/feature.html", timeout=30) as r:
        assert b"feature-page" in r.read()
    for path in ("/browse/../secret.txt", "/browse/%2e%2e/secret.txt"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + path, timeout=30)
        assert err.value.code == 404


# ----- the page in headless Chromium ------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    exe, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if exe is None or driver is None:
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs Debian's packages)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        opts.add_argument(flag)
    b = webdriver.Chrome(options=opts, service=Service(driver))
    yield b
    b.quit()


def _wait(b, condition, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(b, timeout).until(lambda d: condition(d))


def _by(b, css):
    from selenium.webdriver.common.by import By

    return b.find_elements(By.CSS_SELECTOR, css)


def _fill(b, element_id: str, value: str) -> None:
    box = _by(b, "#" + element_id)[0]
    box.clear()
    if value:
        box.send_keys(value)


def _run(b, tool: str) -> str:
    """Click the tool's button, wait until the request is done; the tool's error text ('' if none)."""
    _by(b, f"#{tool}-run")[0].click()
    _wait(b, lambda d: _by(d, f"#{tool}-run")[0].is_enabled() and not _by(d, "#status")[0].text)
    return _by(b, f"#{tool}-error")[0].text


def test_each_tab_works_in_chromium_and_bad_inputs_show_a_message(served, browser):
    url, _ = served
    b = browser
    b.get(url + "/")
    _wait(b, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
    assert "tiny-qwen3" in _by(b, "#about")[0].text

    # analyze: one heatmap per layer, one header cell per token, features linking to the browse site
    _fill(b, "analyze-text", CATS[0])
    assert _run(b, "analyze") == ""
    tables = _by(b, "#analyze-out table.heat")
    assert [t.get_attribute("data-layer") for t in tables] == ["1", "2"]
    status, want = _post(url + "/api/analyze", {"text": CATS[0]})
    assert status == 200
    assert len(_by(tables[0], "th.tok")) == len(want["tokens"])
    link = _by(tables[0], "a.feature")[0]
    assert link.get_attribute("href").startswith(url + "/browse/feature.html#layer=1&id=")
    # bad inputs: a message, nothing rendered over the last result, and the app keeps serving
    _fill(b, "analyze-text", "")
    assert "empty" in _run(b, "analyze")
    _fill(b, "analyze-text", CATS[1])
    _fill(b, "analyze-layers", "7")
    assert "no SAE for layer 7" in _run(b, "analyze")
    _fill(b, "analyze-layers", "all")
    assert _run(b, "analyze") == "" and len(_by(b, "#analyze-out table.heat")) == 2

    # compare: cat sentences against code lines
    _by(b, "#tab-compare")[0].click()
    _fill(b, "compare-a", "\n".join(CATS))
    _fill(b, "compare-b", "\n".join(CODE))
    assert _run(b, "compare") == ""
    assert "12 texts in A, 12 in B" in _by(b, "#compare-summary")[0].text
    assert len(_by(b, "#compare-out p.classifier")) == 4  # one classifier per side and layer
    assert _by(b, "#compare-out table.more_in_a tr") or _by(b, "#compare-out table.more_in_b tr")
    _fill(b, "compare-b", "only one line")
    assert "b: give at least two texts" in _run(b, "compare")

    # steer: from a feature's "steer" link, then a clamp, then bad inputs
    _by(b, "#tab-analyze")[0].click()
    _by(b, "#analyze-out a.steer-this")[0].click()
    assert _by(b, "#panel-steer")[0].is_displayed() and _by(b, "#steer-layer")[0].get_attribute("value") == "1"
    _fill(b, "steer-strength", "3")
    _fill(b, "steer-tokens", "6")
    assert _run(b, "steer") == ""
    gens = _by(b, "#steer-out .gen")
    assert len(gens) == 2 and all(1 <= len(_by(g, "span")) <= 6 for g in gens)
    assert "p = " in _by(gens[1], "span")[0].get_attribute("title")
    _fill(b, "steer-feature", "999")
    assert "feature 999 is out of range" in _run(b, "steer")
    _fill(b, "steer-feature", "3")
    _fill(b, "steer-layer", "9")
    assert "no SAE for layer 9" in _run(b, "steer")
    _fill(b, "steer-layer", "1")
    _fill(b, "steer-prompt", "")
    assert "empty" in _run(b, "steer")
    _fill(b, "steer-prompt", "The cat sat on the")
    assert _run(b, "steer") == "" and "feature #3" in _by(b, "#steer-summary")[0].text
