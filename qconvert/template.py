"""Chat templates from model files, rendered in Jinja's immutable sandbox under time, output and memory limits.

A template is code from a stranger (CVE-2024-34359: a GGUF's template ran Python in llama-cpp-python). Here it
runs in ``ImmutableSandboxedEnvironment`` (no attribute escapes, no mutation of the inputs, no loader: no
``include`` / ``import``), with ``*``, ``**``, ``%`` and ``+`` checked before they build a huge value, and, on
POSIX, in a forked child process with an address-space limit and a timer, which the parent kills when the
deadline passes. Every failure is one QConvertError starting with "chat template".
"""
from __future__ import annotations

import json
import os
import re
import resource
import select
import signal
import time
from typing import Any

from formats.errors import QConvertError

TIME_LIMIT = 2.0          # seconds
MAX_OUTPUT = 1 << 20      # characters of rendered text
MEMORY_LIMIT = 256 << 20  # bytes of address space the renderer may add
_WIDTH = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d*))?")


class _Stop(BaseException):
    """Raised inside the renderer when a limit is reached (a BaseException: Jinja's own handlers let it pass)."""


class _Deadline:
    """An iterable that stops the render when the time is up (Jinja's ``range`` in loops that print nothing)."""

    def __init__(self, it: Any, deadline: float, limit: float):
        self.it, self.deadline, self.limit = it, deadline, limit

    def __len__(self) -> int:
        return len(self.it)

    def __iter__(self) -> Any:
        for k, v in enumerate(self.it):
            if not k & 1023 and time.monotonic() > self.deadline:
                raise _Stop(f"stopped after {self.limit:g} s")
            yield v


def _env(max_output: int, deadline: float = float("inf"), limit: float = TIME_LIMIT) -> Any:
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            size = lambda v: len(v) if isinstance(v, (str, bytes, list, tuple)) else 0  # noqa: E731
            if operator == "*" and isinstance(left, int) != isinstance(right, int):
                n, seq = (left, right) if isinstance(left, int) else (right, left)
                if isinstance(n, int) and size(seq) * max(n, 0) > max_output:
                    raise SecurityError("a repetition would exceed the output limit")
            if operator == "**" and isinstance(right, (int, float)) and isinstance(left, (int, float)) and \
                    abs(right) > 256 and abs(left) > 1:
                raise SecurityError("exponent too large")
            if operator == "%" and isinstance(left, str):
                for w, p in _WIDTH.findall(left):
                    if len(w) > 6 or len(p) > 6:
                        raise SecurityError("a format width would exceed the output limit")
            if operator == "+" and size(left) + size(right) > max_output:
                raise SecurityError("a concatenation would exceed the output limit")
            return super().call_binop(context, operator, left, right)

        def getattr(self, obj: Any, attribute: str) -> Any:
            if isinstance(obj, str) and attribute in ("format", "format_map"):
                raise SecurityError("str.format is not allowed in chat templates (the format-string route to "
                                    "attributes); use the |format filter")
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            if isinstance(obj, str) and argument in ("format", "format_map"):
                raise SecurityError("str.format is not allowed in chat templates; use the |format filter")
            return super().getitem(obj, argument)

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")

    env = Env(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg: str) -> None:
        raise TemplateError(str(msg))

    def tojson(x: Any, indent: int | None = None, **_: Any) -> str:
        if indent is not None and not (isinstance(indent, int) and 0 <= indent <= 16):
            raise SecurityError("tojson indent must be 0-16")
        return json.dumps(x, ensure_ascii=False, indent=indent)

    from jinja2.sandbox import safe_range

    env.globals["raise_exception"] = raise_exception
    env.globals["range"] = lambda *a: _Deadline(safe_range(*a), deadline, limit)
    env.filters["tojson"] = tojson
    for name in ("center", "indent", "wordwrap", "truncate", "format", "replace"):  # size-changing filters
        env.filters[name] = _bounded(env.filters[name], max_output)
    return env


def _bounded(fn: Any, max_output: int) -> Any:
    def run(*args: Any, **kw: Any) -> Any:
        if any(isinstance(a, int) and not isinstance(a, bool) and a > max_output for a in list(args[1:]) + list(kw.values())):
            from jinja2.exceptions import SecurityError
            raise SecurityError("a filter argument would exceed the output limit")
        out = fn(*args, **kw)
        if isinstance(out, str) and len(out) > max_output:
            raise _Stop(f"output exceeds {max_output} characters")
        return out
    for attr in ("jinja_pass_arg",):  # keep jinja's context/env passing markers
        if hasattr(fn, attr):
            setattr(run, attr, getattr(fn, attr))
    return run


def _render_here(template: str, context: dict[str, Any], time_limit: float, max_output: int) -> str:
    """Render in this process (the sandbox and the operator checks; the time checked between output pieces)."""
    deadline = time.monotonic() + time_limit
    env = _env(max_output, deadline, time_limit)
    parts, n = [], 0
    for piece in env.from_string(template).generate(**context):
        n += len(piece)
        if n > max_output:
            raise _Stop(f"output exceeds {max_output} characters")
        if time.monotonic() > deadline:
            raise _Stop(f"stopped after {time_limit:g} s")
        parts.append(piece)
    return "".join(parts)


def _child(w: int, template: str, context: dict[str, Any], time_limit: float, max_output: int) -> None:
    try:
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_LIMIT, vm + MEMORY_LIMIT))
    except (OSError, ValueError):
        pass

    def alarm(*_: Any) -> None:
        raise _Stop(f"stopped after {time_limit:g} s")
    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        payload = b"K" + _render_here(template, context, time_limit, max_output).encode("utf-8", "surrogatepass")
    except MemoryError:
        payload = b"E" + b"uses too much memory"
    except _Stop as e:
        payload = b"E" + str(e).encode()
    except Exception as e:  # noqa: BLE001 - the sandbox boundary: any failure of the template is reported
        payload = b"E" + f"failed to render: {type(e).__name__}: {e}"[:300].encode("utf-8", "replace")
    signal.setitimer(signal.ITIMER_REAL, 0)
    view = memoryview(payload)
    while view:
        view = view[os.write(w, view):]


def render_template(template: str, context: dict[str, Any], *, time_limit: float = TIME_LIMIT,
                    max_output: int = MAX_OUTPUT) -> str:
    """Render ``template`` with ``context`` in the sandbox, within ``time_limit`` seconds, ``max_output``
    characters and MEMORY_LIMIT bytes of extra memory; QConvertError ("chat template ...") on any failure."""
    if not hasattr(os, "fork"):
        try:
            return _render_here(template, context, time_limit, max_output)
        except _Stop as e:
            raise QConvertError(f"chat template {e}") from None
        except Exception as e:  # noqa: BLE001 - the sandbox boundary
            raise QConvertError(f"chat template failed to render: {type(e).__name__}: {e}"[:400]) from None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: render, send, exit without running the parent's cleanup
        code = 0
        try:
            os.close(r)
            _child(w, template, context, time_limit, max_output)
        except BaseException:  # noqa: BLE001 - nothing may escape the child
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data, deadline, killed = [], time.monotonic() + time_limit + 1.0, False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            data.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    out = b"".join(data)
    if killed:
        raise QConvertError(f"chat template stopped after {time_limit:g} s")
    if not out:
        raise QConvertError(f"chat template rendering died (status {status}); the template is hostile or broken")
    if out[:1] == b"E":
        raise QConvertError(f"chat template {out[1:].decode('utf-8', 'replace')}".replace("\n", " "))
    return out[1:].decode("utf-8", "surrogatepass")
