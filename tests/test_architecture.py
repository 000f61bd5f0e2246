"""The package's layers: every import (at module level or inside a function) runs downward, no circles."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pixtral_lora"

# Bottom to top. A module may import its own layer and the ones below, never one above.
LAYERS = [
    ["errors"],
    ["families"],
    ["outputs", "task"],
    ["config", "data", "model"],
    ["classify", "run"],
    ["evaluation"],
    ["training", "inference", "export"],
    ["cli"],
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pixtral_lora"):
                base = node.module.removeprefix("pixtral_lora").lstrip(".")
                for alias in node.names:
                    full = f"{base}.{alias.name}".lstrip(".")
                    targets.append(full if full in modules else base)
            elif isinstance(node, ast.Import):
                targets = [
                    a.name.removeprefix("pixtral_lora.")
                    for a in node.names
                    if a.name.startswith("pixtral_lora.")
                ]
            graph[name] |= {t for t in targets if t in modules and t not in ("", name)}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def test_every_module_has_a_layer():
    unplaced = [m for m in _modules() if m and not any(m.split(".")[0] in layer for layer in LAYERS)]
    assert unplaced == []


def test_no_import_runs_upward():
    graph = _imports(_modules())
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        if source
        for target in targets
        if _layer(target) > _layer(source)
    )
    assert upward == []


def test_no_import_circles():
    graph = _imports(_modules())
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                circles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above are not vacuous: a planted circle and an upward import are found."""
    package = tmp_path / "pixtral_lora"
    (package / "data").mkdir(parents=True)
    (package / "data" / "__init__.py").write_text("")
    (package / "data" / "a.py").write_text("def f():\n    from pixtral_lora.data.b import g\n")
    (package / "data" / "b.py").write_text("from pixtral_lora.data.a import f\n")
    (package / "outputs.py").write_text("from pixtral_lora.data.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    graph = _imports(_modules())
    assert "data.b" in graph["data.a"] and "data.a" in graph["data.b"]
    assert _layer("data.a") > _layer("outputs") and "data.a" in graph["outputs"]
