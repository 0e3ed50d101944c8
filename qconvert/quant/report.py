"""What ``qconvert quantize`` prints and plots: relative error per matrix, grouped by layer and kind."""
from __future__ import annotations

import re
from pathlib import Path

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def by_layer(errors: dict[str, float]) -> dict[str, dict[int, float]]:
    """{matrix kind (e.g. 'self_attn.q_proj'): {layer: relative RMS error}}; experts are averaged."""
    acc: dict[str, dict[int, list[float]]] = {}
    for name, e in errors.items():
        m = _LAYER.match(name)
        if not m:
            continue
        kind = re.sub(r"experts\.\d+\.", "experts.", m.group(2))
        acc.setdefault(kind, {}).setdefault(int(m.group(1)), []).append(e)
    return {k: {i: sum(v) / len(v) for i, v in sorted(d.items())} for k, d in sorted(acc.items())}


def layer_table(errors: dict[str, float]) -> str:
    """A text table: one row per layer, one column per matrix kind (relative RMS error, 4 decimals)."""
    kinds = by_layer(errors)
    if not kinds:
        return ""
    layers = sorted({i for d in kinds.values() for i in d})
    short = [k.split(".")[-1] for k in kinds]
    lines = ["layer " + " ".join(f"{s:>10s}" for s in short)]
    for i in layers:
        lines.append(f"{i:5d} " + " ".join(f"{kinds[k][i]:10.4f}" if i in kinds[k] else f"{'-':>10s}" for k in kinds))
    return "\n".join(lines)


def plot_errors(errors: dict[str, float], out: Path, title: str) -> None:
    """PNG of the relative RMS error of each matrix kind across layers (matplotlib, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    for kind, d in by_layer(errors).items():
        ax.plot(list(d), list(d.values()), marker=".", lw=0.9, label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative RMS error")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7, ncol=2)
    fig.tight_layout()
    from formats.files.atomic import atomic_file
    with atomic_file(Path(out), force=True) as tmp:  # replaced, never half-written
        fig.savefig(tmp, format=Path(out).suffix.lstrip(".").lower() or "png")
    plt.close(fig)
