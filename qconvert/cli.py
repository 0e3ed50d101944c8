"""The ``qconvert`` command line: each command's options go to one library call (qconvert/convert.py and its
neighbours). User mistakes print one ``error:`` line and exit 1."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from formats import threads
from formats.errors import QConvertError
from formats.gguf.write import OUTTYPES
from qconvert.quant.mixtures import MIXTURES, ROLES
from qconvert.quant.recipes import MIXES

FILE = click.Path(path_type=Path, dir_okay=False, exists=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Move Qwen2-family weights between HF safetensors, GGUF and int4, and check the result."""


def _common(*names: str):
    """The options several commands share: --force, --quiet, --threads, --imatrix, the decoder backend."""
    opts = {
        "force": click.option("--force", is_flag=True, help="replace the output if it exists"),
        "quiet": click.option("--quiet", is_flag=True, help="no progress bar"),
        "imatrix": click.option("--imatrix", type=FILE, help="importance matrix (llama-imatrix's GGUF or legacy .dat, "
                                "or `qconvert imatrix`): weights every block's fit as llama-quantize --imatrix does"),
        "backend": lambda f: click.option("--backend", type=click.Choice(["numpy", "torch"]), default="numpy",
                                          show_default=True)(click.option(
            "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)(click.option(
                "--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
                help="torch backend weight dtype")(f))),
    }
    threads_opt = click.option("--threads", type=click.IntRange(min=1), default=None, expose_value=False,
                               callback=lambda ctx, p, v: threads.set_count(v), is_eager=True,
                               help="threads for every kernel (default: the CPUs this process may use)")

    def wrap(f):
        for n in reversed(names):
            f = opts[n](f)
        return threads_opt(f)
    return wrap


@cli.command("hf-to-gguf")
@click.argument("src")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--outtype", type=click.Choice(OUTTYPES + tuple(MIXTURES) + (ROLES,)), default="auto", show_default=True,
              help="type of 2-D weights (1-D tensors and norms stay F32), or a llama-quantize mixture (the K-quant "
                   "ones, the i-quant ones iq1_s .. iq4_xs, and q4_0_mix .. q5_1_mix: llama-quantize's Q4_0 .. Q5_1 "
                   "files; iq1_s, iq1_m, iq2_*, iq3_xxs, iq3_xs and q2_k_s need --imatrix, as in llama-quantize). "
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
@_common("imatrix", "force", "quiet")
def hf_to_gguf(src, out, outtype, name, split_max_size, split_max_tensors, imatrix, force, quiet) -> None:
    """Convert an HF checkpoint (folder or Hub id), an int4 folder or a GGUF (a split one: its first part) to a
    GGUF file, or to llama.cpp split files."""
    from qconvert.convert import hf_to_gguf as run
    click.echo(run(src, out, outtype, click.echo, name, split_max_size, split_max_tensors, imatrix, force, not quiet))


@cli.command("gguf-to-hf")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["bf16", "f16", "f32"]), default="bf16", show_default=True)
@click.option("--max-shard-size", default="4G", show_default=True, help="largest safetensors shard")
@_common("force", "quiet")
def gguf_to_hf(src, outdir, dtype, max_shard_size, force, quiet) -> None:
    """Dequantise a GGUF into an HF folder that transformers loads."""
    from qconvert.convert import gguf_to_hf as run
    click.echo(run(str(src), outdir, dtype, max_shard_size, force, not quiet))


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
@click.option("--calib", type=FILE, help="gptq: calibration text file (default: a fixed set of Python "
              "standard-library modules)")
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
                   + ", ".join(MIXTURES) + "; those whose types llama-quantize writes only with an importance "
                   "matrix need --imatrix)")
@_common("imatrix", "force", "quiet")
def quantize_cmd(src, out, fmt, bits, group_size, scale_bits, mix, target_bpw, method, sym, zero_point, head_bits,
                 calib, calib_samples, calib_ctx, act_order, sequential, damp, propagate, calib_dtype, report_png,
                 gtype, imatrix, force, quiet) -> None:
    """Quantise a model (HF folder, Hub id or GGUF) to the int4 layout or to a GGUF type / mixture."""
    from qconvert.convert import quantize_folder, quantize_gguf
    from qconvert.quant.groupwise import QuantSpec
    from qconvert.quant.run import CalibOptions

    calib_opts = CalibOptions(calib, calib_samples, calib_ctx, act_order, damp, sequential, propagate, calib_dtype)
    if fmt == "gguf":
        click.echo(quantize_gguf(src, out, gtype, method, calib_opts, click.echo, imatrix, force, quiet))
        return
    if imatrix is not None:
        raise QConvertError("--imatrix applies to --format gguf; the int4 format's data-aware method is --method gptq")
    base = QuantSpec(bits, int(group_size), sym, int(scale_bits), zero_int=zero_point == "int")
    quantize_folder(src, out, base, method, mix, head_bits, target_bpw, calib_opts, click.echo, report_png, force,
                    quiet)


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
@_common("force", "quiet")
def export_cmd(src, out, to, bits, group_size, sym, mix, method, widen, force, quiet) -> None:
    """Write a quantised HF checkpoint that vLLM, SGLang and transformers load. SRC: an int4 folder (its codes are
    kept: symmetric and --zero-point int groups exactly, float offsets re-rounded to integer zeros, the change
    reported), or any model, quantised first on the format's own grid (f16 scales, integer zeros) so nothing
    is rounded on the way."""
    from qconvert.convert import export
    from qconvert.quant.groupwise import QuantSpec

    spec = QuantSpec(bits, int(group_size), sym, 16, zero_int=not sym)
    click.echo(export(src, out, to, click.echo, spec, method, mix, widen, force, quiet))


