"""Retrieve the satellite images that match query images with a trained GLEAM-C model.

    python -m gleam_jax.retrieve --workdir=W --query=img.jpg --gallery=DIR [--k=5] [--modality=panorama]
    python -m gleam_jax.retrieve --workdir=W --query=QUERIES --gallery=DIR --results=top5.jsonl --nopngs \
        [--match_by_name]

Loads the model described by `W/config.json` with the parameters of W's latest checkpoint, embeds
every image in DIR (png, jpg, jpeg, bmp, tif, tiff, webp; other files are skipped and counted) as
satellite references, batch by batch, and keeps those embeddings in W/retrieve/ for the next call
(reused while the checkpoint and DIR's files stay the same). It embeds the query (one file, or every
image of a folder) with the query tower, searches as the evaluation does (`eval.search`: exact, or
ScaNN for large galleries), prints each query's top-k gallery files with their cosine scores and
writes a PNG of the query and its top-k (default `W/retrieve/<query>_top<k>.png`; `--nopngs` for
large query folders), and with `--results` a JSON Lines file of every query's top-k. With
`--match_by_name` the gallery image named as a query (extensions aside) is its true satellite, and
R@K over the queries is printed: a quick score of your own paired folders. With `--one_place` the
query folder's images are views of one place (a drone flight's frames): they are searched as one
query, the mean of their embeddings (University-1652's multiple queries). `--query` may be a video
file (a drone's .mp4; needs PyAV): its frames, sampled at `--fps` as GLEAM-X samples a flight, are the
queries (`--one_place`: one place), extracted once under the data dir (`data/video_files.py`). Where the
gallery's centres are known (`--gallery_coords`, a CSV, or names ending in `_<lat>_<lon>`) and a query
records where it was taken (EXIF GPS, a DJI drone's XMP or flight log), each candidate's distance from it
is printed and written, and Dis@1 over those queries (`eval/geo_distance.py`).

    python -m gleam_jax.retrieve --workdir=W --pairs=pairs.jsonl [--results=scores.jsonl] [--modality=uav]

scores a GLEAM-X pairs file (`data/pair_files.py`: any of its layouts) with GLEAM-C, the baseline
for GLEAM-X's verdicts on the same pairs: each pair's cosine similarity (query tower of the pair's
`modality`, or `--modality` for pairs that name none; satellite by the reference tower) and, where the
pairs say whether they match, the ROC AUC of those scores (`explain --pairs` reports the verdict's as
`verdict_auc`) and the accuracy at the best threshold (chosen on these pairs: an upper bound).
Images are read upright (their EXIF orientation applied) and resized to the sizes the model was
trained on (`config.data`). A phase-2 job places a ground photo by its camera (`--heading_deg`,
`--fov_deg`) and a UAV view by its pose (`--heading_deg --pitch_deg --altitude_m --fov_deg`) and the
gallery's `--footprint_m`; camera values not given are read from the file where it records them
(EXIF, a DJI drone's XMP: `data/photo_camera.py`).
"""
import hashlib
import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
from flax import nnx
import numpy as np

from gleam_jax import errors
from gleam_jax.data import pair_files, video_files
from gleam_jax.data.augment import FRAME_CAMERA_KEYS, normalise, query_in_frame, resize, warps_query
from gleam_jax.data.config import MODALITIES, data_config, query_shape
from gleam_jax.data.gleam_x import FLIGHT
from gleam_jax.data.photo_camera import recorded_camera, recorded_position
from gleam_jax.data.sources import CAMERA_KEYS, image_files, read_image
from gleam_jax.errors import GleamError, make_dir, stop_on_bad_input
from gleam_jax.eval import explain
from gleam_jax.eval import geo_distance
from gleam_jax.eval import metrics
from gleam_jax.eval import report
from gleam_jax.eval import retrieval
from gleam_jax.train import checkpoint
from gleam_jax.train import contrastive
from gleam_jax.train import lora
from gleam_jax.train import sharding as shd

