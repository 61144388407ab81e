"""The browse stage: per-feature statistics equal a brute-force pass, specific features come first, twin
latents are marked on both pages and in the index, and the static site shows a person the feature, its
highlighted contexts, logit lens and histogram when opened from file:// in headless Chromium."""

import contextlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from qscope_train.cli import compose
from qscope_train.features import HIST_BINS, hist_bin
from qscope_train.lm import load_lm
from qscope_train.load import load_sae
from qscope_train.pipeline import run
from qscope_train.rundir import RunDirs
from qscope_train.scorecard import TWIN_COS, max_cosines
from qscope_train.stages import browse
from qscope_train.stages.browse import _held_out, codes, collect
from qscope_train.tracking import NullBar, Tracker

SETTINGS = [
    "experiment=demo",
    "data.train_tokens=131072",
    "data.eval_tokens=16384",
    "data.shard_tokens=8192",
    "trainer.batch_size=512",
    "browse.tokens=16384",
    "browse.top_n=8",
    "browse.window=4",
    "browse.delphi=true",
    "browse.delphi_splits=3",
    'browse.prompts=["the cat sat on the mat . 12 + 7 = 19"]',
]


@pytest.fixture(scope="module")
def browsed(fixtures_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("browse")
    cfg = compose([*SETTINGS, f"run_dir={run_dir}", "stages=[cache,fit,browse]"])
    run(cfg, Accelerator(cpu=True))
    return cfg, run_dir


def _js_data(path: Path):
    """The arguments of the loader call in one of the site's data files."""
    text = path.read_text()
    args = text[text.index("(") + 1 : text.rindex(")")]
    return json.loads(f"[{args}]")


def test_feature_statistics_equal_a_brute_force_pass(browsed):
    cfg, run_dir = browsed
    lm = load_lm(cfg.model)
    sae = load_sae(run_dir / "fit" / "layer1.sae.pt")
    got = collect(lm, {1: sae}, cfg, "cpu", NullBar)[1]
    dense, ids, tok_index = [], [], []
    for chunk, offset in _held_out(lm, cfg, "cpu"):
        idx, val = codes(sae, chunk.rows[1])
        dense.append(torch.zeros(idx.shape[0], sae.d_sae).scatter_(1, idx, val))
        tok_index.append(offset + chunk.positions[1].long())
        ids.append(chunk.input_ids.flatten())
    A, T, stream = torch.cat(dense), torch.cat(tok_index), torch.cat(ids)
    assert got.first.tokens == A.shape[0]
    fires = (A > 0).sum(0)
    assert torch.equal(got.first.fires, fires)
    checked = 0
    for f in fires.nonzero().flatten().tolist()[:200]:
        col = A[:, f]
        rows = sorted((r for r in range(A.shape[0]) if col[r] > 0), key=lambda r: (-col[r].item(), T[r].item()))[:8]
        want = [T[r].item() for r in rows]
        assert got.first.top.tok[f, : len(want)].tolist() == want, f
        assert torch.equal(got.first.hist[f], torch.bincount(hist_bin(col[col > 0]), minlength=HIST_BINS))
        # the context around each top example: the stream's own tokens, the feature's activation at the centre
        for j, t in enumerate(want):
            assert got.top_windows.ids[f, j, 4].item() == stream[t].item()
            assert got.top_windows.acts[f, j, 4].item() == pytest.approx(col[rows[j]].item())
        checked += 1
    assert checked > 50


def test_specific_features_come_first_in_the_index(browsed):
    _, run_dir = browsed
    layer, index = _js_data(run_dir / "browse" / "data" / "layer2" / "index.js")
    order = sorted(range(len(index["spec"])), key=lambda i: (-index["spec"][i], -index["freq"][i], i))
    first = order[:5]
    assert all(index["spec"][i] == 1.0 for i in first), [index["spec"][i] for i in first]
    meta = _js_data(run_dir / "browse" / "data" / "meta.js")[0]
    for f in first:
        _, _, feats = _js_data(run_dir / "browse" / "data" / "layer2" / f"b{f // meta['bucket']}.js")
        rec = feats[f % meta["bucket"]]
        centre = {ex[0][meta["window"]] for ex in rec["top"]}
        assert len(rec["top"]) == 8 and len(centre) == 1  # every top context peaks on the same token
    vocab = _js_data(run_dir / "browse" / "data" / "vocab.js")[0]
    print("specific features of layer 2:", [(f, vocab[str(index["token"][f])]) for f in first])


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package)")
    return exe


