"""Quantised HF checkpoints read as canonical models: GPTQ (v1 / v2, act-order), AutoAWQ GEMM and
compressed-tensors ``pack-quantized``.

All three store, for each quantised Linear ``L`` [out, in], integer codes ``q``, per-group scales ``s`` and
integer zero points ``z``, and mean ``w[o, i] = s[o, g] * (q[o, i] - z[o, g])`` with ``g`` the column's group
(``i // group_size``, or ``g_idx[i]`` under act-order). They differ only in where the integers sit (table
``LAYOUTS``): which axis the codes are packed along, in which nibble order, and whether the stored zero is
``z`` or ``z - 1``. Packing is a little-endian bit stream of 32-bit words (value ``k`` at bits
``k*bits .. k*bits+bits-1``), which is also how formats/int4/layout.py packs a row, so unpacking reuses it.

``open_quantised_hf`` turns every quantised Linear into a ``CodeMatrix``: a lazy float32 tensor
(dequantised exactly, in float32), the decoders' native int codes, and the stored form that
formats/int4/to_gguf.py maps onto GGML blocks without requantising (symmetric groups -> Q4_0, asymmetric -> Q4_1).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from formats.container.safetensors_io import SafetensorsFile
from formats.errors import QConvertError
from formats.files.mapped import release
from formats.int4.layout import pack, row_bytes, unpack
from formats.model.stored import CodeMatrix, PackedMatrix
from formats.model.tensor import LazyTensor


@dataclass(frozen=True)
class Layout:
    """Where one checkpoint format keeps a quantised Linear's integers (suffixes after ``L.``)."""

    method: str                # quantization_config.quant_method
    codes: str                 # packed codes
    codes_along: str           # "in": [in*b/32, out] (GPTQ); "out": [in, out*b/32] (AWQ); "row": [out, in*b/32]
    scales: str
    scales_out_first: bool     # scales [out, G] (compressed-tensors) instead of [G, out]
    zeros: str | None          # packed zero points (None: symmetric, z = 2^(b-1))
    zeros_out_first: bool      # zeros [ceil(out*b/32), G] (compressed-tensors) instead of [G, out*b/32]
    g_idx: str | None          # act-order group of each input column
    nibble_order: tuple[int, ...] | None = None  # AWQ: nibble k of a word holds column order[k] of its 8
    zero_minus_one: bool = False                 # GPTQ v1 stores z - 1


LAYOUTS = {
    "gptq": Layout("gptq", "qweight", "in", "scales", False, "qzeros", False, "g_idx", zero_minus_one=True),
    "gptq_v2": Layout("gptq", "qweight", "in", "scales", False, "qzeros", False, "g_idx"),
    "awq": Layout("awq", "qweight", "out", "scales", False, "qzeros", False, None, nibble_order=(0, 2, 4, 6, 1, 3, 5, 7)),
    "compressed-tensors": Layout("compressed-tensors", "weight_packed", "row", "weight_scale", True,
                                 "weight_zero_point", True, "weight_g_idx"),
}
METHODS = ("gptq", "awq", "compressed-tensors")


@dataclass(frozen=True)
class Scheme:
    """One Linear's quantisation as its config declares it."""

    bits: int
    group_size: int  # -1: one group per row
    sym: bool


def is_quantised_config(raw_cfg: dict[str, Any]) -> bool:
    """True when config.json declares one of the quantised layouts read here."""
    q = raw_cfg.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") in METHODS


