#!/usr/bin/env python3
"""Family benchmark: a shape-exact proxy of every Qwen2-family member through every conversion, checked
against transformers and llama.cpp.

For each system (qconvert/testing/proxy.py SHAPES: full widths, 2 layers, 1 for 57b-a14b so that transformers fits
in 24 GiB; ``--narrow``: the narrow copies with the same traits, as CI runs them), on the same tokens:

  f16     qconvert hf-to-gguf --outtype f16, in llama.cpp, vs transformers on the source: KL <= 5e-5 (MoE: or
          <= 1.1x the KL of llama.cpp's own convert_hf_to_gguf.py --outtype f16, whose execution flips
          near-tied expert choices just the same)
  q8_0    qconvert hf-to-gguf --outtype q8_0 in llama.cpp: KL <= 1.5x that of convert_hf_to_gguf.py --outtype q8_0
  q4_k_m  qconvert hf-to-gguf F16.gguf --outtype q4_k_m: KL <= 1.1x llama-quantize Q4_K_M of the same F16 GGUF,
          and every tensor type equal to llama-quantize's
  int4    qconvert quantize --mix uniform --sym (codes that map exactly to Q4_0 / Q8_0), hf-to-gguf of that
          folder (every quantised tensor mapped exactly) in llama.cpp vs our decoder on the folder: mean KL <= 5e-3
          (llama.cpp's Q8 activations)
  gguf-to-hf  of the F16 GGUF (--dtype f16): every tensor bit-equal to the source rounded to f16 by torch,
          and config.json equal to the source's (every key but the dtype)

Every model runs in a subprocess (its memory goes back before the next); outputs are deleted when no later
check needs them. Prints a Markdown table (system x check: KL, top-1, bound, pass, seconds) and saves JSON.
  .venv/bin/python scripts/bench_family.py --work /tmp/family [--systems 7b,72b] [--narrow] [--tokens 128]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from qconvert.testing.peers import kl_stats, llama_convert_cmd  # noqa: E402
from qconvert.testing.proxy import SHAPES, proxy_config, write_proxy  # noqa: E402

PY = sys.executable
QC = [str(Path(PY).parent / "qconvert")]  # the console script next to this interpreter
# Two layers of 57b-a14b do not fit transformers (float32, ~8 GB a layer) in 24 GiB; 72b's two layers just do
# (peak RSS 23.5 GB).
LAYERS = {"57b-a14b": 1}
CHECKS = ("f16", "gguf-to-hf", "q4_k_m", "q8_0", "int4")
BOUNDS = {"f16": 5e-5, "q8_0": 1.5, "q4_k_m": 1.1, "int4": 5e-3, "moe_f16": 1.1}


def sh(cmd: list[str], env: dict[str, str] | None = None, output: list[str] | None = None) -> float:
    """Run ``cmd``; return its wall time (its stdout + stderr appended to ``output``); raise with its last
    stderr lines when it fails."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed ({r.returncode}):\n"
                           + "\n".join((r.stderr or r.stdout).splitlines()[-12:]))
    if output is not None:
        output.append(r.stdout + r.stderr)
    return time.perf_counter() - t0


def worker(kind: str, model: str, ids_path: str, out: str) -> None:
    """In a subprocess: logits of ``model`` over the token ids (``hf``: transformers float32, ``llama``:
    llama.cpp), saved as .npy; ``quantize``: llama-quantize ``model`` to ``out`` as Q4_K_M."""
    from qconvert.testing import peers

    if kind == "quantize":
        peers.llama_quantize(Path(model), Path(out), "Q4_K_M")
        return
    ids = json.loads(Path(ids_path).read_text())
    fn = {"hf": peers.hf_logits, "llama": peers.llama_logits}[kind]
    np.save(out, fn(Path(model), ids))


