"""The package's rooms (docs/architecture.md): ``engine/`` trains, ``evaluation/`` evaluates,
``deploy/`` uses a trained model; every public name has one address."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import edaan_fast

ROOMS = ("edaan_fast.engine", "edaan_fast.evaluation", "edaan_fast.deploy")
#: Modules that moved when ``engine/`` was split; CHANGELOG.md says where to.
GONE = ("edaan_fast.engine.evaluation", "edaan_fast.engine.evaluator",
        "edaan_fast.engine.targets", "edaan_fast.engine.figures", "edaan_fast.engine.report",
        "edaan_fast.engine.extractor", "edaan_fast.engine.translation",
        "edaan_fast.engine.export", "edaan_fast.engine.protocols",
        "edaan_fast.engine.reranking", "edaan_fast.engine.step")
#: The training loop proper: what neither the evaluation nor the deployment room may import.
LOOP = ("edaan_fast.engine.trainer", "edaan_fast.engine.hooks", "edaan_fast.engine.stages",
        "edaan_fast.engine.steps", "edaan_fast.engine.distributed")
PACKAGE = Path(edaan_fast.__file__).parent


def _modules(package: str) -> list[str]:
    pkg = importlib.import_module(package)
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]


@pytest.mark.parametrize("name", GONE)
def test_old_addresses_are_gone(name):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)


@pytest.mark.parametrize("package", ROOMS)
def test_each_room_offers_its_own_names(package):
    """A room's ``__all__`` resolves, and every class or function it lists is defined inside
    that room (no name offered by two rooms)."""
    pkg = importlib.import_module(package)
    assert pkg.__all__, package
    for name in pkg.__all__:
        obj = getattr(pkg, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__.startswith(package + "."), (package, name, obj.__module__)


@pytest.mark.parametrize("module", [m for room in ROOMS for m in _modules(room)]
                         + ["edaan_fast.evaluate", "edaan_fast.train"])
def test_modules_list_only_what_they_define(module):
    """No re-exports: a module's ``__all__`` names only classes and functions defined in it."""
    mod = importlib.import_module(module)
    for name in getattr(mod, "__all__", ()):
        obj = getattr(mod, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == module, (module, name, obj.__module__)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("room", ["evaluation", "deploy"])
def test_evaluation_and_deploy_never_import_the_training_loop(room):
    files = sorted((PACKAGE / room).glob("*.py"))
    assert files
    for path in files:
        bad = sorted(m for m in _imports(path) if m in LOOP)
        assert not bad, f"{path.name} imports the training loop: {bad}"


@pytest.mark.parametrize("cli", ["evaluate", "translate", "export", "masks", "_cli"])
def test_the_clis_error_classes_are_named_at_their_one_address(cli):
    """The (module, class) pairs the commands turn into one-line errors name each class where
    it is defined (a stale pair would surface only when that error happens)."""
    mod = importlib.import_module(f"edaan_fast.{cli}")
    pairs = getattr(mod, "ERRORS", None) or getattr(mod, "INPUT_ERRORS", None)
    if pairs is None:  # masks passes its pair inline
        pairs = (("edaan_fast.masks", "MasksError"),)
    for module, name in pairs:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, BaseException) and cls.__module__ == module, (module, name)
