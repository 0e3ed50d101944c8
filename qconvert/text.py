"""Tokenising with the model's own tokenizer and rendering its chat template in a sandbox."""
from __future__ import annotations

import json
from typing import Any

from formats.errors import QConvertError
from formats.model.tokenizer import TokenizerData


def load_tokenizer(tok: TokenizerData) -> Any:
    """A ``tokenizers.Tokenizer`` built from the model's own tokenizer data (any source format)."""
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_str(json.dumps(tok.to_hf_files()["tokenizer.json"]))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception for bad data
        raise QConvertError(f"the tokenizers library refuses this model's tokenizer ({str(e)[:200]}); the "
                            "tokenizer files are damaged") from None


def encode(tok: TokenizerData, text: str) -> list[int]:
    """Token ids of ``text`` (no BOS: Qwen2 adds none; special tokens in the text are recognised)."""
    return load_tokenizer(tok).encode(text, add_special_tokens=False).ids


def render_chat(tok: TokenizerData, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Render the model's chat template in Jinja's immutable sandbox under time / output / memory limits
    (qconvert/template.py)."""
    from qconvert.template import render_template

    if not tok.chat_template:
        raise QConvertError("the model has no chat template; drop --chat and pass the raw prompt")
    name = (lambda i: tok.tokens[i] if i is not None and 0 <= i < len(tok.tokens) else "")
    return render_template(tok.chat_template, {
        "messages": messages, "add_generation_prompt": add_generation_prompt, "tools": None,
        "bos_token": name(tok.bos_id) if tok.add_bos else "", "eos_token": name(tok.eos_id)})
