import pytest
import torch

from qscope_train.config import ModelConfig
from qscope_train.lm import capture, find_decoder_layers, load_lm, run_captured

MODELS = ["tiny-qwen3", "tiny-qwen3_5", "tiny-qwen3_5-vl"]


@pytest.fixture(scope="module", params=MODELS)
def lm(request, fixtures_dir):
    return load_lm(ModelConfig(name_or_path=str(fixtures_dir / request.param)))


def _ids(lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, lm.model.config.get_text_config().vocab_size, (2, 24), generator=g)


def test_hook_capture_equals_output_hidden_states_except_last(lm):
    ids = _ids(lm)
    n_layers = len(lm.layers)
    ref = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(ref) == n_layers + 1
    got = run_captured(lm, list(range(n_layers)), ids)
    for n in range(n_layers - 1):
        assert torch.equal(got[n], ref[n + 1]), f"layer {n}"
    # hidden_states[-1] is after the final norm, so it is NOT the last layer's residual stream.
    assert not torch.allclose(got[n_layers - 1], ref[-1])
    torch.testing.assert_close(lm.model.model.norm(got[n_layers - 1]), ref[-1])


def test_forward_stops_after_the_deepest_layer(lm):
    calls = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in enumerate(lm.layers)]
    head = lm.model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    try:
        out = run_captured(lm, [1, 0], _ids(lm))
    finally:
        for h in [*hooks, head]:
            h.remove()
    assert sorted(out) == [0, 1]
    assert calls == [0, 1]


def test_capture_rejects_layers_out_of_range(lm):
    with pytest.raises(ValueError, match="out of range"):
        with capture(lm.layers, [len(lm.layers)]):
            pass


def test_qwen3_5_hybrid_layer_types_are_present(fixtures_dir):
    lm = load_lm(ModelConfig(name_or_path=str(fixtures_dir / "tiny-qwen3_5")))
    kinds = {type(getattr(layer, "linear_attn", None) or layer.self_attn).__name__ for layer in lm.layers}
    assert any("GatedDeltaNet" in k for k in kinds) and any("Attention" in k for k in kinds)


def test_multimodal_checkpoint_loads_its_real_text_weights(fixtures_dir):
    from transformers import Qwen3_5ForConditionalGeneration

    path = fixtures_dir / "tiny-qwen3_5-vl"
    vl = Qwen3_5ForConditionalGeneration.from_pretrained(path).eval()
    layers = find_decoder_layers(vl)
    assert layers is vl.model.language_model.layers  # not the vision blocks
    text = load_lm(ModelConfig(name_or_path=str(path)))
    assert type(text.model).__name__ == "Qwen3_5ForCausalLM"
    assert torch.equal(text.model.model.embed_tokens.weight, vl.model.language_model.embed_tokens.weight)
    ids = _ids(text)
    with capture(layers, [2]) as out:
        try:
            vl(input_ids=ids, use_cache=False)
        except Exception as e:  # the early-stop signal
            assert type(e).__name__ == "_StopForward"
    assert torch.equal(out[2], run_captured(text, [2], ids)[2])


def test_missing_local_model_points_to_the_fixture_builder(tmp_path):
    with pytest.raises(FileNotFoundError, match="make fixtures"):
        load_lm(ModelConfig(name_or_path=str(tmp_path / "nothing")))


def test_non_qwen_model_is_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_lm(ModelConfig(name_or_path=str(tmp_path)))


def test_qwen3_5_on_cuda_without_the_fast_kernels_warns_and_names_the_extra(fixtures_dir):
    import importlib.util

    import pytest
    from transformers import AutoConfig

    from qscope_train.lm import warn_if_slow_linear_attention

    if importlib.util.find_spec("fla") and importlib.util.find_spec("causal_conv1d"):
        pytest.skip("the fast kernels are installed here")
    qwen35 = AutoConfig.from_pretrained(fixtures_dir / "tiny-qwen3_5")
    with pytest.warns(UserWarning, match=r"2 of this model's 4 layers are Gated DeltaNet.*qscope-train\[gpu\]"):
        warn_if_slow_linear_attention(qwen35, "cuda")
    assert warn_if_slow_linear_attention(qwen35, "cpu") is None  # the CPU has no fast path to miss
    assert warn_if_slow_linear_attention(AutoConfig.from_pretrained(fixtures_dir / "tiny-qwen3"), "cuda") is None
