"""The README's commands run as written.

Every line that begins with ``qconvert `` in the README's ```bash blocks is run, in order, with bash, in one
temporary folder prepared so the README's names exist, made from the tiny checkpoint:

- ``Qwen2.5-0.5B-Instruct/``: the HF folder of the recipes;
- ``Qwen/Qwen2.5-0.5B-Instruct``: the same folder as a Hub id, in a Hugging Face cache under the temporary
  folder (``HF_HOME``), read with ``HF_HUB_OFFLINE=1``;
- ``qwen2.5-0.5b-instruct-q4_k_m.gguf``: the "downloaded" GGUF (made from the same checkpoint);
- ``calib.txt``: calibration text (Python standard-library source).

Every command must exit 0. The other lines of the bash blocks must be the install commands, so nothing in a
bash block goes untested by accident. Also checked: the README's length and its links.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qconvert.testing.tiny import make_tiny

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 200
MIN_COMMANDS = 10

HF_DIR = "Qwen2.5-0.5B-Instruct"
HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"
DOWNLOADED = "qwen2.5-0.5b-instruct-q4_k_m.gguf"
CALIB = "calib.txt"
# lines of bash blocks that are not qconvert commands: the install section, run by CI through scripts/test.sh
INSTALL = ("./scripts/demo.sh", "./scripts/test.sh", "pip install ")


def bash_blocks(text: str) -> list[list[str]]:
    """The lines of every ```bash block, in order."""
    return [block.splitlines() for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)]


def readme_commands(text: str) -> list[str]:
    return [ln.strip() for block in bash_blocks(text) for ln in block if ln.strip().startswith("qconvert ")]


def _calib_text() -> str:
    """A few thousand tokens of Python source: enough windows of 512 for imatrix and GPTQ."""
    import json.decoder
    import string

    return "".join(Path(m.__file__).read_text(encoding="utf-8") for m in (textwrap, json.decoder, string))


def _prepare(work: Path, env: dict[str, str]) -> None:
    hf = make_tiny(work / HF_DIR, "tied", "f32")
    # the Hub id: the same files as a snapshot in a Hugging Face cache (HF_HOME/hub/models--ORG--NAME)
    repo = work / "hf-home" / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(hf, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (work / CALIB).write_text(_calib_text(), encoding="utf-8")
    # the "downloaded" GGUF: the same model quantised, as a GGUF from the Hub would be
    subprocess.run([str(Path(sys.executable).parent / "qconvert"), "hf-to-gguf", str(hf), str(work / DOWNLOADED),
                    "--outtype", "q4_k_m", "--quiet"], cwd=work, env=env, check=True, capture_output=True)


def test_readme_length():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; at most {MAX_LINES}"


def test_readme_bash_blocks_hold_only_tested_commands():
    for block in bash_blocks(README.read_text(encoding="utf-8")):
        for ln in block:
            s = ln.strip()
            if s and not s.startswith("#") and not s.startswith("qconvert "):
                assert s.startswith(INSTALL), f"README bash line not run by this test: {s!r}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.is_file(), f"README links to {path}, which does not exist"
        if anchor:
            heads = {_slug(m) for m in re.findall(r"^#+ (.*)$", target.read_text(encoding="utf-8"), re.M)}
            assert anchor in heads, f"README links to {link}: no such heading in {path}"


def test_readme_commands_run(tmp_path: Path):
    cmds = readme_commands(README.read_text(encoding="utf-8"))
    assert len(cmds) >= MIN_COMMANDS, f"only {len(cmds)} qconvert commands found in README.md's bash blocks"
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    _prepare(tmp_path, env)
    for cmd in cmds:
        t0 = time.perf_counter()
        res = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            pytest.fail(f"README command failed (exit {res.returncode}, {time.perf_counter() - t0:.1f}s):\n  {cmd}\n"
                        f"--- stdout (tail) ---\n{res.stdout[-3000:]}\n--- stderr ---\n{res.stderr[-6000:]}")
