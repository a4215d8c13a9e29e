"""The layers of ARCHITECTURE.md, checked on the source: every import of an llmscale module points
down (to its own package or a lower layer), and no modules import each other in a circle.

Imports inside functions count too: a deferred import is still a dependency.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "llmscale"

# Lowest first. A module may import its own package and the packages of lower layers; packages
# that share a layer are independent of each other. The root's own modules (llmscale/__init__.py,
# files.py, wheelhouse.py) sit in the first layer.
LAYERS = [
    ("llmscale", "config"),
    ("adapters", "tracking"),
    ("models", "data"),
    ("optim", "prep", "objectives"),
    ("parallel",),
    ("checkpoint",),
    ("eval",),
    ("train",),
    ("bench",),
]
LAYER_OF = {package: depth for depth, packages in enumerate(LAYERS) for package in packages}


def module_name(path: Path, root: Path) -> str:
    parts = ["llmscale", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(root: Path) -> Dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The llmscale modules that `name` imports; `from package import module` names the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return {module for module in found if module in known}


def import_graph(root: Path) -> Dict[str, Set[str]]:
    modules = all_modules(root)
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def layer_package(module: str) -> str:
    """`llmscale.parallel.engine` -> `parallel`; the root package and its own modules
    (`llmscale.files`) -> `llmscale`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER_OF else "llmscale"


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    return [
        f"{module} imports {target}: {layer_package(target)} is not below "
        f"{layer_package(module)} in LAYERS"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_package(target) != layer_package(module)
        and LAYER_OF[layer_package(target)] >= LAYER_OF[layer_package(module)]
    ]


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), plus self-imports."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in graph[module]:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_every_package_has_a_layer() -> None:
    packages = {path.parent.name for path in PACKAGE_ROOT.glob("*/__init__.py")}
    assert packages - set(LAYER_OF) == set(), "add the new package to LAYERS and ARCHITECTURE.md"


def test_imports_point_down_the_layers() -> None:
    assert upward_imports(import_graph(PACKAGE_ROOT)) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph(PACKAGE_ROOT)) == []


def test_an_upward_import_and_a_cycle_are_caught(tmp_path: Path) -> None:
    files = {
        "__init__.py": "",
        "config/__init__.py": "from llmscale.config.plan import Plan\n",
        "config/plan.py": "def f():\n    from llmscale.train import loop\n",
        "models/__init__.py": "",
        "models/a.py": "from llmscale.models import b\n",
        "models/b.py": "from .a import x\n",
        "train/__init__.py": "",
        "train/loop.py": "import torch\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == [
        "llmscale.config.plan imports llmscale.train: train is not below config in LAYERS",
        "llmscale.config.plan imports llmscale.train.loop: train is not below config in LAYERS",
    ]
    assert cycles(graph) == [["llmscale.models.a", "llmscale.models.b"]]
