"""Case generation for every reader: ``make_case(reader, seeds, seed, index, workdir)`` writes one mutated model
(deterministic in seed and index, so a finding can be replayed) and returns (location, mutation label)."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qconvert.testing.fuzz import gguf_mut
from qconvert.testing.fuzz.seeds import GGUF_SEEDS

READERS = ("gguf", "safetensors", "int4", "hf-config", "tokenizer", "template")
BOUND = [0, -1, 1, 2 ** 31, 2 ** 31 - 1, 2 ** 32, 2 ** 63, 2 ** 64 - 1, 2 ** 64, -2 ** 63, 1.5, 1e308, float("nan"),
         float("inf"), "7", "", None, True, [], {}, [1, 2], {"a": 1}]
HOSTILE_TEMPLATE = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ cycler.__init__.__globals__.os }}",
    "{{ self._TemplateReference__context }}", "{{ 'a'.format }}", "{{ '{0.__class__}'.format(1) }}",
    "{{ lipsum.__globals__ }}", "{{ request.application }}", "{{ [].append(1) }}", "{{ messages.clear() }}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'a' * 10 ** 10 }}", "{{ 'x' | center(10 ** 10) }}", "{{ '%0999999999d' % 1 }}", "{{ 10 ** 10 ** 10 }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "{{ range(10 ** 6) | list | join('x') * 1000 }}",
    "{% for m in messages * 100000 %}{{ m }}{% endfor %}", "{{ raise_exception('bad') }}", "{% include 'x' %}",
    "{% import 'os' as os %}", "{{ 1 / 0 }}", "{{ undefined_name.attr }}", "{{ messages[99] }}", "{% set x = 1 %",
    "{{ tojson }}", "{{ messages | tojson(indent=10 ** 9) }}", "{{ ''.join }}", "{{ loop.__class__ }}",
]


def damage(b: bytes, rng: np.random.Generator, hot: int | None = None) -> tuple[bytes, str]:
    """Random byte flips, truncation or a splice; ``hot`` bytes at the start get most of the flips."""
    kind = rng.choice(["flip", "flip", "truncate", "splice", "insert"])
    a = bytearray(b)
    if kind == "flip" and a:
        for _ in range(int(rng.integers(1, 9))):
            lim = hot if hot and rng.random() < 0.8 else len(a)
            i = int(rng.integers(0, min(lim, len(a))))
            a[i] = int(rng.integers(0, 256)) if rng.random() < 0.5 else a[i] ^ (1 << int(rng.integers(8)))
        return bytes(a), "byte flips"
    if kind == "truncate":
        return bytes(a[:int(rng.integers(0, max(1, len(a))))]), "truncated"
    i, j = sorted(int(x) for x in rng.integers(0, max(1, len(a)), 2))
    if kind == "splice":
        k = int(rng.integers(0, max(1, len(a))))
        return bytes(a[:k] + a[i:j] + a[k:]), "splice"
    return bytes(a[:i] + rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes() + a[i:]), "insert"


# ---------------------------------------------------------------- safetensors (also int4's file)
def st_split(b: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack_from("<Q", b)[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def st_join(header: Any, data: bytes, raw: bytes | None = None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def st_structural(b: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One checklist mutation of a valid safetensors file."""
    header, data = st_split(b)
    names = [k for k in header if k != "__metadata__"]
    name = names[rng.integers(len(names))]
    m = header[name]
    kind = rng.choice(["dtype", "shape", "offsets", "offsets", "drop", "extra", "dup", "meta", "not_object",
                       "len_field", "deep", "trailing", "bad_utf8", "entry_type"])
    if kind == "dtype":
        m["dtype"] = [str(x) for x in ("F64", "I64", "BOOL", "F8_E4M3", "U16", "XX", "")][rng.integers(7)] \
            if rng.random() < 0.8 else BOUND[rng.integers(len(BOUND))]
    elif kind == "shape":
        opts = [[-1], [2 ** 64], [2 ** 63, 2], [0], [1.5], ["a"], m["shape"][::-1], m["shape"] + [1], [],
                [2 ** 32, 2 ** 32], [1] * 20, None, [m["shape"][0] + 1] + m["shape"][1:]]
        m["shape"] = opts[rng.integers(len(opts))]
    elif kind == "offsets":
        bg, e = m["data_offsets"]
        opts = [[e, bg], [bg, e + 1], [bg - 1, e], [0, 2 ** 64], [-8, e], [bg + 2 ** 63, e + 2 ** 63], [bg + 8, e + 8],
                [0, e - bg], [bg, e, 0], [bg], "x", [bg + 0.5, e]]
        m["data_offsets"] = opts[rng.integers(len(opts))]
    elif kind == "drop":
        del header[name]
    elif kind == "extra":
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        header["model.extra.weight"] = {"dtype": "F32", "shape": [2], "data_offsets": [end, end + 8]}
        data += b"\0" * 8
    elif kind == "dup":
        raw = json.dumps(header)
        entry = json.dumps({name: m})[1:-1]
        return st_join(None, data, ("{" + entry + "," + raw[1:]).encode()), "duplicate key"
    elif kind == "meta":
        header["__metadata__"] = [{"a": 1}, [], "x", {"format": None}, {"format": 1}][rng.integers(5)]
    elif kind == "not_object":
        return st_join(None, data, [b"[]", b'"x"', b"1", b"null", b"[{}]"][rng.integers(5)]), "header not an object"
    elif kind == "len_field":
        v = [0, 1, 7, 2 ** 31, 2 ** 63, 2 ** 64 - 1, 100_000_001, len(b), len(b) - 7][rng.integers(9)]
        return struct.pack("<Q", v) + b[8:], f"header length {v}"
    elif kind == "deep":
        return st_join(None, data, ("{\"a\":" + "[" * 100000 + "]" * 100000 + "}").encode()), "deep nesting"
    elif kind == "trailing":
        return b + b"\0" * int(rng.integers(1, 64)), "trailing bytes"
    elif kind == "bad_utf8":
        raw = json.dumps(header).encode().replace(b'"dtype"', b'"dt\xff\xfepe"', 1)
        return st_join(None, data, raw), "invalid UTF-8"
    else:
        header[name] = [None, [], "x", 1][rng.integers(4)]
    return st_join(header, data), f"safetensors {kind}"


