"""The package's layers (docs/design.md, "Layers"): which part may import which, read from the source
with ``ast`` so that a forbidden import anywhere (module level or inside a function) fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deconvnet"

# part -> parts it must never import (a part is a top-level module or sub-package of deconvnet)
FORBIDDEN = {
    "engine": {"analysis", "display", "explorer", "report", "server", "commands", "cli", "training", "weights", "zoo"},
    "models": {
        "engine",
        "analysis",
        "display",
        "explorer",
        "report",
        "server",
        "commands",
        "cli",
        "training",
        "weights",
        "zoo",
    },
    "data": {"engine", "analysis", "display", "explorer", "report", "server", "commands", "cli"},
    "weights": {"engine", "analysis", "display", "explorer", "report", "server", "commands", "cli"},
    # zoo: names -> builders only; weights (entries, files, conversion) sit on it
    "zoo": {"engine", "analysis", "display", "explorer", "report", "server", "commands", "cli", "training", "weights"},
    "validation": {"engine", "analysis", "display", "explorer", "report", "server", "commands", "cli", "weights"},
    # initialisation is the models' (probes train from scratch without the training loop's module)
    "analysis": {"explorer", "report", "server", "commands", "cli", "training"},
    "display": {"explorer", "report", "server", "commands", "cli"},
    "explorer": {"report", "server", "commands", "cli"},
    "report": {"server", "commands", "cli"},
    "server": {"report", "commands", "cli"},
    "inference": {"analysis", "explorer", "report", "server", "commands", "cli"},
    "training": {"analysis", "explorer", "report", "server", "commands", "cli"},
    # bridges to other libraries (Quantus) sit on the analyses and the engine, beside the interfaces
    "integrations": {"explorer", "report", "server", "commands", "cli"},
}
for _part_below in ("engine", "models", "data", "weights", "zoo", "analysis", "display", "inference", "training"):
    FORBIDDEN[_part_below].add("integrations")  # nothing the integrations build on imports them


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported deconvnet module, line, at module level?) for every import in ``path``."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            names = [node.module] if node.module else [a.name for a in node.names]
            targets = [".".join([*base, name]) for name in names]
            found += [(t, node.lineno, id(node) in top_level) for t in targets]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deconvnet."):
            found.append((node.module or "", node.lineno, id(node) in top_level))
        elif isinstance(node, ast.Import):
            ours = [a.name for a in node.names if a.name.startswith("deconvnet.")]
            found += [(name, node.lineno, id(node) in top_level) for name in ours]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_part_imports_a_layer_above_it(path: Path) -> None:
    part = _part(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    bad = [(t, line) for t, line, _ in _imports(path) if _part(t) in FORBIDDEN.get(part, set())]
    assert not bad, f"{path.relative_to(PACKAGE)} ({part}) imports {bad}: see docs/design.md, Layers"


ANALYSES = sorted((PACKAGE / "analysis").rglob("*.py"))


@pytest.mark.parametrize("path", ANALYSES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_analyses_draw_only_when_asked(path: Path) -> None:
    """An analysis imports the display layer only inside ``figure()`` (computing never loads matplotlib)."""
    eager = [(t, line) for t, line, top in _imports(path) if _part(t) == "display" and top]
    assert not eager, f"{path.relative_to(PACKAGE)} imports the display layer at module level: {eager}"


def _names_imported_from(path: Path, part: str, root: Path = PACKAGE.parent) -> list[tuple[str, int]]:
    """(name, line) for every ``from <deconvnet part or a module of it> import name`` in ``path``
    (a file under ``root``/deconvnet), at module level or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            package = path.relative_to(root).parts[: -node.level] if node.level else ()
            module = ".".join([*package, node.module])
            if module.startswith("deconvnet.") and _part(module) == part:
                found += [(alias.name, node.lineno) for alias in node.names]
    return found


