"""Valid seed files for the fuzzer: a micro Qwen2 checkpoint (HF, GGUF, int4) with a 320-token byte-level BPE
tokenizer cut from the real Qwen2 one, so one case converts in milliseconds; plus the real 0.5B GGUF's header
(tensor data left as a file hole) when that file is cached.

The GGUF seeds cover the C block decoders the GGUF reader runs (formats/ggml/blocks.h, iq_blocks.h): F16, Q8_0,
Q4_1, IQ4_NL, IQ4_XS (from a 256-wide micro checkpoint, since IQ4_XS needs rows of whole 256-value blocks) and,
retyped from the IQ4_XS seed, every other block type of ``RETYPED``. ``GGUF_SEEDS`` lists the keys of the micro
GGUF seeds."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qconvert.testing.fuzz.gguf_mut import _set_kv, build, parse
from qconvert.testing.tiny import DATA

N_BPE = 300  # 256 byte symbols + the first 44 merges of the real vocabulary
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 320
CHATML = (DATA / "tokenizer_config.json")
SEEDS_VERSION = "seeds 3\n"  # bump when the seeds change: cached seed folders are then rebuilt


def micro_tokenizer() -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer.json, tokenizer_config.json) of a small valid Qwen2-style tokenizer."""
    tj = json.load(gzip.open(DATA / "tokenizer.json.gz"))
    vocab = {t: i for t, i in tj["model"]["vocab"].items() if i < N_BPE}
    tj["model"]["vocab"] = vocab
    tj["model"]["merges"] = tj["model"]["merges"][:N_BPE - 256]
    tj["added_tokens"] = [dict(a, id=N_BPE + k) for k, a in enumerate(tj["added_tokens"][:len(SPECIALS)])]
    tc = json.loads(CHATML.read_text())
    tc["added_tokens_decoder"] = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in tj["added_tokens"]}
    return tj, tc


RETYPED = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0", "MXFP4")
"""Block types of the seeds made by ``retype``: the IQ4_XS seed with its matrices in the type, random blocks."""
GGUF_SEEDS = ("gguf_f16", "gguf_q8", "gguf_q4", "gguf_iq4_nl", "gguf_iq4_xs", *(f"gguf_{t.lower()}" for t in RETYPED))
IQ4_FILE_TYPE = {"IQ4_NL": 25, "IQ4_XS": 30}  # llama_ftype (general.file_type), as llama-quantize records it


def micro_hf(out: Path, dtype: str = "f32", seed: int = 0, hidden: int = 32, intermediate: int = 64) -> Path:
    """A valid micro HF checkpoint (1 layer, 2 query heads and 1 kv head, tied; hidden 32 unless told) written
    with the safetensors package."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, f, heads, kv = hidden, intermediate, 2, 1
    hd = h // heads
    ts = {"model.embed_tokens.weight": rng.normal(0, 1, (VOCAB, h)), "model.norm.weight": rng.normal(1, .1, h)}
    p = "model.layers.0."
    for n, shape in [("self_attn.q_proj.weight", (heads * hd, h)), ("self_attn.k_proj.weight", (kv * hd, h)),
                     ("self_attn.v_proj.weight", (kv * hd, h)), ("self_attn.o_proj.weight", (h, heads * hd)),
                     ("mlp.gate_proj.weight", (f, h)), ("mlp.up_proj.weight", (f, h)), ("mlp.down_proj.weight", (h, f))]:
        ts[p + n] = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
    for n, k in [("self_attn.q_proj.bias", heads * hd), ("self_attn.k_proj.bias", kv * hd),
                 ("self_attn.v_proj.bias", kv * hd)]:
        ts[p + n] = rng.normal(0, .1, k)
    for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        ts[p + n] = rng.normal(1, .1, h)
    np_dt = {"f32": np.float32, "f16": np.float16}[dtype]
    save_file({k: np.ascontiguousarray(v.astype(np_dt)) for k, v in ts.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": h,
           "intermediate_size": f, "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv,
           "max_position_embeddings": 4096, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
           "bos_token_id": N_BPE, "eos_token_id": N_BPE + 2, "torch_dtype": "float32" if dtype == "f32" else "float16",
           "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
           "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 1, "hidden_act": "silu"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": N_BPE, "eos_token_id": N_BPE + 2}))
    tj, tc = micro_tokenizer()
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False))
    return out


def real_header_gguf(out: Path) -> Path | None:
    """The cached real 0.5B Q4_K_M GGUF's header with its data as a file hole (a few MB on disk), or None."""
    from qconvert.testing.fetch import REAL_MODEL_NAME, cache_dir

    real = cache_dir() / REAL_MODEL_NAME
    if not real.is_file():
        return None
    from formats.gguf.header import read_header
    _, infos = read_header(real)
    start = min(t.offset for t in infos)
    with open(real, "rb") as f, open(out, "wb") as g:
        g.write(f.read(start))
        g.truncate(real.stat().st_size)
    return out


def iq4_types(src: Any, want: str) -> dict[str, str]:
    """{GGUF name: type} for an IQ4 seed: every matrix in ``want`` (IQ4_NL or IQ4_XS; IQ4_XS falls back to
    IQ4_NL for rows that are not whole 256-value blocks, as llama-quantize does), 1-D tensors and norms F32."""
    from formats.gguf.write import tensor_type
    from formats.model.names import canonical_shape, gguf_layout

    out = {}
    for gname, members in gguf_layout(src.config):
        shape = canonical_shape(members[0], src.config)
        if tensor_type(gname, shape, "q8_0") == "F32":
            out[gname] = "F32"
        else:
            out[gname] = "IQ4_NL" if want == "IQ4_NL" or shape[-1] % 256 else "IQ4_XS"
    return out


