"""GGUF mutations: every header field at boundary values, structural rebuilds (duplicates, alignment, offsets,
dims, types, known keys with wrong types or values: the checklist of docs/security.md), and random damage."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
B8 = [0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]
B4 = [0, 1, 2, 3, 4, 5, 6, 12, 13, 40, 2 ** 31, 2 ** 32 - 1]


@dataclass
class Layout:
    """A parsed GGUF: numeric header fields (label, offset, width) and the parts to rebuild it from."""

    version: int
    kvs: list[list[Any]] = field(default_factory=list)      # [key, value type, raw value bytes]
    tensors: list[list[Any]] = field(default_factory=list)  # [name, dims, ggml type, relative offset]
    fields: list[tuple[str, int, int]] = field(default_factory=list)
    data: bytes = b""


def parse(b: bytes) -> Layout:
    """Walk a valid GGUF (a seed) and record where every field is."""
    lay = Layout(version=struct.unpack_from("<I", b, 4)[0])
    nt, nkv = struct.unpack_from("<QQ", b, 8)
    lay.fields += [("version", 4, 4), ("n_tensors", 8, 8), ("n_kv", 16, 8)]
    p = 24

    def skip_value(p: int, vt: int, label: str, record: bool = True) -> int:
        if vt == 8:
            if record:
                lay.fields.append((label + ".strlen", p, 8))
            return p + 8 + struct.unpack_from("<Q", b, p)[0]
        if vt == 9:
            sub = struct.unpack_from("<I", b, p)[0]
            n = struct.unpack_from("<Q", b, p + 4)[0]
            lay.fields += [(label + ".arrtype", p, 4), (label + ".arrlen", p + 4, 8)]
            p += 12
            for i in range(n):
                if i == 0 and sub == 8:
                    lay.fields.append((label + ".elem0len", p, 8))
                p = skip_value(p, sub, label, False) if sub in (8, 9) else p + _SCALAR_SIZE[sub]
            return p
        return p + _SCALAR_SIZE[vt]

    for i in range(nkv):
        kl = struct.unpack_from("<Q", b, p)[0]
        key = b[p + 8:p + 8 + kl].decode()
        lay.fields.append((f"kv[{key}].keylen", p, 8))
        p += 8 + kl
        vt = struct.unpack_from("<I", b, p)[0]
        lay.fields.append((f"kv[{key}].type", p, 4))
        start = p + 4
        p = skip_value(start, vt, f"kv[{key}]")
        lay.kvs.append([key, vt, b[start:p]])
    for j in range(nt):
        nl = struct.unpack_from("<Q", b, p)[0]
        name = b[p + 8:p + 8 + nl].decode()
        lay.fields.append((f"t[{name}].namelen", p, 8))
        p += 8 + nl
        nd = struct.unpack_from("<I", b, p)[0]
        lay.fields.append((f"t[{name}].n_dims", p, 4))
        dims = list(struct.unpack_from(f"<{nd}Q", b, p + 4))
        lay.fields += [(f"t[{name}].dim{k}", p + 4 + 8 * k, 8) for k in range(nd)]
        p += 4 + 8 * nd
        t, off = struct.unpack_from("<IQ", b, p)
        lay.fields += [(f"t[{name}].type", p, 4), (f"t[{name}].offset", p + 4, 8)]
        p += 12
        lay.tensors.append([name, dims, t, off])
    align = 32
    lay.data = b[-(-p // align) * align:]
    return lay


def build(lay: Layout, align: int = 32, n_kv: int | None = None, n_t: int | None = None) -> bytes:
    """Serialise a (possibly mutated) layout; data starts at the next multiple of ``align``."""
    out = [struct.pack("<IIQQ", 0x46554747, lay.version, len(lay.tensors) if n_t is None else n_t,
                       len(lay.kvs) if n_kv is None else n_kv)]
    for key, vt, raw in lay.kvs:
        k = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
        out.append(struct.pack("<Q", len(k)) + k + struct.pack("<I", vt) + raw)
    for name, dims, t, off in lay.tensors:
        n = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
        out.append(struct.pack("<Q", len(n)) + n + struct.pack("<I", len(dims))
                   + b"".join(struct.pack("<Q", d & (2 ** 64 - 1)) for d in dims) + struct.pack("<IQ", t, off & (2 ** 64 - 1)))
    head = b"".join(out)
    a = align if 0 < align <= 4096 and not align & (align - 1) else 32  # no GiB of padding in a test case
    return head + b"\0" * (-len(head) % a) + lay.data


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv_value(vt: int, v: Any) -> bytes:
    fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
    return _str(v) if vt == 8 else struct.pack(fmt[vt], v)


def _set_kv(lay: Layout, key: str, vt: int, raw: bytes) -> None:
    for kv in lay.kvs:
        if kv[0] == key:
            kv[1], kv[2] = vt, raw
            return
    lay.kvs.append([key, vt, raw])


ARCH_VALUES = {  # known keys x hostile values (value type, value)
    "qwen2.block_count": [(4, 0), (4, 2 ** 31), (4, 1000), (8, "2"), (6, 1.5)],
    "qwen2.embedding_length": [(4, 0), (4, 31), (4, 2 ** 31), (10, 2 ** 63)],
    "qwen2.feed_forward_length": [(4, 0), (4, 65), (11, -1)],
    "qwen2.attention.head_count": [(4, 0), (4, 3), (4, 2 ** 32 - 1)],
    "qwen2.attention.head_count_kv": [(4, 0), (4, 3), (4, 64)],
    "qwen2.context_length": [(4, 0), (10, 2 ** 40), (5, -1)],
    "qwen2.rope.freq_base": [(6, float("nan")), (6, float("inf")), (6, -1.0), (6, 0.0), (12, 1e300)],
    "qwen2.attention.layer_norm_rms_epsilon": [(6, 0.0), (6, float("nan")), (6, 1.0), (6, -1e-6)],
    "qwen2.rope.scaling.type": [(8, "foo"), (8, "yarn"), (8, ""), (4, 1)],
    "qwen2.rope.scaling.factor": [(6, 0.0), (6, float("nan")), (6, -4.0), (6, float("inf"))],
    "qwen2.rope.scaling.original_context_length": [(4, 0), (10, 2 ** 63)],
    "qwen2.dual_chunk_attention.chunk_size": [(4, 0), (4, 8), (4, 2 ** 31)],
    "qwen2.expert_count": [(4, 4), (4, 2 ** 31)],
    "general.architecture": [(8, "llama"), (8, "qwen2moe"), (8, ""), (4, 7)],
    "general.alignment": [(4, 0), (4, 1), (4, 3), (4, 48), (4, 64), (4, 16), (4, 2 ** 31), (10, 32), (5, 32), (8, "32")],
    "tokenizer.ggml.model": [(8, "llama"), (8, ""), (4, 2)],
    "tokenizer.ggml.bos_token_id": [(4, 2 ** 32 - 1), (4, 320), (4, 10 ** 6), (8, "1"), (6, 1.0), (5, -1)],
    "tokenizer.ggml.eos_token_id": [(4, 2 ** 31), (4, 303), (7, 1)],
    "tokenizer.ggml.add_bos_token": [(7, 2), (4, 1), (8, "true")],
    "tokenizer.chat_template": [(8, "{{ ''.__class__.__mro__ }}"), (4, 1), (8, b"\xff\xfe{{")],
    "split.count": [(2, 0), (2, 2), (2, 65535), (8, "2")],
    "split.no": [(2, 1), (2, 65535)],
}


def structural(b: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One checklist mutation of a valid GGUF; returns (bytes, label)."""
    lay = parse(b)
    kind = rng.choice(["field", "field", "field", "dup_kv", "dup_tensor", "key_value", "key_value", "offset",
                       "dims", "n_dims", "ttype", "nested", "bad_utf8", "long_name", "empty_name", "drop_kv",
                       "drop_tensor", "data_cut", "elem_type", "str_array_len"])
    if kind == "field":
        label, off, width = lay.fields[rng.integers(len(lay.fields))]
        old = int.from_bytes(b[off:off + width], "little")
        cands = (B8 if width == 8 else B4) + [old + 1, max(old - 1, 0), old * 2, len(b) - off, len(b) - off + 1,
                                              int(rng.integers(0, 2 ** 31))]
        v = cands[rng.integers(len(cands))] & ((1 << (8 * width)) - 1)
        return b[:off] + v.to_bytes(width, "little") + b[off + width:], f"field {label.split('.')[-1]}={v}"
    if kind == "dup_kv":
        lay.kvs.append(list(lay.kvs[rng.integers(len(lay.kvs))]))
        return build(lay), "duplicate key"
    if kind == "dup_tensor" and len(lay.tensors) > 1:
        i, j = rng.choice(len(lay.tensors), 2, replace=False)
        lay.tensors[j][0] = lay.tensors[i][0]
        return build(lay), "duplicate tensor name"
    if kind == "key_value":
        key = list(ARCH_VALUES)[rng.integers(len(ARCH_VALUES))]
        vt, v = ARCH_VALUES[key][rng.integers(len(ARCH_VALUES[key]))]
        _set_kv(lay, key, vt, _kv_value(vt, v))
        align = v if key == "general.alignment" and vt == 4 else 32
        return build(lay, align), f"{key}={v!r}"
    if kind == "offset" and len(lay.tensors) > 1:
        j = int(rng.integers(1, len(lay.tensors)))
        how = rng.choice(["swap", "overlap", "unaligned", "past_end", "huge"])
        t = lay.tensors
        if how == "swap":
            t[j][3], t[j - 1][3] = t[j - 1][3], t[j][3]
        elif how == "overlap":
            t[j][3] = t[j - 1][3]
        elif how == "unaligned":
            t[j][3] += int(rng.integers(1, 32))
        elif how == "past_end":
            t[j][3] = len(lay.data) + 32
        else:
            t[j][3] = 2 ** 64 - 32
        return build(lay), f"tensor offset {how}"
    if kind == "dims":
        t = lay.tensors[rng.integers(len(lay.tensors))]
        how = rng.choice(["zero", "2^32", "2^63", "overflow", "transpose", "grow", "minus1"])
        d = t[1]
        if how == "zero":
            d[0] = 0
        elif how == "2^32":
            d[-1] = 2 ** 32
        elif how == "2^63":
            d[0] = 2 ** 63
        elif how == "overflow":
            t[1] = [2 ** 32, 2 ** 32] + d[2:] if len(d) >= 2 else [2 ** 62, 2 ** 4]
        elif how == "transpose":
            t[1] = d[::-1]
        elif how == "grow":
            d[-1] += 1
        else:
            d[0] = 2 ** 64 - 1
        return build(lay), f"dims {how}"
    if kind == "n_dims":
        t = lay.tensors[rng.integers(len(lay.tensors))]
        t[1] = [] if rng.random() < 0.5 else t[1] + [1, 1, 1, 1]
        return build(lay), f"n_dims {len(t[1])}"
    if kind == "ttype":
        t = lay.tensors[rng.integers(len(lay.tensors))]
        t[2] = int(rng.choice([4, 5, 31, 36, 39, 40, 99, 2 ** 31, 0, 1, 2, 8, 12, 14, 30]))
        return build(lay), f"tensor type {t[2]}"
    if kind == "nested":
        lay.kvs.append(["x.nested", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 1) + b"\1\0\0\0"])
        return build(lay), "nested array"
    if kind == "elem_type":
        lay.kvs.append(["x.arr", 9, struct.pack("<IQ", int(rng.choice([13, 99, 2 ** 31])), 1) + b"\0" * 8])
        return build(lay), "array element type unknown"
    if kind == "str_array_len":
        lay.kvs.append(["x.strs", 9, struct.pack("<IQ", 8, 2 ** 61) + _str("a")])
        return build(lay), "string array length wraps"
    if kind == "bad_utf8":
        if rng.random() < 0.5:
            lay.kvs.append([b"\xff\xfe.key", 4, b"\0\0\0\0"])
        else:
            lay.tensors[rng.integers(len(lay.tensors))][0] = b"\xc3\x28bad"
        return build(lay), "invalid UTF-8 name"
    if kind == "long_name":
        lay.tensors[rng.integers(len(lay.tensors))][0] = "blk." + "x" * 100
        return build(lay), "tensor name too long"
    if kind == "empty_name":
        if rng.random() < 0.5:
            lay.kvs.append(["", 4, b"\0\0\0\0"])
        else:
            lay.tensors[rng.integers(len(lay.tensors))][0] = ""
        return build(lay), "empty name"
    if kind == "drop_kv":
        del lay.kvs[rng.integers(len(lay.kvs))]
        return build(lay), "missing key"
    if kind == "drop_tensor":
        del lay.tensors[rng.integers(len(lay.tensors))]
        return build(lay), "missing tensor"
    cut = int(rng.integers(0, max(1, len(lay.data))))
    lay.data = lay.data[:cut]
    return build(lay), "data truncated"
