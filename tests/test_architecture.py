"""The package's layers: every import (at module level or inside a function) runs downward, no
circles between modules or between folders, and a top level that holds the stage folders only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pixtral_lora"

# The pipeline's stages, bottom to top. A module imports its own folder and the layers below; two
# folders of one layer are independent (neither imports the other).
LAYERS = [
    ["errors", "task"],
    ["families", "outputs"],
    ["config"],
    ["data"],
    ["model"],
    ["classify", "run"],
    ["export"],
    ["evaluation"],
    ["training", "inference"],
    ["cli"],
]
# Beside the stage folders, the top level holds only these modules.
TOP_LEVEL_MODULES = {"__init__", "errors", "outputs"}
MAX_MODULE_LINES = 600


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


def _folder(module: str) -> str:
    return module.split(".")[0]


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, or of another folder in the same layer."""
    return sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        if source
        for target in targets
        if _folder(target) != _folder(source) and _layer(target) >= _layer(source)
    )


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                circles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return circles


def _folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Folder -> the other folders (or top-level modules) its modules import."""
    folders: dict[str, set[str]] = {}
    for source, targets in graph.items():
        if source:
            folders.setdefault(_folder(source), set()).update(
                _folder(t) for t in targets if _folder(t) != _folder(source)
            )
    return folders


def test_no_import_runs_upward():
    assert _upward(_imports(_modules())) == []


def test_no_import_circles_between_modules():
    assert _circles(_imports(_modules())) == []


def test_no_import_circles_between_folders():
    assert _circles(_folder_graph(_imports(_modules()))) == []


def test_the_top_level_holds_the_stage_folders_and_a_few_shared_modules():
    top = {path.stem for path in PACKAGE.glob("*.py")}
    folders = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    assert top <= TOP_LEVEL_MODULES, (
        f"top-level modules beyond {sorted(TOP_LEVEL_MODULES)}: {sorted(top - TOP_LEVEL_MODULES)}"
    )
    assert folders == {name for layer in LAYERS for name in layer} - {m for m in TOP_LEVEL_MODULES}


def test_no_module_is_past_the_size_limit():
    long = {
        name or "__init__": n
        for name, path in _modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_the_checker_sees_circles_and_upward_imports(tmp_path, monkeypatch):
    """The checks above are not vacuous: a planted module circle, a folder circle whose modules form
    no circle (model.render -> data.a, data.b -> model.loading), an upward import and an import
    between two folders of one layer are all found."""
    package = tmp_path / "pixtral_lora"
    files = {
        "data/__init__.py": "",
        "data/a.py": "def f():\n    from pixtral_lora.data.b import g\n",
        "data/b.py": "from pixtral_lora.data.a import f\nfrom pixtral_lora.model.loading import h\n",
        "model/__init__.py": "",
        "model/loading.py": "",
        "model/render.py": "from pixtral_lora.data.a import f\n",
        "classify/__init__.py": "from pixtral_lora.run import reader\n",
        "run/__init__.py": "",
        "run/reader.py": "",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    graph = _imports(_modules())
    assert ["data.a", "data.b", "data.a"] in _circles(graph)
    assert not any("model.render" in circle for circle in _circles(graph))  # modules alone: no circle
    assert ["data", "model", "data"] in _circles(_folder_graph(graph))
    assert _upward(graph) == ["classify -> run.reader", "data.b -> model.loading"]