def _dom(url: str) -> str:
    res = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_index_and_feature_pages_render_from_file_urls_in_chromium(browsed):
    _, run_dir = browsed
    site = run_dir / "browse"
    index = _dom((site / "index.html").as_uri())
    rows = re.findall(r'<tr data-id="(\d+)"', index)
    assert len(rows) == 100  # the first page of the layer's features, drawn by the script
    assert "features match" in index
    f = int(rows[0])
    page = _dom((site / "feature.html").as_uri() + f"#layer=1&id={f}")
    assert f"Feature {f} · layer 1" in page
    # highlighted context tokens (lazily loaded from the feature's data file), the logit lens, the histogram
    top = page.split("<h2>Top activations</h2>")[1].split("<h2>")[0]
    assert len(re.findall(r'class="tok centre"[^>]*style="background: rgba?\(255, 120, 0', top)) == 8
    lens = re.search(r'<div class="promoted">promotes: (.*?)</div>', page).group(1)
    assert len(re.findall(r"<span", lens)) == 10
    assert page.count("<rect") == HIST_BINS
    prompts = _dom((site / "prompts.html").as_uri())
    assert "the cat sat on the mat" in prompts and "feature.html#layer=2&amp;id=" in prompts


def test_the_neuronpedia_export_validates_against_saedashboards_batch_schema(browsed):
    from qscope_train.neuronpedia import SCHEMA, validate

    cfg, run_dir = browsed
    out = run_dir / "browse" / "neuronpedia"
    assert json.loads((out / "schema.json").read_text()) == SCHEMA
    files = sorted(out.glob("layer*/batch-*.json"))
    assert len(files) == 2 * 8  # two layers of 1024 features, 128 a file
    batch = json.loads(files[0].read_text())
    assert validate(batch) == []
    assert batch["model_id"] == "tiny-qwen3" and batch["layer"] in (1, 2) and len(batch["features"]) == 128
    fired = [f for f in batch["features"] if f["activations"]]
    assert fired and all(len(a["tokens"]) == len(a["values"]) for f in fired for a in f["activations"])
    top = fired[0]["activations"][0]
    assert top["bin_min"] == -1 and max(top["values"]) == pytest.approx(top["bin_max"], abs=1e-3)
    # the validator is not a formality: a renamed, a mistyped and a missing field are each reported
    broken = json.loads(files[0].read_text())
    broken["features"][0]["pos_strs"] = broken["features"][0].pop("pos_str")
    broken["features"][1]["frac_nonzero"] = "0.1"
    del broken["features"][2]["activations"]
    errors = validate(broken)
    assert any("missing 'pos_str'" in e for e in errors) and any("unexpected 'pos_strs'" in e for e in errors)
    assert any("frac_nonzero: expected number" in e for e in errors)
    assert any("features[2]: missing 'activations'" in e for e in errors)


def test_an_adaptation_site_shows_the_source_feature_beside_and_sorts_by_drift(browsed, tmp_path):
    cfg, run_dir = browsed
    # "adapt" from this run's own SAEs with one feature's decoder direction turned: it must lead the index
    src = tmp_path / "source"
    shutil.copytree(run_dir / "fit", src, ignore=shutil.ignore_patterns("checkpoints"))
    tensors = torch.load(src / "layer1.sae.pt", weights_only=True)
    tensors["W_dec"][:, 7] = -tensors["W_dec"][:, 7]
    torch.save(tensors, src / "layer1.sae.pt")
    shutil.copytree(run_dir / "fit", tmp_path / "run" / "fit", ignore=shutil.ignore_patterns("checkpoints"))
    adapt = compose(
        [*SETTINGS, f"run_dir={tmp_path / 'run'}", "stages=[browse]", f"init_from={src}", "browse.tokens=4096"]
    )
    run(adapt, Accelerator(cpu=True))
    site = tmp_path / "run" / "browse"
    index = _dom((site / "index.html").as_uri())
    assert re.findall(r'<tr data-id="(\d+)"', index)[0] == "7"  # opened sorted by drift: 2.0 for the turned one
    page = _dom((site / "feature.html").as_uri() + "#layer=1&id=7")
    assert "Feature 7 · layer 1" in page and "The source SAE's feature 7" in page
    assert re.search(r"drift from the source 2\b", page)
    assert '<script src="data/layer1/b0.js"></script>' in page  # the bucket was loaded on demand, from file://