# what training re-exports for old callers: devices and torchrun's environment are the runtime's,
# initialisation is the models'; nothing in the package takes them from training
NOT_TRAININGS = {"init_weights", "resolve_device", "dist_info", "local_rank"}
OUTSIDE_TRAINING = [p for p in SOURCES if "training" not in p.relative_to(PACKAGE).parts]


@pytest.mark.parametrize("path", OUTSIDE_TRAINING, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_devices_and_initialisation_are_not_imported_through_training(path: Path) -> None:
    bad = [(name, line) for name, line in _names_imported_from(path, "training") if name in NOT_TRAININGS]
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad} from training: import them from runtime / models"


def test_the_training_import_check_sees_imports(tmp_path: Path) -> None:
    """The check above reads ``from ..training import`` inside functions, and only imports of training."""
    names = {name for name, _ in _names_imported_from(PACKAGE / "commands" / "train.py", "training")}
    assert {"TrainConfig", "train"} <= names
    assert not _names_imported_from(PACKAGE / "commands" / "common.py", "training")  # its device: runtime's
    bad = tmp_path / "deconvnet" / "commands" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def device(name):\n    from ..training.run import resolve_device\n")
    assert _names_imported_from(bad, "training", root=tmp_path) == [("resolve_device", 2)]


def test_the_checker_sees_imports() -> None:
    """The checks above read real imports (relative, absolute, inside functions)."""
    report = {t for t, _, _ in _imports(PACKAGE / "report.py")}
    assert "deconvnet.explorer" in report
    probes = {(t, top) for t, _, top in _imports(PACKAGE / "analysis" / "probes.py")}
    assert ("deconvnet.display.figures", False) in probes  # ProbeResult.figure draws lazily


def test_the_inline_display_mixin_draws_only_when_asked() -> None:
    """``deconvnet/notebook.py`` sits under the engine and the models (``Projection`` and ``LoadedModel``
    inherit its mixin): it imports nothing of the package but the display layer, inside its methods."""
    found = _imports(PACKAGE / "notebook.py")
    assert found and all(_part(t) == "display" and not top for t, _, top in found), found


def _module_file(name: str) -> Path | None:
    """The file of a deconvnet module or package name (None for a name that is neither, e.g. a class)."""
    base = PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _module_level_graph() -> dict[str, set[str]]:
    """Module -> modules it runs on import (module-level imports, and the packages above each of them)."""
    graph: dict[str, set[str]] = {}
    for path in SOURCES:
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        edges = set()
        for target, _, top in _imports(path):
            if not top:
                continue
            while _module_file(target) is None and "." in target:
                target = target.rsplit(".", 1)[0]  # `from .pkg import name`: the package runs
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}  # parents' __init__ run first
        graph[name] = edges - {name}
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_notebook_mixin_is_in_no_import_circle() -> None:
    """The mixin (``deconvnet.notebook``) and what it draws with (``display/notebook.py``) are in no
    circle of module-level imports: the display module imports the engine, the weights and the
    analyses only inside its functions, so the classes inheriting the mixin are not tied into one knot."""
    graph = _module_level_graph()
    for module in ("deconvnet.notebook", "deconvnet.display.notebook"):
        assert module not in _reaches(graph, module), f"{module} imports itself through a circle"
    below = _reaches(graph, "deconvnet.display.notebook")
    assert not {m for m in below if _part(m) in {"engine", "weights", "analysis"}}, sorted(below)


def test_the_circle_check_finds_a_circle() -> None:
    """The graph above sees module-level imports: the engine's core imports the engine's package."""
    graph = _module_level_graph()
    assert "deconvnet.engine" in graph["deconvnet.engine.core"] or "deconvnet.engine" in _reaches(
        graph, "deconvnet.engine.core"
    )
    assert "deconvnet.engine.core" in _reaches(graph, "deconvnet.engine")


