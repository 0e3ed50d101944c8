"""Quantised HF checkpoints (GPTQ v1 / v2 / act-order, AutoAWQ GEMM, compressed-tensors pack-quantized) made by
independent code (tests/quant_layouts.py from the layouts' descriptions; the compressed-tensors package itself)
are read exactly, decoded natively, mapped onto GGML blocks without requantising, and cross-checked by
llama.cpp's converter, transformers + compressed-tensors, and llama.cpp."""
import numpy as np
import pytest
import torch
from conftest import qconvert
from gguf import GGUFReader
from gguf.quants import dequantize
from quant_layouts import awq_checkpoint, ct_checkpoint, dense_checkpoint, expected, gptq_checkpoint

from formats.model.names import hf_to_gguf
from formats.open import open_model
from qconvert.decoder import products
from qconvert.testing.peers import hf_logits, kl_stats, llama_convert, llama_logits

CASES = {"gptq": {}, "gptq-v2-asym": {"v2": True, "sym": False}, "gptq-act": {"act_order": True}, "awq": None}


@pytest.fixture(scope="module")
def quantised(tiny, tmp_path_factory):
    """quantised(kind) -> (folder, {module: (q, z, s, g_idx)}) of the h256 tiny model, made once."""
    root, made = tmp_path_factory.mktemp("hfq"), {}

    def get(kind):
        if kind not in made:
            kw = CASES[kind]
            out = root / kind
            m = awq_checkpoint(tiny("h256"), out) if kw is None else gptq_checkpoint(tiny("h256"), out, **kw)
            made[kind] = (out, m)
        return made[kind]
    return get


@pytest.mark.parametrize("kind", CASES)
def test_reads_the_exact_weights_and_decodes_natively(quantised, kind):
    path, made = quantised(kind)
    rng = np.random.default_rng(0)
    with open_model(str(path)) as src:
        assert len(src.stored) == len(made) == 14
        for module in made:
            want = expected(made, module).numpy()
            t = src.tensors[module + ".weight"]
            assert np.array_equal(t.numpy(), want), module
            x = rng.standard_normal((3, want.shape[1])).astype(np.float32)
            np.testing.assert_allclose(products.matmul(t.packed(), x), x @ want.T, rtol=2e-5, atol=2e-5 * np.abs(x @ want.T).max())
        label = src.tensors["model.layers.0.mlp.up_proj.weight"].packed().stype
    assert label == {"gptq": "int4 g128 sym", "gptq-v2-asym": "int4 g128 asym zint", "awq": "int4 g128 asym zint",
                     "gptq-act": "int4 g128 sym"}[kind], label  # asymmetric: the codes with their zeros, as stored


@pytest.mark.parametrize("kind", ["gptq", pytest.param("gptq-v2-asym", marks=pytest.mark.heavy),
                                  pytest.param("gptq-act", marks=pytest.mark.heavy)])
