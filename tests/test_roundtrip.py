"""hf -> gguf -> hf is bit-exact (f32, bf16); metadata, tokenizer and sharding survive; Hub cache works offline."""
import json
import shutil

import numpy as np
import pytest
from conftest import VARIANTS, qconvert
from safetensors.numpy import load_file

from formats.gguf.header import read_header
from formats.open import open_model


def _load_all(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(str(f)).items()})
    return out


def _load_raw(d):
    """name -> raw bytes (bf16 can't be loaded by safetensors.numpy)."""
    src = open_model(str(d))
    try:
        return {n: t.raw_rows(0, t.n_rows).tobytes() for n, t in src.tensors.items()}, src.config
    finally:
        src.close()


@pytest.mark.parametrize("dtype,outtype", [("f32", "f32"), ("bf16", "bf16")])
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_gguf_hf_bit_exact(tiny, tmp_path, variant, dtype, outtype):
    src = tiny(variant, dtype)
    qconvert("hf-to-gguf", str(src), str(tmp_path / "m.gguf"), "--outtype", outtype)
    qconvert("gguf-to-hf", str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--dtype", dtype,
             "--max-shard-size", "20M")
    a, ca = _load_raw(src)
    b, cb = _load_raw(tmp_path / "hf")
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k] != b[k]]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    unused = dict(sliding_window=None, max_window_layers=None, name=None)  # not carried by GGUF
    assert ca.replace(**unused) == cb.replace(**unused)
    if variant != "tied":  # the embedding alone is 39 MB: more than one 20M shard
        idx = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
        assert len(set(idx["weight_map"].values())) > 1
    cfg_out = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg_in = json.loads((src / "config.json").read_text())
    for k in ("rope_scaling", "tie_word_embeddings", "num_key_value_heads", "vocab_size", "model_type"):
        assert cfg_out.get(k) == cfg_in.get(k), k


def test_gguf_metadata_llama_cpp_reads(tiny, tmp_path):
    qconvert("hf-to-gguf", str(tiny("moe")), str(tmp_path / "m.gguf"), "--outtype", "f16")
    kv, infos = read_header(tmp_path / "m.gguf")
    names = {t.name: t for t in infos}
    assert kv["general.architecture"] == "qwen2moe"
    for k in ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon", "expert_count",
              "expert_used_count", "expert_feed_forward_length", "expert_shared_feed_forward_length"):
        assert f"qwen2moe.{k}" in kv, k
    assert kv["general.file_type"] == 1 and kv["general.quantization_version"] == 2
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "qwen2"
    assert len(kv["tokenizer.ggml.tokens"]) == 151936 and kv["tokenizer.ggml.tokens"][-1] == "[PAD151935]"
    assert kv["tokenizer.ggml.add_bos_token"] is False and "im_start" in kv["tokenizer.chat_template"]
    assert names["blk.0.ffn_gate_exps.weight"].shape == (4, 32, 64)
    assert names["blk.0.ffn_gate_exps.weight"].type == "F16"
    assert names["blk.0.attn_q.bias"].type == "F32" and names["blk.0.ffn_gate_inp.weight"].type == "F32"
    assert "output.weight" in names


