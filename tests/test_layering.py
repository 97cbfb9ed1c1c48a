"""Layering: the shapes world (firm/synthetic/) is a plugin; nothing else in firm/ imports it, and inside it the task
never imports the recipes (firm/synthetic/recipes/) that run studies on top of it. The fused kernels
(firm/kernels/) import nothing else of firm, and the data layer (firm/data/) only the leaves firm.vocab and
firm.images. Every module sits in one layer of the table LAYERS and imports only lower layers (or its own package);
no module imports a private name of another package; there are no import circles.

Every ``.py`` under firm/ outside firm/synthetic/ is parsed with ``ast`` and every import statement is checked, at
module level and inside functions alike, including relative imports and ``importlib.import_module`` /
``__import__`` calls with a literal name. The plugin is reached only through import strings that are not imports:
the registry's ``"firm.synthetic.x:Name"`` entries (firm/registry.py) and the ``PROVIDERS`` list of firm/cli.py.
"""

import ast
import functools
from pathlib import Path

import pytest

FIRM = Path(__file__).resolve().parents[1] / "firm"
PLUGIN = "firm.synthetic"


def _package(path: Path) -> str:
    """The package of a file under firm/: firm/bench/cli.py and firm/bench/__init__.py are in firm.bench."""
    return ".".join(path.relative_to(FIRM.parent).parent.parts)


def _is_in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def plugin_imports(source: str, package: str) -> list[tuple[int, str]]:
    """(line, statement) for each import of firm.synthetic in ``source``, a module of the package ``package``."""
    return imports_matching(source, package, lambda name: _is_in(name, PLUGIN))


def import_statements(source: str, package: str) -> list[tuple[int, list[str], str]]:
    """(line, the module names it imports, statement) for each import in ``source``, a module of ``package``."""
    return list(_import_statements(source, package))


@functools.cache
def _parse(source: str) -> ast.Module:
    return ast.parse(source)  # each file of firm/ is parsed once for all the checks of this module


