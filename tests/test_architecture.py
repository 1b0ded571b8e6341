"""The rooms of ARCHITECTURE.md: a module imports only from its own room or a lower one, and no modules import
each other in a circle."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# lowest first; a module may import from its own room and the rooms before it
ROOMS = [
    ("foundation", ("config_utils", "data_processors", "models", "train")),
    ("analysis", ("process_exp_results.analysis",)),
    ("report", ("process_exp_results.report",)),
    ("figures", ("process_exp_results.figures",)),
    ("step 4", ("inference",)),
    ("experiments", ("process_exp_results.experiments",)),
]
MAX_LINES = 500


def room_of(module: str) -> int | None:
    for level, (_, prefixes) in enumerate(ROOMS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return level
    return None


def project_modules() -> dict[str, Path]:
    modules = {}
    for _, prefixes in ROOMS:
        for prefix in prefixes:
            for path in (REPO / prefix.replace(".", "/")).rglob("*.py"):
                if "results" in path.relative_to(REPO).parts:
                    continue
                parts = path.relative_to(REPO).with_suffix("").parts
                modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement names, at any depth (lazy imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = project_modules()


def test_every_package_belongs_to_a_room():
    """A new top-level package, or a new room under process_exp_results, must be placed in ROOMS."""
    outside = {"tests", "benchmarks", "configs", "docs", "images", "data", "train_results"}
    packages = [p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.py"))]
    packages += [
        f"process_exp_results.{p.name}" for p in (REPO / "process_exp_results").iterdir() if any(p.glob("*.py"))
    ]
    unplaced = [
        name for name in packages if name not in outside and name != "process_exp_results" and room_of(name) is None
    ]
    assert not unplaced, f"place {unplaced} in ROOMS (tests/test_architecture.py) and ARCHITECTURE.md"
    assert len(MODULES) > 40


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_room(module):
    own = room_of(module)
    higher = sorted(
        name for name in imported_modules(MODULES[module]) if (room_of(name) or 0) > own and name in MODULES
    )
    assert not higher, f"{module} ({ROOMS[own][0]}) imports {higher} from a higher room (ARCHITECTURE.md)"


def test_the_rule_catches_a_lower_room_importing_a_higher_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from process_exp_results.figures.common import DPI\n")
    assert "process_exp_results.figures.common" in imported_modules(bad)
    assert room_of("process_exp_results.figures.common") > room_of("process_exp_results.analysis.statistics")


def test_no_import_cycles():
    graph = {
        module: {name for name in imported_modules(path) if name in MODULES and name != module}
        for module, path in MODULES.items()
    }
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in sorted(graph[module]):
            if state.get(name) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(name) :] + [module, name]))
            if name not in state:
                visit(name, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("room", ["process_exp_results", "inference"])
def test_no_analysis_module_is_longer_than_a_sitting(room):
    long = {
        str(path.relative_to(REPO)): n
        for path in (REPO / room).rglob("*.py")
        if "results" not in path.relative_to(REPO).parts
        and (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
