"""The ``qconvert`` command line. User mistakes print one ``error:`` line and exit 1."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from formats.errors import QConvertError
from formats.gguf.write import OUTTYPES
from qconvert.quant.mixtures import MIXTURES, ROLES, ROLES_FILE_TYPE
from qconvert.quant.recipes import MIXES, describe_plan


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Move Qwen2-family weights between HF safetensors and GGUF, and check the result."""


def _size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().rstrip("B")
    try:
        return int(float(s[:-1]) * units[s[-1]]) if s and s[-1] in units else int(s)
    except ValueError:
        raise QConvertError(f"cannot read size {s!r}; write e.g. 2G, 500M or a byte count") from None


def _available_memory() -> int:
    """Bytes of RAM available now (MemAvailable, capped by a cgroup memory limit if one is set)."""
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


def _write_gguf(src, out: Path, outtype: str, force: bool, progress: bool, name: str | None = None,
                split: tuple[int | None, int | None] = (None, None), files: list[Path] | None = None,
                imatrix: Path | None = None) -> dict:
    """Write a GGUF with a plain output type or a llama-quantize mixture (``imatrix``: an importance-matrix
    file for the encoders, as llama-quantize --imatrix).

    From an int4 folder or a GPTQ / AWQ / compressed-tensors checkpoint, ``auto`` / ``q4_0`` / ``q4_1`` /
    ``q8_0`` repack the stored codes into GGML blocks where that is exact and requantise the rest
    (formats/int4/to_gguf.py); one line reports which.
    """
    from formats.gguf.imatrix import read_imatrix
    from formats.gguf.write import write_gguf

    im = read_imatrix(imatrix) if imatrix is not None else None
    if im is not None:
        click.echo(f"imatrix: {len(im.entries)} entries from {imatrix} ({im.chunk_count} chunks"
                   + (f" of {im.datasets[0]}" if im.datasets else "") + ")")

    if src.kind == "int4" or src.stored:
        from formats.int4.to_gguf import EXACT_OUTTYPES, plan_int4_gguf
        if outtype in EXACT_OUTTYPES or outtype in MIXTURES:
            if outtype in MIXTURES:
                from qconvert.quant.mixtures import mixture_types
                plan = plan_int4_gguf(src, outtype, mixture_types(src.config, outtype, im is not None),
                                      MIXTURES[outtype][1])
            else:
                plan = plan_int4_gguf(src, outtype)
            types = write_gguf(src, out, force=force, progress=progress, name=name, types=plan.types,
                               file_type=plan.file_type, raw_chunks=plan.raw_chunks, split_max_size=split[0],
                               split_max_tensors=split[1], files=files, imatrix=im)
            click.echo(plan.summary())
            return types
        click.echo(f"{src.quantization or 'int4'} -> GGUF: no tensor mapped exactly; every matrix dequantised and re-encoded as {outtype} "
                   f"(exact mapping of the codes needs --outtype {', '.join(EXACT_OUTTYPES)})")
    if outtype in MIXTURES or outtype == ROLES:
        from qconvert.quant.mixtures import mixture_types
        return write_gguf(src, out, force=force, progress=progress, name=name,
                          types=mixture_types(src.config, outtype, im is not None),
                          file_type=MIXTURES[outtype][1] if outtype in MIXTURES else ROLES_FILE_TYPE,
                          split_max_size=split[0], split_max_tensors=split[1], files=files, imatrix=im)
    return write_gguf(src, out, outtype, force=force, progress=progress, name=name, split_max_size=split[0],
                      split_max_tensors=split[1], files=files, imatrix=im)


def _imatrix_option(f):
    return click.option("--imatrix", type=click.Path(path_type=Path, dir_okay=False, exists=True),
                        help="importance matrix (llama-imatrix's GGUF or legacy .dat, or `qconvert imatrix`): "
                             "weights every block's fit as llama-quantize --imatrix does")(f)