@functools.cache
def _import_statements(source: str, package: str) -> tuple[tuple[int, list[str], str], ...]:
    parts = package.split(".")
    found = []
    for node in ast.walk(_parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from ..synthetic import x, from . import synthetic
                base = parts[: len(parts) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]  # `from firm import kernels` names firm.kernels
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        if names:
            found.append((node.lineno, names, ast.get_source_segment(source, node) or ast.dump(node)))
    return tuple(found)


def imports_matching(source: str, package: str, bad) -> list[tuple[int, str]]:
    """(line, statement) for each import in ``source`` (a module of ``package``) that names a module ``bad`` accepts."""
    return [(line, text) for line, names, text in import_statements(source, package) if any(bad(n) for n in names)]


def _library_files() -> list[Path]:
    return sorted(p for p in FIRM.rglob("*.py") if (FIRM / "synthetic") not in p.parents)


def test_there_are_library_files_to_check():
    files = _library_files()
    assert FIRM / "registry.py" in files and FIRM / "bench" / "cli.py" in files
    assert not any("synthetic" in p.relative_to(FIRM).parts for p in files)


def test_nothing_in_the_library_imports_the_shapes_plugin():
    offences = [
        f"{path.relative_to(FIRM.parent)}:{line}: {text}"
        for path in _library_files()
        for line, text in plugin_imports(path.read_text(encoding="utf-8"), _package(path))
    ]
    assert not offences, "firm/synthetic/ is a plugin: register it by name instead of importing it\n" + "\n".join(
        offences
    )


@pytest.mark.parametrize(
    "package, source",
    [
        ("firm.bench", "import firm.synthetic"),
        ("firm.bench", "import firm.synthetic.world as w"),
        ("firm.bench", "from firm.synthetic.critic import ShapesRuleCritic"),
        ("firm.bench", "from firm import synthetic"),
        ("firm.bench", "def f():\n    if True:\n        from firm.synthetic import world\n"),
        ("firm.bench", "from ..synthetic import world"),
        ("firm.policies.families", "from ...synthetic.world import render"),
        ("firm", "from . import synthetic"),
        ("firm", "from .synthetic import cli"),
        ("firm.bench", "import importlib\ndef f():\n    return importlib.import_module('firm.synthetic.bench')\n"),
        ("firm.bench", "def f():\n    return __import__('firm.synthetic')\n"),
    ],
)
def test_the_check_finds_plugin_imports(package, source):
    assert plugin_imports(source, package), source


@pytest.mark.parametrize(
    "package, source",
    [
        ("firm", 'TEACHERS = {"shapes_rule": "firm.synthetic.curation:ShapesRuleTeacher"}'),
        ("firm", 'import importlib\nPROVIDERS = ["firm.synthetic.cli"]\nimportlib.import_module(PROVIDERS[0])\n'),
        ("firm.bench", "from firm.bench.data import write_benchmark\nfrom . import data\nimport firm.synthetics"),
        ("firm.bench", "from .synthetic import x"),  # a module of firm/bench/, not the plugin
    ],
)
def test_the_check_allows_registry_strings_and_other_modules(package, source):
    assert plugin_imports(source, package) == []


# --------------------------------------------------------------------------------------------------------------------
# Inside the plugin: the recipes (firm/synthetic/recipes/: pretraining, the demo, the ablation, faithfulness, the critic
# proof) sit on top of the task (world, language, tasks, perception, rule critic, ...). The task never imports them.

RECIPES = "firm.synthetic.recipes"


def recipe_offences(folder: Path, package: str = PLUGIN) -> list[str]:
    """``file:line: statement`` for each import of the recipes by a module of the plugin in ``folder`` (firm/synthetic/,
    whose package is ``package``): any ``.py`` under it outside ``folder/recipes/``."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        if folder / "recipes" in path.parents:
            continue
        sub = ".".join([package, *path.relative_to(folder).parent.parts])
        for line, text in imports_matching(path.read_text(encoding="utf-8"), sub, lambda n: _is_in(n, RECIPES)):
            found.append(f"{path.relative_to(folder.parent)}:{line}: {text}")
    return found


def test_the_shapes_task_never_imports_its_recipes():
    assert (FIRM / "synthetic" / "world.py").is_file() and (FIRM / "synthetic" / "recipes" / "demo.py").is_file()
    offences = recipe_offences(FIRM / "synthetic")
    assert not offences, "the shapes task plugin imports a recipe; recipes sit on top of it\n" + "\n".join(offences)


@pytest.mark.parametrize(
    "source",
    [
        "from firm.synthetic.recipes.demo import ShapesReport",
        "def f():\n    from firm.synthetic.recipes import ablation\n",
        "from .recipes import demo",
        "from . import recipes",
        "import importlib\nimportlib.import_module('firm.synthetic.recipes.cli')\n",
    ],
)
def test_the_recipe_check_finds_a_planted_import(tmp_path, source):
    plugin = tmp_path / "synthetic"
    (plugin / "recipes").mkdir(parents=True)
    (plugin / "world.py").write_text("from firm.synthetic.tasks import edit_tasks\n")
    (plugin / "recipes" / "demo.py").write_text("from firm.synthetic.world import render\nfrom . import report\n")
    assert recipe_offences(plugin) == []  # recipes import the task and each other
    (plugin / "critic.py").write_text(source)
    assert [o.split(":")[0] for o in recipe_offences(plugin)] == ["synthetic/critic.py"], source


@pytest.mark.parametrize(
    "layer, allowed",
    [("firm.kernels", ()), ("firm.data", ("firm.vocab", "firm.images"))],
)
def test_kernels_and_data_import_only_the_leaves_they_need(layer, allowed):
    """The fused kernels import nothing else of firm (they are usable alone); the data layer only the vocabulary and
    the image rules."""
    folder = FIRM.parent.joinpath(*layer.split("."))
    files = sorted(folder.rglob("*.py"))
    assert len(files) >= 5, f"{folder} has too few modules to check"

    def outside(name: str) -> bool:
        return _is_in(name, "firm") and not any(_is_in(name, ok) for ok in (layer, *allowed))

    offences = [
        f"{path.relative_to(FIRM.parent)}:{line}: {text}"
        for path in files
        for line, text in imports_matching(path.read_text(encoding="utf-8"), _package(path), outside)
    ]
    assert not offences, f"{layer} may import only {allowed or 'nothing'} of firm\n" + "\n".join(offences)


def test_the_wall_check_sees_an_import_of_the_library():
    def outside(name: str) -> bool:
        return _is_in(name, "firm") and not _is_in(name, "firm.kernels")

    assert imports_matching("from firm.critics import types", "firm.kernels", outside)
    assert imports_matching("from .. import config", "firm.kernels", outside)
    assert imports_matching("from . import _common\nfrom firm.kernels import nft_loss", "firm.kernels", outside) == []


# --------------------------------------------------------------------------------------------------------------------
# The layer table. A module may import modules of lower layers, and modules of its own package; two packages of one
# layer do not import each other. A command module (`<package>/cli.py`, firm/cli.py) belongs to the command layer
# whatever its folder. docs/architecture.md draws the same table.

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "leaves",
        (
            "firm.vocab",
            "firm.images",
            "firm.paths",
            "firm.provenance",
            "firm.templates",
            "firm.registry",
            "firm.devices",
            "firm.tiny_checkpoints",
        ),
    ),
    ("kernels", ("firm.kernels",)),
    ("config", ("firm.config", "firm.module")),
    ("data", ("firm.data",)),
    ("models", ("firm.policies", "firm.critics")),
    ("rewards", ("firm.rewards",)),
    ("pipelines", ("firm.curation", "firm.bench")),
    ("algorithms", ("firm.algorithms", "firm.toy")),
    ("runner", ("firm.runner",)),
    ("tools", ("firm.eval", "firm.profile", "firm.plan", "firm.doctor")),
    ("commands", ("firm.cli", "firm.__main__", "firm.kernels_cli", "firm.rewards_cli")),
    ("plugin", ("firm.synthetic",)),
)
COMMANDS = next(i for i, (name, _) in enumerate(LAYERS) if name == "commands")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(FIRM.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the package that owns ``module`` in that layer); KeyError for a module the table lacks."""
    if module == "firm":
        return 0, "firm"  # firm/__init__.py imports nothing
    if module in LAYERS[COMMANDS][1]:
        return COMMANDS, "firm"  # the top-level commands: anything below them
    if module.endswith(".cli") and not _is_in(module, "firm.synthetic"):
        return COMMANDS, module.rsplit(".", 1)[0]  # a package's commands sit above everything but the plugin
    best = None
    for i, (_, packages) in enumerate(LAYERS):
        for p in packages:
            if _is_in(module, p) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    if best is None:
        raise KeyError(f"{module} is in no layer of tests/test_layering.py LAYERS: add it")
    return best


def _imported_modules(source: str, package: str) -> list[tuple[int, str, str]]:
    """(line, imported module, statement) for each firm module ``source`` imports (``from a import b`` names a.b when
    that is a module, else a)."""
    return [
        (line, _existing_module(name), text)
        for line, names, text in import_statements(source, package)
        for name in names
        if _is_in(name, "firm")
    ]


def _existing_module(name: str) -> str:
    """The longest prefix of ``name`` that is a module or package under firm/."""
    parts = name.split(".")
    while len(parts) > 1:
        rel = Path(*parts)
        if (FIRM.parent / rel).with_suffix(".py").is_file() or (FIRM.parent / rel / "__init__.py").is_file():
            return ".".join(parts)
        parts = parts[:-1]
    return "firm"


def layer_offences(module: str, imported: str) -> str | None:
    """Why ``module`` may not import ``imported`` (None: it may)."""
    if imported == "firm":
        return None  # `from firm import kernels` names firm.kernels, which is checked by its own name
    (mine, my_pkg), (theirs, their_pkg) = layer_of(module), layer_of(imported)
    if _is_in(imported, my_pkg) or theirs < mine:
        return None
    if theirs == mine:
        return f"{my_pkg} and {their_pkg} share the layer {LAYERS[mine][0]!r} and must not import each other"
    return f"layer {LAYERS[mine][0]!r} ({my_pkg}) imports the higher layer {LAYERS[theirs][0]!r} ({their_pkg})"


def _all_modules() -> list[Path]:
    return sorted(FIRM.rglob("*.py"))


def test_every_module_of_firm_has_a_layer():
    for path in _all_modules():
        layer_of(_module_name(path))


def test_no_module_imports_a_higher_layer():
    offences = []
    for path in _all_modules():
        module = _module_name(path)
        package = _package(path)
        for line, imported, text in _imported_modules(path.read_text(encoding="utf-8"), package):
            why = layer_offences(module, imported)
            if why:
                offences.append(f"{path.relative_to(FIRM.parent)}:{line}: {text.splitlines()[0]}  -- {why}")
    assert not offences, "imports against the layer table (tests/test_layering.py LAYERS):\n" + "\n".join(offences)


@pytest.mark.parametrize(
    "module, imported, allowed",
    [
        ("firm.data.reader", "firm.vocab", True),
        ("firm.data.reader", "firm.critics.types", False),  # data below critics
        ("firm.critics.export", "firm.runner", False),  # a model-layer module reaching up to the runner
        ("firm.policies.policy", "firm.critics.types", False),  # two packages of one layer
        ("firm.algorithms.base", "firm.algorithms.rollout", True),  # its own package
        ("firm.algorithms.rollout", "firm.rewards.functions", True),
        ("firm.rewards.functions", "firm.algorithms.config", False),
        ("firm.critics.cli", "firm.rewards", True),  # commands sit above everything
        ("firm.kernels.bench", "firm.config", False),
        ("firm.synthetic.recipes.demo", "firm.runner", True),  # the plugin is on top
        ("firm.bench.run", "firm.eval.run", False),
    ],
)
def test_the_layer_check_sees_an_upward_import(module, imported, allowed):
    assert (layer_offences(module, imported) is None) == allowed


def test_the_layer_scan_finds_a_planted_upward_import():
    text = "from firm.algorithms.base import RLAlgorithm\n"
    found = _imported_modules(text, "firm.critics")
    assert [m for _, m, _ in found] == ["firm.algorithms.base"]
    assert layer_offences("firm.critics.types", found[0][1])


# --------------------------------------------------------------------------------------------------------------------
# Private names stay in their package; no import circles.


def private_imports(source: str, package: str) -> list[tuple[int, str]]:
    """(line, statement) for each ``from other_package... import _name`` of ``source`` (a module of ``package``)."""
    top = ".".join(package.split(".")[:2])
    found = []
    for node in ast.walk(_parse(source)):
        if isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            target = node.module or ""
            if node.level:
                target = ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])
            if not _is_in(target, "firm") or _is_in(target, top):
                continue
            if any(a.name.startswith("_") and not a.name.startswith("__") for a in node.names):
                found.append((node.lineno, ast.get_source_segment(source, node) or ast.dump(node)))
    return found


def test_no_module_imports_a_private_name_of_another_package():
    offences = [
        f"{path.relative_to(FIRM.parent)}:{line}: {text}"
        for path in _all_modules()
        for line, text in private_imports(path.read_text(encoding="utf-8"), _package(path))
    ]
    assert not offences, "a private name used outside its package: make it public or move it\n" + "\n".join(offences)


def test_the_private_check_sees_one():
    assert private_imports("from firm.runner import _git_commit", "firm.bench")
    assert private_imports("from firm.kernels._common import x\nfrom firm.cli import _find", "firm.eval")
    assert private_imports("from firm.kernels import _common", "firm.kernels") == []  # its own package
    assert private_imports("from . import _common", "firm.kernels") == []


def import_graph() -> dict[str, set[str]]:
    """module -> the firm modules it imports (at module level or inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in _all_modules():
        module = _module_name(path)
        found = _imported_modules(path.read_text(encoding="utf-8"), _package(path))
        graph[module] = {m for _, m, _ in found if m != module and m != "firm"}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles (each line: modules that import each other, directly or not):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_the_circle_check_sees_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