GALLERY_BATCH = 64

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program: gleam_jax.main owns --workdir too)."""
  flags.DEFINE_string("workdir", None, "Workdir of a finished (or running) GLEAM-C job.")
  flags.DEFINE_string("query", None, "The query image (panorama, UAV view, street map or photo), a folder "
                      "of query images (one modality), or a video file (a drone flight: its frames sampled at "
                      "--fps, each a query, or with --one_place one place).")
  flags.DEFINE_float("fps", 2.0, "With a --query video file: the frames per second to sample it at.")
  flags.DEFINE_string("gallery", None, "Folder of satellite images to search.")
  flags.DEFINE_integer("k", 5, "How many gallery images to show.")
  flags.DEFINE_string("modality", None, "Query modality (sets its input size and tower); needed when the "
                      "job was trained for several.")
  flags.DEFINE_string("out", None, "PNG to write for one query, folder of the PNGs for several (default "
                      "W/retrieve/<query>_top<k>.png).")
  define_camera_flags()
  define_gallery_coords_flag()
  flags.DEFINE_bool("pngs", True, "Write a PNG of each query and its top-k (--nopngs for large query folders).")
  flags.DEFINE_string("results", None, "A JSON Lines file to write: each query's top-k files and scores "
                      "(with --pairs: each pair's score).")
  flags.DEFINE_bool("one_place", False, "The query images (a folder) are views of one place, e.g. the frames of one "
                    "drone flight: search with the mean of their embeddings, as one query (University-1652's "
                    "multiple queries).")
  flags.DEFINE_bool("match_by_name", False, "Each query's true satellite is the gallery image of the same name: "
                    "print R@K over the queries.")
  flags.DEFINE_string("pairs", None, "A GLEAM-X pairs file to score with GLEAM-C (each pair's cosine similarity, "
                      "and their ROC AUC where the pairs say whether they match) instead of searching a gallery.")
  flags.DEFINE_string("image_root", None, "--pairs: the folder relative image paths are read from (default: "
                      "the pairs file's).")


def define_gallery_coords_flag():
  """--gallery_coords, for retrieval and `gleam_jax.localize`."""
  flags.DEFINE_string("gallery_coords", None, "A CSV of file,latitude,longitude: each gallery image's centre (default: "
                      "read from names ending in _<latitude>_<longitude>, as VIGOR's), for the distance from where "
                      "a query was taken (its EXIF GPS, a DJI drone's XMP or flight log) to each candidate, and Dis@1.")


def define_camera_flags():
  """The query camera's flags (`CAMERA_KEYS`), for retrieval and `gleam_jax.localize`."""
  flags.DEFINE_float("heading_deg", None, "The camera's compass heading (clockwise from north), for jobs "
                     "that read ground photos in the panorama frame (data.ground_frame; default: the "
                     "photo's EXIF GPSImgDirection) or UAV views in the satellite frame (data.uav_frame).")
  flags.DEFINE_float("fov_deg", None, "The camera's horizontal field of view (a ground photo: default from "
                     "its EXIF 35 mm-equivalent focal length, else 90).")
  flags.DEFINE_float("pitch_deg", None, "A UAV camera's pitch below the horizon (data.uav_frame).")
  flags.DEFINE_float("altitude_m", None, "A UAV camera's height above the ground, metres (data.uav_frame).")
  flags.DEFINE_float("footprint_m", None, "The gallery satellites' ground width, metres (data.uav_frame).")


def load_config(workdir):
  config = checkpoint.job_config(workdir)
  if config is None:
    raise GleamError(f"{os.path.join(workdir, 'config.json')} not found: --workdir must be the folder of a "
                     "GLEAM-C training job.")
  if "data" in config:  # fields added since the job was written take their defaults
    config.data = data_config(**config.data.to_dict())
  return config


def load_model(workdir):
  """(model in eval mode, config) with the parameters of the workdir's latest checkpoint."""
  model, config, _, _ = load_trained(workdir)
  return model, config


