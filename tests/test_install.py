"""The install tells the truth: ranges in setup.cfg, a lock that satisfies them, only smt_jax ships.

Everything here reads files and package metadata (no pip, no network, no compile).
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata as md
import os
import re
import subprocess
import sys

import setuptools
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_constraints  # noqa: E402

EXTRAS = {"tb", "wandb", "hf", "gcs", "reference", "cuda", "tpu", "test"}


def _cfg() -> configparser.ConfigParser:
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  return cfg


def _pins() -> dict[str, str]:
  pins = {}
  with open(os.path.join(ROOT, "constraints.txt")) as f:
    for line in f:
      if line.strip() and not line.startswith("#"):
        name, version = line.strip().split("==")
        pins[name] = version
  return pins


def test_python_and_ranges_not_pins():
  cfg = _cfg()
  assert SpecifierSet(cfg["options"]["python_requires"]) == SpecifierSet(">=3.11")
  groups = make_constraints.declared()
  assert set(groups) == {""} | EXTRAS
  for extra, reqs in groups.items():
    for req in reqs:
      assert not any(s.operator in ("==", "===") for s in req.specifier), (extra, str(req))
      if not extra:  # the library's own dependencies: a floor the lock meets, never a pin
        assert any(s.operator == ">=" for s in req.specifier), str(req)


def test_the_lock_pins_every_declared_dependency_within_its_range():
  pins = _pins()
  assert list(pins) == sorted(pins) and all(n == canonicalize_name(n) for n in pins)
  header = open(os.path.join(ROOT, "constraints.txt")).read()
  not_locked = set(re.search(r"not locked: (.*)\.", header).group(1).split(", "))
  for extra, reqs in make_constraints.declared().items():
    for req in reqs:
      name = canonicalize_name(req.name)
      if name not in pins:  # only what is not installed where the lock was made
        assert extra in ("gcs", "reference") and name in not_locked, (extra, name)
        continue
      assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])
  # What the README's install and CI need is all locked (the core and [test] closure).
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "nbclient", "ipykernel"):
    assert name in pins, name


def test_the_lock_walk_follows_extras_and_markers():
  """lock() on fixed roots: extras pull their own requirements; a false marker pulls nothing."""
  pins, missing = make_constraints.lock(
    [Requirement("jax"), Requirement('flax; python_version < "3"'), Requirement("no-such-pkg-x")]
  )
  assert pins["jax"] == md.version("jax") and "jaxlib" in pins and "ml-dtypes" in pins
  assert "flax" not in pins and missing == {"no-such-pkg-x"}
  text = make_constraints.render()
  names = [ln.split("==")[0] for ln in text.splitlines() if not ln.startswith("#")]
  assert text == make_constraints.render() and names == sorted(names)  # stable, sorted


def test_no_declared_dependency_goes_unused():
  """Each dependency of install_requires is imported by smt_jax/, experiments/ or launch/."""
  imported = set()
  for top in ("smt_jax", "experiments", "launch"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if f.endswith(".py"):
          for node in ast.walk(ast.parse(open(os.path.join(dirpath, f)).read())):
            if isinstance(node, ast.Import):
              imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
              imported.add(node.module.split(".")[0])
  dists = md.packages_distributions()  # import name -> distributions
  provided = {canonicalize_name(d) for name in imported for d in dists.get(name, [])}
  for req in make_constraints.declared()[""]:
    assert canonicalize_name(req.name) in provided, f"{req.name} is declared but never imported"
  assert "tqdm" not in {canonicalize_name(r.name) for r in make_constraints.declared()[""]}


def test_only_smt_jax_ships():
  find = _cfg()["options.packages.find"]["include"].split()
  packages = setuptools.find_packages(ROOT, include=find)
  assert packages and all(p == "smt_jax" or p.startswith("smt_jax.") for p in packages), packages
  assert {"smt_jax", "smt_jax.models", "smt_jax.data"} <= set(packages)


def test_the_readme_and_ci_install_with_the_lock():
  readme = open(os.path.join(ROOT, "README.md")).read()
  first, second = re.search(r"```bash\n(.*?)\n(.*?)\n```", readme, re.S).groups()
  assert first.startswith("pip install -c constraints.txt -e . && ")
  assert second.startswith('pip install -c constraints.txt -e ".[test]" && ')
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert 'pip install -q -c constraints.txt -e ".[test]" && ruff format --check . && ' in ci
  assert second.split(" && ")[1:] == ci.strip().splitlines()[-1].split(" && ")[1:]


def test_the_experiments_run_from_the_checkout():
  """Not installed, experiments/ is found from the repository root (python -m adds the cwd)."""
  out = subprocess.run(
    [sys.executable, "-c", "import experiments.run, smt_jax; print(experiments.run.__file__)"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert os.path.realpath(out.strip()).startswith(os.path.realpath(ROOT))