def _int(v: Any, what: str, where: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise QConvertError(f"{where}: quantization_config {what} is {v!r}; expected an integer {lo}..{hi}")
    return v


def _match(pattern: str, name: str, where: str) -> bool:
    if len(pattern) > 1000:
        raise QConvertError(f"{where}: a module pattern of {len(pattern)} characters is not a real config")
    try:
        return re.match(pattern, name) is not None
    except re.error as e:
        raise QConvertError(f"{where}: module pattern {pattern[:80]!r} is not a regular expression ({e})") from None


def layout_and_schemes(q: dict[str, Any], where: str) -> tuple[Layout, Callable[[str], Scheme | None]]:
    """The layout of ``quantization_config`` ``q`` and a function module name -> its Scheme (None: the
    config leaves that module unquantised)."""
    method = q.get("quant_method")
    if method == "gptq":
        fmt = q.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise QConvertError(f"{where}: GPTQ checkpoint_format {str(fmt)[:40]!r} is not supported (gptq, gptq_v2); "
                                "re-save it with GPTQModel in one of those")
        base = Scheme(_int(q.get("bits"), "bits", where, 2, 8), _int(q.get("group_size", 128), "group_size", where,
                      -1, 1 << 16), bool(q.get("sym", True)))
        dynamic = q.get("dynamic") or {}
        if not isinstance(dynamic, dict):
            raise QConvertError(f"{where}: quantization_config.dynamic must be an object of pattern -> overrides")

        def gptq_scheme(module: str) -> Scheme | None:
            for key, over in dynamic.items():
                neg, pat = key.startswith("-:"), key[2:] if key[:2] in ("-:", "+:") else key
                if _match(pat, module, where):
                    if neg:
                        return None
                    over = over if isinstance(over, dict) else {}
                    return Scheme(_int(over.get("bits", base.bits), "dynamic bits", where, 2, 8),
                                  _int(over.get("group_size", base.group_size), "dynamic group_size", where, -1, 1 << 16),
                                  bool(over.get("sym", base.sym)))
            return base
        return LAYOUTS[fmt], gptq_scheme
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise QConvertError(f"{where}: AWQ version {version[:20]!r} is not supported (only the GEMM layout); "
                                "re-save the model with AutoAWQ's GEMM version")
        if q.get("zero_point", True) is not True:
            raise QConvertError(f"{where}: AWQ without zero points is not supported; only zero_point: true")
        s = Scheme(_int(q.get("bits", q.get("w_bit")), "bits", where, 4, 4),
                   _int(q.get("group_size", q.get("q_group_size")), "group_size", where, 1, 1 << 16), False)
        skip = q.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(k, str) for k in skip):
            raise QConvertError(f"{where}: quantization_config.modules_to_not_convert must be a list of names")
        return LAYOUTS["awq"], lambda module: None if any(k in module for k in skip) else s  # AutoAWQ: substrings
    fmt = q.get("format")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QConvertError(f"{where}: compressed-tensors config has no config_groups")
    parsed = []
    for gname, g in groups.items():
        if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
            raise QConvertError(f"{where}: config_groups.{gname} has no weights entry")
        gfmt = g.get("format") or fmt
        if gfmt != "pack-quantized":
            raise QConvertError(f"{where}: compressed-tensors format {str(gfmt)[:40]!r} is not supported here; "
                                "qconvert reads pack-quantized (integer weights packed into int32)")
        w = g["weights"]
        if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
            raise QConvertError(f"{where}: config_groups.{gname}: only integer weights with the group or channel "
                                f"strategy are supported (got type {w.get('type')!r}, strategy {w.get('strategy')!r})")
        if g.get("input_activations"):
            raise QConvertError(f"{where}: config_groups.{gname} quantises activations too; qconvert reads "
                                "weight-only schemes")
        gs = -1 if w["strategy"] == "channel" else _int(w.get("group_size"), "group_size", where, 1, 1 << 16)
        targets = g.get("targets") or []
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise QConvertError(f"{where}: config_groups.{gname}.targets must be a list of names")
        parsed.append((targets, Scheme(_int(w.get("num_bits"), "num_bits", where, 2, 8), gs,
                                       bool(w.get("symmetric", True)))))
    ignore = q.get("ignore") or []

    def ct_scheme(module: str) -> Scheme | None:
        def hit(t: str) -> bool:
            return _match(t[3:], module, where) if t.startswith("re:") else t == module
        if any(isinstance(t, str) and hit(t) for t in ignore):
            return None
        for rank in (lambda t: not t.startswith("re:") and t != "Linear", lambda t: t.startswith("re:"),
                     lambda t: t == "Linear"):
            for targets, s in parsed:
                if any(rank(t) and (t == "Linear" or hit(t)) for t in targets):
                    return s
        return None
    return LAYOUTS["compressed-tensors"], ct_scheme