def load_trained(workdir, config=None):
  """(model in eval mode, config, the step folder of the checkpoint read, the sigmoid loss's learned
  bias or None for a job of another loss). `config`: the job's (`load_config`), when the caller has
  read it already."""
  config = config or load_config(workdir)
  if config.get("trainer") != "contrastive":
    raise GleamError(f"{workdir} holds a {config.get('trainer')!r} job; retrieval needs a GLEAM-C "
                     "('contrastive') job.")
  model = contrastive.build_model(config.model, int(config.seed), pretrained=False)  # the checkpoint's parameters
  graphdef, params, rng_state, rest = contrastive.split_model(model)
  mesh = shd.single_device_mesh()
  target = {"model": jax.device_put(nnx.to_pure_dict(params), shd.replicated(mesh))}
  if config.loss.name == "sigmoid":
    target["loss_bias"] = jax.device_put(np.float32(0), shd.replicated(mesh))
  if lora.enabled(config.get("lora")):  # read beside the model, then folded into its kernels
    target["lora"] = jax.device_put(lora.init(target["model"], config.lora, 0), shd.replicated(mesh))
  restored, where, _ = checkpoint.restore_params(workdir, target)
  model = nnx.merge(graphdef, lora.merged_model(restored, config.get("lora")), rng_state, rest)
  model.eval()
  print(f"model from {where}")
  loss_bias = float(restored["loss_bias"]) if "loss_bias" in restored else None
  return model, config, where, loss_bias


def query_files(path, fps=2.0):
  """(query files, their frame rate): a query image file, the images of a folder of queries (at `fps`,
  where they are a flight's frames), or a video file's frames sampled at `fps` (a drone flight;
  `video_files.extract_frames`: as PNG files under the data dir, extracted once), with the rate they
  stand for."""
  if os.path.isdir(path):
    return image_files(path, "--query")[0], fps
  if not os.path.isfile(path):
    raise GleamError(f"--query={path} is neither an image file, a video file nor a folder of images.")
  if video_files.is_video_file(path):
    return video_files.extract_frames(path, fps, f"--query={path}")
  return [path], fps


def prepare(image, size, data_cfg):
  return normalise(resize(image, tuple(size)), tuple(data_cfg.mean), tuple(data_cfg.std))


def job_modalities(config) -> tuple[str, ...]:
  """The query modalities a GLEAM-C job knows: those it trained on, then those it evaluated."""
  return tuple(dict.fromkeys(tuple(config.data.modalities) + tuple(config.eval.get("modalities") or ())))


def _query_modality(workdir, config, modality):
  """`modality` when the job knows it; else the job's one query modality (a job of several needs
  `--modality`)."""
  known = job_modalities(config)
  if modality is None and len(known) > 1:
    raise GleamError(f"{workdir} was trained for the query modalities {', '.join(known)}: say which one the "
                     "query is with --modality.")
  if modality is not None and modality not in known:
    raise GleamError(f"--modality={modality}: {workdir} was trained for the query modalities "
                     f"{', '.join(known)}; give one of them.")
  return modality or known[0]


def _check_output(k, out, single):
  """A request that cannot be answered stops before any image is embedded."""
  if k < 1:
    raise GleamError(f"--k={k}: ask for at least one gallery image (--k=5 shows the best five).")
  if out:
    folder = os.path.dirname(os.path.abspath(out)) if single else out
    make_dir(folder, "--out")
    if not os.access(folder, os.W_OK):
      raise GleamError(f"--out={out}: cannot write in {folder} (permission denied); give a path you can write.")


def _camera_from_file(query_path, modality, given):
  """`given` (camera values, None where not given) completed from what the query file records (EXIF,
  DJI XMP: `photo_camera.recorded_camera`) for the values `modality`'s frame needs; a ground photo's
  field of view defaults to 90 deg. Says which values came from the file."""
  recorded = recorded_camera(query_path)
  camera, used = dict(given), []
  for key in FRAME_CAMERA_KEYS[modality]:
    if camera.get(key) is None and recorded.get(key) is not None:
      camera[key] = recorded[key]
      used.append(f"{key}={camera[key]:.1f}")
  if used:
    magnetic = recorded["north"] == "magnetic" and given.get("heading_deg") is None
    note = " (the heading is from magnetic north; declination not corrected)" if magnetic else ""
    print(f"camera from {query_path}'s metadata: {', '.join(used)}{note}")
  if modality == "ground" and camera.get("fov_deg") is None:
    camera["fov_deg"] = 90.0
  return camera


