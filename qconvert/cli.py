"""The ``qconvert`` command line. User mistakes print one ``error:`` line and exit 1."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from formats.errors import QConvertError
from formats.gguf import OUTTYPES


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


@cli.command("hf-to-gguf")
@click.argument("src")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--outtype", type=click.Choice(OUTTYPES), default="auto", show_default=True,
              help="type of 2-D weights; 1-D tensors and norms stay F32")
@click.option("--name", default=None, help="general.name to store (default: the model's own name)")
@click.option("--force", is_flag=True, help="overwrite OUT if it exists")
@click.option("--quiet", is_flag=True, help="no progress bar")
def hf_to_gguf(src: str, out: Path, outtype: str, name: str | None, force: bool, quiet: bool) -> None:
    """Convert an HF checkpoint (folder or Hub id) or a GGUF to a GGUF file."""
    from formats.detect import open_model
    from formats.gguf import write_gguf
    from formats.output import check_target

    check_target(out, force)
    t0 = time.perf_counter()
    with open_model(src) as s:
        types = write_gguf(s, out, outtype, force=force, progress=not quiet, name=name)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    click.echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {len(types)} tensors {counts}) "
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
    from formats.detect import open_model
    from formats.hf import write_hf
    from formats.output import check_target

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
    from formats.detect import open_model
    from qconvert.inspect_model import describe, render

    with open_model(model) as s:
        d = describe(s)
    click.echo(json.dumps(d, indent=1) if as_json else render(d, None if show_all else 40))


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