# ---------------------------------------------------------------- JSON documents
DEEP = "\u0000deep\u0000"


def dumps(obj: Any, depth: int = 5000) -> str:
    """json.dumps, with the DEEP marker written as ``depth`` nested lists (json.dumps itself would recurse)."""
    return json.dumps(obj, ensure_ascii=False).replace(json.dumps(DEEP), "[" * depth + "1" + "]" * depth)


def json_structural(obj: Any, rng: np.random.Generator, keys: list[str]) -> tuple[Any, str]:
    """Set a key (existing or from ``keys``) to a boundary value, delete one, or nest it deeply."""
    kind = rng.choice(["set", "set", "set", "delete", "deep", "type"])
    if kind == "type":
        return [[], "x", 1, None][rng.integers(4)], "not an object"
    key = keys[rng.integers(len(keys))] if keys and rng.random() < 0.7 else list(obj)[rng.integers(len(obj))]
    if kind == "delete":
        obj.pop(key, None)
        return obj, f"{key} deleted"
    if kind == "deep":
        obj[key] = DEEP
        return obj, f"{key} deeply nested"
    v = BOUND[rng.integers(len(BOUND))]
    obj[key] = v
    return obj, f"{key}={v!r}"[:60]


CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
               "rope_scaling", "torch_dtype", "dtype", "bos_token_id", "eos_token_id", "model_type", "num_experts",
               "num_experts_per_tok", "moe_intermediate_size", "sliding_window", "max_window_layers",
               "use_sliding_window", "dual_chunk_attention_config", "rope_parameters", "_name_or_path"]
ROPE_VALUES = [{"type": "yarn", "factor": 0}, {"type": "yarn", "factor": float("nan")}, {"type": "yarn"},
               {"rope_type": "llama3", "factor": 8}, {"type": "yarn", "factor": 4, "original_max_position_embeddings": -1},
               {"type": "linear", "factor": 1e300}, {"type": "yarn", "factor": 4, "beta_fast": "x"}, "yarn", [1]]


def config_case(cfg: dict[str, Any], rng: np.random.Generator) -> tuple[Any, str]:
    if rng.random() < 0.2:
        key = rng.choice(["rope_scaling", "rope_parameters", "dual_chunk_attention_config"])
        cfg[key] = ROPE_VALUES[rng.integers(len(ROPE_VALUES))] if key != "dual_chunk_attention_config" else \
            [{"chunk_size": 0, "local_size": 1}, {"chunk_size": 8, "local_size": 8}, {"chunk_size": 2 ** 40,
             "local_size": 1}, {"chunk_size": "8"}, 5][rng.integers(5)]
        return cfg, f"{key} hostile"
    return json_structural(cfg, rng, CONFIG_KEYS)


