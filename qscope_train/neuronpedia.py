"""The browse stage's per-feature data in the batch format that SAEDashboard's Neuronpedia runner writes and
Neuronpedia imports, with a JSON Schema of that format and a small validator for it.

The format is SAEDashboard's NeuronpediaDashboardBatch / NeuronpediaDashboardFeature /
NeuronpediaDashboardActivation (github.com/jbloomAus/SAEDashboard, file
sae_dashboard/neuronpedia/neuronpedia_dashboard.py, seen at commit 03a615f7): a batch holds
model_id, layer, sae_set and features; each feature its logit-lens strings and values, firing
fraction, activation histogram, neuron alignment, correlations and example activations (tokens as
strings, one value per token, and the activation range the example was drawn from). SCHEMA restates
those fields and their types; the fields we do not compute (correlations, logit histogram, decoder
weight distribution) are present as empty lists, as the dataclasses' defaults are."""

from __future__ import annotations

from typing import Any

import torch

from .site import examples, token_text

_NUM = {"type": "number"}
_NUMS = {"type": "array", "items": _NUM}
_INTS = {"type": "array", "items": {"type": "integer"}}
_STRS = {"type": "array", "items": {"type": "string"}}

ACTIVATION_SCHEMA = {
    "type": "object",
    "required": ["bin_min", "bin_max", "bin_contains", "tokens", "values"],
    "properties": {"bin_min": _NUM, "bin_max": _NUM, "bin_contains": _NUM, "tokens": _STRS, "values": _NUMS},
    "additionalProperties": False,
}
FEATURE_SCHEMA = {
    "type": "object",
    "required": [
        "feature_index",
        "neuron_alignment_indices",
        "neuron_alignment_values",
        "neuron_alignment_l1",
        "correlated_neurons_indices",
        "correlated_neurons_l1",
        "correlated_neurons_pearson",
        "correlated_features_indices",
        "correlated_features_l1",
        "correlated_features_pearson",
        "neg_str",
        "neg_values",
        "pos_str",
        "pos_values",
        "frac_nonzero",
        "freq_hist_data_bar_values",
        "freq_hist_data_bar_heights",
        "logits_hist_data_bar_heights",
        "logits_hist_data_bar_values",
        "n_prompts_total",
        "n_tokens_in_prompt",
        "dataset",
        "decoder_weights_dist",
        "activations",
    ],
    "properties": {
        "feature_index": {"type": "integer"},
        "neuron_alignment_indices": _INTS,
        "neuron_alignment_values": _NUMS,
        "neuron_alignment_l1": _NUMS,
        "correlated_neurons_indices": _INTS,
        "correlated_neurons_l1": _NUMS,
        "correlated_neurons_pearson": _NUMS,
        "correlated_features_indices": _INTS,
        "correlated_features_l1": _NUMS,
        "correlated_features_pearson": _NUMS,
        "neg_str": _STRS,
        "neg_values": _NUMS,
        "pos_str": _STRS,
        "pos_values": _NUMS,
        "frac_nonzero": _NUM,
        "freq_hist_data_bar_values": _NUMS,
        "freq_hist_data_bar_heights": _NUMS,
        "logits_hist_data_bar_heights": _NUMS,
        "logits_hist_data_bar_values": _NUMS,
        "n_prompts_total": {"type": "integer"},
        "n_tokens_in_prompt": {"type": "integer"},
        "dataset": {"type": "string"},
        "decoder_weights_dist": _NUMS,
        "activations": {"type": "array", "items": ACTIVATION_SCHEMA},
    },
    "additionalProperties": False,
}
SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "SAEDashboard NeuronpediaDashboardBatch",
    "type": "object",
    "required": ["model_id", "layer", "sae_set", "features"],
    "properties": {
        "model_id": {"type": "string"},
        "layer": {"type": "integer"},
        "sae_set": {"type": "string"},
        "features": {"type": "array", "items": FEATURE_SCHEMA},
    },
    "additionalProperties": False,
}
_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
}