def search(workdir, query_path, gallery_dir, k=5, modality=None, out=None, heading_deg=None, fov_deg=None,
           pitch_deg=None, altitude_m=None, footprint_m=None):
  """Prints and returns the top-k [(file, score)] of one query file; writes the PNG (`out`). See
  `search_all`, which this calls, for the camera values."""
  found, _ = search_all(workdir, [query_path], gallery_dir, k, modality, out, heading_deg=heading_deg,
                        fov_deg=fov_deg, pitch_deg=pitch_deg, altitude_m=altitude_m, footprint_m=footprint_m)
  return found[query_path]


def search_all(workdir, query_paths, gallery_dir, k=5, modality=None, out=None, pngs=True, results=None,
               match_by_name=False, show=True, one_place=False, gallery_coords=None, measure_distances=True,
               **camera):
  """({query file: its top-k [(gallery file, score)]} for every query, scores or None: {R@K: fraction}
  with `match_by_name`, and the distance scores where positions are known (below)),
  printed, with a PNG each (`pngs`; `out`: the PNG of a single query, else the folder of the PNGs;
  default W/retrieve/) and, with `results`, a JSON Lines file of them (a line per query). Queries are
  read and embedded in batches; only their embeddings are held. The gallery's embeddings are kept in
  W/retrieve/ and reused while the checkpoint, the input settings and the gallery's files (names,
  sizes, modification times) stay the same; the search is the evaluation's (`eval.search`: exact, or
  ScaNN for large galleries). With `match_by_name` each query's true satellite is the gallery file of
  the same name (its extension aside): R@1, R@5, R@10 (those up to k) and R@k are printed and
  returned. A ground photo needs `heading_deg` and `fov_deg` when the job read ground photos in the
  panorama frame: when not given, they are read from the photo's EXIF (compass
  heading, 35 mm-equivalent focal length; the field of view defaults to 90 deg); a UAV view needs
  its camera (`heading_deg`, `pitch_deg`, `altitude_m`, `fov_deg`) and the satellites' `footprint_m`
  when the job read UAV views in the satellite frame. Camera values given apply to every query.
  `show=False` leaves out the printed top-k lists (a caller that prints its own). With `one_place`, the
  query files are views of one place, searched as one query with the mean of their embeddings
  (University-1652's multiple queries): the result's one key is the files' common folder, its PNG
  shows the first view and its results line lists the `views`. Where the gallery images' centres are known
  (`gallery_coords`, a CSV, or their names: `geo_distance.gallery_positions`) and a query file records
  where it was taken (`photo_camera.recorded_position`; a place: its views' mean), each candidate's
  distance from it is printed and written (`distance_m`), and Dis@1 and the top-1's hit rates within
  25-250 m over those queries (`geo_distance.summary`) are printed and returned; `measure_distances=False`
  leaves that to the caller (`candidate_distances`)."""
  if one_place and match_by_name:
    raise GleamError("--one_place searches all query images as one place, --match_by_name scores each query image "
                     "against its own satellite: give one of them.")
  queries = [os.path.commonpath(query_paths)] if one_place else query_paths
  _check_output(k, out if pngs else None, single=len(queries) == 1)
  if results:
    _check_results_file(results)
  files, skipped = image_files(gallery_dir, "--gallery")
  truth = true_matches(query_paths, files) if match_by_name else None  # before anything is embedded
  model, config, source, _ = load_trained(workdir)
  data_cfg = config.data
  modality = _query_modality(workdir, config, modality)
  embedded = query_embeddings(model, workdir, query_paths, modality, camera, data_cfg)
  if one_place:
    embedded = retrieval.mean_per_location(embedded, np.zeros(len(query_paths)))[0]
  gallery = gallery_embeddings(model, config, source, files, workdir)
  search_cfg = config.eval.get("search") or retrieval.search_config()
  index = retrieval.build_index(gallery, search_cfg, workdir=os.path.join(workdir, "retrieve"))
  scores, top = index.search(embedded, k)
  print(f"gallery {len(files)} images in {gallery_dir}"
        + (f" ({skipped} non-image files skipped)" if skipped else ""))
  distances = candidate_distances({q: [files[i] for i in row] for q, row in zip(queries, top)}, query_paths, files,
                                  gallery_dir, gallery_coords, one_place) if measure_distances else {}
  found = {}
  for path, row_scores, row_top in zip(queries, scores, top):
    metres = distances.get(path)
    if show:
      print(f"query {path} ({modality}" + (f"; {len(query_paths)} views as one place)" if one_place else ")"))
      for rank, (score, i) in enumerate(zip(row_scores, row_top), 1):
        far = "" if metres is None else f"  {geo_distance.format_distance(metres[rank - 1])}"
        print(f"{rank:3d}. {score:.4f}  {files[i]}{far}")
    if pngs:
      png = _png_path(workdir, path, len(row_top), out, single=len(queries) == 1)
      report.save_topk_png(read_image(query_paths[0] if one_place else path), [read_image(files[i]) for i in row_top],
                           row_scores, png)
      print(f"wrote {png}")
    found[path] = [(files[i], float(score)) for score, i in zip(row_scores, row_top)]
  if results:
    with open(results, "w", encoding="utf-8") as f:
      for path, top_k in found.items():
        line = {"query": path, "modality": modality, "top": [{"file": g, "score": s} for g, s in top_k]}
        if path in distances:
          for entry, metres in zip(line["top"], distances[path]):
            entry["distance_m"] = float(metres)
        if one_place:
          line["views"] = list(query_paths)
        if truth:
          line["true"] = truth[path]
        f.write(json.dumps(line) + "\n")
    print(f"wrote {results} ({len(found)} queries)")
  recall = None
  if truth:
    recall = recall_by_name({p: [g for g, _ in found[p]] for p in query_paths}, truth, k)
    print(f"{len(query_paths)} queries matched by name: {format_recall(recall)}")
  if distances:
    geo = geo_distance.summary([metres[0] for metres in distances.values()])
    print(f"{len(distances)} of {len(queries)} queries record where they were taken: "
          f"{geo_distance.format_summary(geo)}")
    recall = (recall or {}) | geo
  return found, recall