def _bitstream(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Rows of little-endian int32 words -> the first ``count`` b-bit values of each row (uint8)."""
    b = np.ascontiguousarray(words).view(np.uint8).reshape(words.shape[0], -1)
    return unpack(np.ascontiguousarray(b[:, :row_bytes(count, bits)]), bits, count)


def _float_view(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return a.view(np.float16 if dtype == "F16" else np.float32).astype(np.float32)


class QuantLinear(CodeMatrix):
    """One quantised Linear of a GPTQ / AWQ / compressed-tensors checkpoint, read from mapped arrays.

    ``parts`` maps a layout role (codes, scales, zeros, g_idx) to (array, safetensors dtype); the arrays are
    read-only views of the mapped file, so nothing is read until a row range is asked for."""

    ROUNDING = "f16 block offsets -z*s (or bf16 / f32 scales) rounded"

    def __init__(self, name: str, rows: int, cols: int, scheme: Scheme, layout: Layout,
                 parts: dict[str, tuple[np.ndarray, str]], where: str):
        group = cols if scheme.group_size == -1 else scheme.group_size
        super().__init__(name, rows, cols, scheme.bits, group)
        self.layout, self.parts, self.where = layout, parts, where
        self.n_groups = -(-cols // group)
        self._zeros: np.ndarray | None = None
        self._gcol: np.ndarray | None = None
        self._checked_gidx = False

    # ---- integers ----
    def codes(self, r0: int, r1: int) -> np.ndarray:
        """Codes of rows [r0, r1) as uint8 [n, cols], in input-column order."""
        w, _ = self.parts["codes"]
        b, lay = self.bits, self.layout
        if lay.codes_along == "row":
            return _bitstream(w[r0:r1], b, self.cols)
        if lay.codes_along == "in":
            return _bitstream(np.ascontiguousarray(w[:, r0:r1].T), b, self.cols)
        return self._out_packed(w, r0, r1).T.copy()

    def _out_packed(self, w: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """Values packed along the output axis (AWQ: [k, out/8] words) -> [k, r1 - r0] for outputs r0..r1."""
        per = 32 // self.bits
        w0, w1 = r0 // per, -(-r1 // per)
        shifts = np.arange(per, dtype=np.uint32) * np.uint32(self.bits)
        v = (np.ascontiguousarray(w[:, w0:w1]).view(np.uint32)[:, :, None] >> shifts) & np.uint32((1 << self.bits) - 1)
        if self.layout.nibble_order is not None:
            v = v[:, :, np.argsort(self.layout.nibble_order)]
        v = v.reshape(w.shape[0], -1).astype(np.uint8)
        return v[:, r0 - w0 * per: r1 - w0 * per]

    def zeros(self) -> np.ndarray:
        """Zero points z [rows, groups] (int16); symmetric layouts without zeros give 2^(bits-1)."""
        if self._zeros is None:
            lay, b = self.layout, self.bits
            if "zeros" not in self.parts:
                z = np.full((self.rows, self.n_groups), 1 << (b - 1), np.int16)
            elif lay.zeros_out_first:
                zw, _ = self.parts["zeros"]
                z = _bitstream(np.ascontiguousarray(zw.T), b, self.rows).T.astype(np.int16)
            elif lay.nibble_order is not None:
                zw, _ = self.parts["zeros"]
                z = self._out_packed(zw, 0, self.rows).T.astype(np.int16)
            else:
                zw, _ = self.parts["zeros"]
                z = _bitstream(zw, b, self.rows).T.astype(np.int16)
            if lay.zero_minus_one:
                z += 1
            self._zeros = np.ascontiguousarray(z)
        return self._zeros

    def scales(self, r0: int, r1: int) -> np.ndarray:
        """Scales of rows [r0, r1) as float32 [n, groups] (exact: stored as F16 / BF16 / F32)."""
        a, dt = self.parts["scales"]
        a = a[r0:r1] if self.layout.scales_out_first else np.ascontiguousarray(a[:, r0:r1].T)
        return _float_view(np.ascontiguousarray(a), dt)

    def column_groups(self) -> np.ndarray | None:
        """Group of each input column when act-order permutes them (g_idx), None for ``i // group_size``."""
        if not self._checked_gidx:
            self._checked_gidx = True
            if "g_idx" in self.parts:
                g = np.asarray(self.parts["g_idx"][0]).astype(np.int64)
                if g.min(initial=0) < 0 or g.max(initial=0) >= self.n_groups:
                    raise QConvertError(f"{self.where}: {self.name} g_idx has groups outside 0..{self.n_groups - 1}; "
                                        "the checkpoint is damaged")
                if not np.array_equal(g, np.arange(self.cols) // self.group_size):
                    self._gcol = g
        return self._gcol

    # ---- values ----
    def dequant(self, r0: int, r1: int) -> np.ndarray:
        """float32 rows [r0, r1): s * (q - z), each product exact in float32."""
        q, s, z = self.codes(r0, r1), self.scales(r0, r1), self.zeros()[r0:r1]
        g = self.column_groups()
        if g is None:
            g = np.minimum(np.arange(self.cols) // self.group_size, self.n_groups - 1)
        return (q.astype(np.float32) - z[:, g]) * s[:, g]

    @property
    def sym(self) -> bool:
        """True when every zero point is 2^(bits-1) (the GGML Q4_0 / int4 symmetric grid)."""
        return bool((self.zeros() == (1 << (self.bits - 1))).all())

    def _f16(self, v: np.ndarray) -> tuple[np.ndarray, bool]:
        with np.errstate(over="ignore"):
            h = v.astype(np.float16)
        return h.view(np.uint16), bool(np.array_equal(h.astype(np.float32), v))

    @property
    def rounded(self) -> bool:
        """True when mapping to f16 block scales / offsets rounds something (bf16 / f32 scales, or offsets
        -z*s that f16 cannot hold exactly)."""
        s = self.scales(0, self.rows)
        exact = self._f16(s)[1] and (self.sym or self._f16(-self.zeros().astype(np.float32) * s)[1])
        return not exact

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Rows as formats/int4/layout.py stores them: packed codes, f16 scales, f16 offsets ``-z * s`` (None when
        symmetric), for the exact GGML mapping; only valid without act-order."""
        if self.column_groups() is not None:
            raise QConvertError(f"{self.name}: act-order columns cannot be mapped onto GGML blocks")
        q, s, z = self.codes(start, stop), self.scales(start, stop), self.zeros()[start:stop]
        if self.sym:
            return pack(q, self.bits), self._f16(s)[0], None
        return pack(q, self.bits), self._f16(s)[0], self._f16(-z.astype(np.float32) * s)[0]

    def map_reason(self) -> str | None:
        """Why these codes cannot be repacked into GGML blocks at all (None: they can)."""
        if self.column_groups() is not None:
            return "act-order (g_idx) groups are not runs of columns"
        return None

    def packed(self) -> Any:
        """The decoders' native form (``_native``), built from the mapped file, whose pages are then dropped
        from the process again (the built arrays are what the decoder keeps)."""

        try:
            return self._native()
        finally:
            release(*(a for a, _ in self.parts.values()))

    def _native(self) -> Any:
        """The decoders' native form: b-bit symmetric codes when every zero is 2^(b-1), else b-bit codes with
        their integer zeros (int4 layout v3's form, exact: s * (q - z)), or, for a zero of 2^b (GPTQ v1 can store
        it), 8-bit symmetric codes q - z + 128; f16 scales when they are exact in f16, float32 otherwise.
        Act-order columns are stored sorted by group (then each group is a run) and the product permutes x."""

        s = self.scales(0, self.rows)
        s16, exact = self._f16(s)
        z = self.zeros()
        g, perm = self.column_groups(), None
        if g is not None:  # act-order: sorted by group, the columns form runs of group_size (GPTQ's own order)
            perm = np.argsort(g, kind="stable")
            sizes = np.bincount(g, minlength=self.n_groups)
            if not (sizes[:-1] == self.group_size).all() or sizes[-1] > self.group_size:
                exact = False
        if exact:
            q = self.codes(0, self.rows)
            q = q if perm is None else np.ascontiguousarray(q[:, perm])
            if self.sym:
                pm = PackedMatrix.int_codes(pack(q, self.bits), s16, None, None, self.bits, self.group_size, self.cols)
                return pm if perm is None else pm.permuted(perm)
            if z.min(initial=0) >= 0 and z.max(initial=0) < 1 << self.bits:  # b-bit codes with their zeros
                pm = PackedMatrix.int_codes(pack(q, self.bits), s16, pack(z.astype(np.uint8), self.bits), None,
                                            self.bits, self.group_size, self.cols, zeros=True)
                return pm if perm is None else pm.permuted(perm)
            zc = np.repeat(z, self.group_size, axis=1)[:, :self.cols]
            c8 = q.astype(np.int16) - zc + 128
            if c8.min(initial=0) >= 0 and c8.max(initial=0) <= 255:
                pm = PackedMatrix.int_codes(c8.astype(np.uint8), s16, None, None, 8, self.group_size, self.cols)
                return pm if perm is None else pm.permuted(perm)
        w = self.dequant(0, self.rows)
        return PackedMatrix.ggml("F32", w.view(np.uint8).reshape(self.rows, -1), self.cols)


_ROLES = ("codes", "scales", "zeros", "g_idx", "shape")
_INT_TYPES = {"I32": np.int32, "I64": np.int64}
_FLOAT_TYPES = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}


def _suffixes(lay: Layout) -> dict[str, str]:
    """Stored suffix -> role for one layout."""
    out = {lay.codes: "codes", lay.scales: "scales"}
    if lay.zeros:
        out[lay.zeros] = "zeros"
    if lay.g_idx:
        out[lay.g_idx] = "g_idx"
    if lay.method == "compressed-tensors":
        out["weight_shape"] = "shape"
    return out


def split_part(name: str, lay: Layout) -> tuple[str, str] | None:
    """``model.layers.0.mlp.up_proj.qweight`` -> (module, role), or None when ``name`` is not a quantised part."""
    module, _, suffix = name.rpartition(".")
    role = _suffixes(lay).get(suffix)
    return (module, role) if role and module else None


def _array(f: SafetensorsFile, name: str) -> tuple[np.ndarray, str]:
    """Tensor ``name`` of ``f`` as a read-only array over the mapped file, with its safetensors dtype."""
    meta = f.header[name]
    dt = meta["dtype"]
    np_dt = _INT_TYPES.get(dt) or _FLOAT_TYPES.get(dt)
    if np_dt is None:
        raise QConvertError(f"{f.path}: {name} is {dt}; quantised parts are I32 / I64 integers or F16 / BF16 / F32 scales")
    shape = tuple(int(x) for x in meta["shape"])
    begin, end = meta["data_offsets"]
    raw = f.mapped().view(f.data_start + begin, end - begin)
    return raw.view(np_dt).reshape(shape), dt


def quant_linear(module: str, rows: int, cols: int, scheme: Scheme, lay: Layout,
                 found: dict[str, tuple[SafetensorsFile, str]], where: str) -> QuantLinear:
    """Check one Linear's stored parts against its shape and scheme and wrap them as a QuantLinear."""
    b, gs = scheme.bits, (cols if scheme.group_size == -1 else scheme.group_size)
    ng = -(-cols // gs)
    words = lambda n: -(-n * b // 32)  # noqa: E731 - int32 words holding n b-bit values
    if lay.method == "awq" and rows % (32 // b):
        raise QConvertError(f"{where}: {module} has {rows} outputs, not a multiple of {32 // b} as AWQ packs them")
    want = {
        "codes": {"in": (words(cols), rows), "out": (cols, words(rows)), "row": (rows, words(cols))}[lay.codes_along],
        "scales": (rows, ng) if lay.scales_out_first else (ng, rows),
        "zeros": (words(rows), ng) if lay.zeros_out_first else (ng, words(rows)),
        "g_idx": (cols,), "shape": (2,),
    }
    kinds = {"codes": _INT_TYPES, "zeros": _INT_TYPES, "g_idx": _INT_TYPES, "shape": _INT_TYPES, "scales": _FLOAT_TYPES}
    need = {"codes", "scales"} | ({"zeros"} if lay.zeros and (lay.method != "compressed-tensors" or not scheme.sym)
                                  else set()) | ({"shape"} if lay.method == "compressed-tensors" else set())
    missing = sorted(need - set(found))
    if missing:
        sfx = {v: k for k, v in _suffixes(lay).items()}
        raise QConvertError(f"{where}: {module}.{sfx[missing[0]]} is missing; the {lay.method} checkpoint is incomplete")
    parts = {}
    for role, (f, tname) in found.items():
        arr, dt = _array(f, tname)
        if dt not in kinds[role] or arr.shape != want[role]:
            raise QConvertError(f"{f.path}: {tname} is {dt} {list(arr.shape)}; a {rows}x{cols} Linear at {b} bits, "
                                f"group {scheme.group_size}, needs {'/'.join(kinds[role])} {list(want[role])} "
                                "(is config.json's quantization_config from this checkpoint?)")
        parts[role] = (arr, dt)
    if "shape" in parts and [int(x) for x in parts["shape"][0]] != [rows, cols]:
        raise QConvertError(f"{where}: {module}.weight_shape is {[int(x) for x in parts['shape'][0]]}, the config "
                            f"implies {[rows, cols]}")
    return QuantLinear(module + ".weight", rows, cols, scheme, lay, parts, where)


def describe(q: dict[str, Any]) -> str:
    """A short label of a quantization_config, e.g. ``gptq (gptq) 4-bit g128 sym``."""
    m = q.get("quant_method")
    if m == "compressed-tensors":
        ws = [g.get("weights", {}) for g in q.get("config_groups", {}).values() if isinstance(g, dict)]
        return "compressed-tensors pack-quantized " + ", ".join(
            f"{w.get('num_bits')}-bit {'g' + str(w.get('group_size')) if w.get('strategy') == 'group' else 'per-row'}"
            f" {'sym' if w.get('symmetric', True) else 'asym'}" for w in ws)
    if m == "awq":
        return f"awq gemm {q.get('bits', q.get('w_bit'))}-bit g{q.get('group_size', q.get('q_group_size'))}"
    return (f"gptq ({q.get('checkpoint_format', 'gptq')}) {q.get('bits')}-bit g{q.get('group_size')} "
            f"{'sym' if q.get('sym', True) else 'asym'}" + (" act-order" if q.get("desc_act") else "")
            + (" + dynamic" if q.get("dynamic") else ""))


def lazy_tensor(qm: QuantLinear) -> Any:
    """The canonical float32 LazyTensor of a QuantLinear (dequantised per row range; native codes for the
    decoders)."""

    stored = sum(a.nbytes for a, _ in qm.parts.values())
    label = f"{qm.layout.method} int{qm.bits} g{qm.group_size}" + (" act-order" if "g_idx" in qm.parts and
                                                                    qm.column_groups() is not None else "")
    return LazyTensor(qm.name, (qm.rows, qm.cols), "F32",
                      lambda s, e: qm.dequant(s, e).reshape(-1).view(np.uint8), quant=label,
                      stored_nbytes=stored, packer=qm.packed)
