"""`python -m gleam_jax.localize`: GLEAM-C's top-k candidates, checked and explained by GLEAM-X, re-ranked
by its yes-probability."""
import json
import os
import shutil
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
  return c_job, x_job, str(root / "gallery"), retrieve.query_files(str(root / "queries"))[0], root


def test_candidates_are_retrieved_checked_and_reranked(jobs, capsys):
  c_job, x_job, gallery, queries, root = jobs
  lines = []
  out, png = str(root / "out" / "localized.jsonl"), str(root / "figures" / "localized.png")
  checked, recall = localize.localize(c_job, queries, gallery, x_workdir=x_job, k=3, match_by_name=True, out=out,
                                      batch_size=4, max_new_tokens=12, log=lines.append, png=png)
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
  # the figure: a row per query (1.8 in) of the query and its 3 candidates (1.6 in each) at 100 dpi, the true
  # satellite outlined green where it is among them, the others red
  image = np.asarray(Image.open(png).convert("RGB")).astype(int)
  assert image.shape[:2] == (180 * len(queries), 160 * 4) and f"wrote {png}" in lines
  hits = sum(truth[q] in [r["file"] for r in checked[q]] for q in queries)
  green = np.all(np.abs(image - [0x1a, 0x98, 0x50]) < 8, axis=-1).sum()
  red = np.all(np.abs(image - [0xd7, 0x30, 0x27]) < 8, axis=-1).sum()
  assert (green > 100) == (hits > 0) and (red > 100) == (hits < 3 * len(queries)), (green, red, hits)
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


def test_one_place_checks_evenly_spaced_views_and_averages_their_yes(jobs):
  """--one_place: one search with the views' mean embedding (retrieve's), then GLEAM-X asks about 3 of the
  5 views (first, middle, last) for each candidate; p_yes is their mean, the answer the nearest view's."""
  c_job, x_job, gallery, queries, root = jobs
  folder = root / "flight"
  folder.mkdir()
  views = []
  for i, query in enumerate(queries + queries[:2]):
    views.append(str(folder / f"view{i}.jpg"))
    shutil.copy(query, views[-1])
  lines = []
  checked, recall = localize.localize(c_job, views, gallery, x_workdir=x_job, k=2, one_place=True, x_views=3,
                                      max_new_tokens=8, batch_size=4, log=lines.append)
  assert recall is None and list(checked) == [str(folder)]
  found, _ = retrieve.search_all(c_job, views, gallery, k=2, pngs=False, one_place=True, show=False)
  rows = checked[str(folder)]
  assert sorted((r["retrieval_rank"], r["file"]) for r in rows) == [
      (n + 1, f) for n, (f, _) in enumerate(found[str(folder)])]
  for row in rows:
    assert [v["view"] for v in row["views"]] == [views[0], views[2], views[4]]
    assert len({round(v["p_yes"], 6) for v in row["views"]}) > 1  # three different views, three answers' odds
    assert row["p_yes"] == pytest.approx(np.mean([v["p_yes"] for v in row["views"]]))
    assert row["answer"] == min(row["views"], key=lambda v: abs(v["p_yes"] - row["p_yes"]))["answer"]
  asked = rows[0]["views"][1]
  assert asked["answer"] == explain.explain(None, [asked["view"], rows[0]["file"]], lang="en", max_new_tokens=8,
                                            workdir=x_job, write=lambda _: None)
  assert any("GLEAM-X checks 6 pairs (2 candidates per query, each against 3 views of the place)" in line
             for line in lines)
  with pytest.raises(GleamError, match="--x_views=0"):
    localize.localize(c_job, views, gallery, x_workdir=x_job, one_place=True, x_views=0)
  # --x_flight: each candidate asked once, about the 3 views as a flight (frames first): explain's flight pair,
  # timed by the rate 3 of the 5 views at 1 fps stand for (0.6 fps, as transformers times a sampled clip)
  flight, _ = localize.localize(c_job, views, gallery, x_workdir=x_job, k=2, one_place=True, x_views=3,
                                x_flight=True, fps=1.0, max_new_tokens=8, batch_size=4, log=lines.append)
  for row, before in zip(sorted(flight[str(folder)], key=lambda r: r["retrieval_rank"]),
                         sorted(rows, key=lambda r: r["retrieval_rank"])):
    assert row["file"] == before["file"] and [v["view"] for v in row["views"]] == [[views[0], views[2], views[4]]]
    assert row["p_yes"] == row["views"][0]["p_yes"] and row["answer"] == row["views"][0]["answer"]
    assert row["views"][0]["fps"] == pytest.approx(0.6)
  frames = root / "asked"
  frames.mkdir()
  for i in (0, 2, 4):
    shutil.copy(views[i], frames / f"view{i}.jpg")
  row = flight[str(folder)][0]
  assert row["answer"] == explain.explain(None, [row["file"]], video_dirs=[str(frames)], fps=0.6, max_new_tokens=8,
                                          workdir=x_job, write=lambda _: None)
  assert any("GLEAM-X checks 2 pairs (2 candidates per query, each against a flight of 3 views of the place at 0.6 fps)"
             in line
             for line in lines)
  with pytest.raises(GleamError, match="--x_flight asks GLEAM-X about the views of one place"):
    localize.localize(c_job, views, gallery, x_workdir=x_job, x_flight=True)
  with pytest.raises(GleamError, match=r"--fps=0: give the frames per second"):
    localize.localize(c_job, views, gallery, x_workdir=x_job, one_place=True, x_flight=True, fps=0)
  assert localize.evenly_spaced(5, 3) == [0, 2, 4] and localize.evenly_spaced(2, 3) == [0, 1]
  assert localize.evenly_spaced(54, 1) == [0]