def query_positions(query_paths, one_place=False):
  """{query: (latitude, longitude)} of the query files that record where they were taken
  (`photo_camera.recorded_position`); with `one_place`, the one place (the files' folder) at the mean of
  its views' positions."""
  if one_place:
    recorded = [p for p in map(recorded_position, query_paths) if p is not None]
    return {os.path.commonpath(query_paths): tuple(np.mean(recorded, axis=0))} if recorded else {}
  return {q: p for q, p in zip(query_paths, map(recorded_position, query_paths)) if p is not None}


def candidate_distances(ranked, query_paths, files, gallery_dir, gallery_coords=None, one_place=False):
  """{query: the metres from where it was taken to the centre of each of its `ranked` gallery files}
  ({query: files}), for the queries that record it, where the centres of the gallery's `files` are known
  (`geo_distance.gallery_positions`); else {}."""
  centres = geo_distance.gallery_positions(files, gallery_dir, gallery_coords)
  where = query_positions(query_paths, one_place) if centres else {}
  if not where and gallery_coords:
    print(f"no query records where it was taken (EXIF GPS, DJI XMP, a video's flight log): no distances from the "
          f"--gallery_coords={gallery_coords} centres")
  return {q: geo_distance.distance_m(lat, lon, *np.asarray([centres[f] for f in ranked[q]]).T)
          for q, (lat, lon) in where.items()}


def recall_by_name(ranked, truth, k):
  """R@1, R@5, R@10 (those up to k) and R@k of {query: its ranked gallery files} against {query: its
  true gallery file}."""
  ranks = [next((r for r, f in enumerate(files) if f == truth[q]), k) for q, files in ranked.items()]
  return metrics.recall_at_k(ranks, sorted({K for K in (1, 5, 10) if K <= k} | {k}))


def format_recall(scores):
  """The R@K of `scores` (`search_all`'s) as percentages."""
  return ", ".join(f"{name} {value:.1%}" for name, value in scores.items() if name.startswith("R@"))