@cli.command("hf-to-gguf")
@click.argument("src")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--outtype", type=click.Choice(OUTTYPES + tuple(MIXTURES) + (ROLES,)), default="auto", show_default=True,
              help="type of 2-D weights (1-D tensors and norms stay F32), or a llama-quantize mixture (the K-quant "
                   "ones, iq4_nl, iq4_xs, and q4_0_mix .. q5_1_mix: llama-quantize's Q4_0 .. Q5_1 files). "
                   "auto: bf16 for a bf16 source, else f16; for an int4 folder, its codes repacked exactly into "
                   "Q4_0 (sym) / Q4_1 (asym) blocks up to 4 bits, Q5_0 / Q5_1 for 5 bits, Q8_0 for 6-8-bit sym codes "
                   "(the 8-bit head), requantising only what cannot map (reported); likewise for a GPTQ / AWQ / "
                   "compressed-tensors checkpoint (symmetric groups -> Q4_0, asymmetric -> Q4_1). q4_0 / q4_1 / "
                   "q5_0 / q5_1 / q8_0 and the mixtures (e.g. q4_0_mix) from those also map exactly where the codes "
                   "fit the tensor's type")
@click.option("--name", default=None, help="general.name to store (default: the model's own name)")
@click.option("--split-max-size", default=None, help="write llama.cpp split files (OUT-00001-of-0000N.gguf) of at "
              "most this much tensor data each, e.g. 2G or 200M (1000-based, as llama-gguf-split)")
@click.option("--split-max-tensors", type=click.IntRange(min=1), default=None,
              help="write llama.cpp split files of at most this many tensors each")
@_imatrix_option
@click.option("--force", is_flag=True, help="overwrite OUT if it exists")
@click.option("--quiet", is_flag=True, help="no progress bar")
def hf_to_gguf(src: str, out: Path, outtype: str, name: str | None, split_max_size: str | None,
               split_max_tensors: int | None, imatrix: Path | None, force: bool, quiet: bool) -> None:
    """Convert an HF checkpoint (folder or Hub id), an int4 folder or a GGUF (a split one: its first part) to a
    GGUF file, or to llama.cpp split files."""
    from formats.files.atomic import check_target
    from formats.gguf.split import parse_size
    from formats.open import open_model

    split = (parse_size(split_max_size) if split_max_size else None, split_max_tensors)
    if not any(split):
        check_target(out, force)
    t0 = time.perf_counter()
    with open_model(src) as s:
        files: list[Path] = []
        types = _write_gguf(s, out, outtype, force, not quiet, name, split, files, imatrix)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    size = sum(f.stat().st_size for f in files)
    where = f"{files[0]} .. {files[-1].name} ({len(files)} parts, " if len(files) > 1 else f"{out} ("
    click.echo(f"wrote {where}{size / 2**20:.1f} MiB, {len(types)} tensors {counts}) "
               f"in {time.perf_counter() - t0:.1f}s")


@cli.command("gguf-to-hf")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["bf16", "f16", "f32"]), default="bf16", show_default=True)
@click.option("--max-shard-size", default="4G", show_default=True, help="largest safetensors shard")
@click.option("--force", is_flag=True, help="replace OUTDIR if it exists")
@click.option("--quiet", is_flag=True, help="no progress bar")
def gguf_to_hf(src: Path, outdir: Path, dtype: str, max_shard_size: str, force: bool, quiet: bool) -> None:
    """Dequantise a GGUF into an HF folder that transformers loads."""
    from formats.files.atomic import check_target
    from formats.hf.write import write_hf
    from formats.open import open_model

    check_target(outdir, force)
    t0 = time.perf_counter()
    with open_model(str(src)) as s:
        shards = write_hf(s, outdir, dtype, _size(max_shard_size), force=force, progress=not quiet)
    size = sum(p.stat().st_size for p in shards)
    click.echo(f"wrote {outdir} ({len(shards)} shard(s), {size / 2**20:.1f} MiB {dtype}) in {time.perf_counter() - t0:.1f}s")


