#!/usr/bin/env python3
"""Fuzz every reader with mutated models and print the outcome table (docs/security.md).

    scripts/fuzz.py --reader gguf --cases 10000 --seed 1 [--workers 2] [--cli 500] [--asan] [--json OUT]
    scripts/fuzz.py --reader all --cases 300            # every reader
    scripts/fuzz.py --reader gguf --seed 1 --replay 1234  # rerun one case in this process, with its traceback

Cases come from valid seeds (a micro Qwen2 checkpoint as HF / GGUF F16, Q8_0, Q4_1 / int4, and the real 0.5B
GGUF's header when cached), mutated field by field (boundary values, the docs/security.md checklist) or by
random flips / truncations / splices. Workers (``qconvert.testing.fuzz.worker``) run each case through the reader, and
an accepted case through a conversion (compared bit for bit with what the input claims) and the decoder; each
case has a time limit (a hang kills and restarts the worker) and an address-space limit. ``--cli N`` also runs
N cases per reader through the installed CLI (inspect, conversions, logits, generate --chat). ``--asan``
builds the C kernels with -fsanitize=address,undefined and runs the workers on them (LD_PRELOAD of libasan):
any sanitizer report is a finding. Exit status 1 when there is any finding.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from qconvert.testing.fuzz.mutate import READERS, make_case  # noqa: E402
from qconvert.testing.fuzz.seeds import make_seeds  # noqa: E402

FINDINGS = ("mismatch", "traceback", "crash", "hang", "memory", "sanitizer")
KINDS = ("clean", "accepted") + FINDINGS


class Worker:
    """A worker process with a per-case deadline; restarted after a crash or a hang."""

    def __init__(self, env: dict[str, str], log: Path):
        self.env, self.log, self.p = env, log, None

    def start(self) -> None:
        self.logf = open(self.log, "ab")
        self.p = subprocess.Popen([sys.executable, "-m", "qconvert.testing.fuzz.worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.logf, env=self.env, cwd=ROOT)
        self.buf = b""

    def send(self, req: dict) -> None:
        if self.p is None or self.p.poll() is not None:
            self.start()
        self.req, self.t0, self.log_at = req, time.monotonic(), self.log.stat().st_size
        self.p.stdin.write((json.dumps(req) + "\n").encode())
        self.p.stdin.flush()

    def kill(self) -> None:
        if self.p is not None:
            self.p.kill()
            self.p.wait()
            self.p = None
            self.logf.close()


def sanitizer_report(log: Path, start: int) -> str | None:
    """The first sanitizer line written to the worker log since byte ``start``."""
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    for line in text.splitlines():
        if "AddressSanitizer" in line or "runtime error:" in line or "LeakSanitizer" in line:
            return line.strip()[:300]
    return None


def run_cases(reader: str, n: int, seed: int, workers: int, env: dict[str, str], timeout: float, logdir: Path,
              progress: bool = True) -> list[dict]:
    """Run cases 0..n-1 of ``reader`` over ``workers`` processes; one result dict per case."""
    pool = [Worker(env, logdir / f"{reader}-{i}.log") for i in range(workers)]
    todo = list(range(n))[::-1]
    results, busy = [], {}
    last = time.monotonic()
    while todo or busy:
        for w in pool:
            if w not in busy.values() and todo:
                i = todo.pop()
                w.send({"reader": reader, "seed": seed, "index": i})
                busy[w.p.stdout.fileno()] = w
        ready, _, _ = select.select(list(busy), [], [], 0.2)
        now = time.monotonic()
        for fd in ready:
            w = busy[fd]
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # the worker died: a crash (signal) or a sanitizer abort
                rc = w.p.wait()
                rep = sanitizer_report(w.log, w.log_at)
                kind = "sanitizer" if rep else "crash"
                results.append({"index": w.req["index"], "kind": kind, "label": "?", "secs": now - w.t0, "rss": 0,
                                "detail": rep or f"worker exited with {rc}"})
                del busy[fd]
                w.p = None
                continue
            w.buf += chunk
            if b"\n" in w.buf:
                line, w.buf = w.buf.split(b"\n", 1)
                r = json.loads(line)
                rep = sanitizer_report(w.log, w.log_at)
                if rep:
                    r["kind"], r["detail"] = "sanitizer", rep
                results.append(r)
                del busy[fd]
        for fd, w in list(busy.items()):
            if now - w.t0 > timeout:
                results.append({"index": w.req["index"], "kind": "hang", "label": "?", "secs": now - w.t0, "rss": 0,
                                "detail": f"no result after {timeout:.0f} s"})
                del busy[fd]
                w.kill()
        if progress and now - last > 10:
            print(f"  {reader}: {len(results)}/{n}", file=sys.stderr, flush=True)
            last = now
    for w in pool:
        w.kill()
    return results


def cli_cases(reader: str, n: int, seed: int, total: int, seeds: dict, work: Path, timeout: float) -> list[dict]:
    """``n`` of the ``total`` cases through the installed CLI (spread evenly); one result per command run."""
    exe = str(Path(sys.executable).parent / "qconvert")
    step = max(1, total // n)
    out = []
    work.mkdir(parents=True, exist_ok=True)
    ids = work / "ids.json"
    ids.write_text("[1, 17, 256, 300]")
    for k, i in enumerate(range(0, total, step)[:n]):
        loc, label = make_case(reader, seeds, seed, i, work / "case")
        if reader == "template":
            cmd = ["generate", str(loc), "--prompt", "hi", "--chat", "--max-new-tokens", "2"]
        elif k % 3 == 0:
            cmd = ["inspect", str(loc)]
        elif k % 3 == 1:
            cmd = ["gguf-to-hf", str(loc), str(work / "case" / "o"), "--dtype", "f32"] if reader == "gguf" else \
                ["hf-to-gguf", str(loc), str(work / "case" / "o.gguf"), "--outtype", "f32"]
        else:
            cmd = ["logits", str(loc), "--token-ids", str(ids), "--out", str(work / "case" / "o.npz")]
        t0 = time.monotonic()
        try:
            r = subprocess.run([exe, *cmd], capture_output=True, text=True, timeout=timeout)
            err = r.stderr.strip().splitlines()
            errs = [e for e in err if e.startswith("error:")]
            if r.returncode == 0:
                kind = "accepted"
            elif r.returncode == 1 and len(errs) == 1 and err[-1] == errs[0] and "Traceback" not in r.stderr:
                kind = "clean"
            elif r.returncode < 0:
                kind = "crash"
            else:
                kind = "traceback"
            detail = (err[-1] if err else "")[:300]
        except subprocess.TimeoutExpired:
            kind, detail = "hang", f"no exit after {timeout:.0f} s"
        leftovers = [p.name for p in (work / "case").rglob(".*tmp-*")]
        if leftovers:
            kind, detail = "mismatch", f"temporary left behind: {leftovers}"
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
        out.append({"index": i, "kind": kind, "label": label, "cmd": cmd[0], "detail": detail,
                    "secs": time.monotonic() - t0, "rss": rss})
    return out


def native_sources() -> dict[str, list[Path]]:
    """{extension module: its C sources}, read from pyproject.toml's ext-modules: the list the normal build uses."""
    return {n: [ROOT / s for s in m["sources"]] for n, m in tomllib_ext_modules().items()}


