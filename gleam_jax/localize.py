"""GLEAM-C finds the candidates, GLEAM-X checks and explains them: the two models as one pipeline.

    python -m gleam_jax.localize --c_workdir=W_C --x_workdir=W_X --query=uav.jpg --gallery=DIR [--k=5]
    python -m gleam_jax.localize --c_workdir=W_C --x_model_dir=/models/Qwen2.5-VL-3B-Instruct \
        --query=QUERIES --gallery=DIR --match_by_name --out=localized.jsonl

For each query image (or each image of a folder) the GLEAM-C job's model retrieves the top-k
satellite images of the gallery (`retrieve.search_all`: the gallery's embeddings kept for the next
call, the query's camera read from the file or the flags as `retrieve` does), then the GLEAM-X model
(a fine-tuning job's latest checkpoint, or a Hugging Face directory) answers, for each candidate,
whether it shows the query's place and why (`eval.explain.generate_answers`, in batches), with its
yes-probability. The candidates are re-ranked by that probability (GLEAM-C's cosine breaks ties;
`--norerank` keeps GLEAM-C's order), printed with both scores, the verdict and the explanation, and
written to `--out` (a JSON line per query). With `--match_by_name` (the gallery image named as a query
is its satellite) R@K is printed before and after the re-ranking. With `--one_place` the query folder's
images are views of one place (a drone flight's frames): GLEAM-C searches with the mean of their
embeddings (`retrieve --one_place`), and GLEAM-X checks each candidate against `--x_views` of the
views, evenly spaced through the folder; a candidate's yes-probability is the mean over them, its
answer that of the view nearest that mean, and every view's answer is written too. With `--x_flight`
GLEAM-X is asked once per candidate, about those views as one drone flight (a video, before the satellite
image, as GLEAM-X jobs with `examples.flights` train), timed by the rate they stand for: the folder's
frames are `--fps` frames a second (a `--query` video file: the rate its sampled frames stand for), and
x_views of n of them stand for x_views / n of that (`processor.sampled_fps`). `--png` draws each query (a
place's first view) with its candidates in the final order and their yes-probabilities, the true
satellite outlined green and the others red with `--match_by_name`. With the gallery's centres
(`--gallery_coords`, or names, as `retrieve`'s) and geotagged queries, each candidate's distance from where
the query was taken is shown and written (`distance_m`), and Dis@1 before and after the re-ranking.
"""
import json
import os

import numpy as np

from absl import app
from absl import flags
from absl import logging