_F16_SCALE = 0x211F  # 0.01 as an f16, the block scale of the random blocks
_SCALE_AT = {"TQ1_0": 52, "TQ2_0": 64}  # byte offset of the f16 scale d in a block (else 0)


def random_blocks(qtype: str, n_blocks: int, rng: np.random.Generator) -> bytes:
    """``n_blocks`` blocks of ``qtype`` with random codes and a finite scale (so that decoding gives finite
    values): d = 0.01 as an f16 where the block stores one, IQ1_M's scale spread over the top nibbles of its
    four 16-bit scale words, MXFP4's exponent byte 2^-8."""
    size = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    b = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    if qtype == "MXFP4":
        b[:, 0] = 120
    elif qtype == "IQ1_M":
        words = b[:, size - 8:].copy().view("<u2")
        words[:] = (words & 0x0FFF) | (((_F16_SCALE >> (4 * np.arange(4))) & 0xF) << 12).astype(np.uint16)
        b[:, size - 8:] = words.view(np.uint8)
    else:
        at = _SCALE_AT.get(qtype, 0)
        b[:, at:at + 2] = np.frombuffer(struct.pack("<H", _F16_SCALE), np.uint8)
    return b.tobytes()


def retype(src: Path, out: Path, qtype: str, seed: int = 0) -> Path:
    """A copy of GGUF ``src`` whose IQ4_XS matrices are ``qtype`` with random blocks (other tensors kept),
    ``general.file_type`` set to the type's llama_ftype."""
    lay = parse(Path(src).read_bytes())
    rng = np.random.default_rng(seed)
    block = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    iq4 = int(gguf.GGMLQuantizationType.IQ4_XS)
    old, data, at = lay.data, [], 0
    starts = sorted(off for *_, off in lay.tensors) + [len(old)]
    for k, (name, dims, t, off) in enumerate(lay.tensors):
        if t == iq4:
            part = random_blocks(qtype, int(np.prod(dims)) // block, rng)
            lay.tensors[k][2] = int(gguf.GGMLQuantizationType[qtype])
        else:
            part = old[off:next(e for e in starts if e > off)]
        lay.tensors[k][3] = at
        data.append(part + b"\0" * (-len(part) % 32))
        at += len(data[-1])
    lay.data = b"".join(data)
    ftype = {"MXFP4": "MOSTLY_MXFP4_MOE"}.get(qtype, f"MOSTLY_{qtype}")
    _set_kv(lay, "general.file_type", 4, struct.pack("<I", int(gguf.LlamaFileType[ftype])))
    Path(out).write_bytes(build(lay))
    return Path(out)


def make_seeds(root: Path) -> dict[str, Path]:
    """Every seed under ``root`` (made once): hf, hf16, int4, int4_16 folders, and the GGUF files of
    ``GGUF_SEEDS`` (f16, q8_0, q4_1, iq4_nl from hf; iq4_xs from a 256-wide checkpoint, hf256)."""
    import subprocess
    import sys

    from formats.gguf.write import write_gguf
    from formats.hf.read import open_hf

    root = Path(root)
    marker = root / ".done"
    seeds = {"hf": root / "hf", "hf16": root / "hf16", "gguf_f16": root / "f16.gguf", "gguf_q8": root / "q8.gguf",
             "gguf_q4": root / "q4_1.gguf", "gguf_iq4_nl": root / "iq4_nl.gguf", "gguf_iq4_xs": root / "iq4_xs.gguf",
             "int4": root / "int4", "int4_16": root / "int4_16", "hf256": root / "hf256",
             **{f"gguf_{t.lower()}": root / f"{t.lower()}.gguf" for t in RETYPED}}
    if marker.is_file() and marker.read_text() == SEEDS_VERSION:
        real = root / "real-header.gguf"
        return {**seeds, **({"gguf_real": real} if real.is_file() else {})}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    micro_hf(seeds["hf"])
    micro_hf(seeds["hf16"], "f16", seed=1)
    micro_hf(seeds["hf256"], seed=2, hidden=256, intermediate=256)
    for key, t in (("gguf_f16", "f16"), ("gguf_q8", "q8_0"), ("gguf_q4", "q4_1")):
        with open_hf(str(seeds["hf"])) as src:
            write_gguf(src, seeds[key], t, progress=False)
    for key, hf, t in (("gguf_iq4_nl", "hf", "IQ4_NL"), ("gguf_iq4_xs", "hf256", "IQ4_XS")):
        with open_hf(str(seeds[hf])) as src:
            write_gguf(src, seeds[key], types=iq4_types(src, t), file_type=IQ4_FILE_TYPE[t], progress=False)
    for k, t in enumerate(RETYPED):
        retype(seeds["gguf_iq4_xs"], seeds[f"gguf_{t.lower()}"], t, seed=k)
    cli = [sys.executable, "-c", "from qconvert.cli import main; main()", "quantize"]
    subprocess.run([*cli, str(seeds["hf"]), str(seeds["int4"]), "--method", "rtn", "--quiet"], check=True,
                   capture_output=True)
    subprocess.run([*cli, str(seeds["hf16"]), str(seeds["int4_16"]), "--method", "rtn", "--quiet", "--bits", "3",
                    "--scale-bits", "16", "--sym", "--mix", "uniform"], check=True, capture_output=True)
    real = real_header_gguf(root / "real-header.gguf")
    marker.write_text(SEEDS_VERSION)
    os.sync()
    return {**seeds, **({"gguf_real": real} if real else {})}