def test_llama_cpp_converter_dequantises_gptq_to_our_values(quantised, kind, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py has its own GPTQ dequantiser: F32 output equal bit for bit."""
    path, made = quantised(kind)
    out = llama_convert(path, tmp_path / "llama.gguf", "f32")
    theirs = {t.name: t for t in GGUFReader(str(out)).tensors}
    with open_model(str(path)) as src:
        for module in made:
            n = module + ".weight"
            t = theirs[hf_to_gguf(n)[0]]
            assert np.array_equal(np.asarray(t.data).reshape(src.tensors[n].shape), src.tensors[n].numpy()), n


@pytest.mark.parametrize("kind", ["gptq-v2-asym", "gptq-act"])
def test_decoder_on_gptq_matches_transformers_on_its_dequantisation(quantised, tiny, tmp_path, sample_tokens, kind):
    """Our decoder on the packed codes (8-bit symmetric form of asymmetric codes; act-order columns sorted by
    group, x permuted to match) vs transformers on the float32 weights the checkpoint means."""
    from qconvert.decoder import make_decoder

    path, made = quantised(kind)
    ref = hf_logits(dense_checkpoint(tiny("h256"), tmp_path / "dense", made), sample_tokens)
    with open_model(str(path)) as src:
        ours = make_decoder(src, "numpy").logits(sample_tokens)
    s = kl_stats(ref, ours)
    assert s["mean_kl"] <= 1e-6 and s["top1"] == 1.0, s


@pytest.mark.parametrize("kind, ggml", [pytest.param("gptq", "Q4_0", marks=pytest.mark.heavy), ("awq", "Q4_1")])
def test_hf_to_gguf_maps_codes_exactly_and_llama_cpp_agrees(quantised, kind, ggml, tmp_path, sample_tokens):
    """GPTQ sym g128 -> Q4_0 with the same scales (dequantised GGUF == GPTQ dequantisation, bit for bit);
    AWQ -> Q4_1 (offsets -z*s rounded to f16 only). llama.cpp on the GGUF vs our decoder on the folder."""
    from qconvert.decoder import make_decoder

    path, made = quantised(kind)
    out = tmp_path / "m.gguf"
    res = qconvert("hf-to-gguf", str(path), str(out), "--quiet")
    assert f"14 of 14 quantised tensors mapped exactly ({ggml} x14)" in res.stdout, res.stdout
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    for module in made:
        t = tensors[hf_to_gguf(module + ".weight")[0]]
        assert t.tensor_type.name == ggml
        want = expected(made, module).numpy()
        got = dequantize(t.data, t.tensor_type).reshape(want.shape)
        if ggml == "Q4_0":
            assert np.array_equal(got, want), module
        else:  # the offset -z*s is an f16 in Q4_1: at most half an f16 ulp of it away
            q, z, s, g = made[module]
            zs = (z.float() * s.float())[:, g.long()].numpy()
            assert np.all(np.abs(got - want) <= np.spacing(zs.astype(np.float16)).astype(np.float32) / 2 + 1e-12), module
    with open_model(str(path)) as src:
        ours = make_decoder(src, "numpy").logits(sample_tokens)
    s = kl_stats(ours, llama_logits(out, sample_tokens))
    print(kind, s)
    # measured: gptq 1.7e-3 (top-1 96.1%), awq see the printout; the weights are equal (above) and an F32 GGUF
    # agrees to < 1e-6 (control): the rest is llama.cpp's Q8 activations on the tiny model's peaky logits, as in
    # test_int4_gguf.py. The real 0.5B's figure is in the README.
    assert s["mean_kl"] <= 5e-3 and s["top1"] >= 0.93, s
    qconvert("hf-to-gguf", str(path), str(tmp_path / "f32.gguf"), "--outtype", "f32", "--quiet")
    control = kl_stats(ours, llama_logits(tmp_path / "f32.gguf", sample_tokens))
    assert control["mean_kl"] < 1e-6, control
    if ggml == "Q4_0":  # llama-quantize's Q4_0 file layout: the codes still map, embedding / head encoded as it does
        res = qconvert("hf-to-gguf", str(path), str(tmp_path / "mix.gguf"), "--outtype", "q4_0_mix", "--quiet")
        assert "14 of 14 quantised tensors mapped exactly (Q4_0 x14); none requantised" in res.stdout, res.stdout
        types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "mix.gguf")).tensors}
        assert types["token_embd.weight"] == "Q4_0" and types["output.weight"] == "Q6_K", types


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_package_checkpoint(tiny, tmp_path, sym):
    """A checkpoint the compressed-tensors package wrote: our values equal transformers + compressed-tensors'
    decompression (bf16, theirs rounds the product once as ours does); codes map onto Q4_0 / Q4_1."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = ct_checkpoint(tiny("h256"), tmp_path / "ct", sym=sym)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    theirs = model.state_dict()
    with open_model(str(path)) as src:
        assert len(src.stored) == 14 and all(m.sym == sym for m in src.stored.values())
        for n in src.stored:
            ours = torch.from_numpy(src.tensors[n].numpy()).bfloat16()
            assert torch.equal(ours, theirs[n]), n
    res = qconvert("hf-to-gguf", str(path), str(tmp_path / "m.gguf"), "--quiet")
    assert f"14 of 14 quantised tensors mapped exactly ({'Q4_0' if sym else 'Q4_1'} x14)" in res.stdout, res.stdout


def test_bad_quantised_checkpoints_are_one_line_errors(quantised, tmp_path):
    import json
    import shutil

    path, _ = quantised("gptq")
    cases = {
        "gemv": ("awq", {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemv"},
                 "AWQ version 'gemv' is not supported"),
        "marlin": ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
                   "checkpoint_format 'marlin' is not supported"),
        "bits": ("gptq", {"quant_method": "gptq", "bits": 8, "group_size": 128}, "Linear at 8 bits, group 128, needs I32/I64"),
        "group": ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 64}, "group 64"),
        "regex": ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"-:(": {}}},
                  "is not a regular expression"),
    }
    for name, (kind, qc, msg) in cases.items():
        d = tmp_path / name
        shutil.copytree(quantised(kind)[0], d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"] = qc
        (d / "config.json").write_text(json.dumps(cfg))
        res = qconvert("inspect", str(d), check=False)
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        assert msg in res.stderr and len(res.stderr.strip().splitlines()) == 1, (name, res.stderr)


# ---- export: int4 folder -> GPTQ / AWQ / compressed-tensors ----

@pytest.fixture(scope="module")
def int4_folders(tiny, tmp_path_factory):
    """(symmetric g128 uniform 4-bit, default roles mix, default with integer zeros) int4 folders of the h256
    tiny model."""
    root = tmp_path_factory.mktemp("exp")
    sym = root / "sym128"
    qconvert("quantize", str(tiny("h256")), str(sym), "--sym", "--group-size", "128", "--mix", "uniform", "--quiet")
    default, zint = root / "default", root / "zint"
    qconvert("quantize", str(tiny("h256")), str(default), "--quiet")
    qconvert("quantize", str(tiny("h256")), str(zint), "--zero-point", "int", "--quiet")
    return sym, default, zint


def _ulp_bound(qm):
    """Per-weight bound of an export's change: |q - z| <= 2^(b-1) times one f16 spacing of the scale."""
    s = qm.scales(0, qm.rows)
    g = np.minimum(np.arange(qm.cols) // qm.group_size, qm.n_groups - 1)
    return (1 << (qm.bits - 1)) * np.spacing(s.astype(np.float16)).astype(np.float32)[:, g]


@pytest.mark.parametrize("to", [pytest.param("gptq", marks=pytest.mark.heavy), "awq",
                                pytest.param("compressed-tensors", marks=pytest.mark.heavy)])
def test_export_keeps_the_codes(int4_folders, tmp_path, to):
    """Symmetric int4 -> each format: our reader of the export gives the int4 values up to the f16 rounding of
    the 8-bit scale codes; llama.cpp's converter (GPTQ, compressed-tensors) reads the same values bit for bit,
    and AWQ's values equal the GPTQ export's (same codes, other packing)."""
    sym = int4_folders[0]
    out = tmp_path / to
    res = qconvert("export", str(sym), str(out), "--to", to, "--quiet")
    assert f"{to}: 14 matrices;" in res.stdout and "re-rounded" not in res.stdout, res.stdout
    with open_model(str(sym)) as a, open_model(str(out)) as b:
        assert b.quantization.startswith({"gptq": "gptq (gptq) 4-bit g128 sym", "awq": "awq gemm 4-bit g128",
                                          "compressed-tensors": "compressed-tensors pack-quantized 4-bit g128 sym"}[to])
        assert len(b.stored) == 14
        for n, qm in b.stored.items():
            d = np.abs(a.tensors[n].numpy() - b.tensors[n].numpy())
            assert np.all(d <= _ulp_bound(qm)), n
        if to == "awq":
            g = tmp_path / "gptq"
            qconvert("export", str(sym), str(g), "--to", "gptq", "--quiet")
            with open_model(str(g)) as c:
                for n in b.stored:
                    assert np.array_equal(b.tensors[n].numpy(), c.tensors[n].numpy()), n
            return
        theirs = {t.name: t for t in GGUFReader(str(llama_convert(out, tmp_path / "l.gguf", "f32"))).tensors}
        for n in b.stored:
            t = theirs[hf_to_gguf(n)[0]]
            assert np.array_equal(np.asarray(t.data).reshape(b.tensors[n].shape), b.tensors[n].numpy()), n


@pytest.mark.heavy
def test_export_default_mix_with_integer_zeros_exactly(int4_folders, tmp_path):
    """The default roles mix (float offsets) exports to compressed-tensors with its offsets re-rounded, the change
    reported. With --zero-point int (4/5/8-bit groups, integer zeros) every value is kept:
    - compressed-tensors holds it as is (one config group per scheme); the compressed-tensors package, matching
      modules to groups and decompressing each as it does when loading (to f16), gives our values.
      (transformers 5.24's dequantize=True path decompresses every dense module with the first group's scheme,
      so it misreads any mixed-precision checkpoint; it is not used here.)
    - GPTQ refuses the 5-bit matrices in one line, writing nothing; with --widen they become 8-bit codes
      (q - z + 128, same scales) and llama.cpp's converter reads every matrix as our int4 values, bit for bit.
    - AWQ (4-bit only) with --widen keeps the 5/8-bit matrices unquantised in F16, in modules_to_not_convert."""
    import json

    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    _, flt, default = int4_folders
    res = qconvert("export", str(flt), str(tmp_path / "flt"), "--to", "compressed-tensors", "--quiet")
    assert "14 asymmetric with offsets re-rounded to integer zero points" in res.stdout, res.stdout
    out = tmp_path / "ct"
    res = qconvert("export", str(default), str(out), "--to", "compressed-tensors", "--quiet")
    assert "compressed-tensors: 14 matrices; 14 exact" in res.stdout and "re-rounded" not in res.stdout, res.stdout
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) >= 2, qc
    with open_model(str(default)) as a, open_model(str(out)) as b:
        for n in b.stored:
            assert np.array_equal(a.tensors[n].numpy(), b.tensors[n].numpy()), n
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(out)))
    apply_quantization_config(model, QuantizationConfig.model_validate(qc))
    stored = load_file(str(out / "model.safetensors"))
    seen = 0
    with open_model(str(default)) as src:
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None:
                continue
            state = {k: stored[f"{name}.{k}"] for k in PackedQuantizationCompressor.compression_param_names(scheme)
                     if f"{name}.{k}" in stored}
            theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]  # in the scales' f16
            assert torch.equal(torch.from_numpy(src.tensors[name + ".weight"].numpy()).half(), theirs), name
            seen += 1
    assert seen == 14
    res = qconvert("export", str(default), str(tmp_path / "gptq"), "--to", "gptq", check=False)
    assert res.returncode != 0 and "gptq holds 2/3/4/8-bit codes, but 10 matrices are 5-bit" in res.stderr, res.stderr
    assert "--widen" in res.stderr and len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "gptq").exists()
    res = qconvert("export", str(default), str(tmp_path / "gptq"), "--to", "gptq", "--widen", "--quiet")
    assert "14 exact" in res.stdout and "10 widened 5->8 bits (exact)" in res.stdout, res.stdout
    # every matrix is 8-bit now: llama.cpp's converter (one global bit width, no `dynamic`) reads them all
    theirs = {t.name: t for t in GGUFReader(str(llama_convert(tmp_path / "gptq", tmp_path / "l.gguf", "f32"))).tensors}
    with open_model(str(default)) as a, open_model(str(tmp_path / "gptq")) as b:
        assert len(b.stored) == 14
        for n in b.stored:
            v = a.tensors[n].numpy()
            assert np.array_equal(v, b.tensors[n].numpy()), n
            assert np.array_equal(np.asarray(theirs[hf_to_gguf(n)[0]].data).reshape(v.shape), v), n
    res = qconvert("export", str(default), str(tmp_path / "awq"), "--to", "awq", "--widen", "--quiet")
    assert "14 left unquantised as F16 in modules_to_not_convert" in res.stdout, res.stdout
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert len(qc["modules_to_not_convert"]) == 14, qc
    with open_model(str(default)) as a, open_model(str(tmp_path / "awq")) as b:
        for n, t in a.tensors.items():
            if t.quant and n != "model.embed_tokens.weight" and n != "lm_head.weight":
                assert np.array_equal(b.tensors[n].numpy(), t.numpy().astype(np.float16).astype(np.float32)), n


