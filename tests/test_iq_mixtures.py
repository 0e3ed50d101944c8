"""llama-quantize's i-quant file types (iq1_s .. iq3_m, and q2_k_s): per-tensor types against llama-quantize's
own choice, the refusal without an importance matrix, and whole files against llama-quantize --imatrix."""
import ctypes
import json
from collections import Counter

import numpy as np
import pytest
from conftest import qconvert

from formats.ggml import codec
from formats.gguf.header import read_header
from formats.gguf.imatrix import read_imatrix
from formats.model.config import ModelConfig
from qconvert.quant.mixtures import MIXTURES, imatrix_required, mixture_types
from qconvert.testing import proxy
from qconvert.testing import tiny as tiny_mod
from qconvert.testing.peers import llama_quantize, llama_quantize_types

NEW = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m", "q2_k_s")
# llama-quantize refuses these on the tiny h256 checkpoint without an imatrix (some of their types need one)
REFUSED_H256 = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s")
_EXTRA = {  # llama.cpp's special cases: an 80-layer dense Qwen2 ("70B"), an 8-expert MoE, 4+ heads per kv head
    "l80": dict(tiny_mod.VARIANTS["untied_yarn"], num_hidden_layers=80, rope_scaling=None),
    "moe8": dict(tiny_mod.VARIANTS["moe"], num_experts=8, num_hidden_layers=16),
    "gqa4": dict(tiny_mod.VARIANTS["h256"], num_key_value_heads=1, num_hidden_layers=9),
}


