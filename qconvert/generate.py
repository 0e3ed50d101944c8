"""Greedy generation with the reference decoder, streaming text as it is produced."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


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
