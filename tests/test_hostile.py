"""Hostile inputs, one deterministic case per checklist item of docs/security.md: each must give one QConvertError
naming the file and the field, never a crash, a traceback or a huge allocation. Plus a short seeded fuzz run."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from formats.errors import QConvertError
from qconvert.testing.fuzz import gguf_mut
from qconvert.testing.fuzz.mutate import st_join, st_split

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    from qconvert.testing.fuzz.seeds import make_seeds
    return make_seeds(tmp_path_factory.mktemp("fuzzseeds"))


def _lay(seeds):
    return gguf_mut.parse(Path(seeds["gguf_q8"]).read_bytes())


def _field(b: bytes, lay, label: str, value: int) -> bytes:
    off, width = next((o, w) for name, o, w in lay.fields if name == label)
    return b[:off] + (value & ((1 << 8 * width) - 1)).to_bytes(width, "little") + b[off + width:]


def _kv(lay, key: str, vt: int, raw: bytes):
    gguf_mut._set_kv(lay, key, vt, raw)
    return lay


def _tensor(lay, i: int, **change):
    t = lay.tensors[i]
    for k, v in change.items():
        t[{"name": 0, "dims": 1, "type": 2, "offset": 3}[k]] = v
    return lay


def _first_str_array(lay) -> str:
    return next(k for k, vt, raw in lay.kvs if vt == 9 and struct.unpack_from("<I", raw)[0] == 8)


# (id, make bytes from (seed bytes, layout), text the error must contain)
GGUF_CASES = [
    ("bad magic", lambda b, lay: b"GGUX" + b[4:], "bad magic"),
    ("version 1", lambda b, lay: _field(b, lay, "version", 1), "version 1"),
    ("big-endian version", lambda b, lay: _field(b, lay, "version", 3 << 24), "big-endian"),
    ("CVE-2024-25664 pattern: n_kv wraps", lambda b, lay: _field(b, lay, "n_kv", 2 ** 64 - 1), "metadata count"),
    ("CVE-2024-25666 pattern: n_tensors wraps", lambda b, lay: _field(b, lay, "n_tensors", 2 ** 63), "tensor count"),
    ("CVE-2024-25665 pattern: key length wraps",
     lambda b, lay: _field(b, lay, "kv[general.architecture].keylen", 2 ** 64 - 1), "metadata key 0"),
    ("CVE-2024-25665 pattern: string value length past the end",
     lambda b, lay: _field(b, lay, "kv[general.architecture].strlen", len(b)), "needs"),
    ("CVE-2024-25667 pattern: array length wraps",
     lambda b, lay: _field(b, lay, f"kv[{_first_str_array(lay)}].arrlen", 2 ** 61), "array of"),
    ("CVE-2024-25668 pattern: string-array element length wraps",
     lambda b, lay: _field(b, lay, f"kv[{_first_str_array(lay)}].elem0len", 2 ** 64 - 8), "needs"),
    ("CVE-2024-23605 pattern: numeric array byte count wraps",
     lambda b, lay: gguf_mut.build(_kv(lay, "x.arr", 9, struct.pack("<IQ", 10, 2 ** 61) + b"\0" * 8)), "array of"),
    ("CVE-2024-21802 pattern: n_dims 5", lambda b, lay: gguf_mut.build(_tensor(lay, 0, dims=[32, 1, 1, 1, 1])), "n_dims"),
    ("n_dims 0", lambda b, lay: gguf_mut.build(_tensor(lay, 0, dims=[])), "n_dims"),
    ("dimension negative as int64", lambda b, lay: gguf_mut.build(_tensor(lay, 0, dims=[2 ** 64 - 32])), "negative"),
    ("CVE-2025-53630 pattern: element count overflows",
     lambda b, lay: gguf_mut.build(_tensor(lay, 1, dims=[2 ** 32, 2 ** 32])), "overflows"),
    ("CVE-2026-27940 pattern: offset + size wraps",
     lambda b, lay: gguf_mut.build(_tensor(lay, 1, offset=2 ** 64 - 32)), "ends at byte"),
    ("unknown tensor type 4 (removed Q4_2)", lambda b, lay: gguf_mut.build(_tensor(lay, 0, type=4)), "not a known GGML type"),
    ("tensor type 2^31", lambda b, lay: gguf_mut.build(_tensor(lay, 0, type=2 ** 31)), "not a known GGML type"),
    ("row not whole blocks", lambda b, lay: gguf_mut.build(_tensor(lay, 0, type=12)), "blocks of 256"),
    ("offset unaligned", lambda b, lay: gguf_mut.build(_tensor(lay, 2, offset=lay.tensors[2][3] + 4)), "multiple of the alignment"),
    ("offsets out of order", lambda b, lay: gguf_mut.build(_tensor(lay, 2, offset=0)), "overlaps"),
    ("data section too short", lambda b, lay: b[:len(b) - 64], "truncated"),
    ("duplicate key", lambda b, lay: gguf_mut.build(_kv(lay, "dup", 4, b"\0" * 4) and
                                                    (lay.kvs.append(list(lay.kvs[-1])) or lay)), "appears twice"),
    ("duplicate tensor name", lambda b, lay: gguf_mut.build(_tensor(lay, 1, name=lay.tensors[0][0])), "appears twice"),
    ("alignment 0", lambda b, lay: gguf_mut.build(_kv(lay, "general.alignment", 4, struct.pack("<I", 0))), "power of two"),
    ("alignment 48", lambda b, lay: gguf_mut.build(_kv(lay, "general.alignment", 4, struct.pack("<I", 48))), "power of two"),
    ("alignment stored as u64", lambda b, lay: gguf_mut.build(_kv(lay, "general.alignment", 10, struct.pack("<Q", 32))),
     "expects u32"),
    ("value type 13", lambda b, lay: gguf_mut.build(_kv(lay, "x.t", 13, b"\0" * 8)), "not a GGUF value type"),
    ("nested array", lambda b, lay: gguf_mut.build(_kv(lay, "x.n", 9, struct.pack("<IQ", 9, 1) + b"\0" * 12)), "nested"),
    ("key not UTF-8", lambda b, lay: gguf_mut.build(lay.kvs.append([b"\xff\xfe", 4, b"\0" * 4]) or lay), "UTF-8"),
    ("empty key", lambda b, lay: gguf_mut.build(lay.kvs.append(["", 4, b"\0" * 4]) or lay), "is empty"),
    ("tensor name of 100 bytes", lambda b, lay: gguf_mut.build(_tensor(lay, 0, name="t" * 100)), "longer than 63"),
    ("block_count as a string", lambda b, lay: gguf_mut.build(_kv(lay, "qwen2.block_count", 8, gguf_mut._str("1"))),
     "expects int"),
    ("token list as integers", lambda b, lay: gguf_mut.build(_kv(lay, "tokenizer.ggml.tokens", 9,
                                                                 struct.pack("<IQ", 4, 1) + b"\0" * 4)), "expects str[]"),
]


@pytest.mark.parametrize("name,make,want", GGUF_CASES, ids=[c[0] for c in GGUF_CASES])
def test_gguf_checklist(seeds, tmp_path, name, make, want):
    from formats.open import open_model
    seed = Path(seeds["gguf_q8"]).read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(make(seed, gguf_mut.parse(seed)))
    with pytest.raises(QConvertError) as e:
        open_model(str(bad)).close()
    msg = str(e.value)
    assert want in msg and str(bad) in msg and "\n" not in msg, msg


def test_gguf_values_checked_after_parsing(seeds, tmp_path):
    """Fields that parse but lie: a bos id outside the vocabulary, zero heads, NaN eps."""
    from formats.open import open_model
    for key, vt, raw, want in [("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 10 ** 6), "bos token id"),
                               ("qwen2.attention.head_count", 4, struct.pack("<I", 0), "num_attention_heads"),
                               ("qwen2.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", float("nan")), "rms_norm_eps")]:
        lay = gguf_mut.parse(Path(seeds["gguf_q8"]).read_bytes())
        bad = tmp_path / "v.gguf"
        bad.write_bytes(gguf_mut.build(_kv(lay, key, vt, raw)))
        with pytest.raises(QConvertError, match=want):
            open_model(str(bad)).close()


def _st(seeds, tmp_path, edit) -> Path:
    import shutil
    d = tmp_path / "m"
    shutil.copytree(seeds["hf"], d)
    f = d / "model.safetensors"
    f.write_bytes(edit(f.read_bytes()))
    return d


def _entry(b: bytes, **change) -> bytes:
    h, data = st_split(b)
    name = sorted((v["data_offsets"][0], k) for k, v in h.items() if k != "__metadata__")[1][1]
    h[name].update(change)
    return st_join(h, data)


ST_CASES = [
    ("header length past the end", lambda b: struct.pack("<Q", len(b)) + b[8:], "exceeds the file"),
    ("header length over 100 MB", lambda b: struct.pack("<Q", 100_000_001) + b[8:] + b"\0" * 100_000_001, "100 MB"),
    ("header not an object", lambda b: st_join(None, st_split(b)[1], b"[1, 2]"), "not a JSON object"),
    ("header not UTF-8", lambda b: st_join(None, st_split(b)[1], b'{"\xff": 1}'), "utf-8"),
    ("unknown dtype", lambda b: _entry(b, dtype="F7"), "unknown dtype"),
    ("shape x itemsize != span", lambda b: _entry(b, shape=[3]), "needs"),
    ("negative shape", lambda b: _entry(b, shape=[-1]), "non-negative"),
    ("hole between tensors", lambda b: _entry(b, data_offsets=[o + 8 for o in _entry_offsets(b)]), "a hole"),
    ("overlapping tensors", lambda b: _entry(b, data_offsets=[0, _entry_offsets(b)[1] - _entry_offsets(b)[0]]),
     "overlapping"),
    ("trailing bytes", lambda b: b + b"\0" * 8, "trailing bytes"),
    ("truncated data", lambda b: b[:-8], "truncated"),
    ("__metadata__ not string to string", lambda b: st_join(dict(st_split(b)[0], __metadata__={"a": 1}), st_split(b)[1]),
     "__metadata__"),
    ("duplicate tensor key", lambda b: st_join(None, st_split(b)[1], b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
                                              + json.dumps(st_split(b)[0]).encode()[1:-1] + b',"a":{}}'), "appears twice"),
]


def _entry_offsets(b: bytes) -> list[int]:
    h, _ = st_split(b)
    return sorted(v["data_offsets"] for k, v in h.items() if k != "__metadata__")[1]


@pytest.mark.parametrize("name,edit,want", ST_CASES, ids=[c[0] for c in ST_CASES])
def test_safetensors_checklist(seeds, tmp_path, name, edit, want):
    from formats.hf.read import open_hf
    d = _st(seeds, tmp_path, edit)
    with pytest.raises(QConvertError) as e:
        open_hf(str(d)).close()
    msg = str(e.value)
    assert want in msg and "model.safetensors" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("shard,want", [("../model.safetensors", "no paths"), ("/etc/passwd", "plain"),
                                        ("sub/model.safetensors", "plain"), (5, "plain"), ("symlink", "outside the model folder")])
def test_index_paths_stay_inside_the_folder(seeds, tmp_path, shard, want):
    import shutil

    from formats.container.safetensors_io import read_header
    from formats.hf.read import open_hf
    d = tmp_path / "m"
    shutil.copytree(seeds["hf"], d)
    if shard == "symlink":
        os.replace(d / "model.safetensors", tmp_path / "outside.safetensors")
        os.symlink(tmp_path / "outside.safetensors", d / "model.safetensors")
        shard = "model.safetensors"
    names = [k for k in read_header(d / "model.safetensors")[0] if k != "__metadata__"]
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    with pytest.raises(QConvertError, match=want):
        open_hf(str(d)).close()


@pytest.mark.parametrize("edit,want", [
    (lambda c: c.update(hidden_size=2 ** 40), "hidden_size"), (lambda c: c.update(num_attention_heads=0), "num_attention_heads"),
    (lambda c: c.update(rms_norm_eps=float("nan")), "rms_norm_eps"), (lambda c: c.update(vocab_size="320"), "vocab_size"),
    (lambda c: c.update(model_type=["qwen2"]), "model_type"), (lambda c: c.update(rope_scaling=[4]), "rope_scaling"),
    (lambda c: c.update(rope_scaling={"type": "yarn", "factor": 4, "beta_fast": "x"}), "beta_fast"),
    (lambda c: c.update(eos_token_id=list(range(100))), "eos_token_id")])
def test_config_types_and_ranges(seeds, tmp_path, edit, want):
    import shutil

    from formats.hf.read import open_hf
    d = tmp_path / "m"
    shutil.copytree(seeds["hf"], d)
    c = json.loads((d / "config.json").read_text())
    edit(c)
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(QConvertError, match=want):
        open_hf(str(d)).close()


def test_config_size_and_nesting_limits(seeds, tmp_path):
    import shutil

    from formats.hf.read import open_hf
    d = tmp_path / "m"
    shutil.copytree(seeds["hf"], d)
    c = (d / "config.json").read_text()
    (d / "config.json").write_text(c[:-2] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(QConvertError, match="nested"):
        open_hf(str(d)).close()
    (d / "config.json").write_text(c[:-2] + ', "x": "' + "a" * (2 << 20) + '"}')
    with pytest.raises(QConvertError, match="larger than any real config"):
        open_hf(str(d)).close()


def test_seeded_fuzz_short():
    """A short seeded run of every reader (~1 minute): no finding of any kind."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--reader", "all", "--cases", "150",
                        "--seed", "7"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "FINDING" not in r.stdout


def test_huge_string_in_a_sparse_file_is_refused_before_it_is_read(seeds, tmp_path):
    """A length that fits in a (sparse) file but is no real metadata string: refused without reading it."""
    import resource

    from formats.gguf.header import read_header
    b = Path(seeds["gguf_q8"]).read_bytes()
    lay = gguf_mut.parse(b)
    bad = tmp_path / "sparse.gguf"
    with open(bad, "wb") as f:
        f.write(_field(b, lay, "kv[general.architecture].strlen", 300 << 20))
        f.truncate(400 << 20)  # a hole: costs no disk
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(QConvertError, match="over 64 MiB"):
        read_header(bad)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10  # KiB: no 300 MB copy