def _one_entry_imatrix(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Enough of an imatrix to switch llama-quantize's imatrix-dependent choices (a dry run reads no weights)."""
    return {"blk.0.attn_q.weight": np.ones(cfg.hidden_size, np.float32)}


def _assert_types_equal(f16, cfg, label):
    for mix in NEW:
        for imatrix in (None, _one_entry_imatrix(cfg)):
            theirs = llama_quantize_types(f16, MIXTURES[mix][1], imatrix=imatrix)
            ours = mixture_types(cfg, mix, imatrix is not None)
            diff = {k: (ours.get(k), theirs.get(k)) for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
            assert not diff, (label, mix, imatrix is not None, diff)


@pytest.fixture(scope="module")
def f16_h256(tiny, tmp_path_factory):
    p = tmp_path_factory.mktemp("iqm") / "f16.gguf"
    qconvert("hf-to-gguf", str(tiny("h256")), str(p), "--outtype", "f16")
    return p


@pytest.mark.parametrize("variant", ["h256", "tied", pytest.param("untied_yarn", marks=pytest.mark.heavy),
                                     pytest.param("moe", marks=pytest.mark.heavy)])
def test_iq_mixture_types_equal_llama_quantize(tiny, f16_h256, tmp_path, variant):
    """On the tiny checkpoints (our F16 GGUF, llama-quantize's dry run), with and without an imatrix: the
    h256 rows fit every 256-value block; the 64-wide ones fall back to IQ4_NL / Q4_0 / Q8_0 everywhere."""
    f16 = f16_h256 if variant == "h256" else tmp_path / "f16.gguf"
    if variant != "h256":
        qconvert("hf-to-gguf", str(tiny(variant)), str(f16), "--outtype", "f16")
    _assert_types_equal(f16, ModelConfig.from_hf_dict(tiny_mod.hf_config(variant)), variant)


@pytest.mark.parametrize("variant", list(_EXTRA))
def test_iq_mixture_types_special_cases(tmp_path, monkeypatch, variant):
    """llama.cpp's 80-layer bump (not in the lowest-bit i-quants' branch), the 8-expert rules and the 4-heads-per-
    kv-head attn_v rules, on header-only GGUFs of tiny-width configs at that depth."""
    monkeypatch.setitem(tiny_mod.VARIANTS, variant, _EXTRA[variant])
    config = tiny_mod.hf_config(variant, dtype="float16")
    f16 = proxy.write_shape_gguf(tmp_path / "shape.gguf", config)
    _assert_types_equal(f16, ModelConfig.from_hf_dict(config), variant)


_LIGHT_SHAPES = ("0.5b", "1.5b", "7b", "57b-a14b")


@pytest.mark.parametrize("shape", [s if s in _LIGHT_SHAPES else pytest.param(s, marks=pytest.mark.heavy)
                                   for s in proxy.SHAPES])
def test_iq_mixture_types_equal_llama_quantize_at_full_size(shape, tmp_path):
    """Every real family member at its real depth and widths (header-only F16 GGUF, llama-quantize's dry run):
    the 0.5B's 896-wide rows (not whole 256-value blocks: IQ4_NL, and a Q8_0 head), 7 query heads per kv head,
    the 80-layer 72B, and the 57B MoE, whose ffn_down rule in the lowest-bit i-quants counts the experts' and
    the shared expert's tensors one by one."""
    f16 = proxy.write_shape_gguf(tmp_path / "shape.gguf", proxy.proxy_config(shape, dtype="f16"))
    _assert_types_equal(f16, ModelConfig.from_hf_dict(proxy.proxy_config(shape)), shape)


def _needs_imatrix_by_llama(f16, ftype: int) -> bool:
    """llama-quantize's own verdict: its dry run without an imatrix warns that the real run will need one."""
    import llama_cpp
    import llama_cpp._logger as llama_logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread, p.dry_run = ftype, 1, True
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(f16.with_suffix(".dry-run")).encode(), p)
    finally:
        llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
    assert rc == 0, "".join(lines[-10:])
    return "will require an imatrix" in "".join(lines)


@pytest.mark.parametrize("shape", ["0.5b", "7b"])
def test_imatrix_requirement_equals_llama_quantize(tmp_path, shape):
    """We refuse exactly the files llama-quantize refuses without an imatrix: on the 0.5B, whose 896-wide rows
    fall back to IQ4_NL, iq3_xs needs none (its IQ3_XXS tensors all fall back); on the 7B it does."""
    config = proxy.proxy_config(shape, dtype="f16")
    f16 = proxy.write_shape_gguf(tmp_path / "shape.gguf", config)
    cfg = ModelConfig.from_hf_dict(config)
    verdicts = {mix: _needs_imatrix_by_llama(f16, MIXTURES[mix][1]) for mix in NEW + ("iq4_xs", "q2_k")}
    assert verdicts == {mix: bool(imatrix_required(mix, mixture_types(cfg, mix))) for mix in verdicts}
    assert verdicts["iq3_xs"] == (shape == "7b") and verdicts["iq2_xxs"] and not verdicts["iq3_s"]


@pytest.mark.parametrize("mix", [m if m in ("iq1_s", "iq3_xs", "iq3_s") else pytest.param(m, marks=pytest.mark.heavy)
                                 for m in NEW])
def test_refused_without_imatrix(f16_h256, tmp_path, mix):
    """Without --imatrix: exit 1, one line naming `qconvert imatrix`, nothing written (hf-to-gguf and quantize),
    for the mixtures llama-quantize refuses on this model."""
    if mix not in REFUSED_H256:
        assert not imatrix_required(mix, mixture_types(ModelConfig.from_hf_dict(tiny_mod.hf_config("h256")), mix))
        return
    out = tmp_path / "o.gguf"
    for args in (("hf-to-gguf", str(f16_h256), str(out), "--outtype", mix),
                 ("quantize", str(f16_h256), str(out), "--format", "gguf", "--type", mix)):
        res = qconvert(*args, check=False)
        assert res.returncode == 1, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "`qconvert imatrix" in lines[0], res.stderr
        assert f" {mix} needs an importance matrix" in lines[0]
        assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refused_when_the_imatrix_lacks_a_tensor(f16_h256, tmp_path):
    """An imatrix without an entry for a tensor that needs one is refused as llama-quantize refuses it."""
    from formats.gguf.imatrix import Imatrix, ImatrixEntry, write_imatrix

    cfg = ModelConfig.from_hf_dict(tiny_mod.hf_config("h256"))
    imf = tmp_path / "im.gguf"
    e = ImatrixEntry(np.ones((1, cfg.hidden_size), np.float32), np.ones(1, np.float32))
    write_imatrix(Imatrix({"blk.0.attn_q.weight": e}, ["x.txt"], 1, 64), imf)
    res = qconvert("hf-to-gguf", str(f16_h256), str(tmp_path / "o.gguf"), "--outtype", "iq2_xxs", "--imatrix",
                   str(imf), check=False)
    assert res.returncode == 1 and "has no entry for blk.0.attn_k.weight" in res.stderr, res.stderr
    assert not (tmp_path / "o.gguf").exists()


@pytest.fixture(scope="module")
def h256_f16_and_imatrix(f16_h256):
    im = f16_h256.parent / "im.gguf"
    out = qconvert("imatrix", str(f16_h256), "-o", str(im), "--ctx", "64", "--chunks", "6", "--quiet")
    assert "6 x 64 tokens" in out.stdout
    return f16_h256, im


@pytest.mark.parametrize("mix", [m if m == "iq2_xxs" else pytest.param(m, marks=pytest.mark.heavy) for m in NEW])
def test_iq_gguf_with_imatrix_equals_llama_quantize(h256_f16_and_imatrix, tmp_path, mix):
    """From the same F16 GGUF and imatrix file, every tensor of our file has llama-quantize --imatrix's type
    and bytes, including a Q2_K tensor without an imatrix entry (the token embedding of iq1_s .. iq2_xs), which
    both code with ggml's reference Q2_K."""
    f16, imf = h256_f16_and_imatrix
    im = read_imatrix(imf)
    ours, theirs = tmp_path / "o.gguf", tmp_path / "t.gguf"
    qconvert("hf-to-gguf", str(f16), str(ours), "--outtype", mix, "--imatrix", str(imf), "--quiet")
    llama_quantize(f16, theirs, MIXTURES[mix][1], imatrix={k: e.weights() for k, e in im.entries.items()})
    a, b = read_header(ours)[1], read_header(theirs)[1]
    types = {t.name: t.type for t in a}
    assert types == {t.name: t.type for t in b}
    assert MIXTURES[mix][0] in types.values()  # the h256 rows fit the base type's blocks
    ra, rb = ours.read_bytes(), theirs.read_bytes()
    B = {t.name: t for t in b}
    differ = [t.name for t in a if ra[t.offset:t.offset + t.nbytes] != rb[B[t.name].offset:B[t.name].offset + B[t.name].nbytes]]
    assert differ == [], (mix, differ)
    assert read_header(ours)[0]["general.file_type"] == MIXTURES[mix][1]


def test_inspect_lists_iq_types(h256_f16_and_imatrix, tmp_path):
    """`qconvert inspect` reads a llama-quantize i-quant file: every tensor's type as llama-quantize chose it."""
    f16, imf = h256_f16_and_imatrix
    im = read_imatrix(imf)
    theirs = llama_quantize(f16, tmp_path / "t.gguf", MIXTURES["iq2_xxs"][1],
                            imatrix={k: e.weights() for k, e in im.entries.items()})
    d = json.loads(qconvert("inspect", str(theirs), "--json").stdout)
    cfg = ModelConfig.from_hf_dict(tiny_mod.hf_config("h256"))
    want = mixture_types(cfg, "iq2_xxs", True)
    assert d["types"] == dict(Counter(want.values())) and d["types"]["IQ2_XXS"] == 12 and d["types"]["Q5_K"] == 1
    assert {r["type"] for r in d["tensors"] if r["name"].endswith("self_attn.q_proj.weight")} == {"IQ2_XXS"}
