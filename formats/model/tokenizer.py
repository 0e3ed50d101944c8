"""Qwen2 byte-level BPE tokenizer data, moved between HF tokenizer files and GGUF metadata.

``TokenizerData`` is the format-neutral form (tokens by id, token types, merges, special ids, chat
template). HF side: ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``).
GGUF side: ``tokenizer.ggml.*`` keys exactly as llama.cpp's converter writes them for Qwen2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.errors import QConvertError
from formats.files import jsonio

# gguf TokenType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
QWEN2_PRE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


@dataclass
class TokenizerData:
    """Tokenizer content independent of file format. ``tokens[i]`` is the byte-level string of id i."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    model_max_length: int | None = None

    def __post_init__(self) -> None:
        if self.chat_template == "":
            self.chat_template = None  # an empty template is no template (GGUF then carries none)
        check_tokenizer(self)

    @property
    def n_real(self) -> int:
        """Number of real tokens (without trailing ``[PAD]`` fillers)."""
        n = len(self.tokens)
        while n and self.token_types[n - 1] == UNUSED:
            n -= 1
        return n

    # ------------------------------------------------------------ GGUF
    def to_gguf_kv(self, vocab_size: int) -> dict[str, Any]:
        """``tokenizer.*`` metadata, tokens padded with ``[PAD{i}]`` (UNUSED) up to ``vocab_size``."""
        n = self.n_real
        if n > vocab_size:
            raise QConvertError(f"tokenizer has {n} tokens but the model's vocab_size is {vocab_size}; "
                                "the tokenizer does not belong to this model")
        tokens = self.tokens[:n] + [f"[PAD{i}]" for i in range(n, vocab_size)]
        types = self.token_types[:n] + [UNUSED] * (vocab_size - n)
        kv: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                              "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                              "tokenizer.ggml.merges": self.merges}
        for key, v in (("bos_token_id", self.bos_id), ("eos_token_id", self.eos_id), ("padding_token_id", self.pad_id)):
            if v is not None:
                kv[f"tokenizer.ggml.{key}"] = int(v)
        kv["tokenizer.ggml.add_bos_token"] = bool(self.add_bos)
        if self.chat_template:
            kv["tokenizer.chat_template"] = self.chat_template
        return kv

    @classmethod
    def from_gguf_kv(cls, kv: dict[str, Any], where: str = "GGUF") -> "TokenizerData":
        """Read ``tokenizer.ggml.*``; only the gpt2 (byte-level BPE) model is accepted."""
        model = kv.get("tokenizer.ggml.model")
        if model != "gpt2" or "tokenizer.ggml.tokens" not in kv:
            raise QConvertError(f"{where}: tokenizer model is {model!r}; Qwen2 GGUFs carry a 'gpt2' byte-level BPE "
                                "tokenizer with tokens and merges")
        tokens = list(kv["tokenizer.ggml.tokens"])
        types = list(kv.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        try:
            return cls(tokens=tokens, token_types=[int(t) for t in types],
                       merges=list(kv.get("tokenizer.ggml.merges", [])),
                       bos_id=kv.get("tokenizer.ggml.bos_token_id"), eos_id=kv.get("tokenizer.ggml.eos_token_id"),
                       pad_id=kv.get("tokenizer.ggml.padding_token_id"),
                       add_bos=bool(kv.get("tokenizer.ggml.add_bos_token", False)),
                       chat_template=kv.get("tokenizer.chat_template"))
        except QConvertError as e:
            raise QConvertError(f"{where}: {e}; the file is damaged") from None

    # -------------------------------------------------------------- HF
    @classmethod
    def from_hf_dir(cls, d: Path, config: dict[str, Any] | None = None) -> "TokenizerData":
        """Read ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``) from an HF folder."""
        tj_path = d / "tokenizer.json"
        if not tj_path.is_file():
            raise QConvertError(f"{d}: no tokenizer.json; qconvert needs the fast-tokenizer file of the model")
        tj = jsonio.load(tj_path, "tokenizer")
        tc = jsonio.load(d / "tokenizer_config.json", "tokenizer") if (d / "tokenizer_config.json").is_file() else {}
        model = tj.get("model", {})
        if not isinstance(model, dict) or model.get("type") != "BPE":
            got = model.get("type") if isinstance(model, dict) else model
            raise QConvertError(f"{tj_path}: tokenizer model is {got!r}, expected Qwen2's byte-level BPE")
        vocab, added_list, merges = model.get("vocab"), tj.get("added_tokens") or [], model.get("merges") or []
        if not isinstance(vocab, dict) or not vocab or not all(_is_id(i) for i in vocab.values()):
            raise QConvertError(f"{tj_path}: model.vocab must map token strings to ids in [0, {MAX_TOKENS})")
        if not isinstance(added_list, list) or not all(
                isinstance(t, dict) and _is_id(t.get("id")) and isinstance(t.get("content"), str) and t["content"]
                for t in added_list):
            raise QConvertError(f"{tj_path}: added_tokens must be objects with an id in [0, {MAX_TOKENS}) and a "
                                "non-empty content string")
        if not isinstance(merges, list) or not all(
                isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m))
                for m in merges):
            raise QConvertError(f"{tj_path}: model.merges must be strings 'a b' or pairs [a, b]")
        if len(set(vocab.values())) != len(vocab):
            raise QConvertError(f"{tj_path}: model.vocab gives two tokens the same id; the file is damaged")
        added = {t["id"]: t for t in added_list}
        n = max([*vocab.values(), *added.keys()]) + 1
        tokens = [""] * n
        types = [UNUSED] * n
        for tok, i in vocab.items():
            tokens[i], types[i] = tok, NORMAL
        for i, t in added.items():
            tokens[i] = t["content"]
            types[i] = CONTROL if t.get("special") or _looks_special(t["content"]) else USER_DEFINED
        for i in range(n):
            if not tokens[i]:
                tokens[i] = f"[PAD{i}]"
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
        ids = {tok: i for i, tok in enumerate(tokens)}

        def tok_id(key: str, cfg_key: str) -> int | None:
            v = tc.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and v in ids:
                return ids[v]
            return (config or {}).get(cfg_key)

        template = tc.get("chat_template")
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        mml = tc.get("model_max_length")
        try:
            return cls(tokens=tokens, token_types=types, merges=merges,
                       bos_id=tok_id("bos_token", "bos_token_id"), eos_id=tok_id("eos_token", "eos_token_id"),
                       pad_id=tok_id("pad_token", "pad_token_id"), add_bos=bool(tc.get("add_bos_token", False)),
                       chat_template=template, model_max_length=int(mml) if isinstance(mml, (int, float)) and mml < 1e12 else None)
        except QConvertError as e:
            raise QConvertError(f"{tj_path}: {e}; the tokenizer files are damaged") from None

    def to_hf_files(self) -> dict[str, Any]:
        """{"tokenizer.json": obj, "tokenizer_config.json": obj} for a Qwen2 fast tokenizer."""
        n = self.n_real
        vocab, added = {}, []
        for i in range(n):
            t, ty = self.tokens[i], self.token_types[i]
            if ty in (CONTROL, USER_DEFINED):
                added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": ty != CONTROL, "special": ty == CONTROL})
            elif ty != UNUSED:
                vocab[t] = i
        tj = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PRE_REGEX}, "behavior": "Isolated", "invert": False},
                dict(_BYTE_LEVEL)]},
            "post_processor": dict(_BYTE_LEVEL), "decoder": dict(_BYTE_LEVEL),
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": list(self.merges)},
        }

        def name(i: int | None) -> str | None:
            return self.tokens[i] if i is not None and 0 <= i < n else None

        tc = {
            "add_bos_token": self.add_bos, "add_prefix_space": False,
            "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                       "single_word", "special")} for a in added},
            "bos_token": name(self.bos_id) if self.add_bos else None, "clean_up_tokenization_spaces": False,
            "eos_token": name(self.eos_id), "pad_token": name(self.pad_id), "errors": "replace",
            "model_max_length": self.model_max_length or 131072, "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
        }
        if self.chat_template:
            tc["chat_template"] = self.chat_template
        return {"tokenizer.json": tj, "tokenizer_config.json": tc}


