"""The dependency rules of docs/architecture (README, "What is in the repository"), read from the imports.

The engine (`analysis/` but its front ends: experiments, benchmarks, the demo model's data and training, the
command line) imports nothing from those front ends, nor from gradio; the interface (`dori_ui/`) imports no demo
or experiment code; and no module of `analysis/` or `dori_ui/` imports, directly or through others, itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

from analysis.model import REPO_ROOT

FRONT_ENDS = ("analysis.experiments", "analysis.bench", "analysis.demo", "analysis.cli", "analysis.cli_parser",
              "analysis.__main__")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def modules(*packages: str) -> dict[str, set[str]]:
    return {module_name(path): imports(path) for package in packages
            for path in sorted((REPO_ROOT / package).rglob("*.py"))}


def is_within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


def test_the_engine_imports_no_front_end_and_no_gradio():
    engine = {name: found for name, found in modules("analysis").items() if not is_within(name, FRONT_ENDS)}
    offences = {name: sorted(m for m in found if is_within(m, FRONT_ENDS + ("gradio", "dori_ui")))
                for name, found in engine.items()}
    assert not {name: found for name, found in offences.items() if found}


def test_the_interface_imports_no_demo_or_experiment_code():
    offences = {name: sorted(m for m in found if is_within(m, ("analysis.demo", "analysis.experiments",
                                                               "analysis.bench")))
                for name, found in modules("dori_ui").items()}
    assert not {name: found for name, found in offences.items() if found}


def test_no_import_circles():
    graph = modules("analysis", "dori_ui")

    def resolve(module: str) -> str | None:
        """The module of `graph` that `module` names (a name imported from a package is the package)."""
        while module not in graph and "." in module:
            module = module.rsplit(".", 1)[0]
        return module if module in graph else None

    edges = {name: {target for m in found if (target := resolve(m)) not in (None, name)}
             for name, found in graph.items()}
    circles, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not circles