@cli.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--all", "show_all", is_flag=True, help="list every tensor")
def inspect_cmd(model: str, as_json: bool, show_all: bool) -> None:
    """Show a model's metadata and tensor table (GGUF file, HF folder or Hub id)."""
    from formats.open import open_model
    from qconvert.inspect_model import describe, render

    with open_model(model) as s:
        d = describe(s)
    click.echo(json.dumps(d, indent=1) if as_json else render(d, None if show_all else 40))


@cli.command("quantize")
@click.argument("src")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["int4", "gguf"]), default="int4", show_default=True)
@click.option("--bits", type=click.IntRange(2, 8), default=4, show_default=True, help="int4 format: bits per code")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True,
              help="int4 format: columns per group of one scale (and offset)")
@click.option("--scale-bits", type=click.Choice(["8", "16"]), default="8", show_default=True,
              help="int4 format: 8 = 8-bit scale/offset codes on per-row f16 steps; 16 = f16 scales/offsets")
@click.option("--mix", type=click.Choice(MIXES), default="roles", show_default=True,
              help="int4 format: roles = spend the bits budget on sensitive matrices (k/v 8-bit, q/o +1 bit, ...); "
                   "uniform = every matrix at --bits")
@click.option("--target-bpw", type=click.FloatRange(1, 16), help="--mix roles: bits-per-weight budget "
              "(default: bits + 0.5)")
@click.option("--method", type=click.Choice(["rtn", "search", "gptq"]), default="search", show_default=True,
              help="rtn: min/max; search: error-minimising scale/offset search; gptq: data-aware (calibration text). "
                   "gguf format: search (the GGML encoders, as llama-quantize) or gptq onto the type's own blocks")
@click.option("--sym", is_flag=True, help="symmetric groups (no offsets)")
@click.option("--zero-point", "zero_point", type=click.Choice(["float", "int"]), default="float", show_default=True,
              help="asymmetric groups: float = any f16 / 8-bit offset; int = an integer zero point z (offset "
                   "-z x scale; with 8-bit scale codes every scale is an exact f16), the grid GPTQ / AWQ / "
                   "compressed-tensors store, so `qconvert export` keeps every value")
@click.option("--head-bits", type=click.IntRange(2, 8), default=8, show_default=True,
              help="int4 format: bits of the output head (lm_head, or the tied embedding)")
@click.option("--calib", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="gptq: calibration text file (default: a fixed set of Python standard-library modules)")
@click.option("--calib-samples", type=click.IntRange(1), default=64, show_default=True,
              help="gptq: number of calibration windows")
@click.option("--calib-ctx", type=click.IntRange(16), default=512, show_default=True, help="gptq: tokens per window")
@click.option("--act-order", is_flag=True, help="gptq: sweep columns by decreasing Hessian diagonal (static groups)")
@click.option("--sequential/--no-sequential", default=True, show_default=True,
              help="gptq: within a layer, record each stage's inputs (q/k/v, o, gate/up, down) with the earlier "
                   "stages already quantised (one forward pass per stage)")
@click.option("--damp", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="gptq: Hessian dampening, a fraction of its mean diagonal")
@click.option("--propagate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="gptq: error propagation, 0..1: run the unquantised model alongside and first move each matrix "
                   "by this fraction of the change that makes it reproduce the unquantised outputs from the "
                   "quantised model's inputs (dense models; a second forward stream)")
@click.option("--calib-dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="gptq: number type of the calibration forward passes and recorded inputs (dense layers, torch); "
                   "auto = bfloat16 where the CPU multiplies it natively (AMX / AVX512-BF16), else float32")
@click.option("--report", "report_png", type=click.Path(path_type=Path, dir_okay=False),
              help="int4 format: write the per-layer error as a PNG plot")
