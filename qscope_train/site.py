"""The feature browser's static site: HTML and JavaScript that open from file:// with no server and fetch
nothing from the network. Data are JavaScript files that call a loader (a <script> tag works from
file://, fetch() does not), one per 128 features, loaded only when a page needs them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .features import HIST_BINS, drift, hist_edges, specificity

BUCKET = 128  # features per data file
ASSETS = Path(__file__).with_name("site_assets")


def token_text(tokenizer, i: int) -> str:
    """One token id as the text it stands for (a byte-level BPE piece decoded)."""
    piece = tokenizer.convert_ids_to_tokens(i)
    return tokenizer.convert_tokens_to_string([piece]) if piece is not None else f"<{i}>"


def readable(tokenizer, ids: set[int]) -> dict[int, str]:
    """Each token id as its text with whitespace made visible."""
    return {
        i: token_text(tokenizer, i).replace(" ", "·").replace("\n", "↵").replace("\t", "⇥") or f"<{i}>"
        for i in sorted(ids)
    }


def examples(ids, acts):
    """(token ids, activations) of every example window that has its own token (id >= 0 at the centre)."""
    centre = ids.shape[-1] // 2
    for e_ids, e_acts in zip(ids.tolist(), acts.tolist(), strict=True):
        if e_ids[centre] >= 0:
            yield e_ids, e_acts


def _examples(ids, acts) -> list:
    """[[token ids], [activations]] per example, for the site's data files."""
    return [[e_ids, [round(a, 3) for a in e_acts]] for e_ids, e_acts in examples(ids, acts)]


def feature_record(lf, f: int, tokens: int, bands: int) -> dict:
    """One feature's data for its page."""
    fp = lf.first
    top_max = float(fp.top.val[f, 0]) if fp.top.tok[f, 0] >= 0 else 0.0
    ranges = []
    for b in range(bands - 1):
        ranges.append(
            {
                "lo": round(top_max * b / bands, 4),
                "hi": round(top_max * (b + 1) / bands, 4),
                "ex": _examples(lf.range_windows.ids[f, b], lf.range_windows.acts[f, b]),
            }
        )
    return {
        "id": f,
        "fires": int(fp.fires[f]),
        "freq": float(fp.fires[f]) / max(1, tokens),
        "max": round(top_max, 4),
        "hist": fp.hist[f].tolist(),
        "top": _examples(lf.top_windows.ids[f], lf.top_windows.acts[f]),
        "ranges": ranges,
        "lt": [[int(i), round(float(v), 3)] for i, v in zip(*(t[f] for t in lf.logit_top), strict=True)],
        "lb": [[int(i), round(float(v), 3)] for i, v in zip(*(t[f] for t in lf.logit_bottom), strict=True)],
        "nb": [[int(i), round(float(c), 3)] for i, c in zip(*(t[f] for t in lf.near), strict=True)],
    } | _twin(lf, f)


def _twin(lf, f: int) -> dict:
    """{"twin": [partner, decoder cosine]} for a feature with a live twin (browse.live_twins), else {}."""
    partner = int(lf.twin[0][f])
    return {"twin": [partner, round(float(lf.twin[1][f]), 3)]} if partner >= 0 else {}


def _js(path: Path, call: str, *args) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{call}({', '.join(json.dumps(a, separators=(',', ':')) for a in args)});\n")


def write(out: Path, collected: dict, sets: dict, prompts: list[dict], tokenizer, cfg) -> dict:
    """Write the site under out/; returns a summary (features, tokens, layers, and twins: per layer, how many
    live latents have a twin)."""
    b = cfg.browse
    trained, source = collected["trained"], collected.get("source")
    used: set[int] = set()
    layers_meta, n_features = [], 0
    tokens = 0
    for n, lf in trained.items():
        tokens = lf.first.tokens
        d_sae = lf.first.fires.numel()
        spec = specificity(lf.top_windows.ids, b.window)
        centre_ids = lf.top_windows.ids[:, 0, b.window]
        moved = drift(sets["trained"][n].W_dec, sets["source"][n].W_dec) if source is not None else None
        index = {
            "freq": [round(float(c) / max(1, tokens), 6) for c in lf.first.fires],
            "max": [round(max(0.0, float(v)), 4) for v in lf.first.top.val[:, 0]],
            "spec": [round(float(s), 4) for s in spec],
            "token": centre_ids.tolist(),
            "twin": lf.twin[0].tolist(),  # each feature's twin, or -1
        }
        used.update(i for i in index["token"] if i >= 0)
        if moved is not None:
            index["drift"] = [round(float(d), 4) for d in moved]
        _js(out / "data" / f"layer{n}" / "index.js", "qscopeIndex", n, index)
        for start in range(0, d_sae, BUCKET):
            feats = []
            for f in range(start, min(d_sae, start + BUCKET)):
                rec = feature_record(lf, f, tokens, b.bands)
                if source is not None:
                    src = feature_record(source[n], f, source[n].first.tokens, b.bands)
                    rec["source"] = {
                        k: src[k] for k in ("fires", "freq", "max", "hist", "top", "lt", "twin") if k in src
                    }
                    rec["drift"] = index["drift"][f]
                feats.append(rec)
                for part in (rec, rec.get("source", {})):
                    for ex in part.get("top", []) + [e for r in part.get("ranges", []) for e in r["ex"]]:
                        used.update(i for i in ex[0] if i >= 0)
                    used.update(i for i, _ in part.get("lt", []) + part.get("lb", []))
            _js(out / "data" / f"layer{n}" / f"b{start // BUCKET}.js", "qscopeBucket", n, start // BUCKET, feats)
        layers_meta.append({"layer": n, "d_sae": d_sae})
        n_features += d_sae
    for p in prompts:
        used.update(p["ids"])
    vocab = readable(tokenizer, used)
    _js(out / "data" / "vocab.js", "qscopeVocab", {str(i): s for i, s in vocab.items()})
    meta = {
        "model": cfg.model.name_or_path,
        "run": cfg.name,
        "layers": layers_meta,
        "bucket": BUCKET,
        "window": b.window,
        "tokens": tokens,
        "hist_edges": [round(e, 5) for e in hist_edges()],
        "hist_bins": HIST_BINS,
        "has_source": source is not None,
        "source": cfg.init_from,
    }
    _js(out / "data" / "meta.js", "qscopeMeta", meta)
    _js(out / "data" / "prompts.js", "qscopePrompts", prompts)
    for asset in ASSETS.iterdir():
        (out / asset.name).write_text(asset.read_text())
    twins = {n: int((lf.twin[0] >= 0).sum()) for n, lf in trained.items()}
    return {"features": n_features, "tokens": tokens, "layers": [m["layer"] for m in layers_meta], "twins": twins}


def top_feature_ids(index: dict, key: str = "spec", n: int = 10) -> list[int]:
    """The first n feature ids of a layer index sorted by `key`, descending (as the index page sorts)."""
    vals = torch.tensor(index[key])
    return torch.argsort(vals, descending=True, stable=True)[:n].tolist()