def build_asan(dest: Path) -> dict[str, str]:
    """Compile every C library of the build with ASan + UBSan into ``dest`` (formats/native.py loads them from
    there under QCONVERT_NATIVE_DIR); the environment that makes the workers use them."""
    import sysconfig
    dest.mkdir(parents=True, exist_ok=True)
    inc = sysconfig.get_paths()["include"]
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-std=c99", "-fno-fast-math", "-shared", "-fPIC", f"-I{inc}"]
    mods = tomllib_ext_modules()
    for name, srcs in native_sources().items():
        dirs = [f"-I{ROOT / d}" for d in mods[name].get("include-dirs", [])]
        subprocess.run(["gcc", *flags, *dirs, "-o", str(dest / f"{name}.so"), *map(str, srcs), "-lm", "-lpthread"],
                       check=True)
    env = {"QCONVERT_NATIVE_DIR": str(dest)}
    asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    ubsan = subprocess.run(["gcc", "-print-file-name=libubsan.so"], capture_output=True, text=True).stdout.strip()
    env["LD_PRELOAD"] = f"{asan} {ubsan}"
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    return env


def tomllib_ext_modules() -> dict[str, dict]:
    """pyproject.toml's ext-modules by name."""
    import tomllib
    mods = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["ext-modules"]
    return {m["name"]: m for m in mods}


