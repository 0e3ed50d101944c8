"""qconvert/decoder/products.py over formats/model/stored.py PackedMatrix: every storage type dequantises
exactly and multiplies from the stored bytes.

Every C path is checked on this machine: the kernels are forced to portable C, AVX2 and AVX-512 in turn (a
level the CPU lacks falls back to the best it has), and the numpy fallback runs with the library hidden.
"""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQ
from gguf import quants

from formats.ggml import codec
from formats.int4 import layout as int4
from formats.model.stored import PackedMatrix
from qconvert.decoder import native, products

GGML = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
ISAS = [0, 1, 2] if native.available() else [-1]
ROWS, COLS = 131, 256 * 3  # odd rows; 131 x 768 is enough work for the two-thread split


@pytest.fixture(params=ISAS, ids=lambda i: {-1: "numpy", 0: "c", 1: "avx2", 2: "avx512"}[i])
def isa(request):
    """Run the test with the C kernels forced to one instruction set (restored afterwards)."""
    native.set_isa(request.param)
    yield request.param
    native.set_isa(-1)


def _weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    w[1] *= 40.0  # a row of large values
    return w


def _ggml_bytes(t: str, w: np.ndarray) -> np.ndarray:
    """W stored as type t: the gguf package's encoder where it has one, else our C encoders."""
    try:
        raw = quants.quantize(w, GQ[t])
    except NotImplementedError:
        raw = codec.from_f32(w, t)
    return np.ascontiguousarray(raw).view(np.uint8).reshape(w.shape[0], -1)


def _random_bytes(t: str, rows: int, cols: int) -> np.ndarray:
    """Arbitrary block bytes (every code pattern), f16 fields kept finite."""
    m = PackedMatrix.ggml(t, _ggml_bytes(t, _weights(rows, cols)), cols)
    raw = np.random.default_rng(5).integers(0, 256, size=m.data.shape, dtype=np.uint8)
    raw[:, 1::2] &= 0x3B
    return raw


def _check_product(m: PackedMatrix, ref: np.ndarray, T: int, seed: int = 1) -> None:
    x = np.random.default_rng(seed).standard_normal((T, m.cols)).astype(np.float32)
    want = x.astype(np.float64) @ ref.astype(np.float64).T
    got = products.matmul(m, x)
    assert got.shape == (T, m.rows) and got.dtype == np.float32
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= 1e-5, f"{m.stype} T={T}: relative error {err:.2e}"


# ---- GGML types ----
@pytest.mark.parametrize("t", GGML)
def test_ggml_dequant_equals_gguf_package(isa, t):
    for raw in (_ggml_bytes(t, _weights(ROWS, COLS)), None if t == "F32" else _random_bytes(t, ROWS, COLS)):
        if raw is None:
            continue
        m = PackedMatrix.ggml(t, raw, COLS)
        assert (m.rows, m.cols, m.stype, m.nbytes) == (ROWS, COLS, t, raw.nbytes)
        ref = quants.dequantize(raw, GQ[t]).reshape(ROWS, COLS).astype(np.float32)
        assert np.array_equal(products.dequant(m), ref, equal_nan=True)
        assert np.array_equal(products.dequant(m, 5, 17), ref[5:17], equal_nan=True)
        assert np.array_equal(products.take(m, np.array([3, 0, 130, 3])), ref[[3, 0, 130, 3]])


@pytest.mark.parametrize("t", GGML)
def test_ggml_matmul(isa, t):
    m = PackedMatrix.ggml(t, _ggml_bytes(t, _weights(ROWS, COLS)), COLS)
    ref = products.dequant(m)
    for T in (1, 3, 8, 40):  # decode kernels up to DECODE_ROWS, BLAS on dequantised blocks above
        _check_product(m, ref, T)


@pytest.mark.parametrize("t", ["F32", "F16", "BF16"])
def test_float_rows_of_any_length(isa, t):
    """Float types take any row length (vector tails)."""
    for cols in (1, 7, 45, 200):
        w = _weights(9, cols)
        m = PackedMatrix.ggml(t, codec.from_f32(w, t).view(np.uint8).reshape(9, -1), cols)
        assert np.array_equal(products.dequant(m), codec.to_f32(codec.from_f32(w, t), t).reshape(9, cols))
        for T in (1, 5, 12):
            _check_product(m, products.dequant(m), T)


