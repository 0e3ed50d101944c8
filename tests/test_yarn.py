"""YaRN past the original window: 256 tokens on a model whose original window is 64 (factor 4).

Positions 64..255 only come out right if every implementation blends the frequencies and applies the
attention factor the same way; the control (same weights, YaRN removed) shows the check can fail.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import qconvert

from formats.open import open_model
from qconvert.decoder import make_decoder
from qconvert.testing.peers import hf_logits, kl_stats, llama_logits

N = 256


@pytest.fixture(scope="module")
def yarn(tiny):
    """(HF folder, token ids, transformers' float32 logits) of the yarn_short variant."""
    hf = tiny("yarn_short")
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 150_000, N)]
    return hf, ids, hf_logits(hf, ids)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_decoders_match_transformers_past_window(yarn, backend):
    hf, ids, ref = yarn
    s = kl_stats(ref[64:], make_decoder(open_model(str(hf)), backend).logits(ids)[64:])
    assert s["mean_kl"] <= 1e-6 and s["top1"] == 1.0, s


def test_llama_cpp_f32_gguf_matches_transformers_past_window(yarn, tmp_path):
    hf, ids, ref = yarn
    out = tmp_path / "f32.gguf"
    qconvert("hf-to-gguf", str(hf), str(out), "--outtype", "f32")
    s = kl_stats(ref[64:], llama_logits(out, ids)[64:])
    assert s["mean_kl"] <= 1e-5 and s["top1"] >= 0.99, s


def test_without_yarn_the_check_fails(yarn, tmp_path):
    """Control: the same weights with plain RoPE differ from transformers' YaRN logits past the window."""
    hf, ids, ref = yarn
    plain = tmp_path / "plain"
    shutil.copytree(hf, plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg["rope_scaling"] = None
    (plain / "config.json").write_text(json.dumps(cfg))
    s = kl_stats(ref[64:], make_decoder(open_model(str(plain)), "numpy").logits(ids)[64:])
    assert s["mean_kl"] > 1e-3, s
