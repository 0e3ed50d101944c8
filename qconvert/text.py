"""Tokenising with the model's own tokenizer and rendering its chat template in a sandbox."""
from __future__ import annotations

import json
from typing import Any

from formats.errors import QConvertError
from formats.tokenizer import TokenizerData


def load_tokenizer(tok: TokenizerData) -> Any:
    """A ``tokenizers.Tokenizer`` built from the model's own tokenizer data (any source format)."""
    from tokenizers import Tokenizer
    return Tokenizer.from_str(json.dumps(tok.to_hf_files()["tokenizer.json"]))


def encode(tok: TokenizerData, text: str) -> list[int]:
    """Token ids of ``text`` (no BOS: Qwen2 adds none; special tokens in the text are recognised)."""
    return load_tokenizer(tok).encode(text, add_special_tokens=False).ids


def render_chat(tok: TokenizerData, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Render the model's chat template in Jinja's immutable sandbox (no attribute tricks, no I/O)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not tok.chat_template:
        raise QConvertError("the model has no chat template; drop --chat and pass the raw prompt")

    def raise_exception(msg: str) -> None:
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    name = (lambda i: tok.tokens[i] if i is not None and 0 <= i < len(tok.tokens) else "")
    try:
        return env.from_string(tok.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
            bos_token=name(tok.bos_id) if tok.add_bos else "", eos_token=name(tok.eos_id))
    except TemplateError as e:
        raise QConvertError(f"chat template failed to render: {e}") from None
