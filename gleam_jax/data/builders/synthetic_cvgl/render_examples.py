"""Rendering locations into encoded examples, in parallel worker processes.

Kept apart from the builder module so a worker imports only NumPy, PIL and the synthetic world
(no TFDS). Workers start once for all splits, and each keeps to a subset of the cities, so it
builds only those city rasters (a city raster takes seconds to build).
"""
import collections
import io
import multiprocessing
import queue as queue_lib
import traceback

import numpy as np
from PIL import Image

from gleam_jax.data import synthetic
from gleam_jax.data.synthetic.spec import location_city

MIN_LOCATIONS_PER_WORKER = 64  # below this, starting a process costs more than it saves


def encode_png(image):
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def location_examples(spec, location_id):
  """[(key, example)] of one location: every query view paired with the satellite image."""
  loc = synthetic.render_location(spec, int(location_id))
  common = dict(
      satellite=encode_png(loc["satellite"]),
      location_id=int(location_id),
      city=str(loc["city_name"]),
      city_id=int(loc["city"]),
      coords=np.asarray(loc["coords"], np.float64),
  )
  # (modality, view index, image, camera): heading clockwise from north, horizontal field of view,
  # pitch below the horizon, height above the ground. Streetmap and panorama are north-aligned, the
  # panorama sees 360 deg, the map is orthographic (fov 0, no camera height); street cameras are level.
  street = dict(pitch_deg=0.0, altitude_m=spec.camera_height_m)
  views = [("streetmap", 0, loc["streetmap"], dict(heading_deg=0.0, fov_deg=0.0, pitch_deg=90.0, altitude_m=np.nan)),
           ("panorama", 0, loc["panorama"], dict(heading_deg=0.0, fov_deg=360.0, **street)),
           ("ground", 0, loc["ground"], dict(heading_deg=loc["ground_heading_deg"], fov_deg=spec.ground_fov_deg,
                                              **street))]
  views += [("uav", i, im, dict(heading_deg=cam["heading_deg"], fov_deg=cam["fov_deg"], pitch_deg=cam["pitch_deg"],
                                altitude_m=cam["position_m"][2]))
            for i, (im, cam) in enumerate(zip(loc["uav"], loc["uav_cameras"]))]
  return [(f"{location_id}-{m}-{i}", dict(common, query=encode_png(im), modality=m, view_index=i,
                                          footprint_m=np.float32(spec.footprint_m),
                                          **{k: np.float32(v) for k, v in camera.items()}))
          for m, i, im, camera in views]


def _render_parts(preset, overrides, parts, out):
  try:
    spec = synthetic.spec_from_name(preset, **dict(overrides))
    for split, ids in parts:
      for location_id in ids:
        out.put(("ok", split, location_examples(spec, location_id)))
      out.put(("done", split, None))
  except BaseException:  # the parent re-raises it with this traceback
    out.put(("error", None, traceback.format_exc()))


class ParallelRenderer:
  """Renders the locations of every split in `workers` processes started once for all splits.

  Each split's locations are sorted by city and cut into one contiguous part per worker, the same
  way for every split, so a worker keeps to the same cities. `split(name)` yields that split's
  locations ([(key, example)] each, in no fixed order); results of other splits that arrive
  meanwhile wait in memory.
  """

  def __init__(self, preset, overrides, split_ids, workers):
    self.preset, self.overrides = preset, tuple(overrides)
    self.spec = synthetic.spec_from_name(preset, **dict(overrides))
    total = sum(len(ids) for ids in split_ids.values())
    self.workers = max(1, min(int(workers), total // MIN_LOCATIONS_PER_WORKER))
    self.split_ids = {k: [int(i) for i in v] for k, v in split_ids.items()}
    self.procs = []
    if self.workers == 1:
      return
    parts = [[] for _ in range(self.workers)]
    for split, ids in self.split_ids.items():
      by_city = np.asarray(sorted(ids, key=lambda i: (location_city(self.spec, i), i)), np.int64)
      for w, part in enumerate(np.array_split(by_city, self.workers)):
        parts[w].append((split, part.tolist()))
    ctx = multiprocessing.get_context("spawn")  # the caller may hold jax threads: never fork
    self.out = ctx.Queue(maxsize=64 * self.workers)
    self.procs = [ctx.Process(target=_render_parts, args=(preset, self.overrides, part, self.out), daemon=True)
                  for part in parts]
    for p in self.procs:
      p.start()
    self.waiting = {split: collections.deque() for split in self.split_ids}
    self.done = {split: 0 for split in self.split_ids}

  def _receive(self):
    while True:
      try:
        return self.out.get(timeout=5)
      except queue_lib.Empty:
        if any(p.exitcode not in (None, 0) for p in self.procs):
          raise RuntimeError("a synthetic_cvgl render worker died without a result") from None

  def split(self, name):
    if self.workers == 1:
      for location_id in self.split_ids[name]:
        yield location_examples(self.spec, location_id)
      return
    waiting = self.waiting[name]
    while True:
      while waiting:
        yield waiting.popleft()
      if self.done[name] == self.workers:
        return
      kind, split, payload = self._receive()
      if kind == "ok":
        self.waiting[split].append(payload)
      elif kind == "done":
        self.done[split] += 1
      else:
        raise RuntimeError(f"rendering synthetic_cvgl failed in a worker process:\n{payload}")

  def close(self):
    for p in self.procs:
      if p.is_alive():
        p.terminate()
      p.join()
    self.procs = []
