"""Layering: the shapes world (firm/synthetic/) is a plugin; nothing else in firm/ imports it. The fused kernels
(firm/kernels/) and the data layer (firm/data/) import nothing else of firm.

Every ``.py`` under firm/ outside firm/synthetic/ is parsed with ``ast`` and every import statement is checked, at
module level and inside functions alike, including relative imports and ``importlib.import_module`` /
``__import__`` calls with a literal name. The plugin is reached only through import strings that are not imports:
the registry's ``"firm.synthetic.x:Name"`` entries (firm/registry.py) and the ``PROVIDERS`` list of firm/cli.py.
"""

import ast
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


def imports_matching(source: str, package: str, bad) -> list[tuple[int, str]]:
    """(line, statement) for each import in ``source`` (a module of ``package``) that names a module ``bad`` accepts."""
    parts = package.split(".")
    found = []
    for node in ast.walk(ast.parse(source)):
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
        if any(bad(n) for n in names):
            found.append((node.lineno, ast.get_source_segment(source, node) or ast.dump(node)))
    return found


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


@pytest.mark.parametrize("layer", ["firm.kernels", "firm.data"])
def test_kernels_and_data_import_nothing_else_of_firm(layer):
    folder = FIRM.parent.joinpath(*layer.split("."))
    files = sorted(folder.rglob("*.py"))
    assert len(files) >= 5, f"{folder} has too few modules to check"

    def outside(name: str) -> bool:
        return _is_in(name, "firm") and not _is_in(name, layer)

    offences = [
        f"{path.relative_to(FIRM.parent)}:{line}: {text}"
        for path in files
        for line, text in imports_matching(path.read_text(encoding="utf-8"), _package(path), outside)
    ]
    assert not offences, f"{layer} must import nothing else of firm\n" + "\n".join(offences)


def test_the_wall_check_sees_an_import_of_the_library():
    def outside(name: str) -> bool:
        return _is_in(name, "firm") and not _is_in(name, "firm.kernels")

    assert imports_matching("from firm.critics import types", "firm.kernels", outside)
    assert imports_matching("from .. import config", "firm.kernels", outside)
    assert imports_matching("from . import _common\nfrom firm.kernels import nft_loss", "firm.kernels", outside) == []