def tokenizer_case(tj: dict[str, Any], tc: dict[str, Any], rng: np.random.Generator) -> tuple[Any, Any, str]:
    kind = rng.choice(["vocab_id", "vocab_tok", "merge", "added", "model", "tc", "tc", "pre"])
    vocab = tj["model"]["vocab"]
    if kind == "vocab_id":
        tok = list(vocab)[rng.integers(len(vocab))]
        vocab[tok] = BOUND[rng.integers(len(BOUND))] if rng.random() < 0.7 else int(rng.choice([0, 300, 2 ** 24]))
    elif kind == "vocab_tok":
        vocab[["", "x" * 100000, "\ud800", "Ġ" * 1000][rng.integers(4)]] = len(vocab) + int(rng.integers(0, 5))
    elif kind == "merge":
        mg = tj["model"]["merges"]
        mg.append(["a b c", "zz qq", 1, ["a"], ["a", "b", "c"], "", " "][rng.integers(7)])
    elif kind == "added":
        a = tj["added_tokens"][rng.integers(len(tj["added_tokens"]))]
        k = rng.choice(["id", "content", "special"])
        a[k] = BOUND[rng.integers(len(BOUND))]
    elif kind == "model":
        tj["model"] = [{"type": "WordPiece"}, None, [], {"type": "BPE"}, "BPE"][rng.integers(5)]
    elif kind == "pre":
        tj[rng.choice(["pre_tokenizer", "normalizer", "decoder"])] = [{"type": "Nope"}, 1, {"type": "Split"}][
            rng.integers(3)]
    else:
        key = rng.choice(["bos_token", "eos_token", "pad_token", "chat_template", "add_bos_token", "model_max_length"])
        tc[key] = (BOUND + [{"content": 1}, "<|nope|>", [{"name": "default"}], [{"name": "default", "template": 5}]])[
            rng.integers(len(BOUND) + 4)]
        return tj, tc, f"tokenizer_config {key}"
    return tj, tc, f"tokenizer {kind}"


def template_case(t: str, rng: np.random.Generator) -> tuple[str, str]:
    kind = rng.choice(["insert", "insert", "dup", "damage"])
    if kind == "insert":
        snip = HOSTILE_TEMPLATE[rng.integers(len(HOSTILE_TEMPLATE))]
        cuts = [i for i in range(len(t)) if t.startswith("{%-", i) or t.startswith("{{-", i)] or [0]
        i = cuts[rng.integers(len(cuts))]
        return t[:i] + snip + t[i:], f"template {snip[:30]}"
    if kind == "dup":
        i, j = sorted(int(x) for x in rng.integers(0, len(t), 2))
        return t[:j] + t[i:j] * int(rng.integers(2, 6)) + t[j:], "template block repeated"
    b, label = damage(t.encode(), rng)
    return b.decode("utf-8", "replace"), f"template {label}"