class System:
    """One proxy's checks, run in a work folder."""

    def __init__(self, shape: str, work: Path, narrow: bool, tokens: int, layers: int | None = None,
                 progress: bool = True, checks: tuple[str, ...] = CHECKS):
        self.shape, self.work, self.narrow, self.progress, self.checks = shape, work, narrow, progress, checks
        self.layers = layers or LAYERS.get(shape, 2)
        self.cfg = proxy_config(shape, self.layers, narrow=narrow)
        self.moe = self.cfg["model_type"] == "qwen2_moe"
        self.n_tokens = tokens
        self.rows: list[dict[str, Any]] = []

    def log(self, msg: str) -> None:
        if self.progress:
            print(f"[{self.shape}{' narrow' if self.narrow else ''}] {msg}", file=sys.stderr, flush=True)

    def logits(self, kind: str, model: Path) -> np.ndarray:
        out = self.work / f"logits-{kind}-{model.name}.npy"
        if kind == "ours":
            npz = out.with_suffix(".npz")
            sh(QC + ["logits", str(model), "--token-ids", str(self.ids_path), "--out", str(npz)])
            a = np.load(npz)["logits"]
            npz.unlink()
            return a
        sh([PY, __file__, "--worker", kind, str(model), str(self.ids_path), str(out)])
        a = np.load(out)
        out.unlink()
        return a

    def row(self, check: str, stats: dict[str, float] | None, bound: float | None, ok: bool, secs: float,
            **extra: Any) -> None:
        r = {"system": self.shape + (" (narrow)" if self.narrow else ""), "check": check,
             "kl": stats["mean_kl"] if stats else None, "top1": stats["top1"] if stats else None,
             "bound": bound, "pass": bool(ok), "seconds": round(secs, 1), **extra}
        self.rows.append(r)
        self.log(f"{check}: {'pass' if ok else 'FAIL'} {json.dumps({k: v for k, v in r.items() if k not in ('system', 'check')})}")

    def run(self) -> list[dict[str, Any]]:
        """Every check of this system; a check that crashes is a failed row with the error."""
        self.work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.hf = write_proxy(self.work / "hf", self.shape, self.layers, narrow=self.narrow, progress=self.progress)
        self.log(f"proxy ready ({time.perf_counter() - t0:.0f}s)")
        from tokenizers import Tokenizer
        text = (ROOT / "qconvert" / "data" / "verify.txt").read_text()
        ids = Tokenizer.from_file(str(self.hf / "tokenizer.json")).encode(text * 4).ids[: self.n_tokens]
        self.ids_path = self.work / "ids.json"
        self.ids_path.write_text(json.dumps(ids))
        checks = {"f16": self.check_f16, "gguf-to-hf": self.check_back, "q4_k_m": self.check_q4km,
                  "q8_0": self.check_q8, "int4": self.check_int4}
        if set(self.checks) & {"f16", "q8_0", "q4_k_m"}:
            self.ref = self.logits("hf", self.hf)
            self.log(f"transformers logits std {self.ref.std():.2f}")
        for name in self.checks:
            try:
                checks[name]()
            except Exception as e:  # noqa: BLE001 - the benchmark reports any failure as a failed row
                self.row(name, None, None, False, 0.0, error=str(e).splitlines()[-1][:200])
        (self.work / "f16.gguf").unlink(missing_ok=True)
        return self.rows

    def f16(self) -> tuple[Path, float]:
        """Our F16 GGUF of the proxy (made once, kept until the system is done)."""
        out = self.work / "f16.gguf"
        if not out.is_file():
            self.f16_secs = self._gguf(self.hf, "f16.gguf", "f16")[1]
        return out, self.f16_secs

    def _gguf(self, src: Path, name: str, outtype: str) -> tuple[Path, float]:
        out = self.work / name
        return out, sh(QC + ["hf-to-gguf", str(src), str(out), "--outtype", outtype, "--force"])

    def _theirs(self, name: str, outtype: str) -> Path:
        out = self.work / name
        cmd, env = llama_convert_cmd(self.hf, out, outtype)
        sh(cmd, env)
        return out

    def check_f16(self) -> None:
        f16, secs = self.f16()
        s = kl_stats(self.ref, self.logits("llama", f16))
        bound, extra = BOUNDS["f16"], {}
        if self.moe:  # llama.cpp's own converter on the same proxy: the execution noise floor of expert routing
            theirs = self._theirs("theirs-f16.gguf", "f16")
            peer = kl_stats(self.ref, self.logits("llama", theirs))
            theirs.unlink()
            extra = {"peer_kl": peer["mean_kl"]}
            bound = max(bound, BOUNDS["moe_f16"] * peer["mean_kl"])
        self.row("f16", s, bound, s["mean_kl"] <= bound, secs, **extra)

    def check_back(self) -> None:
        import torch
        from safetensors import safe_open

        back = self.work / "back"
        secs = sh(QC + ["gguf-to-hf", str(self.f16()[0]), str(back), "--dtype", "f16", "--force"])
        want = json.loads((self.hf / "config.json").read_text())
        got = json.loads((back / "config.json").read_text())
        bad_cfg = sorted(k for k in want if k != "torch_dtype" and got.get(k) != want[k])
        src_map = json.loads((self.hf / "model.safetensors.index.json").read_text())["weight_map"]
        idx = back / "model.safetensors.index.json"
        back_map = json.loads(idx.read_text())["weight_map"] if idx.is_file() else None
        bad_t, n = [], 0
        for name, fn in src_map.items():
            with safe_open(str(self.hf / fn), "pt") as a, \
                    safe_open(str(back / (back_map[name] if back_map else "model.safetensors")), "pt") as b:
                x, y = a.get_tensor(name).to(torch.float16), b.get_tensor(name)
                n += 1
                if y.dtype != torch.float16 or not torch.equal(x.view(torch.int16), y.view(torch.int16)):
                    bad_t.append(name)
        missing = set(back_map or []) ^ set(src_map) if back_map else set()
        shutil.rmtree(back)
        ok = not bad_cfg and not bad_t and not missing
        self.row("gguf-to-hf", None, None, ok, secs, tensors=n, unequal_tensors=bad_t[:5], unequal_config=bad_cfg)

    def check_q4km(self) -> None:
        from formats.gguf.header import read_header

        f16 = self.f16()[0]
        ours, secs = self._gguf(f16, "q4km.gguf", "q4_k_m")
        theirs = self.work / "theirs-q4km.gguf"
        sh([PY, __file__, "--worker", "quantize", str(f16), "-", str(theirs)])
        a = {t.name: t.type for t in read_header(ours)[1]}
        b = {t.name: t.type for t in read_header(theirs)[1]}
        s = kl_stats(self.ref, self.logits("llama", ours))
        peer = kl_stats(self.ref, self.logits("llama", theirs))
        ours.unlink(), theirs.unlink()
        bound = BOUNDS["q4_k_m"] * peer["mean_kl"]
        self.row("q4_k_m", s, bound, s["mean_kl"] <= bound and a == b, secs, peer_kl=peer["mean_kl"],
                 types_equal=a == b)

    def check_q8(self) -> None:
        ours, secs = self._gguf(self.hf, "q8.gguf", "q8_0")
        s = kl_stats(self.ref, self.logits("llama", ours))
        ours.unlink()
        theirs = self._theirs("theirs-q8.gguf", "q8_0")
        peer = kl_stats(self.ref, self.logits("llama", theirs))
        theirs.unlink()
        bound = BOUNDS["q8_0"] * peer["mean_kl"]
        self.row("q8_0", s, bound, s["mean_kl"] <= bound, secs, peer_kl=peer["mean_kl"])

    def check_int4(self) -> None:
        folder = self.work / "int4"
        secs = sh(QC + ["quantize", str(self.hf), str(folder), "--mix", "uniform", "--sym", "--force", "--quiet"])
        said: list[str] = []
        g = self.work / "int4.gguf"
        s2 = sh(QC + ["hf-to-gguf", str(folder), str(g), "--force", "--quiet"], output=said)
        m = re.search(r"(\d+) of (\d+) quantised tensors mapped exactly", said[0])
        exact = bool(m) and m.group(1) == m.group(2)
        ours = self.logits("ours", folder)
        s = kl_stats(ours, self.logits("llama", g))
        vs_ref = kl_stats(self.ref, ours)["mean_kl"] if hasattr(self, "ref") else None
        shutil.rmtree(folder), g.unlink()
        self.row("int4", s, BOUNDS["int4"], s["mean_kl"] <= BOUNDS["int4"] and exact, secs + s2,
                 int4_vs_source_kl=vs_ref, mapped=m.group(0) if m else said[0].strip()[-120:])


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table: one line per system, a column per check (KL / top-1, pass)."""
    checks = ["f16", "q8_0", "q4_k_m", "int4", "gguf-to-hf"]
    lines = ["| system | " + " | ".join(checks) + " |", "|---|" + "---|" * len(checks)]
    for system in dict.fromkeys(r["system"] for r in rows):
        cells = []
        for c in checks:
            r = next((r for r in rows if r["system"] == system and r["check"] == c), None)
            if r is None:
                cells.append("")
                continue
            mark = "✓" if r["pass"] else "✗"
            if r.get("error"):
                cells.append(f"✗ {r['error'][:60]}")
            elif r["kl"] is None:
                cells.append(f"{mark} {r.get('tensors', '')} tensors exact" if r["pass"] else f"{mark} differs")
            else:
                peer = f" (peer {r['peer_kl']:.2e})" if r.get("peer_kl") is not None else ""
                cells.append(f"{mark} KL {r['kl']:.2e}{peer}, top-1 {100 * r['top1']:.1f}%")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/qconvert-family"))
    ap.add_argument("--systems", default=",".join(SHAPES), help="comma-separated SHAPES keys")
    ap.add_argument("--narrow", action="store_true", help="the narrow copies with the same traits (CI's)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset of " + ", ".join(CHECKS))
    ap.add_argument("--json", type=Path, default=None, help="where to save the rows (default: WORK/family.json)")
    ap.add_argument("--keep", action="store_true", help="keep each system's proxy folder")
    ap.add_argument("--worker", nargs=4, metavar=("KIND", "MODEL", "IDS", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(*a.worker)
        return 0
    rows: list[dict[str, Any]] = []
    out = a.json or a.work / ("family-narrow.json" if a.narrow else "family.json")
    for shape in a.systems.split(","):
        if shape not in SHAPES:
            ap.error(f"unknown system {shape!r}; choose from {', '.join(SHAPES)}")
        work = a.work / (shape + ("-narrow" if a.narrow else ""))
        checks = tuple(a.checks.split(","))
        if set(checks) - set(CHECKS):
            ap.error(f"unknown check in {a.checks!r}; choose from {', '.join(CHECKS)}")
        rows += System(shape, work, a.narrow, a.tokens, checks=checks).run()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))
    print(markdown(rows))
    print(f"saved {out}", file=sys.stderr)
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