def _turned(u, v, cos: float):
    """v turned, in the plane of u and v and keeping its norm, to cosine `cos` with u."""
    u_hat = u / u.norm()
    o = v - (v @ u_hat) * u_hat
    return v.norm() * (cos * u_hat + (1 - cos**2) ** 0.5 * o / o.norm())


@pytest.fixture(scope="module")
def twinned(browsed, tmp_path_factory):
    """This run's layer-1 SAE browsed again with two planted pairs of often-firing latents: a twin (decoder
    cosine 0.99) and a near pair (0.9). Returns the site, the stage's summary and printed line, the pairs
    and the planted W_dec."""
    cfg, run_dir = browsed
    root = tmp_path_factory.mktemp("twins")
    shutil.copytree(run_dir / "fit", root / "fit", ignore=shutil.ignore_patterns("checkpoints"))
    tensors = torch.load(root / "fit" / "layer1.sae.pt", weights_only=True)
    W = tensors["W_dec"]
    freq = torch.tensor(_js_data(run_dir / "browse" / "data" / "layer1" / "index.js")[1]["freq"])
    # far from every other live direction, so the planted cosines are each one's nearest
    lonely = ((freq > 2e-3) & (max_cosines(W.T, freq > 0)[0] < 0.5)).nonzero().flatten().tolist()
    a, b, c, d = lonely[:4]
    W[:, b] = _turned(W[:, a], W[:, b], 0.99)
    W[:, d] = _turned(W[:, c], W[:, d], 0.9)
    torch.save(tensors, root / "fit" / "layer1.sae.pt")
    again = compose([*SETTINGS, f"run_dir={root}", "stages=[browse]", "browse.tokens=4096"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        tracker = Tracker(root, again.wandb, again.name, {})
        summary = browse.run(again, RunDirs(root), Accelerator(cpu=True), tracker)
        tracker.close()
    return root / "browse", summary, printed.getvalue(), (a, b), (c, d), W


def _record(site: Path, layer: int, f: int) -> dict:
    return _js_data(site / "data" / f"layer{layer}" / f"b{f // 128}.js")[2][f % 128]


def test_twin_latents_are_named_on_both_pages_and_marked_in_the_index(twinned):
    site, summary, printed, (a, b), (c, d), W = twinned
    assert all(_record(site, 1, f)["fires"] > 0 for f in (a, b, c, d))  # the planted pairs are live
    assert _record(site, 1, a)["twin"] == [b, 0.99] and _record(site, 1, b)["twin"] == [a, 0.99]
    assert "twin" not in _record(site, 1, c) and "twin" not in _record(site, 1, d)
    assert [n for n, _ in _record(site, 1, c)["nb"]][0] == d  # the 0.9 pair is still each other's neighbour
    # the index marks exactly the live latents with another live one at cosine >= 0.95, as a dense pass finds
    index = _js_data(site / "data" / "layer1" / "index.js")[1]
    live = torch.tensor(index["freq"]) > 0
    unit = torch.nn.functional.normalize(W.T.float(), dim=1)
    cos = (unit @ unit.T).fill_diagonal_(-2)
    cos[~live], cos[:, ~live] = -2, -2
    best, partner = cos.max(dim=1)
    want = torch.where(best >= TWIN_COS, partner, -1).tolist()
    assert index["twin"] == want and want[a] == b and want[c] == -1
    layer2 = _js_data(site / "data" / "layer2" / "index.js")[1]["twin"]
    assert summary["twins"] == {1: sum(j >= 0 for j in want), 2: sum(j >= 0 for j in layer2)}
    assert f"{summary['twins'][1]} in layer 1" in printed and "twin latents" in printed


def test_twin_notes_and_the_twin_filter_render_in_chromium(twinned):
    site, summary, _, (a, b), (c, d), _ = twinned
    page = _dom((site / "feature.html").as_uri() + f"#layer=1&id={a}")
    note = f'Twin of feature <a href="feature.html#layer=1&amp;id={b}">#{b}</a> (decoder cosine 0.99)'
    assert note in page and "share one direction" in page
    assert "Twin of feature" not in _dom((site / "feature.html").as_uri() + f"#layer=1&id={c}")
    marks = _js_data(site / "data" / "layer1" / "index.js")[1]["twin"]
    twins = [i for i, j in enumerate(marks) if j >= 0]
    only = _dom((site / "index.html").as_uri() + "#layer=1&twins=only")
    rows = [int(i) for i in re.findall(r'<tr data-id="(\d+)"', only)]
    assert len(rows) == min(100, len(twins)) and set(rows) <= set(twins)
    assert f"twin of #{b}</a>" in only and f"{len(twins)} features match ({len(twins)} twin latents" in only
    hidden = _dom((site / "index.html").as_uri() + "#layer=1&twins=hide")
    assert f"{len(marks) - len(twins)} features match" in hidden
    assert not {str(a), str(b)} & set(re.findall(r'<tr data-id="(\d+)"', hidden))


def test_the_delphi_cache_holds_every_code_of_the_held_out_tokens_where_delphi_reads_it(browsed):
    """Every split reread as delphi's loader reads it (delphi.read_split) against the codes of a brute-force
    pass over the same held-out chunks: the same tokens, (sequence, position, latent) and values (fp16)."""
    from qscope_train.delphi import read_split, split_bounds

    cfg, run_dir = browsed
    lm = load_lm(cfg.model, "cpu")
    sae = load_sae(run_dir / "fit" / "layer2.sae.pt")
    ids, want = [], {}
    for chunk, _ in _held_out(lm, cfg, "cpu"):
        seq0, T = sum(x.shape[0] for x in ids), chunk.input_ids.shape[1]
        ids.append(chunk.input_ids)
        idx, val = codes(sae, chunk.rows[2])
        for p, row_i, row_v in zip(chunk.positions[2].tolist(), idx.tolist(), val.tolist(), strict=True):
            for f, v in zip(row_i, row_v, strict=True):
                if abs(v) > 1e-5:
                    want[(seq0 + p // T, p % T, f)] = v
    tokens = torch.cat(ids)
    where = run_dir / "browse" / "delphi" / "latents" / "layers.2"
    names = sorted(p.name for p in where.glob("*.safetensors"))
    assert names == sorted(f"{a}_{b}.safetensors" for a, b in split_bounds(sae.d_sae, 3))
    assert json.loads((where / "config.json").read_text())["model_name"] == cfg.model.name_or_path
    got = {}
    for name in names:
        loc, act, tok = read_split(where / name)
        assert torch.equal(tok, tokens.long())
        a, b = (int(x) for x in name.removesuffix(".safetensors").split("_"))
        assert a <= int(loc[:, 2].min()) and int(loc[:, 2].max()) <= b
        flat = loc[:, 2] * 2**40 + loc[:, 0] * 2**20 + loc[:, 1]  # (latent, sequence, position) ascending
        assert bool((flat[1:] > flat[:-1]).all())
        got.update({tuple(r): float(v) for r, v in zip(loc.tolist(), act.float().tolist(), strict=True)})
    assert got.keys() == want.keys() and len(got) > 1000
    keys = list(want)
    torch.testing.assert_close(
        torch.tensor([got[k] for k in keys]), torch.tensor([want[k] for k in keys]), rtol=2e-3, atol=1e-4
    )