def test_tied_model_has_no_output_tensor(tiny, tmp_path):
    qconvert("hf-to-gguf", str(tiny("tied")), str(tmp_path / "m.gguf"), "--outtype", "q8_0")
    _, infos = read_header(tmp_path / "m.gguf")
    names = {t.name: t.type for t in infos}
    assert "output.weight" not in names and names["token_embd.weight"] == "Q8_0"
    qconvert("gguf-to-hf", str(tmp_path / "m.gguf"), str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _load_raw(tmp_path / "hf")[0]


def test_transformers_5_style_config_converts(tiny, tmp_path):
    from qconvert.testing.tiny import hf_config
    d = tmp_path / "v5"
    shutil.copytree(tiny("untied_yarn"), d)
    (d / "config.json").write_text(json.dumps(hf_config("untied_yarn", "float32", style=5)))
    qconvert("hf-to-gguf", str(d), str(tmp_path / "m.gguf"), "--outtype", "f32")
    kv, _ = read_header(tmp_path / "m.gguf")
    assert kv["qwen2.rope.scaling.type"] == "yarn" and kv["qwen2.rope.scaling.factor"] == 4.0


def test_hub_id_from_offline_cache(tiny, tmp_path, monkeypatch):
    """An 'org/name' id resolves through a populated huggingface_hub cache with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    snap = cache / "models--qwen-test--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny("tied"), snap)
    (cache / "models--qwen-test--tiny" / "refs").mkdir(parents=True)
    (cache / "models--qwen-test--tiny" / "refs" / "main").write_text("a" * 40)
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    exe = Path(sys.executable).parent / "qconvert"
    r = subprocess.run([str(exe), "hf-to-gguf", "qwen-test/tiny", str(tmp_path / "m.gguf"), "--outtype", "f32",
                        "--quiet"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a = _load_raw(tiny("tied"))[0]["model.embed_tokens.weight"]
    src = open_model(str(tmp_path / "m.gguf"))
    b = src.tensors["model.embed_tokens.weight"].raw_rows(0, 151936).tobytes()
    src.close()
    assert a == b
    r = subprocess.run([str(exe), "inspect", "qwen-test/missing"], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "not found in the Hugging Face cache" in r.stderr


def test_inspect_json(tiny, tmp_path):
    qconvert("hf-to-gguf", str(tiny("h256")), str(tmp_path / "m.gguf"), "--outtype", "q8_0")
    for target in (str(tiny("h256")), str(tmp_path / "m.gguf")):
        d = json.loads(qconvert("inspect", target, "--json").stdout)
        assert d["arch"] == "qwen2" and d["config"]["hidden_size"] == 256
        assert d["n_params"] == sum(np.prod(t["shape"]) for t in d["tensors"])
    assert d["types"] == {"Q8_0": 16, "F32": 11}  # 7 matrices x 2 layers + embedding + output; 5 x 2 + 1 1-D in F32


def test_inspect_orders_layers_by_number():
    """Layer 2 comes before layer 10 (names compare their numbers by value, not as strings)."""
    from qconvert.inspect_model import natural_key
    names = ["model.layers.10.mlp.up_proj.weight", "model.norm.weight", "model.layers.2.mlp.up_proj.weight",
             "model.layers.1.self_attn.q_proj.weight", "blk.11.attn_q.weight", "blk.9.attn_q.weight"]
    assert sorted(names, key=natural_key) == [
        "blk.9.attn_q.weight", "blk.11.attn_q.weight", "model.layers.1.self_attn.q_proj.weight",
        "model.layers.2.mlp.up_proj.weight", "model.layers.10.mlp.up_proj.weight", "model.norm.weight"]


def test_f16_and_sharded_input(tiny_root, tmp_path):
    """A sharded f16 checkpoint (index.json) converts bit-exactly to f16 GGUF and back."""
    from qconvert.testing.tiny import make_tiny
    src = make_tiny(tmp_path / "sharded", "moe", "f16", shard_bytes=8 << 20)
    assert len(list(src.glob("*.safetensors"))) > 1
    qconvert("hf-to-gguf", str(src), str(tmp_path / "m.gguf"), "--outtype", "auto")
    kv, infos = read_header(tmp_path / "m.gguf")
    assert kv["general.file_type"] == 1  # auto -> f16 for an f16 source
    qconvert("gguf-to-hf", str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--dtype", "f16")
    a, b = _load_raw(src)[0], _load_raw(tmp_path / "hf")[0]
    assert a == b


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_loads_our_hf_output(tiny, tmp_path, sample_tokens, variant):
    """gguf-to-hf output loads in transformers with every weight in place and the source's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from qconvert.testing.peers import hf_logits
    qconvert("hf-to-gguf", str(tiny(variant)), str(tmp_path / "m.gguf"), "--outtype", "f32")
    qconvert("gguf-to-hf", str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--dtype", "f32")
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    del model
    ids = sample_tokens[:48]
    assert np.array_equal(hf_logits(tiny(variant), ids), hf_logits(tmp_path / "hf", ids))