from gleam_jax import errors
from gleam_jax import explain
from gleam_jax import retrieve
from gleam_jax.data.gleam_x import FLIGHT, FLIGHT_QUESTIONS, QUESTIONS
from gleam_jax.data.sources import CAMERA_KEYS, read_image
from gleam_jax.errors import GleamError, make_dir
from gleam_jax.eval import explain as explain_eval
from gleam_jax.eval import geo_distance
from gleam_jax.models.qwen2_5_vl.processor import sampled_fps
from gleam_jax.eval import report
from gleam_jax.train import sft

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("c_workdir", None, "A GLEAM-C job's workdir: the retrieval model.")
  flags.DEFINE_string("x_workdir", None, "A GLEAM-X job's workdir: the model that checks and explains.")
  flags.DEFINE_string("x_model_dir", None, "Instead of --x_workdir: a Hugging Face Qwen2.5-VL directory.")
  flags.DEFINE_string("query", None, "The query image, a folder of query images (one modality), or a video file "
                      "(a drone flight: its frames sampled at --fps; with --one_place, views of one place).")
  flags.DEFINE_string("gallery", None, "Folder of satellite images to search.")
  flags.DEFINE_integer("k", 5, "Candidates per query that GLEAM-X checks.")
  flags.DEFINE_string("modality", None, "Query modality, for a GLEAM-C job trained for several.")
  flags.DEFINE_enum("lang", "en", sorted(QUESTIONS), "Language of GLEAM-X's question and answers.")
  flags.DEFINE_string("system", None, "The system prompt GLEAM-X is asked with (default: the one the "
                      "--x_workdir job trained with, else Qwen2.5-VL's).")
  flags.DEFINE_bool("rerank", True, "Order the candidates by GLEAM-X's yes-probability (else GLEAM-C's order).")
  flags.DEFINE_bool("match_by_name", False, "Each query's satellite is the gallery image of the same name: "
                    "print R@K before and after the re-ranking.")
  flags.DEFINE_string("out", None, "A JSON Lines file to write: a line per query with its candidates.")
  flags.DEFINE_string("png", None, "A PNG to draw: a row per query, its candidates in the final order with their "
                      "yes-probabilities (with --match_by_name the true one outlined green).")
  flags.DEFINE_bool("one_place", False, "The query folder's images are views of one place (e.g. a drone "
                    "flight's frames): one search with their mean embedding; GLEAM-X checks --x_views of them.")
  flags.DEFINE_integer("x_views", 3, "With --one_place: how many of the views (evenly spaced) GLEAM-X checks "
                       "each candidate against.")
  flags.DEFINE_bool("x_flight", False, "With --one_place: ask GLEAM-X once per candidate, about the --x_views "
                    "views as one drone flight (a video, frames first) instead of view by view.")
  flags.DEFINE_float("fps", 2.0, "With --x_flight: the frame rate of the place's views (a drone flight's frames; "
                     "the --x_views asked about stand for the share of it they keep); with a --query video file, "
                     "the rate to sample it at.")
  flags.DEFINE_integer("batch_size", 8, "Pairs GLEAM-X answers together.")
  flags.DEFINE_integer("max_new_tokens", 128, "Most tokens per explanation.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "GLEAM-X's dtype with --x_model_dir (default float32).")
  flags.DEFINE_enum("x_image_resize", None, ["pil", "torchvision"], "With --x_model_dir: how GLEAM-X's images are "
                    "resized, as transformers' PIL image processor (default) or its torchvision one (explain "
                    "--image_resize).")
  retrieve.define_camera_flags()
  retrieve.define_gallery_coords_flag()
  explain.define_mesh_flags()


def localize(c_workdir, query_paths, gallery_dir, x_workdir=None, x_model_dir=None, k=5, modality=None, lang="en",
             rerank=True, match_by_name=False, out=None, batch_size=8, max_new_tokens=128, dtype=None,
             log=print, fsdp=1, tensor=1, system=None, one_place=False, x_views=3, x_flight=False, fps=2.0,
             png=None, x_image_resize=None, gallery_coords=None, **camera):
  """({query: its candidates, best first: dicts of file, cosine and GLEAM-C rank, p_yes, verdict,
  answer}, {'retrieval': scores, 'reranked': scores} or None: R@K with `match_by_name`, and where the gallery's
  centres (`gallery_coords`, or names) and the queries' positions are known, each candidate's `distance_m`
  and Dis@1 with its hit rates (`retrieve.candidate_distances`, `geo_distance.summary`)). `system`: the system
  prompt GLEAM-X is asked with (default: the one the `x_workdir` job trained with, else Qwen2.5-VL's).
  `one_place`: the query files are views of one place, one query (its key: their folder); each
  candidate also holds `views`, the p_yes and answer of each of the `x_views` views asked about (with
  `x_flight`, one entry: those views asked about as one flight; `fps`: the query files' frame rate, of
  which the views asked about keep their share, `processor.sampled_fps`). `png`: a
  figure of the queries and their candidates in the final order (`draw`). `x_image_resize`: how a
  `x_model_dir` model's images are resized (`explain.load_model`)."""
  if bool(x_workdir) == bool(x_model_dir):
    raise GleamError("give the GLEAM-X model as --x_workdir (a fine-tuning job) or --x_model_dir (a Hugging "
                     "Face directory), one of them.")
  if lang not in QUESTIONS:
    raise GleamError(f"--lang={lang}: GLEAM-X's question is written in {', '.join(sorted(QUESTIONS))}.")
  if batch_size < 1:
    raise GleamError(f"--batch_size={batch_size} must be positive.")
  if one_place and x_views < 1:
    raise GleamError(f"--x_views={x_views}: GLEAM-X needs at least one view of the place to look at.")
  if x_flight and not one_place:
    raise GleamError("--x_flight asks GLEAM-X about the views of one place as a flight: add --one_place (the "
                     "query folder as one place's views).")
  if x_flight and not fps > 0:
    raise GleamError(f"--fps={fps}: give the frames per second the flight's views stand for (> 0).")
  for path, flag in ((out, "--out"), (png, "--png")):
    if path:
      make_dir(os.path.dirname(os.path.abspath(path)), flag)
  mesh = explain.inference_mesh(fsdp, tensor)
  if x_workdir:
    sft.job_config(x_workdir)  # a wrong GLEAM-X workdir or setting stops before anything is retrieved
    explain.check_job_settings(x_workdir, dtype=dtype, image_resize=x_image_resize)
  elif not os.path.isfile(os.path.join(os.path.expanduser(x_model_dir), "config.json")):
    raise GleamError(f"--x_model_dir={x_model_dir} holds no config.json: give a Hugging Face Qwen2.5-VL directory.")
  found, retrieval_scores = retrieve.search_all(c_workdir, query_paths, gallery_dir, k, modality, pngs=False,
                                                match_by_name=match_by_name, show=False, one_place=one_place,
                                                measure_distances=False, **camera)
  files = retrieve.image_files(gallery_dir, "--gallery")[0]
  distances = retrieve.candidate_distances({q: [g for g, _ in found[q]] for q in found}, query_paths, files,
                                           gallery_dir, gallery_coords, one_place)
  model, proc, image_size, trained_system = explain.load_model(x_model_dir, x_workdir, dtype, mesh=mesh,
                                                               image_resize=x_image_resize)
  system = trained_system if system is None else system
  views, flight_fps = {q: [q] for q in query_paths}, None
  if one_place:
    chosen = [query_paths[i] for i in evenly_spaced(len(query_paths), x_views)]
    views = {next(iter(found)): [chosen] if x_flight else chosen}
    flight_fps = sampled_fps(len(chosen), len(query_paths), fps) if x_flight else None
  pairs = [_pair(v, g, lang, system, flight_fps) for q in views for g, _ in found[q] for v in views[q]]
  asked_views = ((f", each against a flight of {len(chosen)} views of the place at {flight_fps:.3g} fps" if x_flight
                  else f", each against {len(chosen)} views of the place") if one_place else "")
  log(f"GLEAM-X checks {len(pairs)} pairs ({k} candidates per query{asked_views})")
  answers, yes = explain_eval.generate_answers(model, proc, pairs, batch_size, max_new_tokens, mesh=mesh,
                                               image_size=image_size)
  checked, start = {}, 0
  for q in views:
    rows = []
    for r, (g, cosine) in enumerate(found[q]):
      flight = dict(fps=flight_fps) if x_flight else {}
      asked = [dict(view=v, p_yes=yes[start + j], answer=answers[start + j]) | flight for j, v in enumerate(views[q])]
      start += len(asked)
      row = dict(file=g, cosine=cosine, retrieval_rank=r + 1, **_summary(asked))
      if q in distances:
        row["distance_m"] = float(distances[q][r])
      rows.append(row | (dict(views=asked) if one_place else {}))
    if rerank:
      rows.sort(key=lambda row: (-(row["p_yes"] if row["p_yes"] is not None else -1.0), row["retrieval_rank"]))
    checked[q] = rows
    log(f"query {q}" + (f" ({len(query_paths)} views of one place; GLEAM-X asked about {len(chosen)}"
                        f"{' as a flight' if x_flight else ''})"
                        if one_place else ""))
    for rank, row in enumerate(rows, 1):
      p_yes = "   -" if row["p_yes"] is None else f"{row['p_yes']:.2f}"
      metres = f"  {geo_distance.format_distance(row['distance_m'])}" if "distance_m" in row else ""
      log(f"{rank:3d}. p_yes {p_yes}  cosine {row['cosine']:.4f} (#{row['retrieval_rank']})  {row['file']}{metres}")
      log(f"     {row['answer']}")
  scores = truth = None
  if match_by_name or distances:
    scores = {"retrieval": retrieval_scores, "reranked": {}}
  if match_by_name:
    truth = retrieve.true_matches(query_paths, files)
    reranked = {q: [row["file"] for row in checked[q]] for q in query_paths}
    scores["reranked"] = retrieve.recall_by_name(reranked, truth, k)
    log(f"R@K over {len(query_paths)} queries: GLEAM-C {retrieve.format_recall(scores['retrieval'])}; re-ranked by "
        f"GLEAM-X {retrieve.format_recall(scores['reranked'])}")
  if distances:  # GLEAM-C's top-1 is its first candidate, GLEAM-X's the first after the re-ranking
    scores["retrieval"] = (retrieval_scores or {}) | geo_distance.summary([distances[q][0] for q in distances])
    scores["reranked"] |= geo_distance.summary([checked[q][0]["distance_m"] for q in distances])
    log(f"over the {len(distances)} queries that record where they were taken: GLEAM-C "
        f"{geo_distance.format_summary(scores['retrieval'])}; re-ranked by GLEAM-X "
        f"{geo_distance.format_summary(scores['reranked'])}")
  if png:
    log(f"wrote {draw(checked, query_paths if one_place else None, png, truth)}")
  if out:
    with open(out, "w", encoding="utf-8") as f:
      for q in checked:
        f.write(json.dumps({"query": q, "candidates": checked[q]}, ensure_ascii=False) + "\n")
    log(f"wrote {out} ({len(checked)} queries)")
  return checked, scores


def _pair(view, satellite, lang, system, fps):
  """GLEAM-X's pair of a query view (or, a list of views, a flight) and a candidate satellite image."""
  if isinstance(view, list):
    return dict(query=view, satellite=satellite, question=FLIGHT_QUESTIONS[lang], lang=lang, modality=FLIGHT,
                system=system, fps=fps)
  return dict(query=view, satellite=satellite, question=QUESTIONS[lang], lang=lang, modality="pair", system=system)


def draw(checked, views, path, truth=None):
  """A PNG of `report.save_topk_grid_png`: a row per query (its first view where `views`, a place's
  views, are given), its candidates in the final order titled with their yes-probabilities (the cosine
  where GLEAM-X gave none), outlined by `truth` ({query: its satellite file}) when given."""
  rows = []
  for q, candidates in checked.items():
    files = [row["file"] for row in candidates]
    rows.append(dict(query=read_image(views[0] if views else q), gallery=[read_image(f) for f in files],
                     scores=[row["cosine"] if row["p_yes"] is None else row["p_yes"] for row in candidates],
                     true_index=[j for j, f in enumerate(files) if f == truth.get(q)] if truth else None,
                     title=os.path.basename(q)))
  return report.save_topk_grid_png(rows, path, title="GLEAM-X p_yes, best first")


def evenly_spaced(n: int, count: int) -> list[int]:
  """`count` indices (at most n) spread evenly over range(n), the first and the last included."""
  return sorted({int(i) for i in np.round(np.linspace(0, n - 1, min(count, n)))})


def _summary(asked: list[dict]) -> dict:
  """A candidate's p_yes (the mean over the views asked about), answer and verdict (those of the view
  nearest that mean)."""
  known = [a for a in asked if a["p_yes"] is not None]
  p_yes = float(np.mean([a["p_yes"] for a in known])) if known else None
  nearest = min(known, key=lambda a: abs(a["p_yes"] - p_yes)) if known else asked[0]
  return dict(p_yes=p_yes, answer=nearest["answer"], verdict=explain_eval.verdict(nearest["answer"]))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs each read at INFO; the results go to stdout
  with errors.stop_on_bad_input():
    query_paths, fps = retrieve.query_files(FLAGS.query, FLAGS.fps)
    localize(os.path.expanduser(FLAGS.c_workdir), query_paths, FLAGS.gallery,
             FLAGS.x_workdir, FLAGS.x_model_dir, FLAGS.k, FLAGS.modality, FLAGS.lang, FLAGS.rerank,
             FLAGS.match_by_name, FLAGS.out, FLAGS.batch_size, FLAGS.max_new_tokens, FLAGS.dtype,
             fsdp=FLAGS.fsdp, tensor=FLAGS.tensor,
             system=FLAGS.system, one_place=FLAGS.one_place, x_views=FLAGS.x_views, x_flight=FLAGS.x_flight,
             fps=fps, png=FLAGS.png, x_image_resize=FLAGS.x_image_resize, gallery_coords=FLAGS.gallery_coords,
             **{name: FLAGS[name].value for name in CAMERA_KEYS})


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["c_workdir", "query", "gallery"])
  app.run(main, flags_parser=errors.parse_flags)
