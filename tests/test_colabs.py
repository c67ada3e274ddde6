"""The notebooks in colabs/ run from top to bottom (the quickstart on the tiny preset)."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)

COLABS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colabs")


def _execute(name, parameters=None):
  """Runs the notebook (its "parameters" cell replaced by `parameters`); returns its text output."""
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  if parameters is not None:
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = parameters
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": COLABS}}).execute()
  texts = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      texts.append(output.get("text") or output.get("data", {}).get("text/plain", ""))
  return "\n".join(texts)


@pytest.mark.slow
def test_quickstart_trains_evaluates_and_retrieves(tiny_cfg, monkeypatch):  # noqa: F811
  monkeypatch.setenv("GLEAM_DATA_DIR", tiny_cfg.data_dir)  # the kernel inherits it: no second build
  text = _execute("gleam_c_quickstart.ipynb", 'ARG = "tiny,steps=6"')
  assert "step 6/6 loss" in text and "step 6: eval R@1: test/panorama" in text
  assert "eval/test/panorama/R@1" in text  # the metrics read back
  assert "_top3.png" in text and "  1. " in text  # the retrieval printed its ranking and wrote the PNG
  assert "exported step 6 of " in text and "PyTorch top 3: [" in text  # the export ranks as retrieve did


@pytest.mark.slow
def test_gleam_x_notebook_trains_explains_and_exports(tiny_cfg, monkeypatch):  # noqa: F811
  monkeypatch.setenv("GLEAM_DATA_DIR", tiny_cfg.data_dir)
  text = _execute("gleam_x_finetune.ipynb", 'ARG = "tiny"')
  assert "step 8/8 loss" in text and "step 8: eval verdict acc" in text
  assert "eval/explain/rouge_l" in text  # the metrics read back
  assert "reference: Yes." in text or "reference: No." in text
  assert "answer:   " in text
  assert "exported step 8 of " in text and "model.safetensors" in text


def test_qwen_generation_notebook_runs():
  text = _execute("qwen2_5_vl_generate.ipynb")
  assert "compiling included" in text
  assert text.count("dtype=int32") == 3  # the greedy, the sampled and the beam-searched tokens
  assert "dtype=float32" in text  # the hypotheses' scores
