"""Compare two models on the same tokens: KL divergence, top-1 agreement, perplexity, max |Δlogit|.

Default bounds depend on the candidate: a float model (every tensor F32/F16/BF16) must be nearly
identical; a quantised one gets the room quantisation needs. They are documented in the README.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from formats.errors import QConvertError
from formats.files.atomic import atomic_file
from formats.open import open_model
from qconvert.logits import logit_chunks, tokens

FLOAT_TYPES = {"F32", "F16", "BF16"}
BOUNDS = {"float": (2e-3, 0.97), "quantised": (0.1, 0.85)}  # (max mean KL, min top-1)


@dataclass
class Report:
    """What ``qconvert verify`` prints and writes as JSON."""

    n_tokens: int
    mean_kl: float
    p99_kl: float
    max_kl: float
    top1: float
    ppl_ref: float
    ppl_cand: float
    max_abs_dlogit: float
    kind: str
    max_kld: float
    min_top1: float
    passed: bool

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def candidate_kind(types: set[str]) -> str:
    """'float' when every tensor is F32/F16/BF16, else 'quantised'."""
    return "float" if types <= FLOAT_TYPES else "quantised"


class Comparison:
    """Running comparison of candidate against reference logits, fed position chunks in order, so neither
    model's [T, vocab] logits need to be in memory at once (``qconvert verify`` streams them)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = np.asarray(tokens)
        self.kl: list[np.ndarray] = []
        self.same = 0
        self.nll_ref = self.nll_cand = 0.0
        self.max_abs = 0.0
        self.pos = 0

    def add(self, ref: np.ndarray, cand: np.ndarray, rows: int = 16) -> None:
        """Logits [n, vocab] of the next n positions from both models (worked through ``rows`` positions at a
        time: the float64 temporaries of 128 positions of a 152k vocabulary would be 150 MB each)."""
        for r0 in range(0, ref.shape[0], rows):
            self._add(ref[r0:r0 + rows], cand[r0:r0 + rows])

    def _add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        n = ref.shape[0]
        lp, lq = log_softmax(ref), log_softmax(cand)
        self.kl.append((np.exp(lp) * (lp - lq)).sum(-1))
        self.same += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        self.max_abs = max(self.max_abs, float(np.abs(ref - cand).max()))
        nxt = self.tokens[self.pos + 1:self.pos + n + 1]  # the last position has no next token
        rows = np.arange(len(nxt))
        self.nll_ref -= float(lp[rows, nxt].sum())
        self.nll_cand -= float(lq[rows, nxt].sum())
        self.pos += n

    def report(self, kind: str, max_kld: float | None = None, min_top1: float | None = None
               ) -> tuple[Report, np.ndarray]:
        """The Report over every position added, and the per-position KL."""
        kl = np.concatenate(self.kl)
        d_kl, d_top1 = BOUNDS[kind]
        max_kld = d_kl if max_kld is None else max_kld
        min_top1 = d_top1 if min_top1 is None else min_top1
        n = len(kl)
        top1 = self.same / n
        rep = Report(n_tokens=n, mean_kl=float(kl.mean()), p99_kl=float(np.percentile(kl, 99)),
                     max_kl=float(kl.max()), top1=top1, ppl_ref=float(np.exp(self.nll_ref / max(1, n - 1))),
                     ppl_cand=float(np.exp(self.nll_cand / max(1, n - 1))), max_abs_dlogit=self.max_abs, kind=kind,
                     max_kld=max_kld, min_top1=min_top1, passed=bool(kl.mean() <= max_kld and top1 >= min_top1))
        return rep, kl


def plot(kl: np.ndarray, out: Path, title: str) -> None:
    """KL divergence per position as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=110)
    ax.plot(np.arange(len(kl)), kl, lw=0.8)
    ax.axhline(kl.mean(), color="tab:red", lw=0.8, ls="--", label=f"mean {kl.mean():.2e}")
    ax.set_yscale("log" if (kl > 0).all() else "linear")
    ax.set_xlabel("position")
    ax.set_ylabel("KL(ref || cand)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_file(Path(out), force=True) as tmp:  # replaced, never half-written
        fig.savefig(tmp, format=Path(out).suffix.lstrip(".").lower() or "png")
    plt.close(fig)


def verify_models(ref: str, cand: str, text: Path | None = None, ctx: int = 512, max_kld: float | None = None,
                  min_top1: float | None = None, backend: str = "numpy", device: str = "cpu",
                  dtype: str = "float32") -> tuple[Report, np.ndarray]:
    """Both models on the same tokens, one model at a time: the reference's logits go to a temporary file, then
    the candidate's are compared with them chunk by chunk, so memory holds one layer of one model and a chunk
    of logits. The Report and the per-position KL."""
    with open_model(ref) as r, open_model(cand) as c:
        if r.tokenizer.tokens[: r.tokenizer.n_real] != c.tokenizer.tokens[: c.tokenizer.n_real]:
            raise QConvertError(f"{ref} and {cand} have different vocabularies; they are not the same model")
        ids = tokens(r, text, None, ctx)
        kind = candidate_kind({t.quant or t.stype for t in c.tensors.values()})
    cmp = Comparison(np.asarray(ids))
    with tempfile.TemporaryFile(prefix="qconvert-ref-logits-") as tf:
        width = 0
        for ch in logit_chunks(ref, ids, backend, device, dtype):
            tf.write(ch.tobytes())
            width = ch.shape[1]
        pos = 0
        for ch in logit_chunks(cand, ids, backend, device, dtype):
            if ch.shape[1] != width:
                raise QConvertError(f"{ref} has {width} logits per token, {cand} has {ch.shape[1]}; "
                                    "they are not the same model")
            nbytes = ch.size * 4
            cmp.add(np.frombuffer(os.pread(tf.fileno(), nbytes, pos), dtype=np.float32).reshape(ch.shape), ch)
            pos += nbytes
    return cmp.report(kind, max_kld, min_top1)


def render(rep: Report) -> str:
    """The lines ``qconvert verify`` prints."""
    return (f"tokens {rep.n_tokens}  candidate {rep.kind}\n"
            f"KL mean {rep.mean_kl:.3e}  p99 {rep.p99_kl:.3e}  max {rep.max_kl:.3e}   (bound {rep.max_kld:g})\n"
            f"top-1 agreement {rep.top1 * 100:.2f}%   (bound {rep.min_top1 * 100:g}%)\n"
            f"perplexity ref {rep.ppl_ref:.4f}  cand {rep.ppl_cand:.4f}\n"
            f"max |dlogit| {rep.max_abs_dlogit:.4g}\n{'PASS' if rep.passed else 'FAIL'}")


def write_json(rep: Report, out: Path) -> None:
    """The report as JSON (replaced, but never half-written)."""
    with atomic_file(out, force=True) as tmp:
        tmp.write_text(json.dumps(rep.as_dict(), indent=2) + "\n")
