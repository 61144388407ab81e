"""Shared fixtures: the offline tiny models, tokenizer and corpus, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from qscope_train.tiny import build_fixtures

# Tests share 2 cores with whatever else runs; fixed threads keep results and timings steady.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    """Built under a session temp dir (never the network); QSCOPE_FIXTURES points the configs there."""
    out = tmp_path_factory.mktemp("fixtures")
    build_fixtures(out, n_docs=3000, seed=0)
    os.environ["QSCOPE_FIXTURES"] = str(out)
    return out


def card_get_feature_acts(sae: dict, x: torch.Tensor, k: int, relu: bool = False) -> torch.Tensor:
    """The Qwen-Scope card's feature extraction, re-implemented independently of qscope_train."""
    pre = x @ sae["W_enc"].T + sae["b_enc"]
    if relu:  # what the official demo app does before the top-k
        pre = torch.relu(pre)
    vals, idx = torch.topk(pre, k, dim=-1)
    acts = torch.zeros_like(pre)
    acts.scatter_(-1, idx, vals)
    return acts


def random_release(d_model: int = 16, d_sae: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_sae, d_model, generator=g),
        "W_dec": torch.randn(d_model, d_sae, generator=g),
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "b_dec": torch.randn(d_model, generator=g) * 0.1,
    }


def torchrun(nproc: int = 2) -> list[str]:
    """torchrun on this machine with a free port of its own (--standalone): fixed ports collide when two
    test runs share a machine, or with a port another program holds."""
    return [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc)]


class ListSource:
    """A seekable BatchSource over a list; raises at `fail_at` the way a crash would stop a run."""

    def __init__(self, batches, fail_at=None):
        self.batches, self.pos, self.fail_at = batches, 0, fail_at

    def __iter__(self):
        while self.pos < len(self.batches):
            if self.pos == self.fail_at:
                raise KeyboardInterrupt("crash")
            self.pos += 1
            yield self.batches[self.pos - 1]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]
