"""The evaluate and adapt stages: held-out metrics and spliced loss for every SAE set on the same tokens,
the evaluation report, and the before/after + feature-drift report of an adaptation run.

run_dir/eval/  eval.json + firing.pt + report.md + *.png      (evaluate)
run_dir/       adapt.json + report.md + *.png                 (adapt)
"""

from __future__ import annotations

import io
from dataclasses import asdict
from itertools import islice
from typing import Optional

import torch

from . import release, shards
from .activations import FilterCounts, make_filter
from .adapt import before_after, feature_drift
from .cache import plan
from .config import ActivationSource, DataConfig, RunConfig
from .downstream import downstream_metrics
from .errors import InputError, MissingInputError
from .evaluate import Evaluator, scalar_metrics
from .fsutil import atomic_write_bytes, atomic_write_json, read_json
from .lm import LoadedLM, load_lm
from .reader import eval_rows, live_chunks
from .report import write_adapt_report, write_eval_report
from .rundir import RunDirs, cache_manifest, fit_file
from .sae import TopKSAE
from .tokens import load_text_dataset, token_stream
from .tracking import Tracker

EVAL_BATCH = 4096


def sae_sets(cfg: RunConfig, dirs: RunDirs) -> dict[str, tuple[str, dict[int, TopKSAE]]]:
    """The SAEs to evaluate, by set name: `given` (evaluate.saes), or `source` (init_from, when compared)
    and `trained` (this run's fit outputs)."""
    e = cfg.evaluate

    def load(source: str, revision: Optional[str]) -> dict[int, TopKSAE]:
        return release.load_saes(source, cfg.layers, revision, cfg.sae.activation)

    if e.saes is not None:
        return {"given": (e.saes, load(e.saes, e.saes_revision))}
    sets = {}
    if cfg.init_from is not None and e.compare_source:
        sets["source"] = (cfg.init_from, load(cfg.init_from, cfg.init_from_revision))
    sets["trained"] = (str(dirs.fit), {n: release.load_sae(fit_file(dirs, n, "evaluate")) for n in cfg.layers})
    return sets


def _check_width(sets: dict, d_model: int, model: str) -> None:
    for source, saes in sets.values():
        release.check_d_model(saes, source, d_model, model)