# ---- int codes (formats/int4/layout.py) ----
def _int_parts(rows: int, cols: int, bits: int, group: int, sym: bool, scale_bits: int, seed: int = 0,
               zint: bool = False):
    """Random codes over the whole range, with their stored scales / offsets (``zint``: integer zeros, uint8
    [rows, groups] unpacked) / steps."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 1 << bits, (rows, cols), dtype=np.uint8)
    ng = -(-cols // group)
    if zint and not sym:
        sc, _, st = _int_parts(rows, cols, bits, group, sym, scale_bits, seed + 1)[1:]
        return q, sc, rng.integers(1, 1 << bits, (rows, ng)).astype(np.uint8), st
    if scale_bits == 8:
        sc = (rng.integers(-127, 128, (rows, ng)).astype(np.int8) if sym
              else rng.integers(0, 256, (rows, ng)).astype(np.uint8))
        of = None if sym else rng.integers(-127, 128, (rows, ng)).astype(np.int8)
        st = (rng.random((rows, 2)) * 0.01 + 1e-4).astype(np.float16).view(np.uint16)
    else:
        sc = (rng.standard_normal((rows, ng)) * 0.02).astype(np.float16).view(np.uint16)
        of = None if sym else (rng.standard_normal((rows, ng)) * 0.1).astype(np.float16).view(np.uint16)
        st = None
    return q, sc, of, st


INT_CASES = [(b, g, c, sym, sb, z) for b in range(2, 9) for g in (32, 64, 128) for c in (96, 200, 256)
             for sym in (False, True) for sb in (8, 16) for z in ((False,) if sym else (False, True))]


def _int_matrix(q, sc, of, st, b, g, cols, zint):
    """The PackedMatrix of ``_int_parts``'s arrays (integer zeros bit-packed, as the int4 layout stores them)."""
    return PackedMatrix.int_codes(int4.pack(q, b), sc, int4.pack(of, b) if zint else of, st, b, g, cols,
                                  zeros=zint)


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_dequant_equals_dequant_rows(isa, bits):
    for b, g, cols, sym, sb, z in (c for c in INT_CASES if c[0] == bits):
        q, sc, of, st = _int_parts(7, cols, b, g, sym, sb, zint=z)
        m = _int_matrix(q, sc, of, st, b, g, cols, z)
        ref = int4.dequant_rows(q, sc, of, b, g, st)
        if z and sb == 16:  # w = s * (q - z), exactly (f16 scales: 11 significant bits)
            s, _ = int4.group_values(sc, None, st)
            idx = np.arange(cols) // g
            assert np.array_equal(ref, (q.astype(np.float32) - of[:, idx]) * s[:, idx])
        assert m.stype == int4.QuantSpec(b, g, sym, sb, zero_int=z).label()
        assert np.array_equal(products.dequant(m), ref), (b, g, cols, sym, sb, z)
        assert np.array_equal(products.dequant(m, 2, 5), ref[2:5])
        assert np.array_equal(products.take(m, np.array([6, 1])), ref[[6, 1]])


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_version1_one_code_per_byte(isa, bits):
    """Version-1 files: codes of widths other than 4 one per byte, f16 scales."""
    for g, cols, sym in ((32, 96, False), (64, 96, True), (128, 200, False)):
        q, sc, of, _ = _int_parts(5, cols, bits, g, sym, 16, seed=bits)
        stored = int4.pack(q, 4) if bits == 4 else q
        m = PackedMatrix.int_codes(stored, sc, of, None, bits, g, cols, version=1)
        ref = int4.dequant_rows(q, sc, of, bits, g)
        assert np.array_equal(products.dequant(m), ref)
        for T in (1, 3):
            _check_product(m, ref, T)


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_matmul(isa, bits):
    for b, g, cols, sym, sb, z in (c for c in INT_CASES if c[0] == bits and c[2] != 256):
        q, sc, of, st = _int_parts(13, cols, b, g, sym, sb, zint=z)
        m = _int_matrix(q, sc, of, st, b, g, cols, z)
        ref = int4.dequant_rows(q, sc, of, b, g, st)
        for T in (1, 3, 8, 40):
            _check_product(m, ref, T)


@pytest.mark.parametrize("spec", [(4, 32, False, 8, False), (8, 32, True, 8, False), (5, 64, False, 16, False),
                                  (3, 20, True, 16, False), (4, 48, False, 8, False), (4, 32, False, 8, True),
                                  (5, 48, False, 16, True)])
def test_int_matmul_two_threads(isa, spec):
    """Enough rows for the two-thread split, odd row count, a group that is not a multiple of 32."""
    b, g, sym, sb, z = spec
    q, sc, of, st = _int_parts(129, 1000, b, g, sym, sb, seed=3, zint=z)
    m = _int_matrix(q, sc, of, st, b, g, 1000, z)
    ref = int4.dequant_rows(q, sc, of, b, g, st)
    assert np.array_equal(products.dequant(m), ref)
    for T in (1, 2, 8, 40):
        _check_product(m, ref, T)


