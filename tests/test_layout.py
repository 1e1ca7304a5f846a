"""The package layout: no import circle inside caikit_core/ or the plugins, no bundled
plugin importing another, implementation modules never importing their ``plugin.py``,
and no private name imported across modules.

Every import statement counts, wherever it is: at module level, inside a function (a
lazy import) or under ``if TYPE_CHECKING:``. Tests are not part of the layout.
"""

from __future__ import annotations

import ast
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_roots(root: Path) -> dict[str, Path]:
    """Top-level package name -> its folder: the core, each bundled plugin, each contrib one."""
    roots = {"caikit_core": root / "caikit_core"}
    for parent in [root / "plugins", *sorted((root / "contrib").glob("*"))]:
        for init in sorted(parent.glob("*/__init__.py")):
            roots[init.parent.name] = init.parent
    return roots


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of every package (tests left out)."""
    out: dict[str, Path] = {}
    for name, folder in package_roots(root).items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder)
            if "tests" in rel.parts:
                continue
            parts = [name, *rel.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, str]]:
    """``(imported module, imported name or "")`` for each import in the file, resolved to
    the known modules (a name that is a submodule counts as that module)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name, ""
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    yield sub, ""
                elif target in known:
                    yield target, alias.name


def graph(root: Path) -> dict[str, set[str]]:
    """Module -> the known modules it imports."""
    mods = modules(root)
    known = set(mods)
    return {m: {t for t, _ in imports(m, p, known) if t != m} for m, p in mods.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def cross_plugin_imports(edges: dict[str, set[str]]) -> list[str]:
    """``a.x -> b.y`` for each import between two different plugin packages."""
    out = []
    for module, targets in sorted(edges.items()):
        top = module.split(".")[0]
        if top == "caikit_core":
            continue
        for target in sorted(targets):
            other = target.split(".")[0]
            if other not in (top, "caikit_core"):
                out.append(f"{module} -> {target}")
    return out


def test_no_import_circle_in_the_core_or_the_plugins() -> None:
    assert circles(graph(ROOT)) == []


def test_no_bundled_plugin_imports_another() -> None:
    assert cross_plugin_imports(graph(ROOT)) == []


def test_the_core_imports_no_plugin() -> None:
    edges = graph(ROOT)
    outside = [
        f"{m} -> {t}"
        for m, targets in sorted(edges.items())
        if m.split(".")[0] == "caikit_core"
        for t in sorted(targets)
        if t.split(".")[0] != "caikit_core"
    ]
    assert outside == []


def test_implementation_modules_never_import_plugin_py() -> None:
    edges = graph(ROOT)
    wrong = [
        f"{m} -> {t}"
        for m, ts in sorted(edges.items())
        for t in sorted(ts)
        if t.endswith(".plugin") and m.count(".") >= 1 and m != t
    ]
    assert wrong == []


def test_no_private_name_is_imported_from_another_module() -> None:
    mods = modules(ROOT)
    known = set(mods)
    private = [
        f"{m}: from {t} import {name}"
        for m, p in sorted(mods.items())
        for t, name in imports(m, p, known)
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


@pytest.mark.parametrize("plugin", ["caikit_torch", "caikit_jax"])
def test_torch_and_jax_mirror_module_names(plugin: str) -> None:
    names = {p.stem for p in (ROOT / "plugins" / plugin).glob("*.py")}
    expected = {"config", "plugin", "common", "optimiser", "sft", "dpo", "ppo", "reward"}
    assert expected <= names, expected - names


def test_the_analysis_finds_a_circle_a_lazy_import_and_a_cross_plugin_import(
    tmp_path: Path,
) -> None:
    (tmp_path / "caikit_core").mkdir()
    (tmp_path / "caikit_core" / "__init__.py").write_text("")
    pkg = tmp_path / "plugins" / "caikit_a"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "plugin.py").write_text("def build():\n    from caikit_a import impl\n")
    (pkg / "impl.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from caikit_a.plugin import x\n"
    )
    other = tmp_path / "plugins" / "caikit_b"
    other.mkdir()
    (other / "__init__.py").write_text("")
    (other / "config.py").write_text("from caikit_a.impl import _private\n")
    edges = graph(tmp_path)
    assert circles(edges) == [["caikit_a.impl", "caikit_a.plugin"]]
    assert cross_plugin_imports(edges) == ["caikit_b.config -> caikit_a.impl"]


@pytest.mark.parametrize("target", ["quickstart", "quickstart-jax"])
def test_the_quickstart_targets_record_their_run_file_in_the_shared_folder(target: str) -> None:
    """``make quickstart`` and ``make quickstart-jax`` share ``runs/quickstart`` so that
    the backend-independent stages are reused; without ``--new-run`` the second target
    stopped with exit 2 ("holds the run of ... quickstart.toml")."""
    done = subprocess.run(
        ["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True
    )
    runs = [line for line in done.stdout.splitlines() if "/caikit run " in line]
    assert len(runs) == 1 and "caikit run --new-run examples/" in runs[0], runs
