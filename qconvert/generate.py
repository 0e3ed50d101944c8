"""Greedy generation with the reference decoder, streaming text as it is produced."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from formats.model.tokenizer import CONTROL
from formats.open import open_model
from qconvert.decoder import make_decoder
from qconvert.text import load_tokenizer, render_chat


def greedy(dec, prompt_ids: list[int], max_new: int, stop_ids: set[int], on_token: Callable[[int], None]) -> dict:
    """Generate up to ``max_new`` tokens greedily; returns token ids and prefill / decode speeds."""
    cache = dec.new_cache(len(prompt_ids) + max_new)
    t0 = time.perf_counter()
    logits = dec.forward(np.asarray(prompt_ids), cache, last_only=True)
    t1 = time.perf_counter()
    out: list[int] = []
    nxt = int(np.argmax(logits[-1]))
    t_dec = time.perf_counter()
    while len(out) < max_new:
        out.append(nxt)
        on_token(nxt)
        if nxt in stop_ids or len(out) == max_new:
            break
        nxt = int(np.argmax(dec.forward(np.asarray([nxt]), cache, last_only=True)[-1]))
    t2 = time.perf_counter()
    n_dec = max(len(out) - 1, 0)
    return {"tokens": out, "prefill_tok_s": len(prompt_ids) / (t1 - t0),
            "decode_tok_s": n_dec / (t2 - t_dec) if n_dec else float("nan")}


class Streamer:
    """Turn token ids into text increments without splitting UTF-8 characters."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tok, self.write, self.ids, self.shown = tokenizer, write, [], 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if not text.endswith("\ufffd"):
            self.write(text[self.shown:])
            self.shown = len(text)


def generate(location: str, prompt: str, write: Callable[[str], None], note: Callable[[str], None],
             chat: bool = False, system: str | None = None, max_new_tokens: int = 128, ignore_eos: bool = False,
             memory_budget: int = 8 << 30, backend: str = "numpy", device: str = "cpu", dtype: str = "float32",
             activations: str = "float") -> str:
    """Greedy generation from ``prompt`` (``chat``: as a user turn of the model's chat template), text streamed to
    ``write``. Weights stay resident while the model's stored size fits ``memory_budget`` bytes; a larger model
    streams a layer at a time per token (``note`` says so). ``activations``: "float" decodes on float32 products,
    "q8" on llama.cpp's 8-bit activation blocks where the storage type has such kernels (the numpy backend).
    The closing speed line."""
    with open_model(location) as src:
        tok = src.tokenizer
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            prompt = render_chat(tok, msgs)
        t = load_tokenizer(tok)
        ids = t.encode(prompt, add_special_tokens=False).ids
        stored = sum(x.nbytes for x in src.tensors.values())
        stream = stored > memory_budget
        if stream:
            note(f"[weights {stored / 2**30:.1f} GiB > memory budget {memory_budget / 2**30:.1f} GiB: streaming "
                 "layer by layer]")
        dec = make_decoder(src, backend, device, dtype, stream=stream)
        q8 = activations == "q8" and hasattr(dec, "activations")
        if q8:
            dec.activations = "q8"
        stop = set() if ignore_eos else {i for i in (tok.eos_id, tok.pad_id) if i is not None}
        if chat and not ignore_eos:
            stop |= {i for i, s in enumerate(tok.tokens[: tok.n_real]) if s in ("<|im_end|>", "<|endoftext|>")
                     and tok.token_types[i] == CONTROL}
        res = greedy(dec, ids, max_new_tokens, stop, Streamer(t, write))
    return (f"\n[{len(ids)} prompt tokens: prefill {res['prefill_tok_s']:.1f} tok/s; {len(res['tokens'])} new "
            f"tokens: decode {res['decode_tok_s']:.1f} tok/s; {backend} on {device}, "
            f"{'q8 activations' if q8 else 'float32 products'}]")