def test_export_widens_narrow_codes_exactly(tiny, tmp_path):
    """3-bit integer-zero matrices -> AWQ (4-bit only) with --widen: codes re-centred (q - z + 8, zero 8, same scales), so
    every value is kept, and the AWQ export reads as the GPTQ export of the same folder (3-bit, as stored)."""
    src = tmp_path / "b3"
    qconvert("quantize", str(tiny("h256")), str(src), "--bits", "3", "--group-size", "64", "--mix", "uniform",
             "--zero-point", "int", "--quiet")
    res = qconvert("export", str(src), str(tmp_path / "awq"), "--to", "awq", "--widen", "--quiet")
    assert "awq: 14 matrices; 14 exact" in res.stdout and "14 widened 3->4 bits (exact)" in res.stdout, res.stdout
    qconvert("export", str(src), str(tmp_path / "gptq"), "--to", "gptq", "--quiet")
    with open_model(str(src)) as a, open_model(str(tmp_path / "awq")) as b, open_model(str(tmp_path / "gptq")) as c:
        assert len(b.stored) == 14 and b.quantization.startswith("awq gemm 4-bit g64")
        for n in b.stored:
            assert np.array_equal(a.tensors[n].numpy(), b.tensors[n].numpy()), n
            assert np.array_equal(c.tensors[n].numpy(), b.tensors[n].numpy()), n