# ---- output slices, row blocks, fallbacks ----
@pytest.mark.parametrize("kind", ["Q4_K", "BF16", "int4"])
def test_out_strided_slice(isa, kind, monkeypatch):
    """matmul writes into a column slice of a wider output (stacked q/k/v) and nowhere else; the BLAS path
    also in several row blocks."""
    monkeypatch.setattr(products, "BLOCK_VALUES", 40 * COLS)
    if kind == "int4":
        q, sc, of, st = _int_parts(ROWS, COLS, 4, 32, False, 8)
        m = PackedMatrix.int_codes(int4.pack(q, 4), sc, of, st, 4, 32, COLS)
    else:
        m = PackedMatrix.ggml(kind, _ggml_bytes(kind, _weights(ROWS, COLS)), COLS)
    for T in (1, 4, 40):
        x = np.random.default_rng(T).standard_normal((T, COLS)).astype(np.float32)
        big = np.full((T, ROWS + 30), 7.0, np.float32)
        view = big[:, 11:11 + ROWS]
        assert products.matmul(m, x, out=view) is view
        want = x.astype(np.float64) @ products.dequant(m).astype(np.float64).T
        assert np.linalg.norm(view - want) / np.linalg.norm(want) <= 1e-5
        assert (big[:, :11] == 7.0).all() and (big[:, 11 + ROWS:] == 7.0).all()
    with pytest.raises(ValueError):
        products.matmul(m, x, out=np.empty((T, ROWS), np.float64))


def test_vector_x_and_bad_input():
    m = PackedMatrix.ggml("Q8_0", _ggml_bytes("Q8_0", _weights(33, 64)), 64)
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    y = products.matmul(m, x)
    assert y.shape == (33,) and np.allclose(y, products.dequant(m) @ x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        products.matmul(m, np.zeros((2, 63), np.float32))
    with pytest.raises(ValueError):
        PackedMatrix.ggml("Q4_K", np.zeros((2, 144), np.uint8), 100)
    with pytest.raises(ValueError):
        PackedMatrix.ggml("IQ2_XS", np.zeros((2, 144), np.uint8), 256)
    with pytest.raises(IndexError):
        products.dequant(m, 0, 34)


@pytest.mark.parametrize("kind", ["Q6_K", "F16", "int5"])
def test_numpy_fallback_without_kernels(kind, monkeypatch):
    """Without the compiled library every operation runs in numpy with the same values."""
    if kind == "int5":
        q, sc, of, st = _int_parts(21, 200, 5, 64, False, 8)
        m = PackedMatrix.int_codes(int4.pack(q, 5), sc, of, st, 5, 64, 200)
    else:
        m = PackedMatrix.ggml(kind, _ggml_bytes(kind, _weights(21, 256)), 256)
    ref = products.dequant(m)
    monkeypatch.setattr(products, "_LIB", None)
    monkeypatch.setattr(native, "LIB", None)
    assert native.isa() == "numpy"
    assert np.array_equal(products.dequant(m), ref)
    for T in (1, 40):
        _check_product(m, ref, T)


def test_reads_mapped_read_only_views(tmp_path):
    """The stored arrays may be read-only views of a mapping: nothing is copied or written."""
    raw = _ggml_bytes("Q4_0", _weights(65, 256))
    p = tmp_path / "w.bin"
    p.write_bytes(b"\0" * 32 + raw.tobytes())
    mm = np.memmap(p, np.uint8, "r", offset=32, shape=raw.shape)
    m = PackedMatrix.ggml("Q4_0", mm, 256)
    assert np.shares_memory(m.data, mm) and not m.data.flags.writeable
    ref = codec.to_f32(raw, "Q4_0").reshape(65, 256)
    assert np.array_equal(products.dequant(m), ref)
    _check_product(m, ref, 1)


def test_worker_thread_concurrent_callers_and_fork():
    """The C worker thread of the two-thread products: callers on several Python threads at once (one gets
    the worker, the others compute alone) and a forked child (which starts a worker of its own) all get the
    right products."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    mats = [PackedMatrix.ggml(t, _ggml_bytes(t, _weights(ROWS, COLS, seed=i)), COLS)
            for i, t in enumerate(["Q4_0", "BF16", "Q6_K", "Q8_0"])]
    x = np.random.default_rng(9).standard_normal((2, COLS)).astype(np.float32)
    want = [x.astype(np.float64) @ products.dequant(m).astype(np.float64).T for m in mats]

    def run(i):
        return max(np.abs(products.matmul(mats[i % 4], x) - want[i % 4]).max() for _ in range(20))

    with ThreadPoolExecutor(4) as pool:
        assert max(pool.map(run, range(8))) < 1e-3
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as child:
        got = child.apply(products.matmul, (mats[0], x))
    assert np.abs(got - want[0]).max() < 1e-3
