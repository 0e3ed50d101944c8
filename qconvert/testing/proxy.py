"""Shape-exact random proxies of the real Qwen2 / Qwen2.5 checkpoints, for scale benchmarks.

``write_proxy(out, "72b")`` writes an HF folder with the real model's config (every width, head count, vocab
size, rope / YaRN / dual-chunk settings), the real Qwen2 tokenizer and seeded random bf16 weights scaled like
qconvert/testing/tiny.py's (peaky logits, std about 5), in shards of at most 4 GB with an index. ``layers`` cuts the
depth for a cheap run at full width. Weights are generated (numpy default_rng, float32), rounded to bf16
(round-to-nearest-even, formats.ggml.codec) and written in chunks of 16M values on a few threads, so memory holds
at most two chunks per thread (~100 MB each), never a whole tensor. Each chunk's values depend only on
(seed, tensor name, chunk index): a 1-layer proxy's layer 0 equals the full proxy's layer 0.
Command line: ``python -m qconvert.proxy OUT --shape 7b [--layers N]``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from formats.container.safetensors_io import SafetensorsWriter
from formats.errors import QConvertError
from formats.ggml import codec
from qconvert.testing.tiny import write_tokenizer

CHUNK = 1 << 24            # values generated per chunk
SHARD_BYTES = 4_000_000_000  # largest shard (HF's "4GB")
MARKER = "qconvert_proxy.json"
_NP = {"BF16": np.uint16, "F16": np.uint16, "F32": np.float32}
_ST = {"bf16": ("BF16", "bfloat16"), "f16": ("F16", "float16"), "f32": ("F32", "float32")}

_DENSE = dict(model_type="qwen2", rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, vocab_size=152064,
              max_position_embeddings=131072, eos_token_id=151643)


def _shape(name: str, **kw: Any) -> dict[str, Any]:
    d = dict(_DENSE)
    d.update(kw, name=name)
    return d


# Public config.json values (../shared/qwen2_family.md); "name" is the model they come from.
SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": _shape("Qwen2.5-0.5B", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936,
                   max_position_embeddings=32768),
    "1.5b": _shape("Qwen2.5-1.5B", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "3b": _shape("Qwen2.5-3B", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936,
                 max_position_embeddings=32768),
    "7b": _shape("Qwen2.5-7B", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4),
    "14b": _shape("Qwen2.5-14B", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                  num_attention_heads=40, num_key_value_heads=8, rms_norm_eps=1e-5),
    "32b": _shape("Qwen2.5-32B", hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                  num_attention_heads=40, num_key_value_heads=8, rms_norm_eps=1e-5),
    "72b": _shape("Qwen2.5-72B", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5),
    "57b-a14b": _shape("Qwen2-57B-A14B", model_type="qwen2_moe", hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=151936,
                       num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
                       shared_expert_intermediate_size=20480, norm_topk_prob=False, decoder_sparse_step=1),
    "7b-instruct": _shape("Qwen2.5-7B-Instruct", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                          eos_token_id=151645,
                          rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    "7b-instruct-1m": _shape("Qwen2.5-7B-Instruct-1M", hidden_size=3584, intermediate_size=18944,
                             num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                             max_position_embeddings=1010000, rope_theta=1e7, rms_norm_eps=1e-5,
                             eos_token_id=151645,
                             dual_chunk_attention_config={"chunk_size": 262144, "local_size": 8192,
                                                          "original_max_position_embeddings": 262144}),
}


def _get(shape: str) -> dict[str, Any]:
    if shape not in SHAPES:
        raise QConvertError(f"unknown proxy shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[shape]


def narrowed(s: dict[str, Any]) -> dict[str, Any]:
    """A narrow copy of a shape with the traits that break converters (for CI): the same head and kv-head
    counts, vocab size, tie, rope / YaRN / DCA settings, eps and expert counts, and feed-forward widths of the
    same 256-divisibility (29568 -> 384: a multiple of 128 but not of 256); head_dim 16 (8 from 64 heads on)."""
    s = dict(s)
    hd = 8 if s["num_attention_heads"] >= 64 else 16
    s["hidden_size"] = s["num_attention_heads"] * hd
    s["intermediate_size"] = 512 if s["intermediate_size"] % 256 == 0 else 384
    if s.get("num_experts"):
        s.update(moe_intermediate_size=256, shared_expert_intermediate_size=512)
    s["name"] = s["name"] + " (narrow)"
    return s


def proxy_config(shape: str, layers: int | None = None, dtype: str = "bf16", narrow: bool = False) -> dict[str, Any]:
    """config.json of a proxy (transformers-4 style, like qconvert/testing/tiny.py's ``hf_config``); ``narrow``: of
    its narrow copy (``narrowed``)."""
    s = narrowed(_get(shape)) if narrow else dict(_get(shape))
    if dtype not in _ST:
        raise QConvertError(f"proxy dtype {dtype!r} is not one of {', '.join(_ST)}")
    n = s["num_hidden_layers"] if layers is None else int(layers)
    if not 1 <= n <= s["num_hidden_layers"]:
        raise QConvertError(f"--layers {n}: {shape} has 1..{s['num_hidden_layers']} layers")
    mt = s.pop("model_type")
    s.pop("name")
    cfg: dict[str, Any] = {
        "architectures": ["Qwen2MoeForCausalLM" if mt == "qwen2_moe" else "Qwen2ForCausalLM"], "model_type": mt,
        "bos_token_id": 151643, "hidden_act": "silu", "use_sliding_window": False,
        "sliding_window": s["max_position_embeddings"], "max_window_layers": n, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "rope_scaling": None, "torch_dtype": _ST[dtype][1],
    }
    cfg.update(s, num_hidden_layers=n)
    if mt == "qwen2_moe":
        cfg.update(mlp_only_layers=[], output_router_logits=False, router_aux_loss_coef=0.001)
    return cfg


def _plan(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...], str, float, float]]:
    """(name, shape, kind, a, b) per tensor in file order; kind "w": N(0,1)*a/sqrt(cols), "v": N(a, b)."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (v, h), "w", 5.0, 0.0
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,), "v", 1.0, 0.1
        for name, rows, bias_std in (("q_proj", q, 0.3), ("k_proj", kv, 0.3), ("v_proj", kv, 0.1)):
            yield p + f"self_attn.{name}.weight", (rows, h), "w", 1.0, 0.0
            yield p + f"self_attn.{name}.bias", (rows,), "v", 0.0, bias_std
        yield p + "self_attn.o_proj.weight", (h, q), "w", 0.5, 0.0
        yield p + "post_attention_layernorm.weight", (h,), "v", 1.0, 0.1
        if cfg["model_type"] == "qwen2_moe":
            e, mff, sff = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
            yield p + "mlp.gate.weight", (e, h), "w", 8.0, 0.0
            for j in range(e):
                yield p + f"mlp.experts.{j}.gate_proj.weight", (mff, h), "w", 1.0, 0.0
                yield p + f"mlp.experts.{j}.up_proj.weight", (mff, h), "w", 1.0, 0.0
                yield p + f"mlp.experts.{j}.down_proj.weight", (h, mff), "w", 0.25, 0.0
            yield p + "mlp.shared_expert.gate_proj.weight", (sff, h), "w", 1.0, 0.0
            yield p + "mlp.shared_expert.up_proj.weight", (sff, h), "w", 1.0, 0.0
            yield p + "mlp.shared_expert.down_proj.weight", (h, sff), "w", 0.25, 0.0
            yield p + "mlp.shared_expert_gate.weight", (1, h), "w", 2.0, 0.0
        else:
            ff = cfg["intermediate_size"]
            yield p + "mlp.gate_proj.weight", (ff, h), "w", 1.0, 0.0
            yield p + "mlp.up_proj.weight", (ff, h), "w", 1.0, 0.0
            yield p + "mlp.down_proj.weight", (h, ff), "w", 0.5, 0.0
    yield "model.norm.weight", (h,), "v", 1.0, 0.1
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", (v, h), "w", 5.0, 0.0


