"""Compare two models on the same tokens: KL divergence, top-1 agreement, perplexity, max |Δlogit|.

Default bounds depend on the candidate: a float model (every tensor F32/F16/BF16) must be nearly
identical; a quantised one gets the room quantisation needs. They are documented in the README.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

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


def kl_per_position(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """KL(ref || cand) at every position, from raw logits [n, vocab]."""
    lp, lq = log_softmax(ref), log_softmax(cand)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def perplexity(logits: np.ndarray, tokens: np.ndarray) -> float:
    """exp(mean next-token negative log-likelihood)."""
    lp = log_softmax(logits[:-1])
    nll = -lp[np.arange(len(tokens) - 1), tokens[1:]]
    return float(np.exp(nll.mean()))


def candidate_kind(types: set[str]) -> str:
    """'float' when every tensor is F32/F16/BF16, else 'quantised'."""
    return "float" if types <= FLOAT_TYPES else "quantised"


def compare(ref: np.ndarray, cand: np.ndarray, tokens: np.ndarray, kind: str,
            max_kld: float | None = None, min_top1: float | None = None) -> tuple[Report, np.ndarray]:
    """Report and per-position KL of candidate logits against reference logits."""
    kl = kl_per_position(ref, cand)
    d_kl, d_top1 = BOUNDS[kind]
    max_kld = d_kl if max_kld is None else max_kld
    min_top1 = d_top1 if min_top1 is None else min_top1
    top1 = float((ref.argmax(-1) == cand.argmax(-1)).mean())
    rep = Report(n_tokens=len(tokens), mean_kl=float(kl.mean()), p99_kl=float(np.percentile(kl, 99)),
                 max_kl=float(kl.max()), top1=top1, ppl_ref=perplexity(ref, tokens), ppl_cand=perplexity(cand, tokens),
                 max_abs_dlogit=float(np.abs(ref - cand).max()), kind=kind, max_kld=max_kld, min_top1=min_top1,
                 passed=bool(kl.mean() <= max_kld and top1 >= min_top1))
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
    fig.savefig(out)
    plt.close(fig)
