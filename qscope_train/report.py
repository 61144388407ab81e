"""Markdown reports with PNG plots beside them: the evaluation report (eval/report.md) and the
adaptation report (report.md in an adaptation run). Plots have titles, axis labels and units.
"""

from __future__ import annotations

import math
from pathlib import Path

from .fsutil import atomic_write_text

SET_LABELS = {"trained": "trained", "source": "source (before)", "given": "evaluated SAEs"}


def _label(set_name: str, sets: dict) -> str:
    if set_name == "trained" and "source" in sets:
        return "adapted (after)"
    return SET_LABELS.get(set_name, set_name)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    _pyplot().close(fig)
    return path.name


def _fmt(value, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _pct(value):
    return None if value is None else 100 * value


def _per_layer_plot(out: Path, name: str, sets: dict[str, dict], key: str, title: str, ylabel: str, scale=1.0):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    plotted = False
    for set_name, layers in sets.items():
        xs = sorted(n for n, m in layers.items() if key in m)
        if xs:
            ax.plot(xs, [layers[n][key] * scale for n in xs], marker="o", label=_label(set_name, sets))
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_title(title)
    ax.xaxis.set_major_locator(_pyplot().MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer n (residual stream after block n)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out / name)


def _firing_plot(out: Path, sets: dict[str, dict]) -> str:
    plt = _pyplot()
    layers = sorted({n for per in sets.values() for n in per})
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, n in zip(axes.flat, layers, strict=False):
        for set_name, per in sets.items():
            if n not in per:
                continue
            h = per[n]["firing_hist"]
            label = f"{_label(set_name, sets)} ({h['never']} never fired)"
            ax.stairs(h["counts"], h["log10_edges"], label=label)
        n_tokens = max(per[n]["n_tokens"] for per in sets.values() if n in per)
        ax.set_xlim(math.floor(-math.log10(max(n_tokens, 1))) - 0.25, 0.1)  # 1 / n_tokens is the rarest possible
        ax.set_title(f"layer {n}")
        ax.set_xlabel("log10 firing frequency (fraction of tokens)")
        ax.set_ylabel("latents")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.suptitle("Held-out firing frequency of each latent")
    fig.tight_layout()
    return _save(fig, out / "firing_hist.png")


def write_eval_report(out: Path, result: dict) -> Path:
    """eval/report.md: one table per SAE set and the per-layer plots (FVU, delta CE, dead/dense, firing)."""
    sets = {name: {int(n): m for n, m in s["layers"].items()} for name, s in result["sets"].items()}
    plots = [
        _per_layer_plot(
            out, "fvu_per_layer.png", sets, "fvu", "Held-out FVU per layer", "FVU (fraction, lower is better)"
        ),
        _per_layer_plot(
            out, "delta_ce_per_layer.png", sets, "delta_ce", "Spliced next-token loss increase", "ΔCE (nats/token)"
        ),
        _per_layer_plot(
            out,
            "dead_per_layer.png",
            sets,
            "dead_frac",
            "Dead latents (never fired on held-out)",
            "dead latents (%)",
            100,
        ),
        _firing_plot(out, sets),
        _twin_plot(out, sets),
    ]
    lines = [f"# Evaluation on `{result['model']}`", "", *_eval_preamble(result), ""]
    for name, per in sets.items():
        lines += [f"## {_label(name, sets)}: `{result['sets'][name]['source']}`", "", *_metrics_table(per), ""]
        lines += ["Scorecard:", "", *_scorecard_table(per), ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots if p] + [""]
    return atomic_write_text(out / "report.md", "\n".join(lines))


def _eval_preamble(result: dict) -> list[str]:
    lines = [
        f"Held-out tokens: {result['heldout']}. Spliced loss: {result['downstream']}.",
        "",
        "FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖² (centered; 1 = predicting the mean); "
        "EV (unc.) = 1 − Σ‖x − x̂‖² / Σ‖x‖². ΔCE = spliced − clean next-token cross-entropy (nats/token); "
        "CE rec. = (CE zero-ablated − CE spliced) / (CE zero-ablated − CE clean); KL(clean ‖ spliced) in nats/token. "
        "Twins: live latents (fired on these tokens) with another live latent at decoder cosine ≥ 0.95. The "
        "scorecard's other columns are SAEBench's core metrics; the README's \"Quality scorecard\" gives each formula.",
    ]
    filters = result.get("filters")
    if filters:
        lines += ["", "Token filters on the held-out rows (same as training), per layer:", ""]
        lines += ["| layer | seen | position 0 | padding | special | outlier | kept |", "|---|---|---|---|---|---|---|"]
        for n in sorted(filters, key=int):
            f = filters[n]
            lines.append(
                f"| {n} | {f['seen']:,} | {f['dropped_position0']:,} | {f['dropped_padding']:,} | "
                f"{f['dropped_special']:,} | {f['dropped_outlier']:,} | {f['kept']:,} |"
            )
    return lines


def _metrics_table(per: dict[int, dict]) -> list[str]:
    head = "| layer | FVU | EV (unc.) | MSE | cosine | l2 ratio | L0 | dead % | dense % | ΔCE | CE rec. | KL |"
    lines = [head, "|---" * 12 + "|"]
    for n in sorted(per):
        m = per[n]
        lines.append(
            f"| {n} | {_fmt(m['fvu'])} | {_fmt(m['explained_variance_uncentered'])} | {_fmt(m['mse'], '.4g')} | "
            f"{_fmt(m['cosine'])} | {_fmt(m['l2_ratio'])} | {_fmt(m['l0'], '.1f')} | {_fmt(100 * m['dead_frac'], '.2f')} | "
            f"{_fmt(100 * m['dense_frac'], '.2f')} | {_fmt(m.get('delta_ce'))} | {_fmt(m.get('ce_recovered'))} | "
            f"{_fmt(m.get('kl'))} |"
        )
    return lines


def _scorecard_table(per: dict[int, dict]) -> list[str]:
    """Twins and SAEBench's core metrics (formulas in the README's "Quality scorecard")."""
    head = (
        "| layer | twins % (cos ≥ 0.95) | twins % (≥ 0.99) | EV legacy (SAEBench) | rel. recon. bias | "
        "avg max dec cos | avg max enc cos | enc–dec cos | > 1 % of tokens | > 10 % | consistent act. |"
    )
    lines = [head, "|---" * 11 + "|"]
    for n in sorted(per):
        m = per[n]
        if "twin_frac" not in m:
            continue
        lines.append(
            f"| {n} | {_fmt(100 * m['twin_frac'], '.2f')} | {_fmt(100 * m['twin_frac_99'], '.2f')} | "
            f"{_fmt(m['explained_variance_legacy'])} | {_fmt(m['relative_reconstruction_bias'])} | "
            f"{_fmt(m['average_max_decoder_cosine_sim'])} | {_fmt(m['average_max_encoder_cosine_sim'])} | "
            f"{_fmt(m['encoder_decoder_cosine_sim'])} | {_fmt(100 * m['freq_over_1_percent'], '.2f')} % | "
            f"{_fmt(100 * m['freq_over_10_percent'], '.2f')} % | {_fmt(m.get('consistent_activation_heuristic'), '.2f')} |"
        )
    return lines


def _twin_plot(out: Path, sets: dict[str, dict]) -> str | None:
    """Per layer, the histogram of each live latent's largest decoder cosine to another live latent."""
    layers = sorted({n for per in sets.values() for n, m in per.items() if "max_decoder_cos_hist" in m})
    if not layers:
        return None
    plt = _pyplot()
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, n in zip(axes.flat, layers, strict=False):
        for set_name, per in sets.items():
            if n in per and "max_decoder_cos_hist" in per[n]:
                h = per[n]["max_decoder_cos_hist"]
                label = f"{_label(set_name, sets)} ({100 * per[n]['twin_frac']:.1f} % twins)"
                ax.stairs(h["counts"], [-0.05, *h["edges"][1:]], label=label)
        ax.axvline(0.95, color="grey", linestyle="--", linewidth=1)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_title(f"layer {n}")
        ax.set_xlabel("largest decoder cosine to another live latent (bin at -0.05: all below 0)")
        ax.set_ylabel("live latents")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.suptitle("Twin latents: a live latent right of the dashed line has a twin")
    fig.tight_layout()
    return _save(fig, out / "twins_hist.png")


def write_adapt_report(out: Path, adapt: dict) -> Path:
    """report.md of an adaptation run: before/after per layer, feature drift, the most-changed features."""
    layers = {int(n): m for n, m in adapt["layers"].items()}
    plots = [_before_after_plot(out, layers), _drift_plot(out, layers)]
    lines = [
        f"# Adapting `{adapt['source']}` to `{adapt['model']}`",
        "",
        f"Source SAEs: `{adapt['source']}` (trained on `{adapt.get('source_model') or 'unknown'}`). "
        f"Adapted on `{adapt['model']}` with {adapt['tokens_trained']:,} activation tokens per layer; "
        f"the adapted SAEs are in `{adapt['export']}`.",
        "",
        "Before = the source SAEs evaluated on the adapted model's held-out activations; after = the adapted SAEs "
        "on the same tokens. ΔCE is the spliced next-token loss increase over the clean model (nats/token).",
        "",
        "| layer | FVU before | FVU after | ΔCE before | ΔCE after | CE rec. before | CE rec. after | "
        "dead % before | dead % after | twins % before | twins % after | decoder cos (mean) | features with cos < 0.9 |",
        "|---" * 13 + "|",
    ]
    for n in sorted(layers):
        m, d = layers[n], layers[n]["drift"]
        lines.append(
            f"| {n} | {_fmt(m['fvu_before'])} | {_fmt(m['fvu_after'])} | {_fmt(m.get('delta_ce_before'))} | "
            f"{_fmt(m.get('delta_ce_after'))} | {_fmt(m.get('ce_recovered_before'))} | "
            f"{_fmt(m.get('ce_recovered_after'))} | {_fmt(100 * m['dead_frac_before'], '.2f')} | "
            f"{_fmt(100 * m['dead_frac_after'], '.2f')} | {_fmt(_pct(m.get('twin_frac_before')), '.2f')} | "
            f"{_fmt(_pct(m.get('twin_frac_after')), '.2f')} | {_fmt(d['decoder_cos_mean'])} | "
            f"{_fmt(100 * d['frac_decoder_below_0.9'], '.1f')} % |"
        )
    lines += ["", "## Most-changed features", "", "Lowest decoder-direction cosine between source and adapted SAE.", ""]
    for n in sorted(layers):
        lines += [
            f"**Layer {n}**",
            "",
            "| feature | decoder cos | encoder cos | freq before | freq after |",
            "|---|---|---|---|---|",
        ]
        for f in layers[n]["drift"]["most_changed"][:5]:
            lines.append(
                f"| {f['feature']} | {_fmt(f['decoder_cos'])} | {_fmt(f['encoder_cos'])} | "
                f"{_fmt(f.get('freq_before'), '.2e')} | {_fmt(f.get('freq_after'), '.2e')} |"
            )
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots if p] + [""]
    return atomic_write_text(out / "report.md", "\n".join(lines))