def query_embeddings(model, workdir, paths, modality, camera, data_cfg):
  """The query tower's embeddings of the query files (each in its modality's frame), read and
  embedded batch by batch."""
  shape = query_shape(data_cfg, modality)
  batches = ({"image": np.stack([prepare(_query_input(workdir, p, modality, camera, data_cfg)[1], shape, data_cfg)
                                 for p in paths[i:i + GALLERY_BATCH]]),
              "index": np.arange(i, min(i + GALLERY_BATCH, len(paths)))}
             for i in range(0, len(paths), GALLERY_BATCH))
  embedded, _ = retrieval.embed(lambda x: model.encode(x, tower=modality), batches, what="the queries")
  return embedded


def _stem(path):
  return os.path.splitext(os.path.basename(path))[0]


def true_matches(query_paths, files):
  """{query file: the gallery file of the same name (its extension aside)}; every query needs one."""
  by_stem = {}
  for i, f in enumerate(files):
    by_stem.setdefault(_stem(f), []).append(i)
  missing = [p for p in query_paths if len(by_stem.get(_stem(p), [])) != 1]
  if missing:
    raise GleamError(f"--match_by_name: {len(missing)} of {len(query_paths)} queries have no gallery image of "
                     f"the same name, or several (first: {missing[0]}); name each query as its satellite "
                     "(extensions may differ), or leave --match_by_name off.")
  return {p: files[by_stem[_stem(p)][0]] for p in query_paths}


def _check_results_file(results):
  if os.path.isdir(results):
    raise GleamError(f"--results={results} is a folder; give the JSON Lines file to write.")
  make_dir(os.path.dirname(os.path.abspath(results)), "--results")


def _query_input(workdir, path, modality, given, data_cfg):
  """(the query as read, the query in its modality's frame); the camera completed from the file."""
  given = {key: given.get(key) for key in CAMERA_KEYS}
  if warps_query(data_cfg, modality):
    given = _camera_from_file(path, modality, given)
    missing = [f"--{k}" for k in FRAME_CAMERA_KEYS[modality] if given[k] is None]
    if missing:
      frame = "ground photos in the panorama frame" if modality == "ground" else "UAV views in the satellite frame"
      raise GleamError(f"{workdir} reads {frame}, placed by their camera, and {path} does not record "
                       f"all of it (EXIF / DJI XMP): give {', '.join(missing)}.")
  camera = {k: float("nan") if v is None else float(v) for k, v in given.items()}
  raw = read_image(path)
  return raw, query_in_frame(raw, modality, camera, data_cfg)  # bad camera values stop here


def _png_path(workdir, query_path, k, out, single):
  name = f"{os.path.splitext(os.path.basename(query_path))[0]}_top{k}.png"
  if out and single:
    path = out
  else:
    path = os.path.join(out or os.path.join(workdir, "retrieve"), name)
  make_dir(os.path.dirname(os.path.abspath(path)), "--out" if out else "--workdir")
  return path


def gallery_embeddings(model, config, source, files, workdir):
  """The reference tower's embeddings of `files`, read and embedded batch by batch (no image is
  held longer), kept in W/retrieve/gallery_<folder>.npz with a fingerprint of the checkpoint
  (`source`), the input settings and the files (path, size, modification time): reused while these
  stay the same, embedded again (and the file replaced) when any changes."""
  stats = []
  for f in files:
    st = os.stat(f)
    stats.append((os.path.abspath(f), st.st_size, st.st_mtime_ns))
  data_cfg = config.data
  key = json.dumps([str(source), list(data_cfg.satellite_size), list(data_cfg.mean), list(data_cfg.std), stats])
  fingerprint = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
  folder = hashlib.blake2b(os.path.dirname(stats[0][0]).encode(), digest_size=8).hexdigest()
  path = os.path.join(workdir, "retrieve", f"gallery_{folder}.npz")
  if os.path.exists(path):
    with np.load(path) as cached:
      if str(cached["fingerprint"]) == fingerprint:
        print(f"gallery embeddings from {path}")
        return cached["embeddings"]
  gallery = reference_embeddings(model, data_cfg, files)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = path[:-len(".npz")] + ".partial.npz"
  np.savez(partial, fingerprint=fingerprint, embeddings=gallery)
  os.replace(partial, path)  # a reader never sees half a file
  return gallery