def proxy_tensors(shape: str, layers: int | None = None, narrow: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a proxy, in file order."""
    return [(n, s) for n, s, *_ in _plan(proxy_config(shape, layers, narrow=narrow))]


def proxy_nbytes(shape: str, layers: int | None = None, dtype: str = "bf16", narrow: bool = False) -> int:
    """Bytes of tensor data a proxy holds (its folder is this plus a few MB of tokenizer and headers)."""
    item = {"bf16": 2, "f16": 2, "f32": 4}[dtype]
    return sum(int(np.prod(s)) * item for _, s in proxy_tensors(shape, layers, narrow))


def _chunks(name: str, shape: tuple[int, ...], kind: str, a: float, b: float, seed: int,
            st: str, pool: ThreadPoolExecutor, ahead: int) -> Iterator[np.ndarray]:
    """Raw encoded chunks of one tensor, in order; chunk k comes from its own generator (seed, name, k).

    At most ``ahead`` chunks are queued or finished but not yet consumed.
    """
    cols = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    step = max(1, CHUNK // cols)
    key = zlib.crc32(name.encode())
    scale = a / np.sqrt(cols) if kind == "w" else b
    shift = 0.0 if kind == "w" else a

    def make(k: int) -> np.ndarray:
        n = min(step, rows - k * step)
        x = np.random.default_rng([seed, key, k]).standard_normal((n, cols), dtype=np.float32)
        x *= np.float32(scale)
        if shift:
            x += np.float32(shift)
        return codec.from_f32(x, st)

    n_chunks = -(-rows // step)
    futs = deque(pool.submit(make, k) for k in range(min(ahead, n_chunks)))
    for k in range(n_chunks):
        out = futs.popleft().result()
        if k + ahead < n_chunks:
            futs.append(pool.submit(make, k + ahead))
        yield out


def proxy_matches(out: Path, shape: str, layers: int | None = None, seed: int = 0, dtype: str = "bf16",
                  narrow: bool = False) -> bool:
    """True when ``out`` holds a complete proxy written with these arguments."""
    try:
        have = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return have == _marker(shape, layers, seed, dtype, narrow)


def _marker(shape: str, layers: int | None, seed: int, dtype: str, narrow: bool = False) -> dict[str, Any]:
    return {"shape": shape, "config": proxy_config(shape, layers, dtype, narrow), "seed": seed, "dtype": dtype,
            "narrow": narrow, "chunk": CHUNK, "version": 2}


def _shards(plan: list[tuple[str, tuple[int, ...], str, float, float]], item: int) -> list[list[Any]]:
    """Split the plan into shards of at most SHARD_BYTES, keeping file order."""
    shards: list[list[Any]] = [[]]
    size = 0
    for t in plan:
        n = int(np.prod(t[1])) * item
        if n > SHARD_BYTES:
            raise QConvertError(f"{t[0]} ({n} bytes) is larger than a shard")
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def _write_shards(folder: Path, shards: list[list[Any]], st: str, seed: int, label: str | None,
                  workers: int) -> tuple[dict[str, str], int]:
    """Write every shard's safetensors file; return (weight_map, total data bytes)."""
    total = sum(int(np.prod(t[1])) * np.dtype(_NP[st]).itemsize for sh in shards for t in sh)
    weight_map: dict[str, str] = {}
    done, t0, last = 0, time.perf_counter(), 0.0
    with ThreadPoolExecutor(workers) as pool:
        for i, shard in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with open(folder / fn, "wb") as f:
                w = SafetensorsWriter(f, [(t[0], st, t[1]) for t in shard])
                for name, shp, kind, a, b in shard:
                    for raw in _chunks(name, shp, kind, a, b, seed, st, pool, 2 * workers):
                        w.write(raw)
                        done += raw.nbytes
                        now = time.perf_counter() - t0
                        if label and now - last >= 2.0:
                            last = now
                            print(f"{label}: {done / 1e9:.2f} / {total / 1e9:.2f} GB ({100 * done / total:.0f}%, "
                                  f"{done / 1e6 / max(now, 1e-9):.0f} MB/s)", file=sys.stderr, flush=True)
                    weight_map[name] = fn
    return weight_map, total


def write_proxy(out: Path, shape: str, layers: int | None = None, seed: int = 0, dtype: str = "bf16",
                progress: bool = True, threads: int | None = None, narrow: bool = False) -> Path:
    """Write (or reuse) a shape-exact random proxy of SHAPES[shape] as an HF folder at ``out``; return ``out``.

    ``layers`` keeps the first N layers (default: the real count); ``dtype`` bf16|f16|f32; ``narrow`` writes
    the narrow copy (``narrowed``). A folder that
    already holds the same proxy (same shape, layers, seed, dtype) is kept as is; an older proxy there is
    replaced; any other existing folder is refused. The folder is written as ``out.partial`` and renamed.
    """
    out = Path(out)
    cfg = proxy_config(shape, layers, dtype, narrow)
    st = _ST[dtype][0]
    if proxy_matches(out, shape, layers, seed, dtype, narrow):
        if progress:
            print(f"proxy {shape}: reusing {out}", file=sys.stderr)
        return out
    if out.exists():
        if not (out / MARKER).is_file():
            raise QConvertError(f"{out} exists and is not a qconvert proxy; remove it or choose another folder")
        shutil.rmtree(out)
    plan = list(_plan(cfg))
    shards = _shards(plan, np.dtype(_NP[st]).itemsize)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ok = False
    try:
        t0 = time.perf_counter()
        weight_map, total = _write_shards(tmp, shards, st, seed, f"proxy {shape}" if progress else None,
                                          threads or max(1, min(4, os.cpu_count() or 1)))
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        gen = {"bos_token_id": 151643, "do_sample": False,
               "eos_token_id": [151645, 151643] if cfg["eos_token_id"] == 151645 else 151643}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        write_tokenizer(tmp)
        if cfg["eos_token_id"] == 151643:  # base models: eos <|endoftext|>, as their tokenizer_config.json says
            tc = json.loads((tmp / "tokenizer_config.json").read_text())
            tc["eos_token"] = "<|endoftext|>"
            (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False))
        (tmp / MARKER).write_text(json.dumps(_marker(shape, layers, seed, dtype, narrow), indent=2))
        os.replace(tmp, out)
        ok = True
    finally:
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"proxy {shape}: wrote {out} ({total / 1e9:.2f} GB, {len(plan)} tensors, {len(shards)} shard(s)) "
              f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return out


