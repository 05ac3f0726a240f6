"""The layout shows the data flow: stage folders that say what comes in and out, imports that go
one way between stages, no module reaching into another's private names, no oversized module."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1]
STAGES = ("gguf", "ours", "llama", "compare", "report", "runs", "notebook")
MODULES = sorted(p for d in ("harness", "probes") for p in (ROOT / d).rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path):
    """(imported module, names) for every import in the file, at any depth (lazy ones too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "probes":
        return "probes"
    return parts[1] if parts[0] == "harness" and len(parts) > 1 else None


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_says_what_comes_in_and_goes_out(stage):
    init = ROOT / "harness" / stage / "__init__.py"
    tree = ast.parse(init.read_text())
    doc = ast.get_docstring(tree) or ""
    assert "In:" in doc and "Out:" in doc, f"{init}: the docstring says what comes in (In:) and goes out (Out:)"
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body), f"{init} imports nothing"


def test_no_module_imports_another_modules_private_name():
    bad = [f"{_module_name(p)}: from {mod} import {n}" for p in MODULES for mod, names in _imports(p)
           if mod.startswith(("harness", "probes")) for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, bad


def test_stages_depend_one_way():
    """Package-level import graph among the stages (and probes) has no cycle."""
    edges: dict[str, set[str]] = {}
    for p in MODULES:
        src = _stage(_module_name(p))
        if src not in STAGES + ("probes",):
            continue
        for mod, _ in _imports(p):
            dst = _stage(mod)
            if dst in STAGES + ("probes",) and dst != src:
                edges.setdefault(src, set()).add(dst)

    def reach(a, seen):
        for b in edges.get(a, ()):
            if b not in seen:
                seen.add(b)
                reach(b, seen)
        return seen
    cycles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a in reach(b, set()))
    assert not cycles, (cycles, edges)
    assert "report" not in reach("compare", set()) and "llama" not in reach("ours", set())


def test_no_module_much_over_500_lines():
    big = {_module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > 520}
    assert not big, big
