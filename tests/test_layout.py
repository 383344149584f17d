"""The package's layout: the library does not depend on the runner, old module paths are gone,
train.py stays short, and the test markers name files that exist."""

from __future__ import annotations

import ast
import importlib
import os

import conftest
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = os.path.join(ROOT, "smt_jax")


def _library_modules() -> list[str]:
  out = []
  for folder, dirs, files in os.walk(LIBRARY):
    dirs[:] = [d for d in dirs if d not in ("runner", "__pycache__")]
    out += [os.path.join(folder, f) for f in files if f.endswith(".py")]
  return sorted(out)


def _imports(path: str) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
  return names


def test_the_library_imports_nothing_from_the_runner():
  modules = _library_modules()
  assert len(modules) > 20
  for path in modules:
    bad = sorted(n for n in _imports(path) if n.startswith("smt_jax.runner"))
    assert not bad, f"{os.path.relpath(path, ROOT)} imports {bad}"


@pytest.mark.parametrize(
  "old",
  ["train", "experiment", "checkpoints", "config_checks", "metrics_io", "evaluation", "samples"],
)
def test_old_module_paths_are_gone(old):
  with pytest.raises(ModuleNotFoundError):
    importlib.import_module(f"smt_jax.{old}")
  assert importlib.import_module(f"smt_jax.runner.{'config' if old == 'config_checks' else old}")


def test_train_py_stays_short():
  with open(os.path.join(LIBRARY, "runner", "train.py")) as f:
    assert sum(1 for _ in f) <= 350


def test_the_integration_marker_names_test_files():
  for name in conftest.INTEGRATION:
    assert os.path.isfile(os.path.join(ROOT, "tests", name)), name


def test_pointers_go_to_docs_method_md():
  for folder in ("smt_jax", "experiments", "launch", "tests"):
    for base, _, files in os.walk(os.path.join(ROOT, folder)):
      for f in files:
        if f.endswith(".py") and f != "test_layout.py":
          assert "SPEC section" not in open(os.path.join(base, f)).read(), f
  assert os.path.isfile(os.path.join(ROOT, "docs", "method.md"))