def evaluate_stage(cfg: RunConfig, dirs: RunDirs, device, tracker: Tracker) -> dict:
    """Held-out metrics for every SAE set on the same rows, then the spliced next-token loss; writes
    eval/eval.json, eval/firing.pt (per-latent firing frequencies) and eval/report.md with its PNGs."""
    e = cfg.evaluate
    sets = sae_sets(cfg, dirs)
    evals = {
        name: {n: Evaluator(sae, device, EVAL_BATCH, e.dense_threshold) for n, sae in saes.items()}
        for name, (_, saes) in sets.items()
    }
    filters, heldout, lm = _feed_heldout(cfg, dirs, sets, evals, device)
    metrics = {name: {n: ev.result() for n, ev in per.items()} for name, per in evals.items()}
    downstream = "skipped (evaluate.downstream_tokens=0)"
    if e.downstream_tokens:
        lm = lm or load_lm(cfg.model, device)
        seqs = heldout_sequences(lm, cfg.data, e.downstream_tokens)
        batch = max(1, e.downstream_batch_tokens // cfg.data.context_len)
        saes = {name: s for name, (_, s) in sets.items()}
        spliced = downstream_metrics(
            lm, saes, seqs, make_filter(lm, cfg.data), batch, device, e.splice_filtered, tracker.progress
        )
        for name, per in spliced.items():
            for n, m in per.items():
                metrics[name][n].update(m)
        where = "every position" if e.splice_filtered else "positions the filters keep"
        downstream = f"{len(seqs) * cfg.data.context_len:,} held-out sequence tokens, spliced at {where}"
    for name, per in metrics.items():
        tracker.log("evaluate", 0, {n: scalar_metrics(m) for n, m in per.items()}, set=name)
    result = {
        "model": cfg.model.name_or_path,
        "heldout": heldout,
        "downstream": downstream,
        "filters": filters,
        "sets": {
            name: {"source": sets[name][0], "layers": {str(n): m for n, m in per.items()}}
            for name, per in metrics.items()
        },
    }
    atomic_write_json(dirs.eval / "eval.json", result)
    firing = {name: {str(n): ev.frequencies().float() for n, ev in per.items()} for name, per in evals.items()}
    atomic_write_bytes(dirs.eval / "firing.pt", _torch_bytes(firing))
    report = write_eval_report(dirs.eval, result)
    print(f"evaluate: {dirs.eval / 'eval.json'}, report {report}")
    return result


def _feed_heldout(
    cfg: RunConfig, dirs: RunDirs, sets: dict, evals: dict, device
) -> tuple[dict, str, Optional[LoadedLM]]:
    """Feed every evaluator the held-out rows: from the cache when this run has one, else from the model.
    Returns the filter counts per layer, a line saying where the rows came from, and the model if loaded."""
    if cfg.data.source is ActivationSource.cache and (dirs.cache / shards.MANIFEST).is_file():
        manifest = cache_manifest(cfg, dirs)
        _check_width(sets, manifest["d_model"], manifest["model"])
        for n in cfg.layers:
            for x in eval_rows(dirs.cache, manifest, n, EVAL_BATCH):
                for per in evals.values():
                    per[n].update(x)
        filters = {str(n): manifest["splits"]["eval"]["layers"][str(n)]["filters"] for n in cfg.layers}
        return filters, f"{manifest['splits']['eval']['tokens']:,} sequence tokens of the cache's held-out split", None
    lm = load_lm(cfg.model, device)
    _check_width(sets, lm.d_model, lm.name)
    counts = {n: FilterCounts() for n in cfg.layers}
    for chunk in live_chunks(lm, cfg.layers, cfg.data, "eval", device, full=True):
        for n, x in chunk.rows.items():
            counts[n].add(chunk.counts[n])
            for per in evals.values():
                per[n].update(x)
    filters = {str(n): asdict(c) for n, c in counts.items()}
    return filters, f"{counts[cfg.layers[0]].seen:,} sequence tokens of the held-out split, run live", lm


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def heldout_sequences(lm, data: DataConfig, n_tokens: int) -> list:
    """The first sequences of the held-out split (the stream's first chunks), up to n_tokens tokens."""
    n_eval = len(plan(data)["eval"]) * data.shard_sequences
    n_seq = min(max(1, n_tokens // data.context_len), n_eval)
    seqs = list(islice(token_stream(load_text_dataset(data), lm.tokenizer, data), n_seq))
    if not seqs:
        raise InputError(f"the dataset {data.dataset!r} gave no sequences for the spliced-loss evaluation")
    return seqs


def eval_result(dirs: RunDirs) -> Optional[dict]:
    path = dirs.eval / "eval.json"
    return read_json(path) if path.is_file() else None


def adapt_stage(cfg: RunConfig, dirs: RunDirs) -> dict:
    """Before/after per layer (source SAEs vs this run's, on the same held-out tokens) and feature drift;
    writes adapt.json and report.md (with PNGs) at the top of the run directory."""
    result = eval_result(dirs)
    if result is None or not {"source", "trained"} <= set(result["sets"]):
        raise MissingInputError(
            f"{dirs.eval / 'eval.json'} lacks the source and trained evaluations: run the evaluate stage with "
            "init_from set and evaluate.compare_source=true (stages=[evaluate,adapt])"
        )
    firing = torch.load(dirs.eval / "firing.pt", map_location="cpu", weights_only=True)
    layers = {}
    for n in cfg.layers:
        before, after = (result["sets"][name]["layers"][str(n)] for name in ("source", "trained"))
        source = release.load_sae(
            cfg.init_from, layer=n, revision=cfg.init_from_revision, default_activation=cfg.sae.activation
        )
        adapted = release.load_sae(fit_file(dirs, n, "adapt"))
        drift = feature_drift(
            source, adapted, freq_before=firing["source"][str(n)], freq_after=firing["trained"][str(n)]
        )
        layers[str(n)] = before_after(before, after) | {"drift": drift}
    meta = read_json(dirs.fit / f"layer{cfg.layers[0]}.json")
    adapt = {
        "source": cfg.init_from,
        "source_model": release.source_model(cfg.init_from, cfg.layers[0], cfg.init_from_revision),
        "model": cfg.model.name_or_path,
        "tokens_trained": meta["tokens_trained"],
        "export": str(dirs.export),
        "layers": layers,
    }
    atomic_write_json(dirs.root / "adapt.json", adapt)
    report = write_adapt_report(dirs.root, adapt)
    print(adapt_table(adapt) + f"\nadapt: {dirs.root / 'adapt.json'}, report {report}")
    return adapt


def summary_table(result: dict) -> str:
    """Per set and layer: held-out FVU, L0, dead %, and the spliced loss when it was measured."""
    lines = []
    for name, s in result["sets"].items():
        lines += [
            "",
            f"{name}: {s['source']}",
            "layer      FVU       L0   dead %      dCE   CE rec.   held-out tokens",
            "-----  -------  -------  -------  -------  --------  ---------------",
        ]
        for n, m in sorted(s["layers"].items(), key=lambda kv: int(kv[0])):
            dce, rec = m.get("delta_ce"), m.get("ce_recovered")
            lines.append(
                f"{n:>5}  {m['fvu']:7.4f}  {m['l0']:7.2f}  {100 * m['dead_frac']:6.2f}%  "
                f"{'-' if dce is None else f'{dce:7.4f}':>7}  {'-' if rec is None else f'{rec:8.4f}':>8}  {m['n_tokens']:>15,}"
            )
    return "\n".join(lines)


def adapt_table(adapt: dict) -> str:
    lines = [
        "",
        f"adaptation of {adapt['source']} to {adapt['model']}",
        "layer  FVU before  FVU after  dCE before  dCE after  decoder cos  cos<0.9",
        "-----  ----------  ---------  ----------  ---------  -----------  -------",
    ]
    for n, m in sorted(adapt["layers"].items(), key=lambda kv: int(kv[0])):
        d = m["drift"]
        lines.append(
            f"{n:>5}  {m['fvu_before']:10.4f}  {m['fvu_after']:9.4f}  {m.get('delta_ce_before', float('nan')):10.4f}  "
            f"{m.get('delta_ce_after', float('nan')):9.4f}  {d['decoder_cos_mean']:11.4f}  {100 * d['frac_decoder_below_0.9']:6.1f}%"
        )
    return "\n".join(lines)