@pytest.mark.heavy
def test_integer_zero_points_export_exactly(tiny, tmp_path):
    """quantize --zero-point int (f16 scales here): asymmetric groups on the integer-zero grid cost about what
    float offsets do (within 5% mean relative RMS on h256, g128, 4-bit head), and every export keeps every value: our
    reader reads each export bit for bit as the int4 folder (llama.cpp's converter too: see the default-mix test); the GGUF
    Q4_1 blocks dequantise to the same values too (the f16 scales keep 11 - bits significant bits)."""
    def mean_err(stdout):
        return float(stdout.split("relative RMS error per matrix: mean ")[1].split(";")[0])

    zint, flt = tmp_path / "zint", tmp_path / "float"
    common = ("--scale-bits", "16", "--group-size", "128", "--mix", "uniform", "--head-bits", "4", "--quiet")
    e_int = mean_err(qconvert("quantize", str(tiny("h256")), str(zint), "--zero-point", "int", *common).stdout)
    e_flt = mean_err(qconvert("quantize", str(tiny("h256")), str(flt), "--zero-point", "float", *common).stdout)
    assert e_int <= 1.05 * e_flt, (e_int, e_flt)
    for to in ("gptq", "awq", "compressed-tensors"):
        out = tmp_path / to
        res = qconvert("export", str(zint), str(out), "--to", to, "--quiet")
        assert "14 matrices; 14 exact" in res.stdout, res.stdout
        with open_model(str(zint)) as a, open_model(str(out)) as b:
            for n in b.stored:
                assert np.array_equal(a.tensors[n].numpy(), b.tensors[n].numpy()), (to, n)
    res = qconvert("hf-to-gguf", str(zint), str(tmp_path / "z.gguf"), "--quiet")
    assert "none requantised" in res.stdout and "rounded" not in res.stdout, res.stdout
    ours = {t.name: t for t in GGUFReader(str(tmp_path / "z.gguf")).tensors}
    with open_model(str(zint)) as a:
        for n, t in a.tensors.items():
            if t.quant is None or n == "lm_head.weight":
                continue
            g = hf_to_gguf(n)[0]
            assert np.array_equal(dequantize(ours[g].data, ours[g].tensor_type).reshape(t.shape), t.numpy()), n