def _before_after_plot(out: Path, layers: dict[int, dict]) -> str:
    plt = _pyplot()
    keys = [("fvu", "Held-out FVU", "FVU (fraction, lower is better)")]
    if all("delta_ce_after" in m for m in layers.values()):
        keys.append(("delta_ce", "Spliced ΔCE", "ΔCE (nats/token, lower is better)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), squeeze=False)
    xs = sorted(layers)
    width = 0.38
    for ax, (key, title, ylabel) in zip(axes.flat, keys, strict=True):
        ax.bar([x - width / 2 for x in xs], [layers[n][f"{key}_before"] for n in xs], width, label="source (before)")
        ax.bar([x + width / 2 for x in xs], [layers[n][f"{key}_after"] for n in xs], width, label="adapted (after)")
        ax.set_title(title)
        ax.set_xlabel("decoder layer n")
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs)
        top = max(max(layers[n][f"{key}_before"], layers[n][f"{key}_after"]) for n in xs)
        ax.set_ylim(0, top * 1.3 if top > 0 else 1)  # headroom for the legend
        ax.legend(fontsize=8)
    fig.suptitle("Source vs adapted SAEs on the post-trained model")
    fig.tight_layout()
    return _save(fig, out / "before_after.png")


def _drift_plot(out: Path, layers: dict[int, dict]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for n in sorted(layers):
        h = layers[n]["drift"]["decoder_cos_hist"]
        # the first bin holds every cosine below 0.5; drawn 0.02 wide at 0.48 so the axis stays readable
        ax.stairs(h["counts"], [0.48, *h["edges"][1:]], label=f"layer {n}")
    ax.axvline(0.9, color="grey", linestyle="--", linewidth=1, label="cos 0.9")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title("Feature drift: source vs adapted decoder directions")
    ax.set_xlabel("cosine(source W_dec[:, i], adapted W_dec[:, i]) (bin at 0.48: all below 0.5)")
    ax.set_ylabel("features")
    ax.legend(fontsize=8)
    return _save(fig, out / "drift.png")
