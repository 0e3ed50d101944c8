"""The layout's rules, checked from the code: imports form no cycle, formats/ never imports qconvert/, no
function-local import closes a cycle, the C libraries have one source list, and files stay short."""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("formats", "qconvert")
MAX_LINES = 450
SOURCE_SUFFIXES = {".py", ".c", ".h", ".sh"}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages under ``root``."""
    out = {}
    for pkg in PACKAGES:
        for p in (root / pkg).rglob("*.py"):
            parts = p.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (not run, so not edges)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imports(path: Path, mods: dict[str, Path], name: str) -> list[tuple[str, bool]]:
    """(imported project module, imported inside a function) for each import statement of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(fn))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        for t in targets:
            while t and t not in mods:  # `import a.b.c` binds a, but runs a.b.c: the deepest known module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.append((t, id(node) in local))
    return out


def graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """The import graph of the project's modules and the rule breaks that need no cycle search."""
    mods = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    problems = []
    for name, path in mods.items():
        for t, _ in imports(path, mods, name):
            edges[name].add(t)
            if name.split(".")[0] == "formats" and t.split(".")[0] == "qconvert":
                problems.append(f"{path.relative_to(root)} imports {t}: formats/ never imports qconvert/")
            if name.split(".")[:2] != ["qconvert", "testing"] and t.startswith("qconvert.testing") \
                    and not name.startswith("qconvert.testing"):
                problems.append(f"{path.relative_to(root)} imports {t}: the product never imports the test wing")
    return edges, problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def local_dodges(root: Path, edges: dict[str, set[str]]) -> list[str]:
    """Function-local imports of project modules that lie on an import cycle (deferring an import to dodge a
    cycle still leaves the cycle)."""
    mods = modules(root)
    in_cycle = {m for c in cycles(edges) for m in c}
    out = []
    for name, path in mods.items():
        for t, local in imports(path, mods, name):
            if local and name in in_cycle and t in in_cycle:
                out.append(f"{path.relative_to(root)}: function-local import of {t} closes a cycle")
    return out


def test_no_import_cycles_and_formats_never_imports_qconvert():
    edges, problems = graph(ROOT)
    assert len(edges) > 60  # every module was read
    found = cycles(edges)
    assert not found, f"import cycles: {found}"
    assert not problems, "\n".join(problems)
    assert not local_dodges(ROOT, edges)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_catches_a_cycle_added_on_purpose(tmp_path):
    """The same checks on a small tree with a cycle closed by a function-local import, an import from formats/
    into qconvert/, and a clean twin: only the broken tree fails."""
    base = {"formats/__init__.py": "", "formats/a.py": "from formats.b import g\n", "qconvert/__init__.py": "",
            "qconvert/c.py": "from formats import a\n"}
    _write(tmp_path / "clean", {**base, "formats/b.py": "def g():\n    return 1\n"})
    edges, problems = graph(tmp_path / "clean")
    assert not cycles(edges) and not problems and not local_dodges(tmp_path / "clean", edges)
    broken = tmp_path / "broken"
    _write(broken, {**base, "formats/b.py": "def g():\n    from formats.a import x\n    return x\n",
                    "formats/d.py": "import qconvert.c\n"})
    edges, problems = graph(broken)
    assert cycles(edges) == [["formats.a", "formats.b"]]
    assert problems == ["formats/d.py imports qconvert.c: formats/ never imports qconvert/"]
    assert local_dodges(broken, edges) == ["formats/b.py: function-local import of formats.a closes a cycle"]


def _ext_modules() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["ext-modules"]


def test_one_c_source_list_for_the_build_and_the_sanitizer_build():
    """scripts/fuzz.py's ASan/UBSan build compiles exactly pyproject.toml's sources, and every C file of the
    tree belongs to one library."""
    spec = importlib.util.spec_from_file_location("fuzz_script", ROOT / "scripts" / "fuzz.py")
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    ours = {e["name"]: sorted(e["sources"]) for e in _ext_modules()}
    assert {n: sorted(str(Path(s).relative_to(ROOT)) for s in srcs) for n, srcs in fuzz.native_sources().items()} == ours
    built = {s for srcs in ours.values() for s in srcs}
    on_disk = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.c")}
    assert built == on_disk
    assert len(ours) == 3


def test_headers_included_exist_and_no_c_file_reaches_into_another_package():
    for e in _ext_modules():
        dirs = [ROOT / d for d in e.get("include-dirs", [])]
        for src in e["sources"]:
            p = ROOT / src
            for inc in re.findall(r'#include "([^"]+)"', p.read_text()):
                assert "../" not in inc, f"{src} includes {inc} by a relative path"
                assert any((d / inc).is_file() for d in [p.parent, *dirs]), f"{src}: {inc} not found"


def _sources() -> list[Path]:
    tracked = [ROOT / p for d in (*PACKAGES, "tests", "scripts") for p in
               (str(q.relative_to(ROOT)) for q in (ROOT / d).rglob("*"))]
    return [p for p in tracked if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts]


@pytest.mark.parametrize("limit", [MAX_LINES])
def test_no_source_file_is_long(limit):
    files = _sources()
    assert len(files) > 80
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text(errors="replace").splitlines())) > limit}
    assert not long, f"over {limit} lines: {long}"
    assert len((ROOT / "qconvert" / "cli.py").read_text().splitlines()) <= 300
