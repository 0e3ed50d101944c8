"""ModelConfig reads both transformers styles and round-trips through GGUF metadata; name tables invert."""
import pytest

from formats.errors import QConvertError
from formats.model.config import ModelConfig
from formats.model.names import canonical_names, gguf_layout, gguf_to_hf, hf_to_gguf
from qconvert.testing.tiny import VARIANTS, hf_config


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_4_and_5_styles_read_the_same(variant):
    a = ModelConfig.from_hf_dict(hf_config(variant, "bfloat16", style=4))
    b = ModelConfig.from_hf_dict(hf_config(variant, "bfloat16", style=5))
    assert a == b
    assert a.dtype == "bfloat16" and a.rope_theta == 1e6


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gguf_kv_round_trip(variant):
    cfg = ModelConfig.from_hf_dict(hf_config(variant))
    kv = {"general.architecture": cfg.arch, **cfg.to_gguf_kv()}
    back = ModelConfig.from_gguf_kv(kv, cfg.vocab_size, cfg.tie_word_embeddings)
    for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "rope_theta", "rms_norm_eps", "rope_scaling", "num_experts", "num_experts_per_tok",
              "moe_intermediate_size", "shared_expert_intermediate_size", "max_position_embeddings"):
        assert getattr(back, f) == getattr(cfg, f), f


def test_yarn_survives_both_ways():
    cfg = ModelConfig.from_hf_dict(hf_config("untied_yarn", style=5))
    assert cfg.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    kv = cfg.to_gguf_kv()
    assert kv["qwen2.rope.scaling.type"] == "yarn" and kv["qwen2.rope.scaling.factor"] == 4.0
    assert kv["qwen2.rope.scaling.original_context_length"] == 32768
    assert cfg.to_hf_dict()["rope_scaling"]["type"] == "yarn"


def test_other_architectures_are_refused():
    d = hf_config("tied")
    d["model_type"] = "llama"
    with pytest.raises(QConvertError, match="model_type 'llama' is not supported"):
        ModelConfig.from_hf_dict(d)
    with pytest.raises(QConvertError, match="general.architecture is 'llama'"):
        ModelConfig.from_gguf_kv({"general.architecture": "llama"}, 10, True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_name_tables_invert(variant):
    cfg = ModelConfig.from_hf_dict(hf_config(variant))
    names = canonical_names(cfg)
    assert len(set(names)) == len(names)
    rebuilt = []
    for gname, members in gguf_layout(cfg):
        assert gguf_to_hf(gname, cfg.num_experts) == members
        rebuilt += members
        for m in members:
            assert hf_to_gguf(m)[0] == gname
    assert sorted(rebuilt) == sorted(names)
    assert ("lm_head.weight" in names) == (not cfg.tie_word_embeddings)
    if cfg.is_moe:
        assert hf_to_gguf("model.layers.1.mlp.experts.3.down_proj.weight") == ("blk.1.ffn_down_exps.weight", 3)
