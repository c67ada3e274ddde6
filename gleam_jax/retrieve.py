"""Retrieve the satellite images that match a query image with a trained GLEAM-C model.

    python -m gleam_jax.retrieve --workdir=W --query=img.jpg --gallery=DIR [--k=5] [--modality=panorama]

Loads the model described by `W/config.json` with the parameters of W's latest checkpoint, embeds
every image in DIR (png, jpg, jpeg, bmp, tif, tiff, webp; other files are skipped and counted) as
satellite references and the query with the query tower, prints the top-k gallery files with their
cosine scores and writes a PNG of the query and its top-k (default `W/retrieve/<query>_top<k>.png`).
Images are read upright (their EXIF orientation applied) and resized to the sizes the model was
trained on (`config.data`). A phase-2 job places a ground photo by its camera (`--heading_deg`,
`--fov_deg`) and a UAV view by its pose (`--heading_deg --pitch_deg --altitude_m --fov_deg`) and the
gallery's `--footprint_m`; camera values not given are read from the file where it records them
(EXIF, a DJI drone's XMP: `data/photo_camera.py`).
"""
import json
import os
import sys

from absl import app
from absl import flags
import jax
import ml_collections
from flax import nnx
import numpy as np
from PIL import ImageOps

from gleam_jax.data.augment import FRAME_CAMERA_KEYS, normalise, query_in_frame, resize, warps_query
from gleam_jax.data.config import data_config, query_shape
from gleam_jax.data.photo_camera import open_image, recorded_camera
from gleam_jax.errors import GleamError
from gleam_jax.eval import report
from gleam_jax.eval import retrieval
from gleam_jax.train import checkpoint
from gleam_jax.train import contrastive
from gleam_jax.train import sharding as shd

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program: gleam_jax.main owns --workdir too)."""
  flags.DEFINE_string("workdir", None, "Workdir of a finished (or running) GLEAM-C job.")
  flags.DEFINE_string("query", None, "The query image (panorama, UAV view, street map or photo).")
  flags.DEFINE_string("gallery", None, "Folder of satellite images to search.")
  flags.DEFINE_integer("k", 5, "How many gallery images to show.")
  flags.DEFINE_string("modality", None, "Query modality (sets its input size and tower); needed when the "
                      "job was trained for several.")
  flags.DEFINE_string("out", None, "PNG to write (default W/retrieve/<query>_top<k>.png).")
  flags.DEFINE_float("heading_deg", None, "The camera's compass heading (clockwise from north), for jobs "
                     "that read ground photos in the panorama frame (data.ground_frame; default: the "
                     "photo's EXIF GPSImgDirection) or UAV views in the satellite frame (data.uav_frame).")
  flags.DEFINE_float("fov_deg", None, "The camera's horizontal field of view (a ground photo: default from "
                     "its EXIF 35 mm-equivalent focal length, else 90).")
  flags.DEFINE_float("pitch_deg", None, "A UAV camera's pitch below the horizon (data.uav_frame).")
  flags.DEFINE_float("altitude_m", None, "A UAV camera's height above the ground, metres (data.uav_frame).")
  flags.DEFINE_float("footprint_m", None, "The gallery satellites' ground width, metres (data.uav_frame).")


def load_config(workdir):
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise GleamError(f"{path} not found: --workdir must be the folder of a GLEAM-C training job.")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if "data" in config:  # fields added since the job was written take their defaults
    config.data = data_config(**config.data.to_dict())
  return config


def load_model(workdir):
  """(model in eval mode, config) with the parameters of the workdir's latest checkpoint."""
  config = load_config(workdir)
  if config.get("trainer") != "contrastive":
    raise GleamError(f"{workdir} holds a {config.get('trainer')!r} job; retrieval needs a GLEAM-C "
                     "('contrastive') job.")
  model = contrastive.build_model(config.model, int(config.seed))
  graphdef, params, rng_state, rest = contrastive.split_model(model)
  mesh = shd.single_device_mesh()
  target = {"model": jax.device_put(nnx.to_pure_dict(params), shd.replicated(mesh))}
  if config.loss.name == "sigmoid":
    target["loss_bias"] = jax.device_put(np.float32(0), shd.replicated(mesh))
  restored, where, _ = checkpoint.restore_params(workdir, target)
  model = nnx.merge(graphdef, restored["model"], rng_state, rest)
  model.eval()
  print(f"model from {where}")
  return model, config


