"""The evaluate stage: held-out metrics and the spliced next-token loss for every SAE set on the same
tokens, written as eval/eval.json, eval/firing.pt (per-latent firing frequencies) and eval/report.md."""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

from ..config import ActivationSource, RunConfig
from ..data import shards
from ..data.activations import FilterCounts, live_chunks, make_filter
from ..data.batches import eval_rows
from ..data.tokens import heldout_sequences
from ..fsutil import atomic_torch_save, atomic_write_json
from ..lm import LoadedLM, load_lm
from ..load import check_d_model, load_sae, load_saes
from ..metrics import Evaluator, scalar_metrics
from ..report import write_eval_report
from ..rundir import RunDirs, cache_manifest, fit_file
from ..sae import TopKSAE
from ..splice import downstream_metrics
from ..tracking import Tracker

EVAL_BATCH = 4096


def run(cfg: RunConfig, dirs: RunDirs, accelerator, tracker: Tracker) -> dict:
    """Evaluate every SAE set (sae_sets) on the held-out split; returns eval.json's content."""
    e, device = cfg.evaluate, accelerator.device
    sets = sae_sets(cfg, dirs)
    metrics, firing, lm = {}, {}, None
    for name, (_, saes) in sets.items():  # one set on the device at a time
        evals = {n: Evaluator(sae, device, EVAL_BATCH, e.dense_threshold) for n, sae in saes.items()}
        filters, heldout, lm = _feed_heldout(cfg, dirs, {name: sets[name]}, {name: evals}, device, lm)
        metrics[name] = {n: ev.result() for n, ev in evals.items()}
        firing[name] = {str(n): ev.frequencies().float() for n, ev in evals.items()}
        for sae in saes.values():
            sae.to("cpu")
    downstream = "skipped (evaluate.downstream_tokens=0)"
    if e.downstream_tokens:
        lm = lm or load_lm(cfg.model, device)
        seqs = heldout_sequences(lm.tokenizer, cfg.data, e.downstream_tokens)
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
    atomic_write_json(dirs.eval_json, result)
    atomic_torch_save(dirs.firing, firing)
    report = write_eval_report(dirs.eval, result)
    print(f"evaluate: {dirs.eval_json}, report {report}")
    print(summary_table(result))
    return result


def sae_sets(cfg: RunConfig, dirs: RunDirs) -> dict[str, tuple[str, dict[int, TopKSAE]]]:
    """The SAEs to evaluate, by set name: `given` (evaluate.saes), or `source` (init_from, when compared)
    and `trained` (this run's fit outputs)."""
    e = cfg.evaluate
    if e.saes is not None:
        return {"given": (e.saes, load_saes(e.saes, cfg.layers, e.saes_revision, cfg.sae.activation))}
    sets = {}
    if cfg.init_from is not None and e.compare_source:
        saes = load_saes(cfg.init_from, cfg.layers, cfg.init_from_revision, cfg.sae.activation)
        sets["source"] = (cfg.init_from, saes)
    sets["trained"] = (str(dirs.fit), {n: load_sae(fit_file(dirs, n, "evaluate")) for n in cfg.layers})
    return sets


def _check_width(sets: dict, d_model: int, model: str) -> None:
    for source, saes in sets.values():
        check_d_model(saes, source, d_model, model)


def _feed_heldout(
    cfg: RunConfig, dirs: RunDirs, sets: dict, evals: dict, device, lm: Optional[LoadedLM] = None
) -> tuple[dict, str, Optional[LoadedLM]]:
    """Feed every evaluator the held-out rows: from the cache when this run has one, else from the model
    (`lm`, loaded here if None). Returns the filter counts per layer, a line saying where the rows came
    from, and the model if loaded."""
    if cfg.reader.source is ActivationSource.cache and (dirs.cache / shards.MANIFEST).is_file():
        manifest = cache_manifest(cfg, dirs)
        _check_width(sets, manifest["d_model"], manifest["model"])
        for n in cfg.layers:
            for x in eval_rows(dirs.cache, manifest, n, EVAL_BATCH):
                for per in evals.values():
                    per[n].update(x)
        filters = {str(n): manifest["splits"]["eval"]["layers"][str(n)]["filters"] for n in cfg.layers}
        return filters, f"{manifest['splits']['eval']['tokens']:,} sequence tokens of the cache's held-out split", None
    lm = lm or load_lm(cfg.model, device)
    _check_width(sets, lm.d_model, lm.name)
    counts = {n: FilterCounts() for n in cfg.layers}
    for chunk in live_chunks(lm, cfg.layers, cfg.data, "eval", device):
        for n, x in chunk.rows.items():
            counts[n].add(chunk.counts[n])
            for per in evals.values():
                per[n].update(x)
    filters = {str(n): asdict(c) for n, c in counts.items()}
    return filters, f"{counts[cfg.layers[0]].seen:,} sequence tokens of the held-out split, run live", lm


def summary_table(result: dict) -> str:
    """Per set and layer: held-out FVU, L0, dead %, twins %, SAEBench's legacy EV and l2 ratio, and the
    spliced loss when it was measured."""
    lines = []
    for name, s in result["sets"].items():
        lines += [
            "",
            f"{name}: {s['source']}",
            "layer      FVU       L0   dead %  twins %  EV leg.  l2 ratio      dCE   CE rec.   held-out tokens",
            "-----  -------  -------  -------  -------  -------  --------  -------  --------  ---------------",
        ]
        for n, m in sorted(s["layers"].items(), key=lambda kv: int(kv[0])):
            dce, rec = m.get("delta_ce"), m.get("ce_recovered")
            lines.append(
                f"{n:>5}  {m['fvu']:7.4f}  {m['l0']:7.2f}  {100 * m['dead_frac']:6.2f}%  {100 * m['twin_frac']:6.2f}%  "
                f"{m['explained_variance_legacy']:7.4f}  {m['l2_ratio']:8.4f}  "
                f"{'-' if dce is None else f'{dce:7.4f}':>7}  {'-' if rec is None else f'{rec:8.4f}':>8}  {m['n_tokens']:>15,}"
            )
    return "\n".join(lines)