@click.option("--type", "gtype", default="q4_k_m", show_default=True,
              help="gguf format: q8_0, q4_0, q4_1, q5_0, q5_1 (every matrix), roles (the int4 --mix roles plan's "
                   "bits on GGML types: 4 -> Q4_1, 5 -> Q5_1, 8 -> Q8_0, ...) or a llama-quantize mixture ("
                   + ", ".join(MIXTURES) + ")")
@_imatrix_option
@click.option("--force", is_flag=True, help="replace OUT if it exists")
@click.option("--quiet", is_flag=True, help="no progress bar")
def quantize_cmd(src: str, out: Path, fmt: str, bits: int, group_size: str, scale_bits: str, mix: str,
                 target_bpw: float | None, method: str, sym: bool, zero_point: str, head_bits: int, calib: Path | None,
                 calib_samples: int, calib_ctx: int, act_order: bool, sequential: bool, damp: float,
                 propagate: float, calib_dtype: str, report_png: Path | None,
                 gtype: str, imatrix: Path | None, force: bool, quiet: bool) -> None:
    """Quantise a model (HF folder, Hub id or GGUF) to the int4 layout or to a GGUF type / mixture."""
    from formats.files.atomic import check_target
    from formats.open import open_model

    check_target(out, force)
    t0 = time.perf_counter()
    if imatrix is not None and fmt != "gguf":
        raise QConvertError("--imatrix applies to --format gguf; the int4 format's data-aware method is --method gptq")
    from qconvert.quant.run import CalibOptions
    calib_opts = CalibOptions(calib, calib_samples, calib_ctx, act_order, damp, sequential, propagate, calib_dtype)
    if fmt == "gguf":
        if gtype not in MIXTURES and gtype not in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", ROLES):
            raise QConvertError(f"--type {gtype} is not a GGUF quantisation qconvert writes; see --help")
        if method not in ("search", "gptq"):
            raise QConvertError(f"--method {method} is not available for --format gguf: the GGML encoders are "
                                "used (default), or gptq onto their blocks (--method gptq)")
        with open_model(src) as s:
            if method == "gptq":
                from formats.gguf.imatrix import read_imatrix
                from qconvert.quant.run import quantize_gguf_gptq
                im = read_imatrix(imatrix) if imatrix is not None else None
                types = quantize_gguf_gptq(s, out, gtype, im, calib_opts, force, quiet, click.echo)
            else:
                types = _write_gguf(s, out, gtype, force, not quiet, imatrix=imatrix)
        n = sum(1 for t in types.values() if t != "F32")
        click.echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {n} quantised tensors, {gtype}) "
                   f"in {time.perf_counter() - t0:.1f}s")
        return
    from qconvert.quant.groupwise import QuantSpec
    from qconvert.quant.report import layer_table, plot_errors
    from qconvert.quant.run import quantize_int4
    base = QuantSpec(bits, int(group_size), sym, int(scale_bits), zero_int=zero_point == "int")
    with open_model(src) as s:
        st = quantize_int4(s, out, base, method, mix, head_bits, target_bpw, calib_opts, force, quiet, click.echo)
    errs = st["errors"]
    worst = sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    title = f"{base.label()} ({method}, mix {mix})"
    click.echo(f"wrote {out}: {title}, "
               f"{st['bits_per_weight']:.3f} bits per weight on {st['quantised_params'] / 1e6:.1f}M quantised weights "
               f"(head {st['head'][0]} at {st['head'][1]} bits), "
               f"{st['dir_bytes'] / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f}s")
    if st["upgrades"]:
        click.echo("mix: " + describe_plan(st["upgrades"]))
    if not quiet:
        click.echo("relative RMS error per layer and matrix:\n" + layer_table(errs))
    click.echo(f"relative RMS error per matrix: mean {sum(errs.values()) / len(errs):.4f}; worst "
               + ", ".join(f"{n} {e:.4f}" for n, e in worst))
    if report_png:
        plot_errors(errs, report_png, f"{src}: {title}")
        click.echo(f"wrote {report_png}")