def read_image(path):
  """The image upright (as its EXIF orientation says it is shown), RGB."""
  with open_image(path) as image:
    return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def gallery_files(folder):
  if not os.path.isdir(folder):
    raise GleamError(f"--gallery={folder} is not a folder of satellite images.")
  names = sorted(os.listdir(folder))
  files = [os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
  skipped = len([n for n in names if os.path.isfile(os.path.join(folder, n))]) - len(files)
  if not files:
    raise GleamError(f"--gallery={folder} has no images ({', '.join(IMAGE_EXTENSIONS)}).")
  return files, skipped


def prepare(image, size, data_cfg):
  return normalise(resize(image, tuple(size)), tuple(data_cfg.mean), tuple(data_cfg.std))


def _only_modality(workdir, config):
  """The query modality of a job that knows one; a job of several needs `--modality`."""
  known = tuple(dict.fromkeys(tuple(config.data.modalities) + tuple(config.eval.get("modalities") or ())))
  if len(known) > 1:
    raise GleamError(f"{workdir} was trained for the query modalities {known}: say which one the query is "
                     "with --modality.")
  return known[0]


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
  """Prints and returns the top-k [(file, score)]; writes the PNG. A ground photo needs `heading_deg`
  and `fov_deg` when the job read ground photos in the panorama frame: when not given, they are read
  from the photo's EXIF (compass heading, 35 mm-equivalent focal length; the field of view defaults
  to 90 deg); a UAV view needs
  its camera (`heading_deg`, `pitch_deg`, `altitude_m`, `fov_deg`) and the satellites' `footprint_m`
  when the job read UAV views in the satellite frame."""
  model, config = load_model(workdir)
  data_cfg = config.data
  modality = modality or _only_modality(workdir, config)
  given = dict(heading_deg=heading_deg, fov_deg=fov_deg, pitch_deg=pitch_deg, altitude_m=altitude_m,
               footprint_m=footprint_m)
  if warps_query(data_cfg, modality):
    given = _camera_from_file(query_path, modality, given)
    missing = [f"--{k}" for k in FRAME_CAMERA_KEYS[modality] if given[k] is None]
    if missing:
      frame = "ground photos in the panorama frame" if modality == "ground" else "UAV views in the satellite frame"
      raise GleamError(f"{workdir} reads {frame}, placed by their camera, and {query_path} does not record "
                       f"all of it (EXIF / DJI XMP): give {', '.join(missing)}.")
  camera = {k: float("nan") if v is None else float(v) for k, v in given.items()}
  query_raw = read_image(query_path)
  query_framed = query_in_frame(query_raw, modality, camera, data_cfg)  # bad camera values stop here
  files, skipped = gallery_files(gallery_dir)
  gallery_raw = [read_image(f) for f in files]
  batch_size = 64
  batches = [{"image": np.stack([prepare(g, data_cfg.satellite_size, data_cfg) for g in gallery_raw[i:i + batch_size]]),
              "index": np.arange(i, min(i + batch_size, len(files)))} for i in range(0, len(files), batch_size)]
  gallery, _ = retrieval.embed(lambda x: model.encode(x, tower="reference"), batches)
  query_image = prepare(query_framed, query_shape(data_cfg, modality), data_cfg)[None]
  query = np.asarray(jax.jit(lambda x: model.encode(x, tower=modality))(query_image))
  scores = (gallery @ query[0]).astype(np.float32)
  k = min(k, len(files))
  top = np.argsort(-scores, kind="stable")[:k]
  print(f"query {query_path} ({modality}); gallery {len(files)} images in {gallery_dir}"
        + (f" ({skipped} non-image files skipped)" if skipped else ""))
  for rank, i in enumerate(top, 1):
    print(f"{rank:3d}. {scores[i]:.4f}  {files[i]}")
  out = out or os.path.join(workdir, "retrieve",
                            f"{os.path.splitext(os.path.basename(query_path))[0]}_top{k}.png")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  report.save_topk_png(query_raw, [gallery_raw[i] for i in top], scores[top], out)
  print(f"wrote {out}")
  return [(files[i], float(scores[i])) for i in top]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  missing = [f"--{n}" for n in ("workdir", "query", "gallery") if not FLAGS[n].value]
  if missing:
    print(f"error: {', '.join(missing)} required.", file=sys.stderr)
    sys.exit(2)
  try:
    search(os.path.expanduser(FLAGS.workdir), FLAGS.query, FLAGS.gallery, FLAGS.k, FLAGS.modality, FLAGS.out,
           FLAGS.heading_deg, FLAGS.fov_deg, FLAGS.pitch_deg, FLAGS.altitude_m, FLAGS.footprint_m)
  except GleamError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
