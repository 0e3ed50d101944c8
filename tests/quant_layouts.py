"""Test-side writers of GPTQ and AutoAWQ GEMM checkpoints, written from the layouts' descriptions in torch,
independently of formats/hf/quantized_read.py (which reads them) and of qconvert's exporters.

``gptq_checkpoint`` / ``awq_checkpoint`` quantise a float HF folder round-to-nearest and save the packed
checkpoint; they return the integer codes, zeros and scales they packed, so tests can compute the expected
weights ``s * (q - z)`` without going through any packing code.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _copy_meta(src: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.suffix == ".json" and p.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(p, out / p.name)
    return json.loads((src / "config.json").read_text())


def _groups(w: torch.Tensor, group: int, perm: torch.Tensor | None) -> torch.Tensor:
    """Group index of each input column: consecutive runs of ``group`` columns in ``perm`` order."""
    cols = w.shape[1]
    order = perm if perm is not None else torch.arange(cols)
    g = torch.empty(cols, dtype=torch.int32)
    g[order] = (torch.arange(cols) // group).to(torch.int32)
    return g


def rtn(w: torch.Tensor, bits: int, group: int, sym: bool, g_idx: torch.Tensor):
    """Round-to-nearest codes q [out, in], zeros z [out, G] and f16 scales s [out, G] for groups ``g_idx``."""
    maxq = (1 << bits) - 1
    n_groups = int(g_idx.max()) + 1
    out = w.shape[0]
    s = torch.empty(out, n_groups, dtype=torch.float16)
    z = torch.empty(out, n_groups, dtype=torch.int32)
    for g in range(n_groups):
        cols = (g_idx == g).nonzero().flatten()
        x = w[:, cols].float()
        lo, hi = x.min(dim=1).values.clamp(max=0), x.max(dim=1).values.clamp(min=0)
        if sym:
            m = torch.maximum(lo.abs(), hi)
            lo, hi = -m, m
        sc = ((hi - lo) / maxq).clamp(min=1e-6).half()
        s[:, g] = sc
        z[:, g] = (maxq + 1) // 2 if sym else torch.round(-lo / sc.float()).clamp(0, maxq).int()
    q = torch.round(w.float() / s.float()[:, g_idx.long()]) + z[:, g_idx.long()]
    return q.clamp(0, maxq).to(torch.int32), z, s


def _pack_in(q: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight [in * bits / 32, out]: input rows packed, value k of a word at bits k*bits (2/4/8 bits)."""
    per = 32 // bits
    t = q.t().contiguous().to(torch.int64)  # [in, out]
    words = torch.zeros(t.shape[0] // per, t.shape[1], dtype=torch.int64)
    for k in range(per):
        words |= t[k::per] << (bits * k)
    return (words - ((words >> 31) << 32)).to(torch.int32)


def _pack_out(v: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[rows, out] -> [rows, out * bits / 32]: output columns packed, word nibble k = column order[k]."""
    per = 32 // bits
    order = order or tuple(range(per))
    v = v.to(torch.int64)
    words = torch.zeros(v.shape[0], v.shape[1] // per, dtype=torch.int64)
    for k in range(per):
        words |= v[:, order[k]::per] << (bits * k)
    return (words - ((words >> 31) << 32)).to(torch.int32)


def _rewrite(src: Path, out: Path, parts) -> tuple[dict, dict[str, tuple[torch.Tensor, ...]]]:
    """Save ``src`` into ``out`` with every Linear weight replaced by ``parts(w)``'s tensors (suffix -> tensor);
    other tensors as F16. Returns (config.json content to complete, module -> the integers packed)."""
    cfg = _copy_meta(src, out)
    new, made = {}, {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        module = name[:-len(".weight")]
        if not (name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS):
            new[name] = w.half() if w.is_floating_point() else w
            continue
        stored, made[module] = parts(w)
        new.update({f"{module}.{k}": v for k, v in stored.items()})
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    return cfg, made


def gptq_checkpoint(src: Path, out: Path, bits: int = 4, group: int = 128, sym: bool = True, v2: bool = False,
                    act_order: bool = False, seed: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
    """Write a GPTQ checkpoint of float folder ``src``; returns module -> (q, z, s, g_idx)."""
    gen = torch.Generator().manual_seed(seed)

    def parts(w: torch.Tensor):
        perm = torch.randperm(w.shape[1], generator=gen) if act_order else None
        g_idx = _groups(w, group, perm)
        q, z, s = rtn(w, bits, group, sym, g_idx)
        stored_z = z - 1 if not v2 else z
        return {"qweight": _pack_in(q, bits), "qzeros": _pack_out((stored_z & ((1 << bits) - 1)).t().contiguous(), bits),
                "scales": s.t().contiguous(), "g_idx": g_idx}, (q, z, s, g_idx)
    cfg, made = _rewrite(src, out, parts)
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
                                  "sym": sym, "static_groups": False, "true_sequential": True,
                                  "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return made


def awq_checkpoint(src: Path, out: Path, group: int = 128) -> dict[str, tuple[torch.Tensor, ...]]:
    """Write an AutoAWQ GEMM checkpoint (4-bit, zero point) of float folder ``src``; module -> (q, z, s, g_idx)."""
    def parts(w: torch.Tensor):
        g_idx = _groups(w, group, None)
        q, z, s = rtn(w, 4, group, False, g_idx)
        return {"qweight": _pack_out(q.t().contiguous(), 4, AWQ_ORDER),   # [in, out / 8]
                "qzeros": _pack_out(z.t().contiguous(), 4, AWQ_ORDER),    # [G, out / 8]
                "scales": s.t().contiguous()}, (q, z, s, g_idx)           # [G, out]
    cfg, made = _rewrite(src, out, parts)
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": None}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return made


def expected(made: dict[str, tuple[torch.Tensor, ...]], module: str) -> torch.Tensor:
    """The float32 weights a checkpoint means: s[g] * (q - z[g]) per column's group."""
    q, z, s, g = made[module]
    g = g.long()
    return (q - z[:, g]).float() * s.float()[:, g]


def ct_checkpoint(src: Path, out: Path, sym: bool = True, bits: int = 4, group: int = 128) -> Path:
    """Write a compressed-tensors pack-quantized checkpoint of float folder ``src`` with the compressed-tensors
    package itself: its QuantizationArgs, its calculate_qparams (min / max) and its ModelCompressor."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    for _, m in model.named_modules():
        if hasattr(m, "weight_scale"):
            g = m.weight.data.reshape(m.weight.shape[0], -1, group).float()
            s, z = calculate_qparams(g.amin(-1), g.amax(-1), args)
            m.weight_scale.data.copy_(s.to(m.weight_scale.dtype))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data.copy_(z.to(m.weight_zero_point.dtype))
    comp = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    comp.compress_model(model)
    tied = model.config.tie_word_embeddings
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not tied}
    cfg = _copy_meta(src, out)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg["torch_dtype"] = "bfloat16"
    cfg["quantization_config"] = {**comp.quantization_config.model_dump(exclude_none=True, mode="json"),
                                  "quant_method": "compressed-tensors"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def dense_checkpoint(src: Path, out: Path, made: dict[str, tuple[torch.Tensor, ...]]) -> Path:
    """A float32 HF folder holding ``src`` with every quantised Linear replaced by its exact dequantisation
    (the reference transformers runs)."""
    cfg = _copy_meta(src, out)
    sd = {k: v.half().float() for k, v in load_file(str(src / "model.safetensors")).items()}  # as the packed file holds them
    for module in made:
        sd[module + ".weight"] = expected(made, module)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
