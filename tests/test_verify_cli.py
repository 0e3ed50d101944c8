"""qconvert logits / verify / generate as a user runs them."""
import json
import shutil

import numpy as np
import pytest
from conftest import qconvert
from safetensors.numpy import load_file, save_file


@pytest.fixture(scope="module")
def broken(tiny, tmp_path_factory):
    """Candidates that must fail verification: wrong rope theta; zeroed q/k/v biases."""
    root = tmp_path_factory.mktemp("broken")
    theta = root / "theta"
    shutil.copytree(tiny("untied_yarn"), theta)
    cfg = json.loads((theta / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (theta / "config.json").write_text(json.dumps(cfg))
    bias = root / "bias"
    shutil.copytree(tiny("untied_yarn"), bias)
    t = load_file(str(bias / "model.safetensors"))
    for k in t:
        if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            t[k] = np.zeros_like(t[k])
    save_file(t, str(bias / "model.safetensors"), metadata={"format": "pt"})
    return {"theta": theta, "bias": bias}


def test_verify_identical_passes(tiny, tmp_path):
    ref = tiny("untied_yarn")
    qconvert("hf-to-gguf", str(ref), str(tmp_path / "m.gguf"), "--outtype", "f32")
    r = qconvert("verify", str(ref), str(tmp_path / "m.gguf"), "--ctx", "96", "--json", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "kl.png"))
    rep = json.loads((tmp_path / "r.json").read_text())
    assert "PASS" in r.stdout and rep["passed"] and rep["kind"] == "float"
    assert rep["mean_kl"] < 1e-9 and rep["top1"] == 1.0 and rep["n_tokens"] == 96
    assert abs(rep["ppl_ref"] - rep["ppl_cand"]) < 1e-3 * rep["ppl_ref"]
    assert (tmp_path / "kl.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("which", ["theta", "bias"])
def test_verify_fails_on_broken_candidate(tiny, broken, tmp_path, which):
    r = qconvert("verify", str(tiny("untied_yarn")), str(broken[which]), "--ctx", "96",
                 "--json", str(tmp_path / "r.json"), check=False)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert r.returncode == 1 and "FAIL" in r.stdout, r.stdout + r.stderr
    assert rep["mean_kl"] > 10 * rep["max_kld"], rep


def test_verify_quantised_candidate_uses_quantised_bounds(tiny, tmp_path):
    qconvert("hf-to-gguf", str(tiny("h256")), str(tmp_path / "q.gguf"), "--outtype", "q8_0")
    qconvert("verify", str(tiny("h256")), str(tmp_path / "q.gguf"), "--ctx", "64", "--json", str(tmp_path / "r.json"))
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["kind"] == "quantised" and rep["max_kld"] == 0.1 and 0 < rep["mean_kl"] < 0.05


def test_logits_command(tiny, tmp_path):
    ref = tiny("moe")
    from conftest import ROOT
    qconvert("logits", str(ref), "--text", str(ROOT / "tests" / "data" / "sample.txt"), "--ctx", "40",
             "--out", str(tmp_path / "a.npz"))
    a = np.load(tmp_path / "a.npz")
    assert a["token_ids"].dtype == np.int32 and a["token_ids"].shape == (40,)
    assert a["logits"].dtype == np.float32 and a["logits"].shape == (40, 151936)
    (tmp_path / "ids.json").write_text(json.dumps(a["token_ids"].tolist()))
    qconvert("logits", str(ref), "--token-ids", str(tmp_path / "ids.json"), "--backend", "torch",
             "--out", str(tmp_path / "b.npz"))
    b = np.load(tmp_path / "b.npz")
    assert np.abs(a["logits"] - b["logits"]).max() < 1e-3
    r = qconvert("logits", str(ref), "--ctx", "8", "--out", str(tmp_path / "a.npz"), check=False)
    assert r.returncode == 1 and "--force" in r.stderr
    (tmp_path / "bad.json").write_text("[1, 2, 999999]")
    r = qconvert("logits", str(ref), "--token-ids", str(tmp_path / "bad.json"), "--out", str(tmp_path / "c.npz"), check=False)
    assert r.returncode == 1 and "outside the vocabulary" in r.stderr and not (tmp_path / "c.npz").exists()


def test_generate_streams_and_reports_speed(tiny):
    r = qconvert("generate", str(tiny("tied")), "--prompt", "hello", "--chat", "--max-new-tokens", "5", "--ignore-eos")
    last = r.stdout.strip().splitlines()[-1]
    assert "prefill" in last and "decode" in last and "5 new tokens" in last


def test_chat_template_is_sandboxed():
    from formats.errors import QConvertError
    from formats.model.tokenizer import TokenizerData
    from qconvert.text import render_chat
    tok = TokenizerData(tokens=["a"], token_types=[1], merges=[],
                        chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(QConvertError, match="chat template failed"):
        render_chat(tok, [{"role": "user", "content": "x"}])


@pytest.mark.real
def test_generate_matches_transformers_greedy(real_hf):
    """Our greedy continuation of a chat prompt equals transformers' greedy generate, token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(real_hf))
    msgs = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)
    model = AutoModelForCausalLM.from_pretrained(str(real_hf), dtype=torch.float32)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    del model
    from formats.open import open_model
    from qconvert.decoder import make_decoder
    from qconvert.generate import greedy
    with open_model(str(real_hf)) as src:
        dec = make_decoder(src, "numpy")
    out = greedy(dec, ids, 24, set(), lambda t: None)["tokens"]
    assert out[: len(ref)] == ref
