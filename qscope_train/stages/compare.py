"""The compare stage: the run's exported SAEs (or compare.saes) on compare.a's and compare.b's texts, written
as run_dir/compare/compare.json and report.md with plots (analysis/compare.py), the top features printed."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch

from ..analysis.compare import firing, summarize
from ..analysis.model import Analyzer
from ..config import DataConfig, RunConfig, TextFormat
from ..data.tokens import load_text_dataset
from ..errors import InputError, MissingInputError
from ..fsutil import atomic_write_json
from ..lm import load_lm
from ..load import load_saes
from ..report import _pyplot, _save
from ..rundir import RunDirs
from ..tracking import Tracker


def texts_of(data: DataConfig, n: int, tokenizer, side: str) -> list[str]:
    """The first n non-empty documents of a data config (chat rendered with the tokenizer's template)."""
    ds = load_text_dataset(data)
    texts = []
    for row in islice(ds, 4 * n):
        value = row[data.text_field]
        text = tokenizer.apply_chat_template(value, tokenize=False) if data.format is TextFormat.chat else value
        if text and text.strip():
            texts.append(text)
        if len(texts) == n:
            break
    if len(texts) < 4:
        raise InputError(f"compare.{side} ({data.dataset}): found {len(texts)} non-empty documents, need at least 4")
    return texts


def _plot(out: Path, layer: int, arrays: dict, alpha: float, names: tuple[str, str]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    a, b, q = (arrays[k].numpy() for k in ("rate_a", "rate_b", "q"))
    fired = (a + b) > 0
    sig = fired & (q < alpha)
    ax.scatter(a[fired & ~sig], b[fired & ~sig], s=4, c="0.6", label="not significant")
    ax.scatter(a[sig], b[sig], s=8, c="C3", label=f"q < {alpha}")
    ax.plot([0, 1], [0, 1], lw=0.8, c="k")
    ax.set_xlabel(f"share of texts fired in, A ({names[0]})")
    ax.set_ylabel(f"share of texts fired in, B ({names[1]})")
    ax.set_title(f"Layer {layer}: every feature that fired")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, out / f"rates_layer{layer}.png")


def _rows(rows: list[dict]) -> list[str]:
    lines = ["| feature | texts A | texts B | q | tokens A | tokens B |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['feature']} | {r['rate_a']:.1%} | {r['rate_b']:.1%} | {r['q']:.2g} | "
            f"{r['token_rate_a']:.2%} | {r['token_rate_b']:.2%} |"
        )
    return lines


def write_report(out: Path, result: dict, arrays: dict, names: tuple[str, str]) -> Path:
    lines = [
        "# Compare",
        "",
        f"A: {names[0]}, {result['texts'][0]} texts, {result['tokens'][0]:,} tokens; "
        f"B: {names[1]}, {result['texts'][1]} texts, {result['tokens'][1]:,} tokens (position 0 left out).",
        "",
        "A feature fires in a text if it fires on any of its tokens. Per feature: Fisher's exact test on the "
        f"shares of texts, Benjamini-Hochberg q-values over the features that fired; significant at q < {result['alpha']}.",
    ]
    for n, layer in result["layers"].items():
        fp = layer["footprint"]
        lines += [
            "",
            f"## Layer {n}",
            "",
            f"{layer['significant']} of {layer['tested']} features that fired differ significantly. Footprint: A fires "
            f"{fp['share_a']:.1%} of the features, B {fp['share_b']:.1%}; B fires {fp['b_covers_of_a']:.1%} of A's, "
            f"A fires {fp['a_covers_of_b']:.1%} of B's.",
            "",
        ]
        for side, clf in layer["classifier"].items():
            lines.append(
                f"Classifier for {side.upper()} (features {clf['features']}, flag a text when any fires; held out "
                f"{clf['held_out_positive']} + {clf['held_out_negative']} texts): precision {clf['precision']:.3f}, "
                f"recall {clf['recall']:.3f}, F1 {clf['f1']:.3f}."
            )
        lines += [
            "",
            f"![rates](rates_layer{n}.png)",
            "",
            "More in A:",
            "",
            *_rows(layer["more_in_a"]),
            "",
            "More in B:",
            "",
            *_rows(layer["more_in_b"]),
        ]
        _plot(out, n, arrays[n], result["alpha"], names)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _counted(texts: list[str], bar):
    for text in texts:
        yield text
        bar.update(1)


def run(cfg: RunConfig, dirs: RunDirs, accelerator, tracker: Tracker) -> dict:
    """Returns compare.json's content."""
    c = cfg.compare
    source = c.saes or dirs.export
    if c.saes is None and not dirs.sae_file(dirs.export, cfg.layers[0]).is_file():
        raise MissingInputError(f"{dirs.export} holds no SAEs: run the export stage first, or set compare.saes")
    device = accelerator.device
    lm = load_lm(cfg.model, device)
    an = Analyzer(lm, load_saes(source, cfg.layers, default_activation=cfg.sae.activation), device)
    side_a = c.a or cfg.data
    a = texts_of(side_a, c.texts, lm.tokenizer, "a")
    b = texts_of(c.b, c.texts, lm.tokenizer, "b")
    cut = min(side_a.context_len, c.b.context_len)  # the same cut for both: a longer text fires more features
    with torch.no_grad(), tracker.progress(total=len(a) + len(b), desc="compare", unit="text") as bar:
        fa = firing(an, _counted(a, bar), cfg.layers, cut)
        fb = firing(an, _counted(b, bar), cfg.layers, cut)
    result, arrays = summarize(fa, fb, c.alpha, c.top, 0.5, c.classifier_features, cfg.trainer.seed)
    names = (side_a.dataset, c.b.dataset)
    result |= {"a": names[0], "b": names[1], "saes": str(source), "max_tokens": cut}
    out = dirs.root / "compare"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", result)
    report = write_report(out, result, arrays, (Path(names[0]).name, Path(names[1]).name))
    for n, layer in result["layers"].items():
        for side, key in (("A", "more_in_a"), ("B", "more_in_b")):
            top = ", ".join(f"{r['feature']} ({r['rate_a']:.0%} vs {r['rate_b']:.0%})" for r in layer[key][:5])
            print(f"compare layer {n}: more in {side}: {top or 'none significant'}")
    print(f"compare: {out / 'compare.json'}, report {report}")
    return result
