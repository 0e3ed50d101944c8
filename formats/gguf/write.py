"""GGUF writing: a Source streamed into a GGUF file (or llama.cpp's split files) with per-tensor types.

The header, metadata and tensor table go through the ``gguf`` package's GGUFWriter; then each tensor's bytes
are streamed chunk by chunk, so memory stays at one chunk. Qwen2-MoE experts are stacked as ``ffn_*_exps``
(expert outermost); tied models get no ``output.weight``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from formats.errors import QConvertError
from formats.files.atomic import atomic_files
from formats.files.progress import bar
from formats.ggml.dtypes import row_nbytes
from formats.gguf.split import part_path, plan_parts, split_kv
from formats.model.config import ModelConfig
from formats.model.names import KEEP_F32_SUFFIXES, canonical_shape, gguf_layout
from formats.model.source import Source
from formats.model.tensor import stream_converted

if TYPE_CHECKING:
    from formats.gguf.imatrix import Imatrix


OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "auto")


FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}  # llama_ftype


QUANT_VERSION = 2


def tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str) -> str:
    """GGML type of one output tensor: 1-D, norms and routers stay F32; rows that don't fit the block fall back."""
    if len(shape) == 1 or gguf_name.endswith(KEEP_F32_SUFFIXES) or shape[0] == 1:
        return "F32"
    t = outtype.upper()
    if t.startswith("Q") and shape[-1] % 32:
        return "F16"  # llama.cpp's converter does the same for rows that don't fill a block
    return t


def resolve_outtype(src: Source, outtype: str) -> str:
    """``auto`` -> bf16 for a bf16 source, else f16 (as llama.cpp's converter decides)."""
    if outtype not in OUTTYPES:
        raise QConvertError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if outtype != "auto":
        return outtype
    return "bf16" if src.tensors["model.embed_tokens.weight"].stype == "BF16" else "f16"


def size_label(cfg: ModelConfig) -> str:
    """'0.5B', '7.6B', '8x1.2B', ... from the parameter count (as general.size_label)."""
    from gguf.utility import size_label as _label
    h = cfg.hidden_size
    attn = h * cfg.head_dim * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
    if cfg.is_moe:
        expert = 3 * h * cfg.moe_intermediate_size
        shared = cfg.num_hidden_layers * (attn + 3 * h * cfg.shared_expert_intermediate_size) + cfg.vocab_size * h
        return _label(shared + expert * cfg.num_experts * cfg.num_hidden_layers, shared,
                      expert * cfg.num_hidden_layers, cfg.num_experts)
    total = cfg.num_hidden_layers * (attn + 3 * h * cfg.intermediate_size) + cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return _label(total, total, 0, 0)


