"""`python -m gleam_jax.localize`: GLEAM-C's top-k candidates, checked and explained by GLEAM-X, re-ranked
by its yes-probability."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from config_files import REPO, tiny_config
from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax import explain, localize, main, retrieve
from gleam_jax.data import sources
from gleam_jax.errors import GleamError
from gleam_jax.eval import explain as explain_eval


@pytest.fixture(scope="module")
def jobs(tiny_cfg, tmp_path_factory):
  """(a one-step GLEAM-C job, a four-step GLEAM-X job) on the tiny world, and a folder of five test
  satellites and three panorama queries named as their satellites."""
  root = tmp_path_factory.mktemp("localize")
  c_job, x_job = str(root / "c"), str(root / "x")
  main.run(tiny_config("c_phase1", tiny_cfg.data_dir, total_steps=1, **{"eval.at_end": False, "optim.warmup_steps": 0}),
           c_job)
  main.run(tiny_config("x_sft", tiny_cfg.data_dir, total_steps=4, **{"eval.at_end": False}), x_job)
  source = sources.get_source(tiny_cfg, "test")
  index = sources.get_index(tiny_cfg, "test", source)
  rows = np.flatnonzero(index["modality"] == 2)[:5]  # panoramas of five locations
  (root / "gallery").mkdir()
  (root / "queries").mkdir()
  for n, r in enumerate(rows):
    Image.fromarray(source[int(r)]["satellite"]).save(root / "gallery" / f"loc{index['location_id'][r]}.png")
    if n < 3:
      Image.fromarray(source[int(r)]["query"]).save(root / "queries" / f"loc{index['location_id'][r]}.jpg")
  return c_job, x_job, str(root / "gallery"), retrieve.query_files(str(root / "queries")), root


def test_candidates_are_retrieved_checked_and_reranked(jobs, capsys):
  c_job, x_job, gallery, queries, root = jobs
  lines = []
  out = str(root / "out" / "localized.jsonl")
  checked, recall = localize.localize(c_job, queries, gallery, x_workdir=x_job, k=3, match_by_name=True, out=out,
                                      batch_size=4, max_new_tokens=12, log=lines.append)
  assert "  1. " not in capsys.readouterr().out  # retrieve's own top-k lists left out: the table says it all
  found, retrieval_recall = retrieve.search_all(c_job, queries, gallery, k=3, pngs=False, match_by_name=True)
  truth = retrieve.true_matches(queries, retrieve.image_files(gallery, "--gallery")[0])
  for q in queries:
    rows = checked[q]
    # GLEAM-C's candidates with their cosines and ranks, ordered by GLEAM-X's yes-probability
    assert sorted((r["retrieval_rank"], r["file"], r["cosine"]) for r in rows) == [
        (n + 1, f, s) for n, (f, s) in enumerate(found[q])]
    assert [r["p_yes"] for r in rows] == sorted((r["p_yes"] for r in rows), reverse=True)
    assert all(0 < r["p_yes"] < 1 and r["verdict"] == explain_eval.verdict(r["answer"]) for r in rows)
  # an answer is what `explain` streams for that pair alone
  first = checked[queries[0]][0]
  alone = explain.explain(None, [queries[0], first["file"]], lang="en", max_new_tokens=12, workdir=x_job,
                          write=lambda _: None)
  assert first["answer"] == alone
  assert recall["retrieval"] == retrieval_recall
  reranked_hits = [truth[q] == checked[q][0]["file"] for q in queries]
  assert recall["reranked"]["R@1"] == pytest.approx(np.mean(reranked_hits))
  assert recall["reranked"]["R@3"] == retrieval_recall["R@3"]  # the same three candidates
  assert any(line.startswith("R@K over 3 queries: GLEAM-C R@1") for line in lines)
  with open(out, encoding="utf-8") as f:
    written = [json.loads(line) for line in f]
  assert [w["query"] for w in written] == queries and written[0]["candidates"] == checked[queries[0]]
  # --norerank keeps GLEAM-C's order; --system asks with that system prompt
  system = "You compare a drone photo with a satellite image."
  kept, _ = localize.localize(c_job, queries[:1], gallery, x_workdir=x_job, k=3, rerank=False, max_new_tokens=12,
                              log=lambda _: None, system=system)
  assert [r["file"] for r in kept[queries[0]]] == [f for f, _ in found[queries[0]]]
  top = kept[queries[0]][0]
  assert top["answer"] == explain.explain(None, [queries[0], top["file"]], lang="en", max_new_tokens=12,
                                          workdir=x_job, write=lambda _: None, system=system)
  assert top["p_yes"] != pytest.approx(next(r["p_yes"] for r in checked[queries[0]] if r["file"] == top["file"]),
                                       abs=1e-6)


def test_bad_requests_stop_before_retrieving(jobs, tmp_path):
  c_job, x_job, gallery, queries, _ = jobs
  with pytest.raises(GleamError, match="--x_workdir .* or --x_model_dir .*, one of them"):
    localize.localize(c_job, queries, gallery, x_workdir=x_job, x_model_dir=x_job)
  with pytest.raises(GleamError, match=r"config.json not found: --workdir must be the folder of a GLEAM-X"):
    localize.localize(c_job, queries, gallery, x_workdir=str(tmp_path / "none"))
  with pytest.raises(GleamError, match=r"--x_model_dir=.* holds no config.json"):
    localize.localize(c_job, queries, gallery, x_model_dir=str(tmp_path))
  run = subprocess.run([sys.executable, "-m", "gleam_jax.localize", f"--c_workdir={c_job}", f"--query={queries[0]}",
                        f"--gallery={gallery}", "--lang=fr"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert run.returncode != 0 and "--lang" in run.stderr, run.stderr[-2000:]
  missing = subprocess.run([sys.executable, "-m", "gleam_jax.localize", f"--c_workdir={c_job}", f"--query={queries[0]}"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
  assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
      "error: --gallery is required (Folder of satellite images to search.)"], missing.stderr