def test_candidates_are_measured_from_where_the_queries_were_taken(jobs, tiny_cfg, tmp_path):
  """With the gallery's centres (a CSV) and geotagged queries: each candidate's distance_m, and Dis@1 of
  GLEAM-C's order and of GLEAM-X's re-ranking (the re-ranked top-1's distances, by hand)."""
  from gleam_jax.eval import geo_distance  # pylint: disable=g-import-not-at-top
  from test_geo_distance import photo_with_gps  # pylint: disable=g-import-not-at-top
  c_job, x_job, gallery, queries, _ = jobs
  index = sources.get_index(tiny_cfg, "test", sources.get_source(tiny_cfg, "test"))
  where = {f"loc{i}": tuple(map(float, c)) for i, c in zip(index["location_id"], index["coords"])}
  centres = tmp_path / "centres.csv"
  centres.write_text("file,latitude,longitude\n" + "".join(
      f"{name},{where[os.path.splitext(name)[0]][0]!r},{where[os.path.splitext(name)[0]][1]!r}\n"
      for name in sorted(os.listdir(gallery))))
  tagged = [photo_with_gps(tmp_path / os.path.basename(q), *where[os.path.splitext(os.path.basename(q))[0]],
                           pixels=np.asarray(Image.open(q))) for q in queries]
  lines = []
  checked, scores = localize.localize(c_job, tagged, gallery, x_workdir=x_job, k=3, max_new_tokens=4,
                                      batch_size=8, log=lines.append, gallery_coords=str(centres))
  top1 = []
  for q in tagged:
    taken = where[os.path.splitext(os.path.basename(q))[0]]
    for row in checked[q]:
      centre = where[os.path.splitext(os.path.basename(row["file"]))[0]]
      assert row["distance_m"] == pytest.approx(float(geo_distance.distance_m(*taken, *centre)), abs=0.01)
    top1.append(checked[q][0]["distance_m"])
  _, retrieval = retrieve.search_all(c_job, tagged, gallery, k=3, pngs=False, gallery_coords=str(centres))
  assert scores == {"retrieval": retrieval, "reranked": geo_distance.summary(top1)}
  assert any(line.startswith(f"over the 3 queries that record where they were taken: GLEAM-C "
                             f"{geo_distance.format_summary(retrieval)}; re-ranked by GLEAM-X") for line in lines)
  assert any(line.endswith(" m") and line.startswith("  1. p_yes") for line in lines)


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


def test_x_image_resize_reaches_the_gleam_x_model_directorys_processor(jobs, monkeypatch):
  """`--x_image_resize=torchvision` resizes a Hugging Face directory's images as explain --image_resize."""
  c_job, x_job, gallery, queries, _ = jobs
  asked = {}

  def load_model(*args, image_resize=None, **kwargs):
    asked.update(image_resize=image_resize)
    raise InterruptedError("the processor setting is what is checked")
  monkeypatch.setattr(localize.explain, "load_model", load_model)
  with pytest.raises(InterruptedError):
    localize.localize(c_job, queries, gallery, x_model_dir=os.path.join(x_job, "tiny_qwen"),
                      x_image_resize="torchvision")
  assert asked == {"image_resize": "torchvision"}
  # a job's processor resizes as the job trained: asking it to resize otherwise stops before retrieving
  with pytest.raises(GleamError, match=r"image_resize='torchvision': these set up a Hugging Face directory's model and "
                     r"processor; a GLEAM-X job's \(.*\) are as it trained .* export the job"):
    localize.localize(c_job, queries, gallery, x_workdir=x_job, x_image_resize="torchvision")
  with pytest.raises(GleamError, match=r"dtype='bfloat16': these set up"):
    localize.localize(c_job, queries, gallery, x_workdir=x_job, dtype="bfloat16")