def table(rows: dict[str, list[dict]], title: str) -> str:
    head = f"{'reader':<12} {'cases':>6} " + " ".join(f"{k:>9}" for k in KINDS) + f" {'peak MiB':>8} {'max s':>6}"
    lines = [title, head, "-" * len(head)]
    for reader, rs in rows.items():
        c = Counter(r["kind"] for r in rs)
        rss = max((r.get("rss", 0) for r in rs), default=0) / 2 ** 20
        secs = max((r.get("secs", 0) for r in rs), default=0)
        lines.append(f"{reader:<12} {len(rs):>6} " + " ".join(f"{c[k]:>9}" for k in KINDS) + f" {rss:>8.0f} {secs:>6.2f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reader", default="all", choices=("all",) + READERS)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--mem", type=float, default=3.0, help="address-space limit per worker, GiB")
    ap.add_argument("--cli", type=int, default=0, help="cases per reader also run through the CLI")
    ap.add_argument("--asan", action="store_true", help="run the workers on ASan/UBSan builds of the C kernels")
    ap.add_argument("--seeds", type=Path, default=Path(tempfile.gettempdir()) / "qconvert-fuzz-seeds")
    ap.add_argument("--json", type=Path, help="write every finding and the tables here")
    ap.add_argument("--replay", type=int, help="run this one case in-process and show its traceback")
    a = ap.parse_args()
    readers = READERS if a.reader == "all" else (a.reader,)
    seeds = make_seeds(a.seeds)
    work = Path(tempfile.mkdtemp(prefix="qconvert-fuzz-"))
    if a.replay is not None:
        from qconvert.testing.fuzz.worker import run_case
        loc, label = make_case(readers[0], seeds, a.seed, a.replay, work / "case")
        print(f"case {a.replay}: {label} -> {loc}")
        print(run_case(readers[0], loc, work / "case"))
        return 0
    env = dict(os.environ, QCONVERT_FUZZ_SEEDS=str(a.seeds), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if a.mem:
        env["QCONVERT_FUZZ_AS"] = str(int(a.mem * 2 ** 30)) if not a.asan else "0"  # ASan reserves terabytes
    if a.asan:
        env.update(build_asan(work / "asan"))
    rows: dict[str, list[dict]] = {}
    cli_rows: dict[str, list[dict]] = defaultdict(list)
    t0 = time.monotonic()
    for r in readers:
        rows[r] = run_cases(r, a.cases, a.seed, a.workers, env, a.timeout, work)
        print(table({r: rows[r]}, f"{r}: in-process, {time.monotonic() - t0:.0f} s"), file=sys.stderr, flush=True)
        if a.cli:
            cli_rows[r] = cli_cases(r, a.cli, a.seed, a.cases, seeds, work / "cli", max(30.0, 3 * a.timeout))
    title = (f"in-process: seed {a.seed}, {a.cases} cases per reader, {a.workers} workers"
             f"{', ASan+UBSan kernels' if a.asan else ''}, {time.monotonic() - t0:.0f} s")
    print(table(rows, title))
    if a.cli:
        print()
        print(table(cli_rows, f"through the CLI: {a.cli} cases per reader (inspect / convert / logits; "
                              "generate --chat for templates)"))
    findings = [dict(r, reader=k) for k, rs in list(rows.items()) + list(cli_rows.items()) for r in rs
                if r["kind"] in FINDINGS or r.get("rss", 0) > 2 ** 30]
    for f in findings[:20]:
        print(f"FINDING {f['reader']} case {f['index']} ({f['label']}): {f['kind']}: {f['detail']}")
    if a.json:
        a.json.write_text(json.dumps({"title": title, "findings": findings,
                                      "table": {k: Counter(r["kind"] for r in rs) for k, rs in rows.items()},
                                      "cli": {k: Counter(r["kind"] for r in rs) for k, rs in cli_rows.items()},
                                      "labels": {k: Counter(r["label"].split("=")[0] for r in rs)
                                                 for k, rs in rows.items()}}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
