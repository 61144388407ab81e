import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from qscope_train.cli import compose
from qscope_train.config import Activation, RunConfig, Stage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def test_there_are_experiment_presets():
    assert {"demo", "qwen3_1.7b_base_w32k_k100", "qwen3.5_2b_base_w32k_k50"} <= set(EXPERIMENTS)
    assert {"demo_adapt", "adapt_qwen3_1.7b", "adapt_qwen3.5_2b"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_into_a_typed_config(name):
    cfg = compose([f"experiment={name}"])
    assert isinstance(cfg, RunConfig)
    assert cfg.layers and cfg.model.name_or_path and cfg.data.dataset
    if Stage.adapt in cfg.stages:  # adaptation presets: every stage but browse and compare (on request)
        assert cfg.stages == [s for s in Stage if s not in (Stage.browse, Stage.compare)] and cfg.init_from
    else:
        assert cfg.stages == [Stage.cache, Stage.fit, Stage.evaluate, Stage.export]


def test_adapt_without_a_source_is_refused():
    with pytest.raises(ValueError, match="stages has adapt, which compares against the source SAEs: set init_from"):
        compose(["experiment=demo", "stages=[fit,evaluate,adapt]"])


@pytest.mark.parametrize("group", ["model", "sae", "data", "trainer"])
def test_every_group_option_composes_and_applies_its_values(group):
    from omegaconf import OmegaConf

    from qscope_train.config import to_plain

    for path in sorted((CONFIGS / group).glob("*.yaml")):
        cfg = to_plain(getattr(compose([f"{group}={path.stem}"]), group))
        raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
        for key, value in raw.items():
            if not (isinstance(value, str) and "${" in value):
                assert cfg[key] == value, (path.name, key)


def test_configs_ship_inside_the_wheel(tmp_path):
    import zipfile

    root = CONFIGS.parent
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("qscope_train-*.whl"))).namelist()
    for rel in [
        "config.yaml",
        "experiment/demo.yaml",
        "model/qwen3.5_2b_base.yaml",
        "sae/w32k_k100.yaml",
        "__init__.py",
    ]:
        assert f"qscope_train/configs/{rel}" in names


def test_release_presets_reproduce_the_release_properties():
    q3 = compose(["experiment=qwen3_1.7b_base_w32k_k100"])
    assert q3.model.name_or_path == "Qwen/Qwen3-1.7B-Base"
    assert (q3.sae.d_sae, q3.sae.k, q3.layers) == (32768, 100, list(range(28)))
    q35 = compose(["experiment=qwen3.5_2b_base_w32k_k50"])
    assert q35.model.name_or_path == "Qwen/Qwen3.5-2B-Base"
    assert (q35.sae.d_sae, q35.sae.k, q35.layers) == (32768, 50, list(range(24)))


def test_overrides_are_typed():
    cfg = compose(["sae.activation=relu_topk", "stages=[fit,export]", "layers=[0,3]", "trainer.lr=1e-3"])
    assert cfg.sae.activation is Activation.relu_topk
    assert cfg.stages == [Stage.fit, Stage.export]
    assert cfg.layers == [0, 3] and cfg.trainer.lr == 1e-3


def test_mistyped_key_fails_with_hydras_message():
    with pytest.raises(ConfigCompositionException) as info:
        compose(["sae.kk=3"])
    assert isinstance(info.value.__cause__, (ConfigAttributeError, ConfigKeyError))
    assert "Key 'kk' not in 'SAEConfig'" in str(info.value.__cause__)


