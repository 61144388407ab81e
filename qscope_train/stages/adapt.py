"""The adapt stage: per layer, the source SAEs (init_from) against this run's on the same held-out tokens,
and the feature drift between them; writes adapt.json and report.md (with PNGs) at the run's top."""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..drift import before_after, feature_drift
from ..errors import MissingInputError
from ..fsutil import atomic_write_json, read_json
from ..load import load_sae, source_model
from ..report import write_adapt_report
from ..rundir import RunDirs, eval_result, fit_file
from ..tracking import Tracker


def run(cfg: RunConfig, dirs: RunDirs, accelerator, tracker: Tracker) -> dict:
    """Returns adapt.json's content. Needs the evaluate stage's source and trained sets."""
    result = eval_result(dirs)
    if result is None or not {"source", "trained"} <= set(result["sets"]):
        raise MissingInputError(
            f"{dirs.eval_json} lacks the source and trained evaluations: run the evaluate stage with "
            "init_from set and evaluate.compare_source=true (stages=[evaluate,adapt])"
        )
    firing = torch.load(dirs.firing, map_location="cpu", weights_only=True)
    layers = {}
    for n in cfg.layers:
        before, after = (result["sets"][name]["layers"][str(n)] for name in ("source", "trained"))
        source = load_sae(
            cfg.init_from, layer=n, revision=cfg.init_from_revision, default_activation=cfg.sae.activation
        )
        adapted = load_sae(fit_file(dirs, n, "adapt"))
        drift = feature_drift(
            source, adapted, freq_before=firing["source"][str(n)], freq_after=firing["trained"][str(n)]
        )
        layers[str(n)] = before_after(before, after) | {"drift": drift}
    meta = read_json(dirs.sidecar(dirs.fit, cfg.layers[0]))
    adapt = {
        "source": cfg.init_from,
        "source_model": source_model(cfg.init_from, cfg.layers[0], cfg.init_from_revision),
        "model": cfg.model.name_or_path,
        "tokens_trained": meta["tokens_trained"],
        "export": str(dirs.export),
        "layers": layers,
    }
    atomic_write_json(dirs.adapt_json, adapt)
    report = write_adapt_report(dirs.root, adapt)
    print(adapt_table(adapt) + f"\nadapt: {dirs.adapt_json}, report {report}")
    return adapt


def adapt_table(adapt: dict) -> str:
    lines = [
        "",
        f"adaptation of {adapt['source']} to {adapt['model']}",
        "layer  FVU before  FVU after  dCE before  dCE after  twins before  twins after  decoder cos  cos<0.9",
        "-----  ----------  ---------  ----------  ---------  ------------  -----------  -----------  -------",
    ]
    for n, m in sorted(adapt["layers"].items(), key=lambda kv: int(kv[0])):
        d = m["drift"]
        lines.append(
            f"{n:>5}  {m['fvu_before']:10.4f}  {m['fvu_after']:9.4f}  {m.get('delta_ce_before', float('nan')):10.4f}  "
            f"{m.get('delta_ce_after', float('nan')):9.4f}  {100 * m.get('twin_frac_before', float('nan')):11.2f}%  "
            f"{100 * m.get('twin_frac_after', float('nan')):10.2f}%  {d['decoder_cos_mean']:11.4f}  {100 * d['frac_decoder_below_0.9']:6.1f}%"
        )
    return "\n".join(lines)