def reference_embeddings(model, data_cfg, files):
  """The reference tower's embeddings of satellite image files, read and embedded batch by batch."""
  batches = ({"image": np.stack([prepare(read_image(f), data_cfg.satellite_size, data_cfg)
                                 for f in files[i:i + GALLERY_BATCH]]),
              "index": np.arange(i, min(i + GALLERY_BATCH, len(files)))}
             for i in range(0, len(files), GALLERY_BATCH))
  return retrieval.embed(lambda x: model.encode(x, tower="reference"), batches)[0]


def confusions(workdir, data_cfg, split, modalities, k):
  """GLEAM-C's `k` most similar wrong satellites of every query of `split` (of `modalities`): {record
  index: their location ids, most similar first}, what the GLEAM-C job in `workdir` would confuse with
  each query, e.g. GLEAM-X's negatives (`examples.negatives_from`). The split is read from `data_cfg`'s
  dataset, which must be the one the job trained on, through the job's own input settings (image
  sizes, frames)."""
  from gleam_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  model, config, _, _ = load_trained(workdir)
  trained = (config.data.name, config.data.config)
  if trained != (data_cfg.name, data_cfg.config):
    raise GleamError(f"{workdir} was trained on {'/'.join(trained)}, the pairs are drawn from {data_cfg.name}/"
                     f"{data_cfg.config}: mine negatives with a GLEAM-C job of the same dataset.")
  missing = [m for m in modalities if m not in job_modalities(config)]
  if missing:
    raise GleamError(f"{workdir} was trained for the query modalities {', '.join(job_modalities(config))}, not "
                     f"{', '.join(missing)}: mine negatives with a job that knows every modality drawn (a phase-2 "
                     "job), or draw only those (data.modalities).")
  job_data = data_config(**dict(config.data.to_dict(), data_dir=data_cfg.data_dir))
  batch_size = int(config.eval.batch_size)
  gallery, labels = retrieval.embed(lambda x: model.encode(x, tower="reference"),
                                    pipeline.make_gallery_batches(job_data, split, batch_size), what=f"{split} satellites")
  gallery_ids = labels["location_id"]
  exact = retrieval.search_config()
  exact.backend = "exact"
  index = retrieval.build_index(gallery, exact)
  out = {}
  for m in modalities:
    queries, labels = retrieval.embed(lambda x, m=m: model.encode(x, tower=m),
                                      pipeline.make_eval_batches(job_data, split, m, batch_size), what=f"{split} {m}")
    _, top = index.search(queries, k + 1)  # the true satellite (one per location) among them at most once
    for r, true, row in zip(labels["index"], labels["location_id"], top):
      out[int(r)] = gallery_ids[row][gallery_ids[row] != true][:k]
  return out


