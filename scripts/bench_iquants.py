#!/usr/bin/env python3
"""The i-quant files against llama-quantize --imatrix on a real model: for each type, our file (``qconvert
hf-to-gguf F16 --outtype TYPE --imatrix IM``) and llama-quantize's (``llama_model_quantize`` of the llama.cpp
that llama-cpp-python loads, given the same imatrix), made from the same F16 GGUF on the same threads.

Per type it prints how many tensors are byte-identical (of all N, F32 ones included), whether every tensor's type is equal,
and the wall time of each (ours / theirs; both run as a fresh process). A Q2_K tensor without an imatrix entry
(the token embedding of iq1_s .. iq2_xs) gets our own unweighted Q2_K search and is expected to differ.

The F16 GGUF is made by llama.cpp's converter (convert_hf_to_gguf.py) from our HF conversion of ``--gguf``
(default: the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M, qconvert.testing.fetch), or given with ``--f16``. The
imatrix comes from llama-imatrix (qconvert.testing.peers.llama_tool builds it) or from ``qconvert imatrix``
(``--imatrix-tool``; auto: llama-imatrix when it is already built), on the stdlib calibration text, or is given
with ``--imatrix``; the output says which.

    python scripts/bench_iquants.py --types iq2_xxs iq3_s
    python scripts/bench_iquants.py --model 1.5b
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from formats.gguf.header import read_header  # noqa: E402
from qconvert.corpus import CALIB_MODULES, stdlib_text  # noqa: E402
from qconvert.quant.mixtures import MIXTURES  # noqa: E402
from qconvert.testing.fetch import cache_dir, fetch_real_model  # noqa: E402
from qconvert.testing.peers import llama_convert, llama_tool  # noqa: E402

QC = str(Path(sys.executable).parent / "qconvert")
TYPES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_s", "iq3_m")
# llama-quantize in a fresh process, the imatrix file read as llama-quantize reads it (tests/test_imatrix.py)
_THEIRS = ("import sys; from formats.gguf.imatrix import read_imatrix; "
           "from qconvert.testing.peers import llama_quantize; im = read_imatrix(sys.argv[3]); "
           "llama_quantize(sys.argv[1], sys.argv[2], int(sys.argv[4]), n_threads=int(sys.argv[5]), "
           "imatrix={k: e.weights() for k, e in im.entries.items()})")


def run(cmd: list[str], log: Path, cwd: Path | None = None) -> tuple[float, bool]:
    """Wall time of ``cmd`` (output to ``log``) and whether it succeeded."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    return time.perf_counter() - t0, r.returncode == 0


def need(cmd: list[str], log: Path) -> float:
    dt, ok = run(cmd, log)
    if not ok:
        sys.exit(f"failed: {' '.join(cmd[:4])} ...; see {log}")
    return dt


