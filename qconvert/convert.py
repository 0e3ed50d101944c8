"""Conversions as one library call each (the CLI is a shell over these): plans, sizes and the memory budget.

Every call opens its source, writes its output atomically (formats/files/atomic.py) and returns the line the
CLI prints; ``echo`` receives the progress lines in between.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from formats.errors import QConvertError
from formats.files.atomic import check_target
from formats.gguf.imatrix import Imatrix, read_imatrix
from formats.gguf.split import parse_size
from formats.gguf.write import write_gguf
from formats.hf.quantized_write import write_export
from formats.hf.write import write_hf
from formats.int4.to_gguf import EXACT_OUTTYPES, plan_int4_gguf
from formats.model.source import Source
from formats.open import open_model
from qconvert.quant.groupwise import QuantSpec
from qconvert.quant.mixtures import MIXTURES, ROLES, ROLES_FILE_TYPE, check_imatrix, mixture_types
from qconvert.quant.recipes import describe_plan
from qconvert.quant.report import layer_table, plot_errors
from qconvert.quant.run import CalibOptions, quantize_gguf_gptq, quantize_int4

Echo = Callable[[str], None]
PLAIN_GGUF_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def size_bytes(s: str) -> int:
    """'4G', '500M', '2K' (1024-based) or a byte count."""
    s = s.strip().upper().rstrip("B")
    try:
        return int(float(s[:-1]) * _UNITS[s[-1]]) if s and s[-1] in _UNITS else int(s)
    except ValueError:
        raise QConvertError(f"cannot read size {s!r}; write e.g. 2G, 500M or a byte count") from None


def available_memory() -> int:
    """Bytes of RAM available now (MemAvailable, capped by this process's cgroup memory limit, v1 or v2)."""
    avail = 8 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # this process's memory cgroup: v1 (hierarchy "memory") or v2 (the unified "0::" line)
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, ctrl, rel = line.split(":", 2)
        limit = (Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / "memory.limit_in_bytes" if "memory" in ctrl.split(",")
                 else Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.max" if ctrl == "" else None)
        try:
            v = limit.read_text().strip() if limit else ""
        except OSError:
            continue
        if v.isdigit():
            avail = min(avail, int(v))
    return avail


def memory_budget(max_memory: str | None) -> int:
    """Bytes the weights may occupy resident: ``max_memory``, else 80% of the RAM available now."""
    return size_bytes(max_memory) if max_memory else int(0.8 * available_memory())


def write_gguf_file(src: Source, out: Path, outtype: str, force: bool, progress: bool, echo: Echo,
                    name: str | None = None, split: tuple[int | None, int | None] = (None, None),
                    files: list[Path] | None = None, imatrix: Path | None = None,
                    flag: str = "--outtype") -> dict[str, str]:
    """Write a GGUF with a plain output type or a llama-quantize mixture (``imatrix``: an importance-matrix
    file for the encoders, as llama-quantize --imatrix). Returns {GGUF name: type}.

    A mixture whose types llama-quantize refuses to write without importance weights (the lowest-bit
    i-quants) is refused before anything is written when ``imatrix`` is None (``flag``: the option that named
    it, for the message), as is an imatrix that lacks one of those tensors.

    From an int4 folder or a GPTQ / AWQ / compressed-tensors checkpoint, ``auto`` / ``q4_0`` / ``q4_1`` /
    ``q8_0`` and the mixtures repack the stored codes into GGML blocks where that is exact and requantise the
    rest (formats/int4/to_gguf.py); one line reports which.
    """
    im: Imatrix | None = read_imatrix(imatrix) if imatrix is not None else None
    if outtype in MIXTURES:
        check_imatrix(outtype, mixture_types(src.config, outtype, im is not None), im, flag)
    if im is not None:
        echo(f"imatrix: {len(im.entries)} entries from {imatrix} ({im.chunk_count} chunks"
             + (f" of {im.datasets[0]}" if im.datasets else "") + ")")
    kw = dict(force=force, progress=progress, name=name, split_max_size=split[0], split_max_tensors=split[1],
              files=files, imatrix=im)
    if src.kind == "int4" or src.stored:
        if outtype in EXACT_OUTTYPES or outtype in MIXTURES:
            plan = plan_int4_gguf(src, outtype, mixture_types(src.config, outtype, im is not None),
                                  MIXTURES[outtype][1]) if outtype in MIXTURES else plan_int4_gguf(src, outtype)
            types = write_gguf(src, out, types=plan.types, file_type=plan.file_type, raw_chunks=plan.raw_chunks, **kw)
            echo(plan.summary())
            return types
        echo(f"{src.quantization or 'int4'} -> GGUF: no tensor mapped exactly; every matrix dequantised and "
             f"re-encoded as {outtype} (exact mapping of the codes needs --outtype {', '.join(EXACT_OUTTYPES)})")
    if outtype in MIXTURES or outtype == ROLES:
        return write_gguf(src, out, types=mixture_types(src.config, outtype, im is not None),
                          file_type=MIXTURES[outtype][1] if outtype in MIXTURES else ROLES_FILE_TYPE, **kw)
    return write_gguf(src, out, outtype, **kw)


def hf_to_gguf(location: str, out: Path, outtype: str, echo: Echo, name: str | None = None,
               split_max_size: str | None = None, split_max_tensors: int | None = None,
               imatrix: Path | None = None, force: bool = False, progress: bool = True) -> str:
    """Any model location -> a GGUF file (or llama.cpp split files); the summary line."""
    split = (parse_size(split_max_size) if split_max_size else None, split_max_tensors)
    if not any(split):
        check_target(out, force)
    t0 = time.perf_counter()
    files: list[Path] = []
    with open_model(location) as s:
        types = write_gguf_file(s, out, outtype, force, progress, echo, name, split, files, imatrix)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    size = sum(f.stat().st_size for f in files)
    where = f"{files[0]} .. {files[-1].name} ({len(files)} parts, " if len(files) > 1 else f"{out} ("
    return f"wrote {where}{size / 2**20:.1f} MiB, {len(types)} tensors {counts}) in {time.perf_counter() - t0:.1f}s"


def gguf_to_hf(location: str, outdir: Path, dtype: str = "bf16", max_shard_size: str = "4G", force: bool = False,
               progress: bool = True) -> str:
    """A GGUF (any type) -> an HF folder that transformers loads; the summary line."""
    check_target(outdir, force)
    t0 = time.perf_counter()
    with open_model(location) as s:
        shards = write_hf(s, outdir, dtype, size_bytes(max_shard_size), force=force, progress=progress)
    size = sum(p.stat().st_size for p in shards)
    return f"wrote {outdir} ({len(shards)} shard(s), {size / 2**20:.1f} MiB {dtype}) in {time.perf_counter() - t0:.1f}s"


def quantize_gguf(location: str, out: Path, gtype: str, method: str, calib: CalibOptions, echo: Echo,
                  imatrix: Path | None = None, force: bool = False, quiet: bool = False) -> str:
    """A model -> a GGUF of one type or a llama-quantize mixture, by the GGML encoders or GPTQ on their grids."""
    check_target(out, force)
    t0 = time.perf_counter()
    if gtype not in MIXTURES and gtype not in PLAIN_GGUF_TYPES + (ROLES,):
        raise QConvertError(f"--type {gtype} is not a GGUF quantisation qconvert writes; see --help")
    if method not in ("search", "gptq"):
        raise QConvertError(f"--method {method} is not available for --format gguf: the GGML encoders are "
                            "used (default), or gptq onto their blocks (--method gptq)")
    with open_model(location) as s:
        if method == "gptq":
            im = read_imatrix(imatrix) if imatrix is not None else None
            if gtype in MIXTURES:
                check_imatrix(gtype, mixture_types(s.config, gtype, im is not None), im, "--type")
            types = quantize_gguf_gptq(s, out, gtype, im, calib, force, quiet, echo)
        else:
            types = write_gguf_file(s, out, gtype, force, not quiet, echo, imatrix=imatrix, flag="--type")
    n = sum(1 for t in types.values() if t != "F32")
    return f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {n} quantised tensors, {gtype}) " \
           f"in {time.perf_counter() - t0:.1f}s"


def quantize_folder(location: str, out: Path, base: QuantSpec, method: str, mix: str, head_bits: int,
                    target_bpw: float | None, calib: CalibOptions, echo: Echo, report_png: Path | None = None,
                    force: bool = False, quiet: bool = False) -> None:
    """A model -> an int4 folder; echoes the size, the mix and the relative error of every matrix."""
    check_target(out, force)
    t0 = time.perf_counter()
    with open_model(location) as s:
        st = quantize_int4(s, out, base, method, mix, head_bits, target_bpw, calib, force, quiet, echo)
    errs = st["errors"]
    worst = sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    title = f"{base.label()} ({method}, mix {mix})"
    echo(f"wrote {out}: {title}, {st['bits_per_weight']:.3f} bits per weight on {st['quantised_params'] / 1e6:.1f}M "
         f"quantised weights (head {st['head'][0]} at {st['head'][1]} bits), {st['dir_bytes'] / 2**20:.1f} MiB, "
         f"{time.perf_counter() - t0:.1f}s")
    if st["upgrades"]:
        echo("mix: " + describe_plan(st["upgrades"]))
    if not quiet:
        echo("relative RMS error per layer and matrix:\n" + layer_table(errs))
    echo(f"relative RMS error per matrix: mean {sum(errs.values()) / len(errs):.4f}; worst "
         + ", ".join(f"{n} {e:.4f}" for n, e in worst))
    if report_png:
        plot_errors(errs, report_png, f"{location}: {title}")
        echo(f"wrote {report_png}")


def export(location: str, out: Path, to: str, echo: Echo, spec: QuantSpec, method: str = "search",
           mix: str = "uniform", widen: bool = False, force: bool = False, quiet: bool = False) -> str:
    """An int4 folder (codes kept) or any model (quantised first with ``spec`` on the format's grid) -> a
    GPTQ / AWQ / compressed-tensors checkpoint; the summary line."""
    check_target(out, force)
    t0 = time.perf_counter()
    tmp = out.parent / f".{out.name}.int4-tmp"
    try:
        with open_model(location) as s:
            if s.kind == "int4":
                line = write_export(s, out, to, force, not quiet, widen=widen)
            else:
                quantize_int4(s, tmp, spec, method, mix, 8, None, force=True, quiet=quiet, echo=echo)
                echo(f"quantised {location}: {spec.label()} ({method}, mix {mix})")
                with open_model(str(tmp)) as q:
                    line = write_export(q, out, to, force, not quiet, floats=s, widen=widen)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.iterdir())
    echo(line)
    return f"wrote {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s; check it with " \
           f"`qconvert verify {location} {out}`"
