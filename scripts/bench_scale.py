#!/usr/bin/env python3
"""Scale benchmark: qconvert on a shape-exact random proxy of a real Qwen2.5 model, under a memory cap.

Writes the proxy (qconvert/testing/proxy.py; reused when the work folder already holds the same one), then runs
each command as a subprocess inside its own cgroup-v1 memory group with ``--cap`` as memory limit:

  hf-to-gguf-f16   qconvert hf-to-gguf PROXY f16.gguf --outtype f16
  llama-f16        llama.cpp's convert_hf_to_gguf.py --outtype f16 (rerun without a cap if killed under it)
  gguf-to-hf       qconvert gguf-to-hf f16.gguf hf_back
  verify-f16       qconvert verify PROXY f16.gguf --ctx TOKENS --json ...
  hf-to-gguf-q4km  qconvert hf-to-gguf PROXY q4km.gguf --outtype q4_k_m
  verify-q4km      qconvert verify PROXY q4km.gguf ...
  quantize-int4    qconvert quantize PROXY int4 (default int4 layout)
  quantize-gptq    qconvert quantize PROXY int4-gptq --method gptq (default calibration: 64 x 512 tokens)
  verify-int4      qconvert verify PROXY int4 ...

The order keeps the disk peak at proxy + f16.gguf + one more full-size file; every output is deleted as soon
as no later selected command needs it (unless --keep). Per command: wall time, the group's peak usage
(memory.max_usage_in_bytes: anonymous memory plus page cache charged to the group; a converter that
writes GBs fills it up to the cap with reclaimable cache), the group's peak anonymous memory (memory.stat
total_rss, sampled every 50 ms), the child's own peak RSS (wait4; it also counts shared pages charged
elsewhere), and the result: completed / passed / completed (bound failed) / killed (OOM) / crashed (a traceback) /
error + last stderr line. After each command the group's page cache is dropped (memory.force_empty), so the next command
reads its inputs from disk. The table is printed as Markdown and saved as JSON next to the work folder.

The memory group is created under this process's own memory cgroup (``/sys/fs/cgroup/memory/<own>/
qconvert-bench-<pid>``; ``<own>`` is empty on a host where the process sits in the root group). Needs root
and a cgroup-v1 memory controller.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from formats.errors import QConvertError  # noqa: E402
from qconvert.testing.peers import llama_convert_cmd  # noqa: E402
from qconvert.testing.proxy import SHAPES, proxy_matches, proxy_nbytes  # noqa: E402

VENV_PY = ROOT / ".venv" / "bin" / "python"
QC = ROOT / ".venv" / "bin" / "qconvert"
MEMCG = Path("/sys/fs/cgroup/memory")
# name: (inputs, output, estimated output size as a fraction of the proxy's)
COMMANDS: dict[str, tuple[tuple[str, ...], str | None, float]] = {
    "hf-to-gguf-f16": (("proxy",), "f16.gguf", 1.0),
    "llama-f16": (("proxy",), "llama-f16.gguf", 1.0),
    "gguf-to-hf": (("f16.gguf",), "hf_back", 1.0),
    "verify-f16": (("proxy", "f16.gguf"), None, 0.0),
    "hf-to-gguf-q4km": (("proxy",), "q4km.gguf", 0.35),
    "verify-q4km": (("proxy", "q4km.gguf"), None, 0.0),
    "quantize-int4": (("proxy",), "int4", 0.35),
    "verify-int4": (("proxy", "int4"), None, 0.0),
    "quantize-gptq": (("proxy",), "int4-gptq", 0.35),
}
OPT_IN = {"quantize-gptq"}  # run only when named in --only (hours on a full-depth 7B on 2 cores; use --layers)


def parse_size(s: str) -> int:
    """'4G', '512M', '1.5G' or a byte count -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = s.strip().upper().rstrip("B").rstrip("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise SystemExit(f"error: cannot read size {s!r}; write e.g. 4G, 512M or a byte count") from None


def own_memcg() -> Path:
    """Folder of this process's cgroup-v1 memory group; SystemExit with one line when there is none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as e:
        raise SystemExit(f"error: cannot read /proc/self/cgroup ({e.strerror}); a Linux cgroup-v1 host is needed")
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            d = MEMCG / path.lstrip("/")
            if (d / "memory.limit_in_bytes").is_file() and os.access(d, os.W_OK):
                return d
            break
    raise SystemExit(f"error: no writable cgroup-v1 memory controller under {MEMCG}; run as root on a host that "
                     "mounts it (cgroup v2 only is not supported)")


class MemGroup:
    """A fresh memory cgroup with a limit; ``wrap`` prefixes a command so it joins the group before exec."""

    def __init__(self, parent: Path, name: str, cap: int | None):
        self.dir = parent / name
        if self.dir.exists():
            self.remove()
        self.dir.mkdir()
        if cap is not None:
            (self.dir / "memory.limit_in_bytes").write_text(str(cap))
            sw = self.dir / "memory.memsw.limit_in_bytes"
            if sw.is_file():
                try:
                    sw.write_text(str(cap))
                except OSError:  # swap accounting off: the memory limit alone applies
                    pass

    def wrap(self, cmd: list[str]) -> list[str]:
        """``sh -c 'echo $$ > cgroup.procs; exec CMD'``: the child is in the group before CMD starts."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" || exit 125; exec "$@"', str(self.dir / "cgroup.procs"), *cmd]

    def read(self, name: str) -> str:
        """Contents of one of the group's control files ('' when absent)."""
        try:
            return (self.dir / name).read_text()
        except OSError:
            return ""

    def stats(self) -> dict[str, int]:
        """peak usage (bytes), failcnt and the OOM-kill counter."""
        oom = dict(line.split() for line in self.read("memory.oom_control").splitlines() if " " in line)
        return {"peak": int(self.read("memory.max_usage_in_bytes") or 0),
                "failcnt": int(self.read("memory.failcnt") or 0), "oom_kill": int(oom.get("oom_kill", 0))}

    def anon(self) -> int:
        """Anonymous memory charged to the group now (memory.stat total_rss), bytes."""
        for line in self.read("memory.stat").splitlines():
            if line.startswith("total_rss "):
                return int(line.split()[1])
        return 0

    def remove(self) -> None:
        """Drop the group's page cache, end leftover processes started in it, and remove it."""
        for _ in range(20):
            pids = [int(p) for p in self.read("cgroup.procs").split()]
            for p in pids:  # only descendants of our own command can be here
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                (self.dir / "memory.force_empty").write_text("0")
            except OSError:
                pass
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.25)
        print(f"warning: could not remove {self.dir}", file=sys.stderr)