def write_gguf(src: Source, out: Path, outtype: str = "auto", force: bool = False, progress: bool = True,
               name: str | None = None, types: dict[str, str] | None = None, file_type: int | None = None,
               raw_chunks: Callable[[str, str, ThreadPoolExecutor], Iterable[np.ndarray] | None] | None = None,
               split_max_size: int | None = None, split_max_tensors: int | None = None,
               files: list[Path] | None = None, imatrix: "Imatrix | None" = None) -> dict[str, str]:
    """Write ``src`` as a GGUF at ``out``. Returns {gguf tensor name: GGML type}.

    ``types`` (GGUF name -> GGML type) overrides the per-tensor choice made from ``outtype``, as the
    K-quant mixtures do; ``file_type`` is then the llama_ftype to record. ``raw_chunks(canonical name,
    GGML type, pool)`` may return that tensor's bytes already encoded (e.g. int4 codes repacked into
    GGML blocks, formats/int4/to_gguf.py); None converts it from the source as usual. ``split_max_size`` (bytes of
    tensor data) / ``split_max_tensors`` write llama.cpp's split files (formats/gguf/split.py) when more than one
    part results; all parts appear together or not at all. ``files``, if given, receives the paths written.
    ``imatrix`` (formats/gguf/imatrix.py): importance weights for the encoders, per tensor as llama-quantize uses
    them (a tensor without an entry is encoded without); the file's datasets and chunk count are recorded
    under llama-quantize's ``quantize.imatrix.*`` keys.
    """
    import gguf

    cfg = src.config
    ot = resolve_outtype(src, outtype) if types is None else "f16"
    layout = gguf_layout(cfg)
    plan = []
    for gname, members in layout:
        shape = canonical_shape(members[0], cfg)
        full = (len(members), *shape) if len(members) > 1 else shape
        plan.append((gname, members, full, types[gname] if types else tensor_type(gname, shape, ot)))
    kv: dict[str, Any] = {
        "general.type": "model", "general.name": name or cfg.name or Path(src.path).name,
        "general.size_label": size_label(cfg),
        "general.file_type": file_type if file_type is not None else FILE_TYPE[ot.upper()],
        "general.quantization_version": QUANT_VERSION,
    }
    kv.update(cfg.to_gguf_kv())
    kv.update(src.tokenizer.to_gguf_kv(cfg.vocab_size))
    if imatrix is not None:
        kv.update(imatrix_kv(imatrix))
    sizes = [int(np.prod(shape[:-1])) * row_nbytes(t, shape[-1]) for _, _, shape, t in plan]
    parts = plan_parts(sizes, split_max_size, split_max_tensors)
    outs = [Path(out)] if len(parts) == 1 else [part_path(out, k, len(parts)) for k in range(len(parts))]
    with atomic_files(outs, force) as tmps, ThreadPoolExecutor(2) as pool, \
            bar(sum(sizes), f"writing {Path(out).name}", progress) as pb:
        for k, (tmp, idx) in enumerate(zip(tmps, parts)):
            w = _Writer(str(tmp), cfg.arch)
            if k:  # later parts hold only the split keys, as llama-gguf-split writes them
                w.kv_data[0].clear()
            for key, v in (kv.items() if k == 0 else ()):
                _add_kv(w, key, v)
            if len(parts) > 1:
                for key, (vt, v) in split_kv(k, len(parts), len(plan)).items():
                    (w.add_uint16 if vt == "u16" else w.add_int32)(key, v)
            for i in idx:
                gname, _, shape, t = plan[i]
                byte_shape = (*shape[:-1], row_nbytes(t, shape[-1]))
                w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), sizes[i],
                                  raw_dtype=gguf.GGMLQuantizationType[t])
            w.write_header_to_file(Path(tmp))
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            fout = w.fout[0]
            for i in idx:
                gname, members, shape, t = plan[i]
                w.write_padding(fout, fout.tell())
                n = 0
                qw = imatrix.weights(gname, shape[-1], len(members)) if imatrix is not None else None
                for j, m in enumerate(members):
                    chunks = raw_chunks(m, t, pool) if raw_chunks else None
                    if chunks is None:
                        # a tensor the imatrix has no entry for: coded as llama-quantize --imatrix codes it
                        chunks = stream_converted(src.tensors[m], t, pool, None if qw is None else qw[j],
                                                  reference=imatrix is not None and qw is None)
                    for chunk in chunks:
                        fout.write(memoryview(chunk).cast("B"))
                        n += chunk.nbytes
                        pb.update(chunk.nbytes)
                if n != sizes[i]:
                    raise QConvertError(f"{gname}: wrote {n} bytes of {t} data, expected {sizes[i]}")
                w.write_padding(fout, n)
            w.close()
    if files is not None:
        files.extend(outs)
    return {g: t for g, _, _, t in plan}


def imatrix_kv(im: "Imatrix") -> dict[str, Any]:
    """llama-quantize's record of the importance matrix a file was quantised with."""
    kv: dict[str, Any] = {"quantize.imatrix.entries_count": len(im.entries),
                          "quantize.imatrix.chunks_count": int(im.chunk_count)}
    if im.datasets:
        kv["quantize.imatrix.dataset"] = im.datasets[0]
    return kv


def _writer_class() -> type:
    import struct

    import gguf
    from gguf import GGUFValueType as VT

    class Writer(gguf.GGUFWriter):
        """GGUFWriter with a fast path for long homogeneous str / int arrays (vocab, merges, token types).

        Produces the same bytes as the base class, which packs item by item (seconds for 150k tokens).
        """

        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype == VT.ARRAY and isinstance(val, list) and len(val) > 64 and sub_type is None:
                head = struct.pack("<I", VT.ARRAY) if add_vtype else b""
                if all(type(x) is str for x in val):
                    enc = [x.encode("utf-8") for x in val]
                    body = b"".join(struct.pack("<Q", len(e)) + e for e in enc)
                    return head + struct.pack("<IQ", VT.STRING, len(val)) + body
                if all(type(x) is int for x in val):
                    return head + struct.pack("<IQ", VT.INT32, len(val)) + np.asarray(val, dtype="<i4").tobytes()
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def _Writer(path: str, arch: str) -> Any:
    return _writer_class()(path, arch)


def _add_kv(w: Any, key: str, v: Any) -> None:
    if isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, int):
        w.add_uint32(key, v)
    elif isinstance(v, float):
        w.add_float32(key, v)
    elif isinstance(v, str):
        w.add_string(key, v)
    elif isinstance(v, list):
        w.add_array(key, v)
    else:  # pragma: no cover - programming error
        raise TypeError(f"metadata {key}: unsupported value {type(v).__name__}")