@pytest.mark.heavy
def test_export_from_a_float_model_quantises_on_the_formats_grid(tiny, tmp_path):
    """export SRC with a float SRC: quantised with integer zeros and f16 scales first, so the export is exact;
    the embedding / head are the source's own (F16), and no temporary folder is left behind."""
    out = tmp_path / "awq"
    res = qconvert("export", str(tiny("h256")), str(out), "--to", "awq", "--method", "rtn", "--quiet")
    assert "int4 g128 asym zint (rtn, mix uniform)" in res.stdout and "awq: 14 matrices; 14 exact" in res.stdout, res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq"]
    with open_model(str(tiny("h256"))) as a, open_model(str(out)) as b:
        for n in ("lm_head.weight", "model.embed_tokens.weight"):
            assert np.array_equal(b.tensors[n].numpy(), a.tensors[n].numpy().astype(np.float16).astype(np.float32))
    res = qconvert("export", str(tiny("h256")), str(tmp_path / "g"), "--to", "gptq", "--method", "gptq", "--quiet")
    assert "int4 g128 asym zint (gptq, mix uniform)" in res.stdout and "gptq: 14 matrices; 14 exact" in res.stdout, res.stdout


def test_damaged_quantised_tensors_are_one_line_errors(quantised, tmp_path):
    """A g_idx naming groups that do not exist, a missing part and a wrong dtype: one line each, at open time
    (g_idx) or when the matrix is first read, never a traceback."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, _ = quantised("gptq-act")
    module = "model.layers.1.mlp.up_proj"
    cases = {
        "gidx": (lambda sd: sd.__setitem__(f"{module}.g_idx", sd[f"{module}.g_idx"] * 0 + 99), "g_idx has groups outside"),
        "missing": (lambda sd: sd.pop(f"{module}.scales"), f"{module}.scales is missing"),
        "dtype": (lambda sd: sd.__setitem__(f"{module}.qweight", sd[f"{module}.qweight"].float()),
                  f"{module}.qweight is F32"),
    }
    for name, (edit, msg) in cases.items():
        d = tmp_path / name
        shutil.copytree(src, d)
        sd = load_file(str(d / "model.safetensors"))
        edit(sd)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        res = qconvert("logits", str(d), "--token-ids", str(_ids(tmp_path)), "--out", str(tmp_path / f"{name}.npz"),
                       check=False)
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        assert msg in res.stderr and len(res.stderr.strip().splitlines()) == 1, (name, res.stderr)


def _ids(tmp_path):
    import json
    p = tmp_path / "ids.json"
    p.write_text(json.dumps(list(range(100, 116))))
    return p