def write_shape_gguf(out: Path, config: dict[str, Any]) -> Path:
    """An F16 GGUF with the header (metadata, tensor table) of the model ``config`` (an HF config.json dict) and
    no data: the file is extended to its full size as a hole, so a 145 GB 72B file costs a few KB of disk.

    For tools that read only the header, such as llama-quantize's dry run (``peers.llama_quantize_types``):
    the K-quant mixture of every real family member at its full depth, without any weights.
    """
    import gguf

    from formats.ggml.dtypes import row_nbytes
    from formats.gguf.write import tensor_type
    from formats.model.config import ModelConfig
    from formats.model.names import canonical_shape, gguf_layout

    cfg = ModelConfig.from_hf_dict(config)
    data: list[int] = []
    w = gguf.GGUFWriter(str(out), cfg.arch)
    w.add_type("model")
    w.add_uint32("general.file_type", 1)
    w.add_uint32("general.quantization_version", 2)
    for k, v in cfg.to_gguf_kv().items():
        {bool: w.add_bool, int: w.add_uint32, float: w.add_float32, str: w.add_string}[type(v)](k, v)
    for gname, members in gguf_layout(cfg):
        shape = canonical_shape(members[0], cfg)
        t = tensor_type(gname, shape, "f16")
        full = (len(members), *shape) if len(members) > 1 else shape
        nbytes = int(np.prod(full[:-1])) * row_nbytes(t, full[-1])
        data.append(nbytes)
        w.add_tensor_info(gname, (*full[:-1], row_nbytes(t, full[-1])), np.dtype(np.uint8), nbytes,
                          raw_dtype=gguf.GGMLQuantizationType[t])
    w.write_header_to_file(Path(out))
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    pad = lambda n: -(-n // align) * align  # noqa: E731
    os.truncate(out, pad(Path(out).stat().st_size) + sum(pad(n) for n in data))
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m qconvert.proxy OUT --shape 7b [--layers N] [--seed S] [--dtype bf16]``: write a proxy folder."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m qconvert.proxy", description=main.__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", required=True, choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default: the real count)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=list(_ST), default="bf16")
    ap.add_argument("--narrow", action="store_true", help="the narrow copy with the same traits (for CI)")
    ap.add_argument("--threads", type=int, default=None, help="generator threads (default: min(4, CPUs))")
    a = ap.parse_args(argv)
    try:
        write_proxy(a.out, a.shape, a.layers, a.seed, a.dtype, threads=a.threads, narrow=a.narrow)
    except QConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write the proxy at {a.out}: {e.strerror or e}; free disk space or choose "
              "another folder", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
