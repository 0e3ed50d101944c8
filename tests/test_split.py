"""Split GGUF files: written like llama.cpp's, read from the first part, loaded by llama.cpp, and interchangeable
with ``llama-gguf-split`` (built from the llama-cpp-python sdist's llama.cpp source, cached)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import qconvert

from formats.gguf.header import read_header
from formats.gguf.split import SPLIT_KEYS
from qconvert.testing.peers import llama_logits


def _tensors(path: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """name -> (type, shape, bytes); shapes without leading 1s (ggml, hence llama-gguf-split, writes a
    [1, 64] tensor as [64])."""
    raw = path.read_bytes()
    out = {}
    for t in read_header(path)[1]:
        shape = t.shape
        while len(shape) > 1 and shape[0] == 1:
            shape = shape[1:]
        out[t.name] = (t.type, shape, raw[t.offset:t.offset + t.nbytes])
    return out


def _all_tensors(parts: list[Path]) -> dict[str, tuple[str, tuple, bytes]]:
    out: dict = {}
    for p in parts:
        out.update(_tensors(p))
    return out


def _meta(path: Path) -> dict:
    return {k: v for k, v in read_header(path)[0].items() if k not in SPLIT_KEYS}


@pytest.fixture(scope="module")
def moe_gguf(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    qconvert("hf-to-gguf", str(tiny("moe")), str(d / "one.gguf"), "--outtype", "f16")
    return d / "one.gguf"


def test_split_by_tensors_reads_back_equal(tiny, moe_gguf, tmp_path, sample_tokens):
    qconvert("hf-to-gguf", str(tiny("moe")), str(tmp_path / "m.gguf"), "--outtype", "f16", "--split-max-tensors", "16")
    parts = [tmp_path / f"m-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]  # 37 tensors, 16 a part
    assert sorted(tmp_path.iterdir()) == parts
    kvs = [read_header(p)[0] for p in parts]
    assert [(kv["split.no"], kv["split.count"], kv["split.tensors.count"]) for kv in kvs] == [(0, 3, 37), (1, 3, 37), (2, 3, 37)]
    assert all(set(kv) == set(SPLIT_KEYS) for kv in kvs[1:])  # later parts: the split keys only
    assert [len(read_header(p)[1]) for p in parts] == [16, 16, 5]
    assert _all_tensors(parts) == _tensors(moe_gguf)
    assert _meta(parts[0]) == _meta(moe_gguf)
    back, ref = tmp_path / "back", tmp_path / "ref"
    qconvert("gguf-to-hf", str(parts[0]), str(back), "--dtype", "f32")
    qconvert("gguf-to-hf", str(moe_gguf), str(ref), "--dtype", "f32")
    assert (back / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert (back / "config.json").read_text() == (ref / "config.json").read_text()
    ids = sample_tokens[:32]
    assert np.array_equal(llama_logits(parts[0], ids), llama_logits(moe_gguf, ids))


def test_split_by_size(tiny, moe_gguf, tmp_path):
    """llama-gguf-split's rule: a part ends before the tensor that would take its padded data past the limit."""
    qconvert("hf-to-gguf", str(tiny("moe")), str(tmp_path / "m.gguf"), "--outtype", "f16", "--split-max-size", "20M")
    parts = sorted(tmp_path.glob("m-*.gguf"))
    assert len(parts) >= 2 and parts[0].name.endswith(f"-00001-of-{len(parts):05d}.gguf")
    for p in parts:
        data = sum(-(-t.nbytes // 32) * 32 for t in read_header(p)[1])
        assert data <= 20_000_000 or len(read_header(p)[1]) == 1
    assert _all_tensors(parts) == _tensors(moe_gguf)


def test_split_errors_are_one_line(tiny, tmp_path):
    hf = str(tiny("tied"))
    qconvert("hf-to-gguf", hf, str(tmp_path / "m.gguf"), "--outtype", "f16", "--split-max-tensors", "10")
    parts = sorted(tmp_path.glob("m-*.gguf"))
    before = {p: p.stat().st_mtime_ns for p in parts}
    r = qconvert("hf-to-gguf", hf, str(tmp_path / "m.gguf"), "--outtype", "f16", "--split-max-tensors", "10", check=False)
    assert r.returncode != 0 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert {p: p.stat().st_mtime_ns for p in parts} == before
    r = qconvert("inspect", str(parts[1]), check=False)
    assert r.returncode != 0 and "pass the first part" in r.stderr and parts[0].name in r.stderr
    parts[-1].rename(tmp_path / "elsewhere.bin")
    r = qconvert("gguf-to-hf", str(parts[0]), str(tmp_path / "x"), check=False)
    assert r.returncode != 0 and "missing" in r.stderr and parts[-1].name in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _gguf_split(*args: str) -> None:
    from qconvert.testing.peers import llama_tool
    r = subprocess.run([str(llama_tool("llama-gguf-split")), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-500:] + r.stderr[-500:]


@pytest.mark.slow
def test_llama_gguf_split_interop(tiny, moe_gguf, tmp_path):
    """llama-gguf-split --merge of our parts equals our unsplit file; our reader takes its --split output."""
    qconvert("hf-to-gguf", str(tiny("moe")), str(tmp_path / "m.gguf"), "--outtype", "f16", "--split-max-tensors", "16")
    _gguf_split("--merge", str(tmp_path / "m-00001-of-00003.gguf"), str(tmp_path / "merged.gguf"))
    assert _tensors(tmp_path / "merged.gguf") == _tensors(moe_gguf)
    assert _meta(tmp_path / "merged.gguf") == _meta(moe_gguf)
    _gguf_split("--split", "--split-max-tensors", "10", str(moe_gguf), str(tmp_path / "theirs"))
    first = tmp_path / "theirs-00001-of-00004.gguf"
    qconvert("gguf-to-hf", str(first), str(tmp_path / "a"), "--dtype", "f32")
    qconvert("gguf-to-hf", str(moe_gguf), str(tmp_path / "b"), "--dtype", "f32")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.real
@pytest.mark.slow
def test_real_model_split_200m(real_gguf, tmp_path):
    """The real 0.5B: our 200M split loads in llama.cpp with identical logits, merges back to our unsplit file,
    and llama-gguf-split's own 200M split converts to the same HF folder as the original."""
    from qconvert.testing.peers import llama_tokenize
    ours = tmp_path / "ours.gguf"
    qconvert("hf-to-gguf", str(real_gguf), str(ours), "--outtype", "q8_0")
    qconvert("hf-to-gguf", str(real_gguf), str(tmp_path / "s.gguf"), "--outtype", "q8_0", "--split-max-size", "200M")
    parts = sorted(tmp_path.glob("s-*.gguf"))
    assert len(parts) >= 3
    ids = llama_tokenize(ours, (Path(__file__).parent / "data" / "sample.txt").read_text())[:32]
    assert np.array_equal(llama_logits(parts[0], ids), llama_logits(ours, ids))
    _gguf_split("--merge", str(parts[0]), str(tmp_path / "merged.gguf"))
    assert _tensors(tmp_path / "merged.gguf") == _tensors(ours) and _meta(tmp_path / "merged.gguf") == _meta(ours)
    _gguf_split("--split", "--split-max-size", "200M", str(real_gguf), str(tmp_path / "theirs"))
    first = sorted(tmp_path.glob("theirs-*.gguf"))[0]
    qconvert("gguf-to-hf", str(first), str(tmp_path / "a"))
    qconvert("gguf-to-hf", str(real_gguf), str(tmp_path / "b"))
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
