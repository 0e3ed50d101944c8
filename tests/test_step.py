"""qconvert/decoder/step.py + _step.c: a one-token decoding step of a dense layer in one C call gives the numpy
blocks' logits to float32 rounding, for every kind of stored matrix, and the same bits for any thread count."""
from __future__ import annotations

import numpy as np
import pytest

from formats import threads
from formats.open import open_model
from qconvert.decoder import make_decoder
from qconvert.decoder.native import LIB

pytestmark = pytest.mark.skipif(LIB is None, reason="needs the compiled decoder kernels")


@pytest.fixture(autouse=True)
def _default_count():
    yield
    threads.set_count(None)


def incremental(dec, ids, prefill: int) -> np.ndarray:
    """Logits of ``ids``: a prefill of the first ``prefill`` tokens, then one token per forward pass."""
    cache = dec.new_cache(len(ids))
    parts = [dec.forward(np.asarray(ids[:prefill]), cache)]
    parts += [dec.forward(np.asarray([t]), cache) for t in ids[prefill:]]
    return np.concatenate(parts)


def stored(tiny, tmp_path, kind: str):
    """A tiny dense checkpoint in one storage: f32 / bf16 HF, a Q8_0 or Q4_K_M GGUF, an int4 folder."""
    from conftest import qconvert

    if kind in ("f32", "bf16"):
        return tiny("h256", kind)
    out = tmp_path / ("int4" if kind == "int4" else f"{kind}.gguf")
    if kind == "int4":
        qconvert("quantize", str(tiny("h256")), str(out), "--quiet")
    else:
        qconvert("hf-to-gguf", str(tiny("h256")), str(out), "--outtype", kind)
    return out


@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0", "q4_k_m", "int4"])
def test_step_equals_the_numpy_blocks(tiny, tmp_path, sample_tokens, kind):
    with open_model(str(stored(tiny, tmp_path, kind))) as src:
        dec = make_decoder(src)
        assert all(s is not None for s in dec.steps), kind  # every dense layer takes the C step
        ids = sample_tokens[:40]
        fast = incremental(dec, ids, 8)
        dec.c_step = False
        ref = incremental(dec, ids, 8)
    assert np.isfinite(ref).all() and ref.std() > 0.1
    assert np.abs(fast - ref).max() <= 1e-4 * np.abs(ref).max(), kind
    assert (fast.argmax(-1) == ref.argmax(-1)).all()
    assert not np.array_equal(fast[:8], fast[8:16])  # the steps' rows are real, distinct positions


def test_step_with_yarn_and_untied_head(tiny, sample_tokens):
    """YaRN's attention factor lives in the rotary tables the step is handed; head_dim 16 takes the dot's tail."""
    with open_model(str(tiny("untied_yarn"))) as src:
        dec = make_decoder(src)
        assert all(s is not None for s in dec.steps)
        ids = sample_tokens[:32]
        fast = incremental(dec, ids, 4)
        dec.c_step = False
        ref = incremental(dec, ids, 4)
    assert np.abs(fast - ref).max() <= 1e-4 * np.abs(ref).max()


def test_moe_layers_keep_the_numpy_path(tiny):
    with open_model(str(tiny("moe"))) as src:
        assert all(s is None for s in make_decoder(src).steps)


def test_step_does_not_depend_on_the_thread_count(tiny, sample_tokens):
    """1, 2, 3 and 8 threads give the same logits bit for bit, over lengths where the attention heads stay on
    one thread and where they are split (_step.c QC_ATTN_SPLIT: 4 heads x 64 dims x 256 keys)."""
    ids = (list(sample_tokens) * 4)[:300]
    with open_model(str(tiny("h256"))) as src:
        dec = make_decoder(src)
        outs = []
        for n in (1, 2, 3, 8):
            threads.set_count(n)
            outs.append(incremental(dec, ids, 240))
    assert np.isfinite(outs[0]).all() and outs[0].std() > 0.1
    for o in outs[1:]:
        assert o.view(np.uint32).tobytes() == outs[0].view(np.uint32).tobytes()


@pytest.mark.parametrize("level", [0, 1])
def test_step_on_each_instruction_set(tiny, sample_tokens, level):
    """The portable C and the AVX2 attention (qc_dot_isa's level, lowered as native.set_isa does) both give the
    numpy blocks' logits, past the length where the scores run four keys at a time."""
    from qconvert.decoder import native

    ids = (list(sample_tokens) * 2)[:140]
    try:
        native.set_isa(level)
        with open_model(str(tiny("h256"))) as src:
            dec = make_decoder(src)
            fast = incremental(dec, ids, 100)
            dec.c_step = False
            ref = incremental(dec, ids, 100)
    finally:
        native.set_isa(-1)
    assert np.abs(fast - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (fast.argmax(-1) == ref.argmax(-1)).all()