# The engine's own modules, bottom to top (docs/design.md, Layout): at module level each imports only
# engine modules of a lower rank (a type-only import, e.g. ``windowed``'s ``DeconvNet``, may point up).
# The catalogue of layers sits below every way down; the projector below ``DeconvNet`` alone.
ENGINE_RANKS = {
    "rules": 0,
    "tracer": 0,
    "kinds": 0,
    "layout": 1,
    "graph": 2,
    "filters": 2,
    "record": 3,
    "shallow": 4,
    "outputs": 3,
    "chain": 3,
    "window_plan": 3,
    "catalogue": 4,
    "reverse": 4,
    "windowed": 5,
    "graph_windowed": 6,
    "projector": 7,
    "core": 8,
    "__init__": 9,
}
ENGINE_SOURCES = sorted((PACKAGE / "engine").glob("*.py"))


def _engine_imports_upwards(path: Path) -> list[tuple[str, int]]:
    rank = ENGINE_RANKS[path.stem]
    upwards = []
    for target, line, top in _imports(path):
        parts = target.split(".")
        if top and parts[:2] == ["deconvnet", "engine"] and len(parts) > 2 and ENGINE_RANKS[parts[2]] >= rank:
            upwards.append((target, line))
    return upwards


@pytest.mark.parametrize("path", ENGINE_SOURCES, ids=lambda p: p.name)
def test_engine_modules_import_only_below_them(path: Path) -> None:
    assert path.stem in ENGINE_RANKS, f"engine/{path.name}: give it a rank in ENGINE_RANKS"
    bad = _engine_imports_upwards(path)
    assert not bad, f"engine/{path.name} (rank {ENGINE_RANKS[path.stem]}) imports {bad} at module level"


def test_the_engine_rank_check_sees_imports() -> None:
    """The check above reads the engine's relative imports: the projector imports the catalogue, and
    would be refused at the catalogue's rank."""
    projector = {t for t, _, top in _imports(PACKAGE / "engine" / "projector.py") if top}
    assert "deconvnet.engine.catalogue" in projector
    saved = ENGINE_RANKS["projector"]
    try:
        ENGINE_RANKS["projector"] = ENGINE_RANKS["catalogue"]
        refused = {t for t, _ in _engine_imports_upwards(PACKAGE / "engine" / "projector.py")}
        assert "deconvnet.engine.catalogue" in refused
    finally:
        ENGINE_RANKS["projector"] = saved


MAX_MODULE_LINES = 600  # #30: a module longer than this says why in its docstring
MAX_FUNCTION_LINES = 120  # its docstring counted


@pytest.mark.parametrize("path", ENGINE_SOURCES, ids=lambda p: p.name)
def test_engine_modules_and_functions_stay_short(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"engine/{path.name}: {len(text.splitlines())} lines"
    long = [
        (node.name, node.end_lineno - node.lineno + 1)  # type: ignore[operator]
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES  # type: ignore[operator]
    ]
    assert not long, f"engine/{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


# The same bounds on the analyses (but occlusion and visualize, checked by their owners' rows), the display
# layer, the CLI, the report and the image loading (#30).
SHORT_SOURCES = sorted(
    [
        *(p for p in (PACKAGE / "analysis").rglob("*.py") if not {"occlusion", "visualize"} & set(p.parts)),
        *(PACKAGE / "display").glob("*.py"),
        *(PACKAGE / "commands").glob("*.py"),
        PACKAGE / "report.py",
        PACKAGE / "data.py",
    ]
)


@pytest.mark.parametrize("path", SHORT_SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_analyses_display_and_commands_stay_short(path: Path) -> None:
    text = path.read_text()
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(PACKAGE)}: {lines} lines"
    long = [
        (node.name, node.end_lineno - node.lineno + 1)  # type: ignore[operator]
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES  # type: ignore[operator]
    ]
    assert not long, f"{path.relative_to(PACKAGE)}: functions over {MAX_FUNCTION_LINES} lines: {long}"
