"""The Opacus pin: pyproject.toml caps opacus at the minor version the engine's use of its private fields was tested
with, the installed Opacus is inside that range, and dp_diffusers refuses (ImportError) any Opacus outside it."""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import opacus
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from dp_diffusers.privacy import opacus_internals

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]


def declared_opacus() -> SpecifierSet:
    """The opacus specifier pyproject.toml declares."""
    with open(REPO / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in dependencies if Requirement(d).name == "opacus"]
    return spec


def test_pyproject_caps_opacus_at_the_tested_minor_version():
    spec = declared_opacus()
    assert spec == SpecifierSet(opacus_internals.TESTED_OPACUS) == SpecifierSet(">=1.6,<1.7")
    assert "1.7.0" not in spec and "1.5.2" not in spec


def test_installed_opacus_is_the_tested_one():
    assert opacus.__version__ in declared_opacus(), (
        f"opacus {opacus.__version__} is installed but pyproject.toml declares opacus{declared_opacus()}"
    )
    opacus_internals.check_opacus_version()  # passes quietly


@pytest.mark.parametrize("version", ["1.5.2", "1.6.0", "1.6.1", "1.6.9", "1.7.0", "1.7.0rc1", "2.0.0", "0.16.3"])
def test_the_import_check_agrees_with_pyproject(version, monkeypatch):
    monkeypatch.delenv(opacus_internals.ALLOW_UNTESTED_ENV, raising=False)
    if version in declared_opacus():
        opacus_internals.check_opacus_version(version)
    else:
        with pytest.raises(ImportError, match=r"tested with opacus>=1\.6,<1\.7.*opacus " + re.escape(version)):
            opacus_internals.check_opacus_version(version)


def test_importing_dp_diffusers_with_an_untested_opacus_fails_loudly(monkeypatch):
    monkeypatch.delenv(opacus_internals.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setattr(opacus, "__version__", "1.7.0")
    try:
        with pytest.raises(ImportError, match=r"opacus>=1\.6,<1\.7.*opacus 1\.7\.0 is installed"):
            importlib.reload(opacus_internals)  # the check runs at import time
        monkeypatch.setenv(opacus_internals.ALLOW_UNTESTED_ENV, "1")
        with pytest.warns(UserWarning, match=r"opacus 1\.7\.0 is installed"):
            importlib.reload(opacus_internals)  # the escape hatch: a loud warning instead
    finally:
        monkeypatch.undo()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            importlib.reload(opacus_internals)  # the real version again: quiet


def test_the_version_check_runs_before_any_other_privacy_module():
    """``dp_diffusers.privacy`` imports ``opacus_internals`` first, and that imports nothing of the package: an
    untested Opacus is refused before ``bookkeeping.py`` or ``grad_sample.py`` import Opacus' private functions."""
    import ast

    package = REPO / "dp_diffusers" / "privacy"
    imports = [n for n in ast.parse((package / "__init__.py").read_text()).body if isinstance(n, ast.ImportFrom)]
    assert (imports[0].level, imports[0].module, [a.name for a in imports[0].names]) == (1, None, ["opacus_internals"])
    internal = [
        n for n in ast.walk(ast.parse((package / "opacus_internals.py").read_text())) if isinstance(n, ast.ImportFrom)
    ]
    assert all(n.level == 0 for n in internal)