def validate(obj: Any, schema: dict = SCHEMA, where: str = "$") -> list[str]:
    """The places where obj breaks the schema (the keywords SCHEMA uses: type, required, properties,
    items, additionalProperties); empty when it conforms."""
    errors = []
    want = _TYPES[schema["type"]]
    if not isinstance(obj, want) or (schema["type"] in ("integer", "number") and isinstance(obj, bool)):
        return [f"{where}: expected {schema['type']}, got {type(obj).__name__}"]
    if schema["type"] == "object":
        errors += [f"{where}: missing {key!r}" for key in schema.get("required", []) if key not in obj]
        props = schema.get("properties", {})
        for key, value in obj.items():
            if key in props:
                errors += validate(value, props[key], f"{where}.{key}")
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{where}: unexpected {key!r}")
    elif schema["type"] == "array" and "items" in schema:
        for i, item in enumerate(obj):
            errors += validate(item, schema["items"], f"{where}[{i}]")
    return errors


def raw_tokens(tokenizer, ids: list[int]) -> list[str]:
    """Each id as its own decoded text, as Neuronpedia shows tokens (no visible-whitespace marks)."""
    return [token_text(tokenizer, i) for i in ids]


def feature(lf, f: int, tokenizer, W_dec_col: torch.Tensor, meta: dict) -> dict:
    """One feature in the SAEDashboard/Neuronpedia layout (see the module docstring)."""
    from .features import hist_edges

    fp = lf.first
    fires = int(fp.fires[f])
    edges = hist_edges()
    mids = [(edges[i] * edges[i + 1]) ** 0.5 for i in range(len(edges) - 1)]
    hist = fp.hist[f].tolist()
    align = W_dec_col.abs().topk(3)
    l1 = float(W_dec_col.abs().sum()) or 1.0
    acts = []
    top_max = max(0.0, float(fp.top.val[f, 0]))
    for ids, vals in examples(lf.top_windows.ids[f], lf.top_windows.acts[f]):
        acts.append(_activation(tokenizer, ids, vals, -1.0, top_max, -1.0))
    bands = lf.ranges.bands
    for b in range(bands - 1):
        share = float(lf.ranges.seen[f, b]) / max(1, fires)
        lo, hi = top_max * b / bands, top_max * (b + 1) / bands
        for ids, vals in examples(lf.range_windows.ids[f, b], lf.range_windows.acts[f, b]):
            acts.append(_activation(tokenizer, ids, vals, lo, hi, share))
    top_ids, top_v = (t[f].tolist() for t in lf.logit_top)
    bot_ids, bot_v = (t[f].tolist() for t in lf.logit_bottom)
    return {
        "feature_index": f,
        "neuron_alignment_indices": align.indices.tolist(),
        "neuron_alignment_values": [round(float(W_dec_col[i]), 5) for i in align.indices],
        "neuron_alignment_l1": [round(float(v) / l1, 5) for v in align.values],
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "correlated_features_indices": [],
        "correlated_features_l1": [],
        "correlated_features_pearson": [],
        "neg_str": raw_tokens(tokenizer, bot_ids),
        "neg_values": [round(v, 4) for v in bot_v],
        "pos_str": raw_tokens(tokenizer, top_ids),
        "pos_values": [round(v, 4) for v in top_v],
        "frac_nonzero": fires / max(1, fp.tokens),
        "freq_hist_data_bar_values": [round(m, 5) for m, h in zip(mids, hist, strict=True) if h],
        "freq_hist_data_bar_heights": [float(h) for h in hist if h],
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "n_prompts_total": meta["sequences"],
        "n_tokens_in_prompt": meta["context_len"],
        "dataset": meta["dataset"],
        "decoder_weights_dist": [],
        "activations": acts,
    }


def _activation(tokenizer, ids, vals, lo: float, hi: float, share: float) -> dict:
    """One example window (the tokens inside its sequence) and the range it was drawn from."""
    keep = [i for i, t in enumerate(ids) if t >= 0]
    return {
        "bin_min": round(lo, 5),
        "bin_max": round(hi, 5),
        "bin_contains": round(share, 6),
        "tokens": raw_tokens(tokenizer, [ids[i] for i in keep]),
        "values": [round(vals[i], 4) for i in keep],
    }
