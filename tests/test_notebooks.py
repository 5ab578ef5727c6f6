"""Both notebooks execute without error on the CPU in small mode."""

from __future__ import annotations

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["quickstart", "ablation"])
def test_notebook_runs(name, tmp_path, monkeypatch):
  monkeypatch.setenv("LMCACHE_JAX_SMALL", "1")
  monkeypatch.setenv("LMCACHE_JAX_OUT", str(tmp_path / "out"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute(env=dict(os.environ))
  errors = [o for cell in notebook.cells for o in cell.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  if name == "ablation":
    assert (tmp_path / "out" / "results.md").exists()
    assert (tmp_path / "out" / "plots" / "ppl_by_position.png").exists()
