"""The shape of the package: the wings exist, no import circle (function-level imports
included), the engine never imports recipes/executors, T^2 is applied in one place, every
public function has a docstring, and the old public import paths still work."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PKG = ROOT / "distill_llm"
WINGS = ("kd", "engine", "data", "formats", "prune")
# Only the CLI (which registers them) and the quickstart (which launches them) may.
MAY_IMPORT_RECIPES = {"distill_llm.cli", "distill_llm.quickstart"}
# Old module paths kept as thin aliases of the modules that moved.
ALIASES = {
    "distill_llm.losses": "distill_llm.kd.losses",
    "distill_llm.teacher_cache": "distill_llm.kd.teacher_cache",
    "distill_llm.preprocess": "distill_llm.data.preprocess",
    "distill_llm.tokenizer": "distill_llm.data.tokenizer",
    "distill_llm.hf": "distill_llm.formats.hf",
}


def _modules() -> dict:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(name: str, path: Path) -> set:
    """Every module path `name` imports, at module or function level."""
    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parent = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1])
                module = f"{parent}.{module}" if module else parent
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
    return found


def import_graph() -> tuple[dict, dict]:
    """(package module -> package modules it imports, module -> outside names it imports)."""
    mods = _modules()

    def resolve(target):
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph, outside = {}, {}
    for name, path in mods.items():
        targets = _imports(name, path)
        outside[name] = {
            t for t in targets if re.match(r"(distill_llm\.)?(recipes|executors)\b", t)
        }
        # the package face (distill_llm/__init__) only re-exports: its arrows close no circle
        graph[name] = {
            r
            for t in targets
            if t.startswith("distill_llm") and (r := resolve(t)) not in (None, name, "distill_llm")
        }
    return graph, outside


def circles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_wings_exist():
    for wing in WINGS:
        assert (PKG / wing / "__init__.py").is_file(), wing
    assert (PKG / "checks.py").is_file() and (PKG / "formats" / "paths.py").is_file()


def test_no_import_circle_and_the_engine_never_imports_recipes_or_executors():
    graph, outside = import_graph()
    assert len(graph) > 30  # the walk found the package
    assert circles(graph) == []
    offenders = {m: sorted(t) for m, t in outside.items() if t and m not in MAY_IMPORT_RECIPES}
    assert offenders == {}


# Wings from the bottom up: a wing imports only wings below it (errors.py sits below all).
WING_LEVEL = {"data": 0, "engine": 1, "kd": 2, "formats": 2}


def test_a_wing_never_imports_a_wing_above_it():
    graph, _ = import_graph()

    def wing(module):
        parts = module.split(".")
        return parts[1] if len(parts) >= 2 and parts[1] in WING_LEVEL else None

    upward = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if wing(a) and wing(b) and wing(a) != wing(b) and WING_LEVEL[wing(b)] >= WING_LEVEL[wing(a)]
    )
    top = sorted(f"{a} -> {b}" for a, ts in graph.items() if wing(a) for b in ts if not wing(b)
                 and b != "distill_llm.errors")  # fmt: skip
    assert upward == [] and top == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_t_squared_lives_in_one_function():
    sites = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in PKG.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"temperature\s*\*\*\s*2|\bT\s*\*\*\s*2|temperature\s*\*\s*temperature", line)
    ]
    assert sites == ["distill_llm/kd/losses.py:" + sites[0].rsplit(":", 1)[1]]


def _public_defs(tree):
    """Top-level public functions and classes, and the public methods of top-level classes
    (functions nested in functions are implementation details)."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
            yield node
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                    yield item


def test_every_public_function_has_a_docstring():
    missing = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
        for path in sorted(PKG.rglob("*.py"))
        for node in _public_defs(ast.parse(path.read_text()))
        if ast.get_docstring(node) is None
    ]
    assert missing == []


@pytest.mark.parametrize("old, new", ALIASES.items())
def test_old_module_paths_are_the_moved_modules(old, new):
    import importlib

    assert importlib.import_module(old) is importlib.import_module(new)


def test_public_names_import_from_the_package_face():
    import distill_llm as dl
    from distill_llm import (  # noqa: F401
        ConfigError,
        DataConfig,
        KDConfig,
        ModelConfig,
        OptimConfig,
        ParallelConfig,
        TrainConfig,
        cache_teacher,
        distill,
        evaluate,
        init_model,
        pretrain,
    )
    from distill_llm.losses import kd_loss, kd_loss_fused  # noqa: F401

    assert callable(dl.import_hf) and callable(dl.export_hf)
    assert KDConfig().scale == 1.0 and KDConfig(temperature=2.0).scale == 4.0


@pytest.mark.parametrize(
    "module", ["preprocess", "tokenizer", "hf", "quickstart", "nemo", "megatron_gpt_distillation"]
)
def test_python_dash_m_entry_points_still_run(module):
    proc = subprocess.run(
        [sys.executable, "-m", f"distill_llm.{module}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_every_subpackage_is_installed():
    """pyproject lists packages explicitly: a wing missing there would be absent from a wheel."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py")} | {
        "distill_llm.recipes",
        "distill_llm.executors",
    }
    assert found == listed