def test_typo_inside_a_yaml_preset_fails(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nlayers: [0]\ndata:\n  contex_len: 64\n")
    with pytest.raises(Exception, match="contex_len"):
        compose([f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine"])


def test_wrong_type_fails():
    with pytest.raises(ConfigCompositionException) as info:
        compose(["sae.k=many"])
    assert isinstance(info.value.__cause__, ValidationError)


def test_bad_value_is_named():
    with pytest.raises(ValueError, match=r"sae.k must be in 1..d_sae \(1024\), got 0"):
        compose(["sae.k=0"])
    with pytest.raises(ValueError, match="layers has duplicates"):
        compose(["layers=[1,1]"])


def test_cli_typo_exits_with_hydras_message(tmp_path):
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    out = subprocess.run(
        [sys.executable, "-m", "qscope_train.cli", "trainer.bach_size=8"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "Key 'bach_size' not in 'TrainerConfig'" in out.stderr


def test_reader_keys_of_old_command_lines_still_work_and_name_the_new_key(capsys):
    cfg = compose(["experiment=demo", "data.source=live", "data.reader_threads=3", "data.shuffle_shards=false"])
    assert cfg.reader.source.value == "live" and cfg.reader.threads == 3 and cfg.reader.shuffle_shards is False
    err = capsys.readouterr().err
    assert "data.source is now reader.source" in err and "data.reader_threads is now reader.threads" in err
    with pytest.raises((ConfigAttributeError, ConfigKeyError, ConfigCompositionException)):
        compose(["experiment=demo", "reader.reader_threads=3"])  # a typo in the new group is still refused


def test_fingerprints_ignore_reader_and_operational_settings_but_not_the_rest():
    from qscope_train.config import fingerprint
    from qscope_train.data.writer import cache_fingerprint

    base = compose(["experiment=demo"])
    other = compose(
        ["experiment=demo", "reader.threads=1", "reader.verify_shards=sha256", "reader.shuffle_shards=false"]
    )
    assert cache_fingerprint("m", None, [1], base.data, 1) == cache_fingerprint("m", None, [1], other.data, 1)
    assert fingerprint(base.reader) != fingerprint(other.reader)  # shuffle_shards changes the batches
    assert set(fingerprint(base.reader)) == {"source", "shuffle_buffer_tokens", "shuffle_shards"}
    quiet = compose(["experiment=demo", "trainer.log_every=7", "trainer.checkpoint_every=3"])
    assert fingerprint(quiet.trainer) == fingerprint(base.trainer)
    assert fingerprint(compose(["experiment=demo", "trainer.lr=0.01"]).trainer) != fingerprint(base.trainer)
    moved = compose(["experiment=demo", "data.context_len=64"])
    assert cache_fingerprint("m", None, [1], moved.data, 1) != cache_fingerprint("m", None, [1], base.data, 1)


def test_layer_sharding_is_chosen_from_layers_and_processes_unless_forced():
    t = compose(["experiment=qwen3_1.7b_base_w32k_k100"]).trainer
    assert t.layer_sharding is None  # auto by default
    assert t.sharded(28, 8) and t.sharded(2, 2)  # at least as many layers as processes
    assert not t.sharded(3, 4) and not t.sharded(28, 1)
    forced = compose(["experiment=qwen3_1.7b_base_w32k_k100", "trainer.layer_sharding=false"]).trainer
    assert not forced.sharded(28, 8)
    forced = compose(["experiment=qwen3_1.7b_base_w32k_k100", "trainer.layer_sharding=true"]).trainer
    assert forced.sharded(3, 2) and not forced.sharded(3, 1)


def test_a_source_checkout_finds_its_configs_without_being_installed(tmp_path):
    # a copy of the package and configs/, imported with site-packages on the path but without the .pth
    # files that install this checkout (python -S): how gpu_check.sh runs on a machine with no network
    import shutil
    import site

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "qscope_train", tmp_path / "qscope_train")
    shutil.copytree(root / "configs", tmp_path / "configs")
    code = (
        f"import sys; sys.path[:0] = [{str(tmp_path)!r}]; sys.path += {site.getsitepackages()!r}\n"
        "import qscope_train.cli as c\n"
        "print(c.CONFIG_PATH); print(c.compose(['experiment=demo']).layers)"
    )
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [str(tmp_path / "configs"), "[1,", "2]"]


def test_keys_of_an_unset_compare_side_get_one_clear_error_and_a_set_side_takes_them(fixtures_dir):
    from qscope_train.cli import unset_compare_side

    chat = str(fixtures_dir / "chat.jsonl")
    problem = unset_compare_side(["experiment=demo_adapt", "stages=[compare]", f"compare.b={{dataset:{chat}}}"])
    assert problem and "+data@compare.b=<preset>" in problem and "tiny_chat" in problem
    # the demo names a preset for side B: its keys can be overridden, and nothing is said
    assert unset_compare_side(["experiment=demo", f"compare.b={{dataset:{chat}}}"]) is None
    assert unset_compare_side(["experiment=demo_adapt"]) is None
    assert compose(["experiment=demo", f"compare.b.dataset={chat}"]).compare.b.dataset == chat