@cli.command("export")
@click.argument("src")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(["gptq", "awq", "compressed-tensors"]), required=True,
              help="gptq: GPTQ v1 (GPTQModel `dynamic` for per-module bits; 2/3/4/8 bits); awq: AutoAWQ GEMM (4-bit, "
                   "one group size); compressed-tensors: pack-quantized, one config group per scheme (2-8 bits)")
@click.option("--bits", type=click.IntRange(2, 8), default=4, show_default=True,
              help="SRC not an int4 folder: quantise it first, with these bits ...")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="128", show_default=True,
              help="... this group size ...")
@click.option("--sym", is_flag=True, help="... symmetric groups (default: integer zero points, --zero-point int) ...")
@click.option("--mix", type=click.Choice(MIXES), default="uniform", show_default=True, help="... this mix ...")
@click.option("--method", type=click.Choice(["rtn", "search", "gptq"]), default="search", show_default=True,
              help="... and this method (gptq: default calibration text)")
@click.option("--widen", is_flag=True, help="store matrices whose bit width the format lacks at the next width it has "
              "(exact; e.g. GPTQ 5 -> 8 bits); AWQ leaves 5-8-bit matrices unquantised (F16, modules_to_not_convert)")
@click.option("--force", is_flag=True, help="replace OUT if it exists")
@click.option("--quiet", is_flag=True, help="no progress bar")
def export_cmd(src: str, out: Path, to: str, bits: int, group_size: str, sym: bool, mix: str, method: str,
               widen: bool, force: bool, quiet: bool) -> None:
    """Write a quantised HF checkpoint that vLLM, SGLang and transformers load. SRC: an int4 folder (its codes are
    kept: symmetric and --zero-point int groups exactly, float offsets re-rounded to integer zeros, the change
    reported), or any model, quantised first on the format's own grid (f16 scales, integer zeros) so nothing
    is rounded on the way."""
    import shutil

    from formats.files.atomic import check_target
    from formats.hf.quantized_write import write_export
    from formats.open import open_model
    from qconvert.quant.groupwise import QuantSpec
    from qconvert.quant.run import quantize_int4

    check_target(out, force)
    t0 = time.perf_counter()
    tmp = out.parent / f".{out.name}.int4-tmp"
    try:
        with open_model(src) as s:
            if s.kind == "int4":
                line = write_export(s, out, to, force, not quiet, widen=widen)
            else:
                spec = QuantSpec(bits, int(group_size), sym, 16, zero_int=not sym)
                quantize_int4(s, tmp, spec, method, mix, 8, None, force=True, quiet=quiet, echo=click.echo)
                click.echo(f"quantised {src}: {spec.label()} ({method}, mix {mix})")
                with open_model(str(tmp)) as q:
                    line = write_export(q, out, to, force, not quiet, floats=s, widen=widen)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.iterdir())
    click.echo(line)
    click.echo(f"wrote {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s; check it with "
               f"`qconvert verify {src} {out}`")


@cli.command("imatrix")
@click.argument("model")
@click.option("--calib", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="calibration text file (default: a fixed set of Python standard-library modules)")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="imatrix file to write (llama-imatrix's GGUF layout)")
@click.option("--ctx", type=click.IntRange(16), default=512, show_default=True,
              help="tokens per chunk; each chunk runs from an empty cache (llama-imatrix's -c)")
