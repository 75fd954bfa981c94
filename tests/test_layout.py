"""The layering the README's "Layout" states, checked on the source (no import runs):
pretrain/model imports nothing else of the project; the library (pretrain/) never imports
launch/ or data_prep/, only the CLI (pretrain/__main__.py) composes them; no import
circle among the modules of pretrain/, launch/ and data_prep/, counting the imports made
inside functions; no source file over 500 lines; and the "Layout" block itself names only
paths that exist and every module and package of pretrain/."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.runs import REPO

ROOTS = ("pretrain", "launch", "data_prep")
SIZED = (*ROOTS, "tests", "bench")
MAX_LINES = 500
CLI = "pretrain.__main__"


def project_modules(repo: Path = REPO) -> dict[str, Path]:
    """Dotted name -> file of every module under ROOTS (a package is its __init__.py)."""
    found = {}
    for root in ROOTS:
        for path in sorted((repo / root).rglob("*.py")):
            parts = path.relative_to(repo).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module `name` imports, wherever the import statement is."""

    def resolve(dotted: str) -> str | None:  # the module itself, or the package holding it
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {resolve(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                child = f"{base}.{alias.name}"  # `from pkg import module` names a module
                found.add(child if child in modules else resolve(base))
    return found - {None, name}


def import_graph(repo: Path = REPO) -> dict[str, set[str]]:
    modules = project_modules(repo)
    return {name: imported(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph`: its strongly connected components of 2 or more
    modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def model_leaks(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Modules of pretrain.model that import the rest of the project, and what."""
    leaks = {
        name: sorted(t for t in targets if not in_package(t, "pretrain.model"))
        for name, targets in graph.items()
        if in_package(name, "pretrain.model")
    }
    return {name: targets for name, targets in leaks.items() if targets}


def library_reaching_out(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Modules of pretrain/ (but the CLI) that import launch/ or data_prep/, and what."""
    reach = {
        name: sorted(t for t in targets if t.split(".")[0] in ("launch", "data_prep"))
        for name, targets in graph.items()
        if in_package(name, "pretrain") and name != CLI
    }
    return {name: targets for name, targets in reach.items() if targets}


def long_files(repo: Path = REPO) -> dict[str, int]:
    sizes = {
        str(path.relative_to(repo)): len(path.read_text().splitlines())
        for root in SIZED
        for path in (repo / root).rglob("*.py")
    }
    return {name: lines for name, lines in sorted(sizes.items()) if lines > MAX_LINES}


def layout_paths(readme: str) -> list[str]:
    """The paths the README's "Layout" block names: a top-level entry per unindented line,
    a child of the folder above per line indented two spaces (deeper lines continue text)."""
    lines = readme.split("\n## Layout\n", 1)[1].split("```")[1].splitlines()
    paths, folder = [], ""
    for line in lines:
        if line[:1].strip():
            folder = line.split()[0]
            paths.append(folder)
        elif line.startswith("  ") and line[2:3].strip():
            paths.append(folder + line.split()[0])
    return paths


def layout_problems(repo: Path = REPO) -> list[str]:
    """Paths the Layout names that do not exist, and pretrain/ modules it leaves out."""
    named = layout_paths((repo / "README.md").read_text(encoding="utf-8"))
    missing = [
        f"{p}: named in the README's Layout, not found" for p in named if not (repo / p).exists()
    ]
    library = repo / "pretrain"
    parts = [p.name for p in library.glob("*.py") if p.name != "__init__.py"]
    parts += [f"{p.name}/" for p in library.iterdir() if (p / "__init__.py").exists()]
    unnamed = [
        f"pretrain/{n}: add it to the README's Layout"
        for n in sorted(parts)
        if f"pretrain/{n}" not in named
    ]
    return missing + unnamed


def test_the_model_imports_nothing_else_of_the_project():
    assert model_leaks(import_graph()) == {}


def test_only_the_cli_composes_the_library_with_launch_and_data_prep():
    assert library_reaching_out(import_graph()) == {}


def test_no_import_circles_counting_imports_inside_functions():
    assert circles(import_graph()) == []


def test_no_source_file_is_over_500_lines():
    assert long_files() == {}


def test_the_readme_layout_names_what_is_there():
    assert layout_problems() == []


def test_the_layout_check_finds_a_stale_entry(tmp_path):
    for name in (
        "pretrain/__init__.py",
        "pretrain/cli.py",
        "pretrain/new.py",
        "pretrain/model/__init__.py",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "README.md").write_text(
        "# x\n\n## Layout\n\n```\npretrain/    the library\n  cli.py     the CLI\n"
        "               continued text\n  model/     the model\n  gone.py    removed\n"
        "bench/       benchmarks\n```\n\n## Next\n"
    )
    assert layout_problems(tmp_path) == [
        "pretrain/gone.py: named in the README's Layout, not found",
        "bench/: named in the README's Layout, not found",
        "pretrain/new.py: add it to the README's Layout",
    ]


def test_the_checks_catch_what_they_forbid(tmp_path):
    """A small tree with one of each violation (a circle made by lazy imports)."""
    files = {
        "pretrain/__init__.py": "",
        "pretrain/config.py": "",
        "pretrain/model/__init__.py": "from . import blocks\n",
        "pretrain/model/blocks.py": "def f():\n    from pretrain import config\n",
        "pretrain/train.py": "def g():\n    import launch.local\n",
        "launch/__init__.py": "",
        "launch/local.py": "from pretrain import config\n\ndef h():\n    from . import spec\n",
        "launch/spec.py": "def k():\n    import launch.local\n",
        "data_prep/__init__.py": "",
        "bench/long.py": "x = 1\n" * (MAX_LINES + 1),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert model_leaks(graph) == {"pretrain.model.blocks": ["pretrain.config"]}
    assert library_reaching_out(graph) == {"pretrain.train": ["launch.local"]}
    assert circles(graph) == [["launch.local", "launch.spec"]]
    assert long_files(tmp_path) == {"bench/long.py": MAX_LINES + 1}
