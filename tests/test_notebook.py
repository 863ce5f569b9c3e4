"""notebooks/replay.ipynb: committed without outputs, and runs top to bottom on a small study."""

import os

import nbclient
import nbformat
import pytest

from tests.test_replay import small_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "replay.ipynb")


@pytest.fixture(scope="session")
def study(tmp_path_factory):
  return small_study(tmp_path_factory)


def test_committed_notebook_is_stripped():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
  assert nb.metadata.kernelspec.name == "python3"


def test_notebook_runs_on_a_small_study(study, monkeypatch):
  monkeypatch.setenv("UNIVERSALITY_RUN", study)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  with open(NOTEBOOK) as f:
    original = f.read()
  nb = nbformat.reads(original, as_version=4)
  # The kernel is a fresh process with one CPU device, while the study was written from 8: the checkpoints
  # must restore whatever layout wrote them.
  client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 4  # learning curves, learning order, similarity heatmap, neuron comparison
  markdown = "\n".join(o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
  assert "### C7" in markdown and "### S3" in markdown and "| sign |" in markdown
  assert "| neuron (A) | dominant irrep (A) |" in markdown
  text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "mean matched correlation" in text and "key-irrep counts at step" in text
  assert open(NOTEBOOK).read() == original  # executing never rewrites the committed file
