"""SAELens reads our release files through its own Qwen-Scope loader and computes what we compute.

Optional: runs only where sae_lens is importable here, or QSCOPE_SAELENS_PYTHON names a python that
has it (SAELens is never one of our dependencies). SAELens's qwen_scope loader takes d_in from the
base model named in the repo id and d_sae / k from the W<N>K / L0_<k> parts, never from the file,
so the SAE here has the real d_model (2048) but the smallest width a release name can say (1K).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import pytest
import torch

from qscope_train import load, release
from qscope_train.config import Activation
from qscope_train.sae import TopKSAE

MODEL, D_MODEL, D_SAE, K, LAYER = "Qwen3-1.7B-Base", 2048, 1024, 16, 5
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def saelens_python() -> Optional[str]:
    if os.environ.get("QSCOPE_SAELENS_PYTHON"):
        return os.environ["QSCOPE_SAELENS_PYTHON"]
    return sys.executable if importlib.util.find_spec("sae_lens") else None


pytestmark = pytest.mark.skipif(
    saelens_python() is None, reason="sae_lens not importable and QSCOPE_SAELENS_PYTHON not set"
)

# Runs under SAELens's python. The repo id is not in pretrained_saes.yaml, so from_pretrained treats it
# as a hub repo and the converter must be named; the file comes through hf_hub_download (offline cache).
SAELENS_SCRIPT = """
import json, sys, torch
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS

repo_id, filename, inputs, out = sys.argv[1:]
sae = SAE.from_pretrained(repo_id, filename, converter=NAMED_PRETRAINED_SAE_LOADERS["qwen_scope"])
x = torch.load(inputs, weights_only=True)
with torch.no_grad():
    z = sae.encode(x)
    x_hat = sae.decode(z)
cfg = {"class": type(sae).__name__, "k": sae.cfg.k, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
       "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input, "hook_name": sae.cfg.metadata.hook_name}
torch.save({"z": z, "x_hat": x_hat}, out)
print(json.dumps(cfg))
"""


def write_release_in_hub_cache(hub: Path, repo_id: str, tensors: dict, sidecar: dict) -> Path:
    """HF_HUB_CACHE/models--owner--name/{refs/main, snapshots/<sha>/layer<n>.sae.pt + .json}, as the hub leaves it."""
    repo_dir = hub / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snapshot = repo_dir / "snapshots" / COMMIT
    release.save_tensors(snapshot / release.layer_filename(LAYER), tensors)
    release.write_sidecar(snapshot / f"layer{LAYER}.json", sidecar)
    return snapshot


def random_release_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "W_enc": torch.randn(D_SAE, D_MODEL, generator=g) / D_MODEL**0.5,
        "W_dec": torch.randn(D_MODEL, D_SAE, generator=g) / D_SAE**0.5,
        # All negative: a row with a small input then has only negative pre-activations, which is
        # where a ReLU around the top-k changes the answer.
        "b_enc": -torch.rand(D_SAE, generator=g) * 0.1 - 0.05,
        "b_dec": torch.randn(D_MODEL, generator=g) * 0.1,
    }


def test_saelens_qwen_scope_loader_matches_our_encode_and_decode(tmp_path):
    repo_id = f"local/{release.ReleaseName.for_sae(MODEL, D_SAE, K)}"  # our naming scheme, parsed by SAELens
    tensors = random_release_tensors()
    sidecar = {"k": K, "activation": Activation.relu_topk.value, "d_model": D_MODEL, "d_sae": D_SAE, "layer": LAYER}
    snapshot = write_release_in_hub_cache(tmp_path / "hub", repo_id, tensors, sidecar)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(48, D_MODEL, generator=g), torch.randn(16, D_MODEL, generator=g) * 1e-3])
    torch.save(x, tmp_path / "x.pt")

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf"))
    cmd = [saelens_python(), "-c", textwrap.dedent(SAELENS_SCRIPT), repo_id, release.layer_filename(LAYER)]
    done = subprocess.run(
        [*cmd, str(tmp_path / "x.pt"), str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = json.loads(done.stdout.strip().splitlines()[-1])
    assert cfg == {
        "class": "TopKSAE",
        "k": K,
        "d_in": D_MODEL,
        "d_sae": D_SAE,
        "apply_b_dec_to_input": False,
        "hook_name": f"blocks.{LAYER}.hook_resid_post",
    }
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)

    ours = load.load_sae(snapshot, layer=LAYER)
    assert (ours.k, ours.activation) == (K, Activation.relu_topk)
    with torch.no_grad():
        z = ours.encode(x)
        torch.testing.assert_close(theirs["z"], z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs["x_hat"], ours.decode(z), atol=1e-5, rtol=1e-5)
        # SAELens's TopK applies a ReLU to the k selected values, so it is our relu_topk, not the card's
        # plain top-k: they differ exactly on the negative values plain top-k keeps.
        z_plain = TopKSAE.from_release(tensors, K, Activation.topk).encode(x)
    assert (z_plain < 0).any()
    torch.testing.assert_close(theirs["z"], z_plain.relu(), atol=1e-5, rtol=1e-5)
