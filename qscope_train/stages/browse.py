"""The browse stage: what every feature of this run's SAEs responds to, over the held-out split (the model
runs live over it twice), written as a static site under run_dir/browse/ (see site.py)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .. import site
from ..allocator import release_freed_memory_on_cpu
from ..config import BrowseConfig, RunConfig
from ..data.activations import live_chunks
from ..delphi import LatentCache, hookpoint
from ..features import FirstPass, Ranges, logit_lens, neighbours, window_activations
from ..lm import LoadedLM, load_lm
from ..load import check_d_model, load_sae, load_saes
from ..rundir import RunDirs, fit_file
from ..sae import TopKSAE
from ..scorecard import TWIN_COS, max_cosines
from ..splice import final_norm
from ..tracking import Tracker

ENCODE_ROWS = 4096  # rows encoded at once: the dense pre-activations are (rows × d_sae)
FILL_EXAMPLES = 16384  # examples whose context windows are read at once (each gathers window × k codes)


@dataclass
class Windows:
    """Token ids (-1 outside the example's sequence) and this feature's activation around each example."""

    ids: Tensor  # (..., 2·window + 1) int32
    acts: Tensor  # (..., 2·window + 1) float32

    @classmethod
    def empty(cls, shape: tuple[int, ...], width: int) -> Windows:
        w = 2 * width + 1
        return cls(torch.full((*shape, w), -1, dtype=torch.int32), torch.zeros(*shape, w))


@dataclass
class LayerFeatures:
    """Everything the site shows about one SAE's features."""

    first: FirstPass
    ranges: Ranges
    top_windows: Windows
    range_windows: Windows
    logit_top: tuple[Tensor, Tensor] = field(default=None)  # (ids, logits), (d_sae, k) each
    logit_bottom: tuple[Tensor, Tensor] = field(default=None)
    near: tuple[Tensor, Tensor] = field(default=None)  # (ids, cosines)
    twin: tuple[Tensor, Tensor] = field(default=None)  # (twin id or -1, nearest live cosine), (d_sae,) each


def live_twins(W_dec_FD: Tensor, fires_F: Tensor) -> tuple[Tensor, Tensor]:
    """Per latent: its twin, the other live latent (one that fired on the held-out tokens) with the nearest
    decoder direction when that cosine is >= TWIN_COS, else -1; and that nearest live cosine (-inf for a dead
    latent). Only live latents count: a dead copy of a direction never shows a user one feature twice."""
    cos_F, partner_F = max_cosines(W_dec_FD, fires_F > 0)
    return torch.where(cos_F >= TWIN_COS, partner_F, -1), cos_F


def codes(sae: TopKSAE, x_ND: Tensor) -> tuple[Tensor, Tensor]:
    """(idx, vals) of the top-k latents of every row, encoded ENCODE_ROWS at a time."""
    idx, val = [], []
    with torch.no_grad():
        for part in x_ND.split(ENCODE_ROWS):
            c = sae.encode_sparse(part.float())
            idx.append(c.idx_BK)
            val.append(c.vals_BK)
    return torch.cat(idx).cpu(), torch.cat(val).cpu()


def _held_out(lm: LoadedLM, cfg: RunConfig, device):
    """(chunk, offset of its first token) over the held-out split, up to browse.tokens tokens."""
    offset = 0
    for chunk in live_chunks(lm, cfg.layers, cfg.data, "eval", device):
        yield chunk, offset
        offset += chunk.input_ids.numel()
        if cfg.browse.tokens and offset >= cfg.browse.tokens:
            return


def _row_of(chunk, pos: Tensor) -> Tensor:
    """For every token of the chunk, its code row (-1 where the filters dropped it)."""
    row_of = torch.full((chunk.input_ids.numel(),), -1, dtype=torch.long)
    row_of[pos] = torch.arange(pos.numel())
    return row_of


def _fill(win: Windows, sel: Tensor, feat: Tensor, tok: Tensor, chunk, offset: int, idx, val, row_of, b: BrowseConfig):
    """Fill the windows of examples (feat, global tok) that lie in this chunk, at flat positions sel of win."""
    ids_flat = chunk.input_ids.flatten()
    T = chunk.input_ids.shape[1]
    local = tok - offset
    acts = window_activations(feat, local, idx, val, row_of, b.window)
    at = local[:, None] + torch.arange(-b.window, b.window + 1)
    same = (at >= 0) & (at < ids_flat.numel()) & (at.div(T, rounding_mode="floor") == (local // T)[:, None])
    ids = torch.where(same, ids_flat[at.clamp(0, ids_flat.numel() - 1)], torch.full_like(at, -1))
    win.ids.view(-1, win.ids.shape[-1])[sel] = ids.to(torch.int32)
    win.acts.view(-1, win.acts.shape[-1])[sel] = torch.where(same, acts, torch.zeros_like(acts))


def collect(
    lm: LoadedLM, saes: dict[int, TopKSAE], cfg: RunConfig, device, progress, latents: Optional[LatentCache] = None
) -> dict[int, LayerFeatures]:
    """Two passes of the model over the held-out split: top-N, histograms and counts, then the lower-range
    examples and every example's context window; then the logit lens, neighbours and twins from the weights.
    `latents`, if given, also receives every code of the first pass (delphi's cache)."""
    b = cfg.browse
    first = {n: FirstPass.new(sae.d_sae, b.top_n) for n, sae in saes.items()}
    with progress(desc="browse: pass 1 of 2", unit="chunk") as bar:
        for chunk, offset in _held_out(lm, cfg, device):
            seq0 = latents.add_tokens(chunk.input_ids) if latents is not None else 0
            for n, sae in saes.items():
                idx, val = codes(sae, chunk.rows[n])
                first[n].add(idx, val, offset + chunk.positions[n].long().cpu())
                first[n].sequences += chunk.input_ids.shape[0]
                if latents is not None:
                    latents.add_codes(n, seq0, chunk.input_ids.shape[1], chunk.positions[n], idx, val)
            bar.update(1)
    out = {}
    for n, fp in first.items():
        d_sae = saes[n].d_sae
        out[n] = LayerFeatures(
            fp,
            Ranges(fp.top.val[:, 0].clamp_min(0), b.bands, b.per_band),
            Windows.empty((d_sae, b.top_n), b.window),
            Windows.empty((d_sae, b.bands - 1, b.per_band), b.window),
        )
    with progress(desc="browse: pass 2 of 2", unit="chunk") as bar:
        for chunk, offset in _held_out(lm, cfg, device):
            end = offset + chunk.input_ids.numel()
            for n, sae in saes.items():
                lf, pos = out[n], chunk.positions[n].long().cpu()
                idx, val = codes(sae, chunk.rows[n])
                lf.ranges.add(idx, val, offset + pos)
                row_of = _row_of(chunk, pos)
                for tok_all, win in ((lf.first.top.tok, lf.top_windows), (lf.ranges.tok, lf.range_windows)):
                    flat = tok_all.flatten()
                    sel = ((flat >= offset) & (flat < end)).nonzero().flatten()
                    per_feature = flat.numel() // sae.d_sae
                    for part in sel.split(FILL_EXAMPLES):  # each example gathers (window × k) codes
                        _fill(win, part, part // per_feature, flat[part], chunk, offset, idx, val, row_of, b)
            bar.update(1)
    head = lm.model.get_output_embeddings().weight.detach().cpu()
    norm = copy.deepcopy(final_norm(lm)).to("cpu", torch.float32)  # a copy: the model stays where it is
    for n, sae in saes.items():
        W_dec = sae.W_dec.detach().cpu()
        with torch.no_grad():
            ti, tv, bi, bv = logit_lens(W_dec, norm, head, b.logit_tokens)
        out[n].logit_top, out[n].logit_bottom = (ti, tv), (bi, bv)
        out[n].near = neighbours(W_dec, b.neighbours)
        out[n].twin = live_twins(W_dec.T, out[n].first.fires)
    return out


def prompt_features(lm: LoadedLM, saes: dict[int, TopKSAE], b: BrowseConfig, device) -> list[dict]:
    """For each configured prompt: its tokens and, per layer, the strongest features on each token."""
    from ..lm import run_captured

    pages = []
    for text in b.prompts:
        ids = lm.tokenizer(text, return_tensors="pt").input_ids.to(device)
        acts = run_captured(lm, list(saes), ids)
        layers = {}
        for n, sae in saes.items():
            idx, val = codes(sae, acts[n][0])
            top = val.topk(min(b.prompt_features, val.shape[1]), dim=1)
            feats = idx.gather(1, top.indices)
            layers[str(n)] = [
                [[int(f), round(float(v), 4)] for f, v in zip(fr, vr, strict=True) if v > 0]
                for fr, vr in zip(feats.tolist(), top.values.tolist(), strict=True)
            ]
        pages.append({"text": text, "ids": ids[0].tolist(), "layers": layers})
    return pages


def run(cfg: RunConfig, dirs: RunDirs, accelerator, tracker: Tracker) -> dict:
    """Collect every layer's feature data for this run's SAEs (and the source SAEs of an adaptation) and
    write the site; returns a summary."""
    device = accelerator.device
    if torch.device(device).type == "cpu":
        release_freed_memory_on_cpu()  # the merges' temporaries vary in size: a never-trimmed heap only grows
    lm = load_lm(cfg.model, device)
    sets: dict[str, dict[int, TopKSAE]] = {"trained": {n: load_sae(fit_file(dirs, n, "browse")) for n in cfg.layers}}
    if cfg.init_from is not None:
        sets["source"] = load_saes(cfg.init_from, cfg.layers, cfg.init_from_revision, cfg.sae.activation)
    collected: dict[str, dict[int, LayerFeatures]] = {}
    latents = LatentCache({n: s.d_sae for n, s in sets["trained"].items()}) if cfg.browse.delphi else None
    for name, saes in sets.items():  # one set on the device at a time
        check_d_model(saes, cfg.init_from if name == "source" else str(dirs.fit), lm.d_model, cfg.model.name_or_path)
        for sae in saes.values():
            sae.to(device).eval()
        collected[name] = collect(lm, saes, cfg, device, tracker.progress, latents if name == "trained" else None)
        for sae in saes.values():
            sae.to("cpu")
    prompts = prompt_features(lm, {n: s.to(device) for n, s in sets["trained"].items()}, cfg.browse, device)
    out = dirs.root / "browse"
    summary = site.write(out, collected, sets, prompts, lm.tokenizer, cfg)
    summary["neuronpedia"] = write_neuronpedia(out / "neuronpedia", collected["trained"], sets["trained"], lm, cfg)
    if latents is not None:
        written = latents.write(out / "delphi", cfg.browse.delphi_splits, delphi_config(cfg))
        summary["delphi"] = {hookpoint(n): count for n, count in written.items()}
        print(f"browse: delphi latent cache, {sum(written.values()):,} activations -> {out / 'delphi' / 'latents'}")
    twins = ", ".join(f"{c} in layer {n}" for n, c in summary["twins"].items())
    print(
        f"browse: {summary['features']} feature pages over {summary['tokens']:,} held-out tokens, "
        f"twin latents (live, decoder cosine >= {TWIN_COS}): {twins} -> {out / 'index.html'}"
    )
    return summary


def delphi_config(cfg: RunConfig) -> dict:
    """config.json of delphi's cache: its CacheConfig keys (the held-out split's source) and model_name."""
    d = cfg.data
    return {
        "dataset_repo": d.dataset,
        "dataset_split": f"{d.split} (qscope-train's held-out chunks)",
        "dataset_name": d.config_name or "",
        "dataset_column": d.text_field,
        "batch_size": 1,
        "model_name": cfg.model.name_or_path,
    }


def write_neuronpedia(out, trained: dict[int, LayerFeatures], saes: dict[int, TopKSAE], lm: LoadedLM, cfg: RunConfig):
    """Every layer's features as SAEDashboard/Neuronpedia batch files (neuronpedia.SCHEMA, also written as
    schema.json), 128 features a file; returns the number of files."""
    import json

    from .. import neuronpedia

    b = cfg.browse
    model_id = b.neuronpedia_model_id or cfg.model.name_or_path.rstrip("/").split("/")[-1].lower()
    files = 0
    for n, lf in trained.items():
        W_dec = saes[n].W_dec.detach().cpu()
        d_sae = W_dec.shape[1]
        sae_set = b.neuronpedia_sae_set or f"qscope-res-{max(1, d_sae // 1024)}k"
        meta = {"sequences": lf.first.sequences, "context_len": cfg.data.context_len, "dataset": cfg.data.dataset}
        for k, start in enumerate(range(0, d_sae, 128)):
            feats = [
                neuronpedia.feature(lf, f, lm.tokenizer, W_dec[:, f], meta)
                for f in range(start, min(d_sae, start + 128))
            ]
            batch = {"model_id": model_id, "layer": n, "sae_set": sae_set, "features": feats}
            path = out / f"layer{n}" / f"batch-{k}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(batch, separators=(",", ":")))
            files += 1
    (out / "schema.json").write_text(json.dumps(neuronpedia.SCHEMA, indent=1) + "\n")
    return files