def make_f16(args: argparse.Namespace, w: Path) -> Path:
    """The F16 GGUF by llama.cpp's converter, from our HF conversion of the source GGUF."""
    if args.f16:
        return args.f16
    f16 = w / "llama-f16.gguf"
    if f16.exists():
        return f16
    if args.gguf is None:
        args.gguf = fetch_real_model(model=args.model)
    hf = w / "hf-bf16"
    if not (hf / "config.json").is_file():
        need([QC, "gguf-to-hf", str(args.gguf), str(hf), "--force", "--quiet"], w / "gguf-to-hf.log")
    t0 = time.perf_counter()
    llama_convert(hf, f16, "f16")
    print(f"F16 GGUF by convert_hf_to_gguf.py: {f16} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return f16


def make_imatrix(args: argparse.Namespace, w: Path, f16: Path) -> tuple[Path, str]:
    """The importance matrix file and a line saying where it came from."""
    if args.imatrix:
        return args.imatrix, f"given ({args.imatrix})"
    tool = args.imatrix_tool
    if tool == "auto":
        tool = "llama" if (cache_dir() / "llama-tools" / "llama-imatrix").is_file() else "qconvert"
    calib = w / "calib.txt"
    calib.write_text(stdlib_text(CALIB_MODULES))
    out = w / f"imatrix-{tool}-{args.calib_chunks}x{args.ctx}.gguf"
    if not out.exists():
        if tool == "llama":
            cmd = [str(llama_tool("llama-imatrix")), "-m", str(f16), "-f", str(calib), "-c", str(args.ctx),
                   "--chunks", str(args.calib_chunks), "-t", str(args.threads), "-o", str(out)]
        else:
            cmd = [QC, "imatrix", str(f16), "--calib", str(calib), "-o", str(out), "--ctx", str(args.ctx),
                   "--chunks", str(args.calib_chunks), "--threads", str(args.threads), "--quiet"]
        dt = need(cmd, w / f"imatrix-{tool}.log")
        print(f"imatrix ({tool}): {dt:.0f}s", flush=True)
    name = "llama-imatrix" if tool == "llama" else "qconvert imatrix"
    return out, f"{name}, {args.calib_chunks} x {args.ctx} tokens of stdlib source ({out})"


def compare(ours: Path, theirs: Path) -> tuple[dict[str, list[int]], bool, list[str]]:
    """({type: [identical, count]} over every tensor, every type equal, names that differ)."""
    a, b = read_header(ours)[1], {t.name: t for t in read_header(theirs)[1]}
    types_equal = {t.name: t.type for t in a} == {n: t.type for n, t in b.items()}
    ra, rb = ours.read_bytes(), theirs.read_bytes()
    by_type: dict[str, list[int]] = {}
    differ = []
    for t in a:
        u = b.get(t.name)
        if u is None:
            differ.append(f"{t.name} (not in llama-quantize's file)")
            continue
        row = by_type.setdefault(u.type, [0, 0])
        row[1] += 1
        if t.type == u.type and ra[t.offset:t.offset + t.nbytes] == rb[u.offset:u.offset + u.nbytes]:
            row[0] += 1
        else:
            differ.append(f"{t.name} ({t.type})")
    return by_type, types_equal, differ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["0.5b", "1.5b"], default="0.5b", help="which real model (qconvert.testing.fetch.MODELS)")
    ap.add_argument("--gguf", type=Path, help="source GGUF of the model (default: the fetched Q4_K_M of --model)")
    ap.add_argument("--f16", type=Path, help="an F16 GGUF made by llama.cpp's converter (skips the conversion)")
    ap.add_argument("--imatrix", type=Path, help="an imatrix file to use (skips computing one)")
    ap.add_argument("--imatrix-tool", choices=["auto", "llama", "qconvert"], default="auto")
    ap.add_argument("--calib-chunks", type=int, default=16, help="imatrix calibration chunks of --ctx tokens")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=[m for m in MIXTURES if m.startswith(("iq", "q2"))])
    ap.add_argument("--threads", type=int, default=2, help="threads for both quantisers")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: /tmp/qconvert-bench-iq-MODEL)")
    args = ap.parse_args()
    w = args.work or Path(f"/tmp/qconvert-bench-iq-{args.model}")
    w.mkdir(parents=True, exist_ok=True)
    f16 = make_f16(args, w)
    imf, im_line = make_imatrix(args, w, f16)
    rows = []
    for t in args.types:
        ours, theirs = w / f"{t}-ours.gguf", w / f"{t}-llama.gguf"
        ours.unlink(missing_ok=True)
        dt_o, ok = run([QC, "hf-to-gguf", str(f16), str(ours), "--outtype", t, "--imatrix", str(imf), "--threads",
                        str(args.threads), "--force", "--quiet"], w / f"{t}-ours.log")
        dt_t = need([sys.executable, "-c", _THEIRS, str(f16), str(theirs), str(imf), str(MIXTURES[t][1]),
                     str(args.threads)], w / f"{t}-llama.log")
        if ok:
            by_type, types_equal, differ = compare(ours, theirs)
        else:
            last = (w / f"{t}-ours.log").read_text(errors="replace").strip().splitlines()[-1:]
            by_type, types_equal = {}, None
            for u in read_header(theirs)[1]:
                by_type.setdefault(u.type, [0, 0])[1] += 1
            differ = [f"ours failed: {last[0] if last else '?'}"]
        same, total = sum(v[0] for v in by_type.values()), sum(v[1] for v in by_type.values())
        kinds = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1][1]))
        verdict = "-" if types_equal is None else "equal" if types_equal else "DIFFER"
        rows.append((t, same, total, verdict, dt_o, dt_t, kinds, differ))
        print(f"{t:<8} identical {same}/{total} ({kinds})  types {verdict}  ours {dt_o:.1f}s  "
              f"llama-quantize {dt_t:.1f}s", flush=True)
    print(f"\n{f16.name} ({args.model}); imatrix: {im_line}; {args.threads} threads each; identical: "
          "tensors byte-identical to llama-quantize's (by llama-quantize's type); types: every tensor's type equal")
    print(f"{'type':<8} {'identical':>10} {'types':>6} {'ours s':>7} {'llama s':>8} {'ours/llama':>10}  by type; differ")
    for t, same, total, verdict, dt_o, dt_t, kinds, differ in rows:
        shown = ", ".join(differ[:3]) + (f", ... {len(differ) - 3} more" if len(differ) > 3 else "")
        print(f"{t:<8} {f'{same}/{total}':>10} {verdict:>6} {dt_o:7.1f} {dt_t:8.1f} {dt_o / dt_t:10.2f}  {kinds}"
              + (f"; {shown}" if shown else ""))

if __name__ == "__main__":
    main()