@click.option("--chunks", type=click.IntRange(1), default=None, help="use at most this many chunks (default: all)")
@click.option("--force", is_flag=True, help="replace OUT if it exists")
@click.option("--quiet", is_flag=True, help="no progress bar")
def imatrix_cmd(model: str, calib: Path | None, out: Path, ctx: int, chunks: int | None, force: bool,
                quiet: bool) -> None:
    """Compute an importance matrix (per input column of every layer matrix, the mean squared activation over
    the calibration text), written in llama.cpp's imatrix format for `--imatrix` here or in llama-quantize."""
    from formats.files.atomic import check_target
    from formats.files.progress import bar
    from formats.gguf.imatrix import write_imatrix
    from formats.open import open_model
    from qconvert.corpus import CALIB_MODULES, stdlib_text, tokens_digest, windows
    from qconvert.quant.imatrix import compute_imatrix
    from qconvert.text import encode

    check_target(out, force)
    t0 = time.perf_counter()
    text = calib.read_text(encoding="utf-8", errors="replace") if calib else stdlib_text(CALIB_MODULES)
    with open_model(model) as s:
        ids = encode(s.tokenizer, text)
        ws = windows(ids, chunks or len(ids) // ctx, ctx)
        with bar(len(ws), "imatrix chunks", not quiet) as pb:
            im = compute_imatrix(s, ws, str(calib) if calib else "python-stdlib:" + ",".join(CALIB_MODULES),
                                 on_window=lambda k, n: pb.update(1))
    write_imatrix(im, out, force)
    click.echo(f"wrote {out}: {len(im.entries)} entries from {len(ws)} x {ctx} tokens (ids {tokens_digest(ws)}) "
               f"in {time.perf_counter() - t0:.1f}s")


def _backend_options(f):
    f = click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
                     help="torch backend weight dtype")(f)
    f = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)(f)
    f = click.option("--backend", type=click.Choice(["numpy", "torch"]), default="numpy", show_default=True)(f)
    return f


def _tokens(src, text: Path | None, token_ids: Path | None, ctx: int) -> "list[int]":
    from qconvert.text import encode

    if token_ids is not None:
        try:
            ids = json.loads(token_ids.read_text())
        except (OSError, ValueError) as e:
            raise QConvertError(f"{token_ids}: cannot read token ids ({e}); expected a JSON list of integers") from None
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise QConvertError(f"{token_ids}: expected a JSON list of integers")
        bad = [i for i in ids if not 0 <= i < src.config.vocab_size]
        if bad:
            raise QConvertError(f"{token_ids}: token id {bad[0]} outside the vocabulary (0..{src.config.vocab_size - 1})")
    else:
        path = text or Path(__file__).parent / "data" / "verify.txt"
        try:
            body = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QConvertError(f"{path}: cannot read text ({e})") from None
        ids = encode(src.tokenizer, body)
    if len(ids) < 2:
        raise QConvertError("need at least 2 tokens; give a longer --text")
    return ids[:ctx]


def _logit_chunks(location: str, tokens, backend: str, device: str, dtype: str):
    """The model's logits for ``tokens``, [≤128, vocab] float32 at a time; the decoder streams its weights
    layer by layer, so memory stays at about one layer whatever the model's size."""
    import numpy as np

    from formats.open import open_model
    from qconvert.decoder import make_decoder

    with open_model(location) as src:
        dec = make_decoder(src, backend, device, dtype, stream=True)
        for chunk in dec.logit_chunks(tokens):
            yield np.asarray(chunk, dtype=np.float32)
        del dec