# ---------------------------------------------------------------- one case
def _copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def make_case(reader: str, seeds: dict[str, Path], seed: int, index: int, work: Path) -> tuple[Path, str]:
    """Write case ``index`` of ``reader`` under ``work`` (cleared first); returns (model location, label)."""
    rng = np.random.default_rng([seed, READERS.index(reader), index])
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    structural = rng.random() < 0.6
    if reader == "gguf":
        if index % 50 == 0:  # every 50th case: the real 0.5B header when cached
            key = "gguf_real" if "gguf_real" in seeds else "gguf_q4"
        else:
            key = GGUF_SEEDS[int(rng.integers(len(GGUF_SEEDS)))]
        src = Path(seeds[key])
        out = work / "case.gguf"
        if src.stat().st_size > 64 << 20:  # the real header: mutate the header, keep the hole
            head_len = 6 << 20
            with open(src, "rb") as f:
                head = f.read(head_len)
            b, label = gguf_mut.structural(head, rng) if structural else damage(head, rng, hot=head_len)
            with open(out, "wb") as f:
                f.write(b)
                if "truncated" not in label:
                    f.truncate(max(len(b), src.stat().st_size))
            return out, "real header " + label
        b = src.read_bytes()
        b, label = gguf_mut.structural(b, rng) if structural else damage(b, rng, hot=len(b) // 3)
        out.write_bytes(b)
        return out, label
    if reader in ("safetensors", "int4"):
        key = ("hf" if rng.random() < 0.6 else "hf16") if reader == "safetensors" else \
            ("int4" if rng.random() < 0.6 else "int4_16")
        d = _copy(seeds[key], work / "model")
        f = d / ("model.safetensors" if reader == "safetensors" else "model.int4.safetensors")
        b = f.read_bytes()
        if reader == "safetensors" and rng.random() < 0.08:
            return d, index_case(d, rng)
        if reader == "int4" and rng.random() < 0.4:
            header, data = st_split(b)
            meta = header["__metadata__"]
            label = int4_meta_case(meta, rng)
            f.write_bytes(st_join(header, data))
            return d, label
        b, label = st_structural(b, rng) if structural else damage(b, rng, hot=struct.unpack_from("<Q", b)[0] + 8)
        f.write_bytes(b)
        return d, label
    d = _copy(seeds["hf"], work / "model")
    if reader == "hf-config":
        p = d / "config.json"
        if structural:
            obj, label = config_case(json.loads(p.read_text()), rng)
            p.write_text(dumps(obj, int(rng.choice([70, 5000]))))
        else:
            b, label = damage(p.read_bytes(), rng)
            p.write_bytes(b)
        return d, label
    if reader == "tokenizer":
        tjp, tcp = d / "tokenizer.json", d / "tokenizer_config.json"
        if structural:
            tj, tc, label = tokenizer_case(json.loads(tjp.read_text()), json.loads(tcp.read_text()), rng)
            tjp.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8", errors="surrogatepass")
            tcp.write_text(json.dumps(tc, ensure_ascii=False), encoding="utf-8", errors="surrogatepass")
        else:
            p = tjp if rng.random() < 0.5 else tcp
            b, label = damage(p.read_bytes(), rng)
            p.write_bytes(b)
        return d, label
    tcp = d / "tokenizer_config.json"
    tc = json.loads(tcp.read_text())
    tc["chat_template"], label = template_case(tc["chat_template"], rng)
    tcp.write_text(json.dumps(tc), encoding="utf-8", errors="surrogatepass")
    return d, label


def index_case(d: Path, rng: np.random.Generator) -> str:
    """A sharded-index case: hostile shard names (paths out of the folder, symlinks) or a broken weight_map."""
    kind = rng.choice(["dotdot", "absolute", "subdir", "symlink", "nonstr", "empty", "missing", "null"])
    target: Any = {"dotdot": "../model.safetensors", "absolute": "/etc/passwd", "subdir": "sub/model.safetensors",
                   "nonstr": 5, "missing": "model-00002-of-00002.safetensors", "null": None,
                   "symlink": "model.safetensors", "empty": ""}[kind]
    if kind == "symlink":
        outside = d.parent / "outside.safetensors"
        os.replace(d / "model.safetensors", outside)
        os.symlink(outside, d / "model.safetensors")
    header, _ = st_split((d / "model.safetensors").read_bytes())
    wm = {k: target for k in header if k != "__metadata__"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return f"index {kind}"


def int4_meta_case(meta: dict[str, str], rng: np.random.Generator) -> str:
    kind = rng.choice(["tensor_field", "tensor_field", "version", "format", "quantization", "tensors_json"])
    if kind == "tensor_field":
        per = json.loads(meta["tensors"])
        name = list(per)[rng.integers(len(per))]
        key = rng.choice(["bits", "group_size", "scheme", "scale_bits"])
        v = ([0, 1, 9, 3, 5, 8, 16, 31, 2 ** 20, 2 ** 63, "4", 4.5, None] + BOUND)[rng.integers(13 + len(BOUND))]
        per[name][key] = v if key != "scheme" else ["x", None, 1, "sym", "asym"][rng.integers(5)]
        meta["tensors"] = json.dumps(per)
        return f"int4 {key}={per[name][key]!r}"[:60]
    if kind == "version":
        meta["version"] = ["0", "3", "1", "", "2\0"][rng.integers(5)]
    elif kind == "format":
        meta["format"] = "gguf"
    elif kind == "quantization":
        meta["quantization"] = ["{", "[]", "1", json.dumps({"bits": "x", "group_size": 0, "scheme": 1})][rng.integers(4)]
    else:
        meta["tensors"] = ["{", "[]", "null", "[" * 5000][rng.integers(4)]
    return f"int4 {kind}"


CaseFn = Callable[[str, dict[str, Path], int, int, Path], tuple[Path, str]]
