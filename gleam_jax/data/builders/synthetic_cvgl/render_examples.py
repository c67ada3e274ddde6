"""Rendering locations into encoded examples, in parallel worker processes.

Kept apart from the builder module so a worker imports only NumPy, PIL and the synthetic world
(no TFDS). Locations are sorted by city and split into one contiguous part per worker, so each
worker builds only the city rasters of its part (a city raster takes seconds to build).
"""
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
  views = [(m, 0, loc[m]) for m in ("streetmap", "panorama", "ground")]
  views += [("uav", i, im) for i, im in enumerate(loc["uav"])]
  return [(f"{location_id}-{m}-{i}", dict(common, query=encode_png(im), modality=m, view_index=i))
          for m, i, im in views]


def _render_part(preset, overrides, ids, out):
  try:
    spec = synthetic.spec_from_name(preset, **dict(overrides))
    for location_id in ids:
      out.put(("ok", location_examples(spec, location_id)))
    out.put(("done", None))
  except BaseException:  # the parent re-raises it with this traceback
    out.put(("error", traceback.format_exc()))


def render_locations(preset, overrides, ids, workers):
  """Yields each location's [(key, example)] (in no fixed order when workers > 1)."""
  spec = synthetic.spec_from_name(preset, **dict(overrides))
  workers = max(1, min(int(workers), len(ids) // MIN_LOCATIONS_PER_WORKER))
  if workers == 1:
    for location_id in ids:
      yield location_examples(spec, location_id)
    return
  by_city = np.asarray(sorted(ids, key=lambda i: (location_city(spec, int(i)), int(i))), np.int64)
  parts = [part.tolist() for part in np.array_split(by_city, workers)]
  ctx = multiprocessing.get_context("spawn")  # the caller may hold jax threads: never fork
  out = ctx.Queue(maxsize=64 * workers)
  procs = [ctx.Process(target=_render_part, args=(preset, tuple(overrides), part, out), daemon=True)
           for part in parts]
  for p in procs:
    p.start()
  try:
    running = len(procs)
    while running:
      try:
        kind, payload = out.get(timeout=5)
      except queue_lib.Empty:
        if any(p.exitcode not in (None, 0) for p in procs):
          raise RuntimeError("a synthetic_cvgl render worker died without a result") from None
        continue
      if kind == "ok":
        yield payload
      elif kind == "done":
        running -= 1
      else:
        raise RuntimeError(f"rendering synthetic_cvgl failed in a worker process:\n{payload}")
  finally:
    for p in procs:
      if p.is_alive():
        p.terminate()
      p.join()