def _write_npz_streamed(path: Path, ids, chunks) -> tuple[int, int]:
    """An .npz with ``token_ids`` and ``logits`` whose logits are appended chunk by chunk (np.load reads it)."""
    import zipfile

    import numpy as np

    first = next(chunks)
    n, vocab = len(ids), first.shape[1]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("token_ids.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(ids, dtype=np.int32))
        with z.open("logits.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, vocab)})
            for c in (first, *chunks):
                f.write(np.ascontiguousarray(c, dtype="<f4").tobytes())
    return n, vocab


@cli.command("logits")
@click.argument("model")
@click.option("--text", type=click.Path(path_type=Path, dir_okay=False), help="text file to tokenise")
@click.option("--token-ids", type=click.Path(path_type=Path, dir_okay=False), help="JSON list of token ids")
@click.option("--ctx", default=512, show_default=True, help="use the first N tokens")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="output .npz (token_ids, logits)")
@click.option("--force", is_flag=True, help="overwrite --out")
@_backend_options
def logits_cmd(model: str, text: Path | None, token_ids: Path | None, ctx: int, out: Path, force: bool,
               backend: str, device: str, dtype: str) -> None:
    """Write the model's logits for the first N tokens of a text (or of given token ids)."""
    from formats.files.atomic import atomic_file, check_target
    from formats.open import open_model

    if text is not None and token_ids is not None:
        raise QConvertError("give either --text or --token-ids, not both")
    check_target(out, force)
    with open_model(model) as src:
        ids = _tokens(src, text, token_ids, ctx)
    t0 = time.perf_counter()
    with atomic_file(out, force) as tmp:
        n, vocab = _write_npz_streamed(tmp, ids, _logit_chunks(model, ids, backend, device, dtype))
    click.echo(f"wrote {out}: {n} tokens x {vocab} logits ({backend}, {time.perf_counter() - t0:.1f}s)")


@cli.command("verify")
@click.argument("ref")
@click.argument("cand")
@click.option("--text", type=click.Path(path_type=Path, dir_okay=False), help="text to evaluate (default: built-in sample)")
@click.option("--ctx", default=512, show_default=True, help="number of tokens")
@click.option("--max-kld", type=float, default=None, help="bound on mean KL (default by candidate type, see README)")
@click.option("--min-top1", type=float, default=None, help="bound on top-1 agreement (default by candidate type)")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="write the report as JSON")
@click.option("--plot", type=click.Path(path_type=Path), help="write KL per position as a PNG")
@_backend_options
def verify_cmd(ref: str, cand: str, text: Path | None, ctx: int, max_kld: float | None, min_top1: float | None,
               json_out: Path | None, plot: Path | None, backend: str, device: str, dtype: str) -> None:
    """Run REF and CAND on the same tokens; exit 1 when KL or top-1 misses its bound."""
    import os
    import tempfile

    import numpy as np

    from formats.open import open_model
    from qconvert.verify import Comparison, candidate_kind
    from qconvert.verify import plot as plot_kl

    with open_model(ref) as r, open_model(cand) as c:
        if r.tokenizer.tokens[: r.tokenizer.n_real] != c.tokenizer.tokens[: c.tokenizer.n_real]:
            raise QConvertError(f"{ref} and {cand} have different vocabularies; they are not the same model")
        ids = _tokens(r, text, None, ctx)
        kind = candidate_kind({t.quant or t.stype for t in c.tensors.values()})
    # one model at a time: the reference's logits go to a temporary file, then the candidate's are compared
    # with them chunk by chunk, so memory holds one layer of one model and a chunk of logits
    cmp = Comparison(np.asarray(ids))
    with tempfile.TemporaryFile(prefix="qconvert-ref-logits-") as tf:
        widths = []
        for ch in _logit_chunks(ref, ids, backend, device, dtype):
            tf.write(ch.tobytes())
            widths.append(ch.shape)
        pos = 0
        for ch in _logit_chunks(cand, ids, backend, device, dtype):
            if ch.shape[1] != widths[0][1]:
                raise QConvertError(f"{ref} has {widths[0][1]} logits per token, {cand} has {ch.shape[1]}; "
                                    "they are not the same model")
            nbytes = ch.size * 4
            r = np.frombuffer(os.pread(tf.fileno(), nbytes, pos), dtype=np.float32).reshape(ch.shape)
            cmp.add(r, ch)
            pos += nbytes
    rep, kl = cmp.report(kind, max_kld, min_top1)
    click.echo(f"tokens {rep.n_tokens}  candidate {kind}\n"
               f"KL mean {rep.mean_kl:.3e}  p99 {rep.p99_kl:.3e}  max {rep.max_kl:.3e}   (bound {rep.max_kld:g})\n"
               f"top-1 agreement {rep.top1 * 100:.2f}%   (bound {rep.min_top1 * 100:g}%)\n"
               f"perplexity ref {rep.ppl_ref:.4f}  cand {rep.ppl_cand:.4f}\n"
               f"max |dlogit| {rep.max_abs_dlogit:.4g}\n{'PASS' if rep.passed else 'FAIL'}")
    if json_out:
        from formats.files.atomic import atomic_file
        with atomic_file(json_out, force=True) as tmp:  # a report: replaced, but never half-written
            tmp.write_text(json.dumps(rep.as_dict(), indent=2) + "\n")
    if plot:
        plot_kl(kl, plot, f"{Path(cand).name} vs {Path(ref).name}: mean KL {rep.mean_kl:.2e}")
    if not rep.passed:
        sys.exit(1)