def score_pairs(workdir, pairs_path, image_root=None, modality=None, results=None, **camera):
  """(each pair's cosine similarity, in the file's order; {pairs, matches, cosine_auc,
  best_threshold_accuracy, best_threshold, and cosine_auc/<modality> for pairs of several modalities},
  or None where not every pair says whether it matches), printed, and with `results` a JSON Lines file
  of the scores (a line per pair). A pair's query is read by the tower of its `modality`; pairs that
  name none ('pair') by `modality`'s, or the job's one query modality. A drone flight's pair (its
  frames as the query) is scored with the mean of its frames' embeddings (as `--one_place` searches),
  read as drone views where the job knows them. Camera values apply as in `search_all`."""
  if results:
    _check_results_file(results)
  pairs = pair_files.read_pairs(pairs_path, image_root, need_answers=False)  # bad lines stop before loading
  model, config, _, _ = load_trained(workdir)
  known = job_modalities(config)
  for p in pairs:
    if p["modality"] in MODALITIES and p["modality"] not in known:
      raise GleamError(f"{p['line']}: a {p['modality']} pair, but {workdir} was trained for the query modalities "
                       f"{', '.join(known)}; score these pairs with a job trained for {p['modality']} views.")
  as_modality = lambda p: "uav" if p["modality"] == FLIGHT and "uav" in known else p["modality"]
  unnamed = [p for p in pairs if as_modality(p) not in MODALITIES]
  fallback = _query_modality(workdir, config, modality) if unnamed else None
  modalities = [fallback if as_modality(p) not in MODALITIES else as_modality(p) for p in pairs]
  rows_of = {m: [i for i, pm in enumerate(modalities) if pm == m] for m in dict.fromkeys(modalities)}
  satellites = list(dict.fromkeys(p["satellite"] for p in pairs))
  reference = dict(zip(satellites, reference_embeddings(model, config.data, satellites)))
  scores = np.zeros(len(pairs), np.float32)
  frames = lambda p: p["query"] if pair_files.is_video_pair(p) else [p["query"]]
  for m, rows in rows_of.items():
    paths = list(dict.fromkeys(path for i in rows for path in frames(pairs[i])))
    query = dict(zip(paths, query_embeddings(model, workdir, paths, m, camera, config.data)))
    for i in rows:
      views = [query[path] for path in frames(pairs[i])]
      embedded = retrieval.mean_per_location(views, np.zeros(len(views)))[0][0]  # one view: itself
      scores[i] = float(np.dot(embedded, reference[pairs[i]["satellite"]]))
  if results:
    with open(results, "w", encoding="utf-8") as f:
      for p, m, score in zip(pairs, modalities, scores):
        f.write(json.dumps({"line": p["line"], "query": p["query"], "satellite": p["satellite"], "modality": m,
                            "score": float(score), "match": p["match"]}) + "\n")
    print(f"wrote {results} ({len(pairs)} pairs)")
  summary = None
  matches = [p["match"] for p in pairs]
  if None not in matches:
    accuracy, threshold = metrics.best_threshold_accuracy(scores, matches)
    summary = dict(pairs=len(pairs), matches=int(sum(matches)), cosine_auc=explain.verdict_auc(scores, matches),
                   best_threshold_accuracy=accuracy, best_threshold=threshold)
    if len(rows_of) > 1:
      for m, rows in rows_of.items():
        summary[f"cosine_auc/{m}"] = explain.verdict_auc(scores[rows], [matches[i] for i in rows])
  auc_text = lambda auc: "n/a (one kind only)" if auc is None else f"{auc:.3f}"
  line = f"{len(pairs)} pairs scored by GLEAM-C ({', '.join(f'{m} {len(rows)}' for m, rows in rows_of.items())})"
  if summary:
    line += (f", {summary['matches']} matching: cosine AUC {auc_text(summary['cosine_auc'])}, accuracy "
             f"{accuracy:.1%} at the best threshold {threshold:.3f} (chosen on these pairs)")
    if len(rows_of) > 1:
      line += "; AUC by modality: " + ", ".join(f"{m} {auc_text(summary[f'cosine_auc/{m}'])}" for m in rows_of)
  print(line)
  return scores, summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs each read at INFO; the results go to stdout
  camera = {name: FLAGS[name].value for name in CAMERA_KEYS}
  with stop_on_bad_input():
    if FLAGS.pairs:
      if FLAGS.query or FLAGS.gallery:
        raise GleamError("--pairs scores the pairs of a file against their own satellites: leave out --query and "
                         "--gallery.")
      score_pairs(os.path.expanduser(FLAGS.workdir), FLAGS.pairs, FLAGS.image_root, FLAGS.modality, FLAGS.results,
                  **camera)
      return
    if not (FLAGS.query and FLAGS.gallery):
      raise GleamError("give --query (an image or a folder) and --gallery (a folder of satellites), or --pairs.")
    search_all(os.path.expanduser(FLAGS.workdir), query_files(FLAGS.query, FLAGS.fps)[0], FLAGS.gallery, FLAGS.k,
               FLAGS.modality, FLAGS.out, FLAGS.pngs, FLAGS.results, FLAGS.match_by_name, one_place=FLAGS.one_place,
               gallery_coords=FLAGS.gallery_coords, **camera)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main, flags_parser=errors.parse_flags)