def run_capped(cmd: list[str], env: dict[str, str] | None, cap: int | None, log: Path,
               cgparent: Path, timeout: float | None) -> dict[str, Any]:
    """Run ``cmd`` in a fresh memory group; wall, peaks, exit code, OOM flag and last stderr line."""
    group = MemGroup(cgparent, f"qconvert-bench-{os.getpid()}", cap)
    try:
        with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
            argv = group.wrap(cmd)
            t0 = time.perf_counter()
            pid = os.posix_spawn(argv[0], argv, env if env is not None else dict(os.environ),
                                 file_actions=[(os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                                               (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])
            timed_out, anon = False, 0
            while True:
                anon = max(anon, group.anon())
                wpid, status, ru = os.wait4(pid, os.WNOHANG)
                if wpid:
                    break
                if timeout and time.perf_counter() - t0 > timeout and not timed_out:
                    os.kill(pid, signal.SIGKILL)
                    timed_out = True
                time.sleep(0.05)
            wall = time.perf_counter() - t0
        st = group.stats()
    finally:
        group.remove()
    rc = os.waitstatus_to_exitcode(status)
    err_text = log.with_suffix(".err").read_text(errors="replace")
    lines = [x for x in err_text.splitlines() if x.strip()]
    return {"rc": rc, "wall_s": round(wall, 2), "peak_cgroup_mib": round(st["peak"] / 2**20, 1),
            "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
            "peak_anon_mib": round(anon / 2**20, 1), "failcnt": st["failcnt"],
            "oom_killed": st["oom_kill"] > 0 or (rc == -signal.SIGKILL and not timed_out),
            "timed_out": timed_out, "traceback": "Traceback (most recent call last)" in err_text,
            "last_stderr": lines[-1][:200] if lines else ""}


def command_line(name: str, work: Path, proxy: Path, tokens: int) -> tuple[list[str], dict[str, str] | None]:
    """Command and environment of one benchmark step."""
    qc = [str(QC)]
    if name == "llama-f16":
        cmd, env = llama_convert_cmd(proxy, work / "llama-f16.gguf", "f16")
        if VENV_PY.is_file():
            cmd[0] = str(VENV_PY)
        return cmd, env
    if name.startswith("verify-"):
        cand = work / COMMANDS[name][0][1]
        return qc + ["verify", str(proxy), str(cand), "--ctx", str(tokens),
                     "--json", str(work / f"{name}.json")], None
    out = work / str(COMMANDS[name][1])
    if name == "hf-to-gguf-f16":
        return qc + ["hf-to-gguf", str(proxy), str(out), "--outtype", "f16", "--force", "--quiet"], None
    if name == "hf-to-gguf-q4km":
        return qc + ["hf-to-gguf", str(proxy), str(out), "--outtype", "q4_k_m", "--force", "--quiet"], None
    if name == "quantize-int4":
        return qc + ["quantize", str(proxy), str(out), "--force", "--quiet"], None
    if name == "quantize-gptq":
        return qc + ["quantize", str(proxy), str(out), "--method", "gptq", "--force", "--quiet"], None
    if name == "gguf-to-hf":
        return qc + ["gguf-to-hf", str(work / "f16.gguf"), str(out), "--force", "--quiet"], None
    raise ValueError(name)


def classify(name: str, r: dict[str, Any], work: Path) -> str:
    """One-word result (plus detail) of a finished step."""
    if r["timed_out"]:
        return "timeout"
    if r["oom_killed"]:
        return "killed (OOM)"
    if r["rc"] == 0:
        return "passed" if name.startswith("verify-") else "completed"
    if name.startswith("verify-") and r["rc"] == 1 and (work / f"{name}.json").is_file():
        return "completed (bound failed)"
    if r["rc"] < 0:
        return f"killed (signal {-r['rc']})"
    if r["traceback"]:
        return f"crashed (rc {r['rc']}): {r['last_stderr']}"
    return f"error (rc {r['rc']}): {r['last_stderr']}"


def remove_output(work: Path, name: str) -> None:
    """Delete an output file or folder and any temporary siblings a killed writer left."""
    for p in [work / name, *work.glob(f".{name}.tmp-*")]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def size_of(p: Path) -> int:
    """Bytes of a file or a folder tree."""
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def markdown(rows: list[dict[str, Any]]) -> str:
    """The result rows as a Markdown table."""
    out = ["| command | cap | wall s | peak cgroup MiB | peak anon MiB | peak RSS MiB | result | mean KL | top-1 |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = f"{r['mean_kl']:.3g}" if r.get("mean_kl") is not None else ""
        t1 = f"{100 * r['top1']:.1f}%" if r.get("top1") is not None else ""
        res = str(r["result"]).replace("|", "\\|")
        wall = f"{r['wall_s']:.1f}" if r.get("wall_s") is not None else ""
        cg = f"{r['peak_cgroup_mib']:.0f}" if r.get("peak_cgroup_mib") is not None else ""
        rss = f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") is not None else ""
        anon = f"{r['peak_anon_mib']:.0f}" if r.get("peak_anon_mib") is not None else ""
        out.append(f"| {r['command']} | {r['cap']} | {wall} | {cg} | {anon} | {rss} | {res} | {kl} | {t1} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=list(SHAPES),
                    help="real model to imitate (7b, 14b, 32b, 72b, ...)")
    ap.add_argument("--layers", type=int, default=None, help="layers of the proxy (default: the real count)")
    ap.add_argument("--cap", default="4G", help="memory limit of each command (default 4G)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default /tmp/qconvert-scale-SHAPE[-LN])")
    ap.add_argument("--keep", action="store_true", help="keep every output (default: delete when no longer needed)")
    ap.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(COMMANDS))
    ap.add_argument("--tokens", type=int, default=128, help="tokens per verify (--ctx)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds after which a command is killed")
    ap.add_argument("--seed", type=int, default=0, help="proxy seed")
    args = ap.parse_args()
    if not QC.is_file():
        raise SystemExit(f"error: {QC} not found; set up the venv first (scripts/test.sh or scripts/demo.sh)")
    cap = parse_size(args.cap)
    n_layers = args.layers or SHAPES[args.shape]["num_hidden_layers"]
    selected = ([c for c in COMMANDS if c not in OPT_IN] if not args.only
                else [c.strip() for c in args.only.split(",") if c.strip()])
    bad = [c for c in selected if c not in COMMANDS]
    if bad:
        raise SystemExit(f"error: unknown command(s) {', '.join(bad)} in --only; choose from {', '.join(COMMANDS)}")
    selected = [c for c in COMMANDS if c in selected]
    pbytes = proxy_nbytes(args.shape, args.layers)  # checks --layers
    cgparent = own_memcg()
    capstr = args.cap.upper()
    work = (args.work or Path("/tmp") / f"qconvert-scale-{args.shape}-L{n_layers}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    proxy = work / "proxy"
    rows: list[dict[str, Any]] = []

    def record(name: str, r: dict[str, Any], capname: str, result: str) -> dict[str, Any]:
        row = {"command": name, "cap": capname, **r, "result": result}
        rows.append(row)
        print(f"{name:<18} cap {capname:<5} {r.get('wall_s') or 0:8.1f}s  "
              f"cgroup {r.get('peak_cgroup_mib') or 0:7.0f} MiB  anon {r.get('peak_anon_mib') or 0:7.0f} MiB  "
              f"RSS {r.get('peak_rss_mib') or 0:7.0f} MiB  {result}", flush=True)
        return row

    if proxy_matches(proxy, args.shape, args.layers, args.seed):
        print(f"proxy {args.shape} ({n_layers} layer(s), {pbytes / 1e9:.2f} GB): reusing {proxy}", flush=True)
    else:
        free = shutil.disk_usage(work).free
        if free < pbytes * 1.02 + (1 << 30):
            raise SystemExit(f"error: the proxy needs {pbytes / 1e9:.1f} GB, {work} has {free / 1e9:.1f} GB free")
        print(f"writing proxy {args.shape} ({n_layers} layer(s), {pbytes / 1e9:.2f} GB) to {proxy}", flush=True)
        cmd = [str(VENV_PY), "-m", "qconvert.proxy", str(proxy), "--shape", args.shape, "--layers", str(n_layers),
               "--seed", str(args.seed)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        r = run_capped(cmd, env, cap, work / "logs" / "write-proxy", cgparent, None)
        record("write-proxy", r, capstr, classify("write-proxy", r, work))
        if r["rc"] != 0:
            print(markdown(rows))
            raise SystemExit(f"error: writing the proxy failed; see {work / 'logs' / 'write-proxy.err'}")

    produced: set[str] = set()
    failed: set[str] = set()
    for i, name in enumerate(selected):
        inputs, output, frac = COMMANDS[name]
        missing = [x for x in inputs if x != "proxy" and not (work / x).exists()]
        if missing:
            why = "failed" if any(x in failed for x in missing) else "missing (run its producer too)"
            record(name, {}, capstr, f"skipped: input {', '.join(missing)} {why}")
            continue
        need = int(pbytes * frac * 1.05) + (1 << 30)
        free = shutil.disk_usage(work).free
        if output and free < need:
            record(name, {}, capstr, f"skipped: needs ~{need / 1e9:.1f} GB disk, {free / 1e9:.1f} GB free")
            continue
        if name.startswith("verify-"):
            (work / f"{name}.json").unlink(missing_ok=True)
        cmd, env = command_line(name, work, proxy, args.tokens)
        r = run_capped(cmd, env, cap, work / "logs" / name, cgparent, args.timeout)
        result = classify(name, r, work)
        row = record(name, r, capstr, result)
        ok = r["rc"] == 0
        if name == "llama-f16" and r["oom_killed"]:
            remove_output(work, "llama-f16.gguf")
            r2 = run_capped(cmd, env, None, work / "logs" / (name + "-nocap"), cgparent, args.timeout)
            record(name + " (rerun)", r2, "none", classify(name, r2, work) + f"; killed under {capstr}, rerun uncapped")
            ok = r2["rc"] == 0
        if name.startswith("verify-") and (work / f"{name}.json").is_file():
            try:
                rep = json.loads((work / f"{name}.json").read_text())
                row.update(mean_kl=rep.get("mean_kl"), top1=rep.get("top1"))
            except ValueError:
                pass
        if output:
            if ok and (work / output).exists():
                produced.add(output)
                rows[-1]["output_mib"] = round(size_of(work / output) / 2**20, 1)
            else:
                failed.add(output)
                remove_output(work, output)
        if not args.keep:  # delete what no later selected step reads
            later = {x for n in selected[i + 1:] for x in COMMANDS[n][0]}
            for o in sorted(produced - later):
                remove_output(work, o)
                produced.discard(o)

    ours = next((r for r in rows if r["command"] == "hf-to-gguf-f16" and r.get("rc") == 0), None)
    peer = next((r for r in reversed(rows) if r["command"].startswith("llama-f16") and r.get("rc") == 0), None)
    ratio = round(ours["wall_s"] / peer["wall_s"], 3) if ours and peer else None
    print(f"\n### {SHAPES[args.shape]['name']} proxy, {n_layers} layer(s) ({pbytes / 1e9:.2f} GB bf16), cap {capstr}\n")
    print(markdown(rows))
    if ratio is not None:
        note = " (llama.cpp rerun without a cap)" if peer["cap"] == "none" else ""
        print(f"\nf16 conversion wall time ours / llama.cpp: {ours['wall_s']:.1f} s / {peer['wall_s']:.1f} s = "
              f"{ratio:.2f}x{note}")
    report = {"shape": args.shape, "model": SHAPES[args.shape]["name"], "layers": n_layers, "proxy_bytes": pbytes,
              "cap": capstr, "cap_bytes": cap, "tokens": args.tokens, "rows": rows, "f16_wall_ratio_ours_llama": ratio}
    out_json = work.with_name(work.name + ".json")
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out_json}; logs in {work / 'logs'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except QConvertError as e:
        sys.exit(f"error: {e}")