@cli.command("generate")
@click.argument("model")
@click.option("--prompt", required=True, help="prompt text")
@click.option("--chat", is_flag=True, help="wrap the prompt as a user turn with the model's chat template")
@click.option("--system", default=None, help="system message for --chat")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--ignore-eos", is_flag=True, help="keep going past end-of-sequence tokens")
@click.option("--max-memory", default=None, help="weights stay resident while the model's stored size fits this "
              "(e.g. 8G); larger models stream a layer at a time per token (slow but bounded). Default: 80% of "
              "the RAM available now")
@_backend_options
def generate_cmd(model: str, prompt: str, chat: bool, system: str | None, max_new_tokens: int, ignore_eos: bool,
                 max_memory: str | None, backend: str, device: str, dtype: str) -> None:
    """Greedy generation, streamed; ends with prefill and decode tokens/s."""
    from formats.model.tokenizer import CONTROL
    from formats.open import open_model
    from qconvert.decoder import make_decoder
    from qconvert.generate import Streamer, greedy
    from qconvert.text import load_tokenizer, render_chat

    with open_model(model) as src:
        tok = src.tokenizer
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            prompt = render_chat(tok, msgs)
        t = load_tokenizer(tok)
        ids = t.encode(prompt, add_special_tokens=False).ids
        budget = _size(max_memory) if max_memory else int(0.8 * _available_memory())
        stored = sum(x.nbytes for x in src.tensors.values())
        stream = stored > budget
        if stream:
            click.echo(f"[weights {stored / 2**30:.1f} GiB > memory budget {budget / 2**30:.1f} GiB: streaming "
                       "layer by layer]", err=True)
        dec = make_decoder(src, backend, device, dtype, stream=stream)
        stop = set() if ignore_eos else {i for i in (tok.eos_id, tok.pad_id) if i is not None}
        if chat and not ignore_eos:
            stop |= {i for i, s in enumerate(tok.tokens[: tok.n_real]) if s in ("<|im_end|>", "<|endoftext|>")
                     and tok.token_types[i] == CONTROL}

        def write(s: str) -> None:
            click.echo(s, nl=False)
            sys.stdout.flush()

        res = greedy(dec, ids, max_new_tokens, stop, Streamer(t, write))
    click.echo(f"\n[{len(ids)} prompt tokens: prefill {res['prefill_tok_s']:.1f} tok/s; {len(res['tokens'])} new "
               f"tokens: decode {res['decode_tok_s']:.1f} tok/s; {backend} on {device}]")


def main() -> None:
    """Entry point: run the CLI, turning QConvertError into one line and exit status 1."""
    try:
        cli.main(standalone_mode=False)
    except QConvertError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    except MemoryError:
        click.echo("error: out of memory; use a machine with more RAM or a smaller model / context", err=True)
        sys.exit(1)
    except OSError as e:  # a disk or file-system failure outside the writers' own handling: one line, no traceback
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"error: {where}{e.strerror or e}; check the path, permissions and free space", err=True)
        sys.exit(1)