@cli.command("imatrix")
@click.argument("model")
@click.option("--calib", type=FILE, help="calibration text file (default: a fixed set of Python standard-library "
              "modules)")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="imatrix file to write (llama-imatrix's GGUF layout)")
@click.option("--ctx", type=click.IntRange(16), default=512, show_default=True,
              help="tokens per chunk; each chunk runs from an empty cache (llama-imatrix's -c)")
@click.option("--chunks", type=click.IntRange(1), default=None, help="use at most this many chunks (default: all)")
@_common("force", "quiet")
def imatrix_cmd(model, calib, out, ctx, chunks, force, quiet) -> None:
    """Compute an importance matrix (per input column of every layer matrix, the mean squared activation over
    the calibration text), written in llama.cpp's imatrix format for `--imatrix` here or in llama-quantize."""
    from qconvert.quant.imatrix import imatrix_file
    click.echo(imatrix_file(model, out, calib, ctx, chunks, force, not quiet))


@cli.command("logits")
@click.argument("model")
@click.option("--text", type=click.Path(path_type=Path, dir_okay=False), help="text file to tokenise")
@click.option("--token-ids", type=click.Path(path_type=Path, dir_okay=False), help="JSON list of token ids")
@click.option("--ctx", default=512, show_default=True, help="use the first N tokens")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="output .npz (token_ids, logits)")
@click.option("--force", is_flag=True, help="overwrite --out")
@_common("backend")
def logits_cmd(model, text, token_ids, ctx, out, force, backend, device, dtype) -> None:
    """Write the model's logits for the first N tokens of a text (or of given token ids)."""
    from qconvert.logits import write_logits
    click.echo(write_logits(model, out, text, token_ids, ctx, force, backend, device, dtype))


@cli.command("verify")
@click.argument("ref")
@click.argument("cand")
@click.option("--text", type=click.Path(path_type=Path, dir_okay=False), help="text to evaluate (default: built-in sample)")
@click.option("--ctx", default=512, show_default=True, help="number of tokens")
@click.option("--max-kld", type=float, default=None, help="bound on mean KL (default by candidate type, see README)")
@click.option("--min-top1", type=float, default=None, help="bound on top-1 agreement (default by candidate type)")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="write the report as JSON")
@click.option("--plot", type=click.Path(path_type=Path), help="write KL per position as a PNG")
@_common("backend")
def verify_cmd(ref, cand, text, ctx, max_kld, min_top1, json_out, plot, backend, device, dtype) -> None:
    """Run REF and CAND on the same tokens; exit 1 when KL or top-1 misses its bound."""
    from qconvert import verify

    rep, kl = verify.verify_models(ref, cand, text, ctx, max_kld, min_top1, backend, device, dtype)
    click.echo(verify.render(rep))
    if json_out:
        verify.write_json(rep, json_out)
    if plot:
        verify.plot(kl, plot, f"{Path(cand).name} vs {Path(ref).name}: mean KL {rep.mean_kl:.2e}")
    if not rep.passed:
        sys.exit(1)


@cli.command("generate")
@click.argument("model")
@click.option("--prompt", required=True, help="prompt text")
@click.option("--chat", is_flag=True, help="wrap the prompt as a user turn with the model's chat template")
@click.option("--system", default=None, help="system message for --chat")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--ignore-eos", is_flag=True, help="keep going past end-of-sequence tokens")
@click.option("--max-memory", default=None, help="weights stay resident while the model's stored size fits this (e.g. "
              "8G); larger ones stream a layer at a time per token (slow, bounded). Default: 80% of the RAM available")
@click.option("--activations", type=click.Choice(["float", "q8"]), default="float", show_default=True,
              help="float32 products (as logits / verify), or faster: llama.cpp's 8-bit activations (bf16 prompt on AMX)")
@_common("backend")
def generate_cmd(model, prompt, chat, system, max_new_tokens, ignore_eos, max_memory, activations, **be) -> None:
    """Greedy generation, streamed; ends with prefill and decode tokens/s."""
    from qconvert.convert import memory_budget
    from qconvert.generate import generate

    def write(s: str) -> None:
        click.echo(s, nl=False)
        sys.stdout.flush()

    click.echo(generate(model, prompt, write, lambda s: click.echo(s, err=True), chat, system, max_new_tokens,
                        ignore_eos, memory_budget(max_memory), activations=activations, **be))


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