MAX_TOKENS = 1 << 20  # the largest real vocabularies have ~256k tokens
MAX_TEMPLATE = 1 << 20


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_TOKENS


def check_tokenizer(t: TokenizerData) -> None:
    """Types and ranges of tokenizer data read from any file (QConvertError without a location; readers add it)."""
    if not isinstance(t.tokens, list) or not 0 < len(t.tokens) <= MAX_TOKENS or \
            not all(isinstance(x, str) for x in t.tokens):
        raise QConvertError(f"tokenizer tokens must be 1 to {MAX_TOKENS} strings")
    if len(t.token_types) != len(t.tokens) or not all(isinstance(x, int) and 0 <= x <= 6 for x in t.token_types):
        raise QConvertError(f"tokenizer token types must be {len(t.tokens)} integers in 0..6 (one per token); "
                            f"got {len(t.token_types)}")
    if not all(isinstance(m, str) for m in t.merges):
        raise QConvertError("tokenizer merges must be strings")
    known = set(t.tokens)
    for i, m in enumerate(t.merges):
        parts = m.split(" ")
        if len(parts) != 2 or parts[0] not in known or parts[1] not in known or parts[0] + parts[1] not in known:
            raise QConvertError(f"tokenizer merge {i} ({m[:40]!r}) is not two tokens of the vocabulary separated by "
                                "one space whose concatenation is a token too")
    for what, v in (("bos", t.bos_id), ("eos", t.eos_id), ("pad", t.pad_id)):
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(t.tokens)):
            raise QConvertError(f"tokenizer {what} token id {v!r} is not one of the {len(t.tokens)} tokens")
    if t.chat_template is not None and (not isinstance(t.chat_template, str) or len(t.chat_template) > MAX_TEMPLATE):
        raise QConvertError(f"chat template must be a string of at most {MAX_TEMPLATE} characters")


def _looks_special(tok: str) -> bool:
    """llama.cpp's heuristic for added tokens that act as control tokens."""
    return tok.startswith("<|") and tok.endswith("|>")
