"""docs/quickstart.ipynb runs top to bottom in a fresh kernel, on this checkout, and trains.

Executed with nbclient (the `[test]` extra; skipped where it or ipykernel is missing). The kernel
starts in the repository root, so `import smt_jax` is this checkout's and the install cell is a
no-op. About a minute on a CPU.
"""

from __future__ import annotations

import json
import os

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "docs", "quickstart.ipynb")


def _texts(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      out.append(o.get("text", "") or o.get("data", {}).get("text/plain", ""))
  return "\n".join(out)


def test_the_quickstart_runs_and_both_methods_learn():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert nb.cells[1].cell_type == "code" and "pip" in nb.cells[1].source  # the install cell
  assert "find_spec(\"smt_jax\") is None" in nb.cells[1].source  # guarded: a no-op here
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
  )
  client.execute()

  text = _texts(nb)
  src = next(ln for ln in text.splitlines() if ln.startswith("smt_jax "))
  assert os.path.join(ROOT, "smt_jax", "__init__.py") in src  # this checkout, not an install
  assert "MemorySpec(num_memory_tokens=2, width=32, vocab_size=8)" in text
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 1  # the two curves

  result = json.loads(next(ln for ln in text.splitlines() if ln.startswith("RESULT "))[7:])
  chance = result["chance"]
  # Both learn well below chance; DMT improves on the RNN that SMT left.
  assert result["bptt"] < 0.5 * chance, result
  assert result["smt_dmt"] < 0.6 * chance, result
  assert result["smt_dmt"] < result["smt"] < chance, result
