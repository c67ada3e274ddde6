"""How far a retrieved satellite image is from where the query was taken, in metres.

UAV geo-localization benchmarks (GTA-UAV's and UAV-VisLoc's Dis@K) score a search by the ground
distance between the query's position and the centre of the satellite image retrieved, not only by
whether the one true image came first. `retrieve` reports it where both are known:
- the query's position from its file (`photo_camera.recorded_position`: EXIF GPS, a DJI drone's XMP,
  a video frame's flight log);
- each gallery image's centre from a CSV file (`file,latitude,longitude`, `--gallery_coords`) or from
  file names that end in `_<latitude>_<longitude>` (VIGOR's `satellite_40.7306_-73.9866.png`).

Distances are great-circle (haversine) on a sphere of the Earth's mean radius: within 0.5% of the
ellipsoid's, far below a satellite tile's width.
"""
import csv
import os
import re

import numpy as np

from gleam_jax.errors import GleamError

EARTH_RADIUS_M = 6_371_008.8  # mean radius (IUGG)
WITHIN_M = (25, 50, 100, 250)  # the distances whose hit rates are reported
_NAME_COORDS = re.compile(r"_([-+]?\d+(?:\.\d+)?)_([-+]?\d+(?:\.\d+)?)$")


def distance_m(lat1, lon1, lat2, lon2):
  """Great-circle distance in metres between points given in degrees (numpy broadcasting)."""
  lat1, lon1, lat2, lon2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
  a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
  return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def check_position(lat, lon, what):
  if not (-90 <= lat <= 90 and -180 <= lon <= 180):
    raise GleamError(f"{what}: ({lat}, {lon}) is not a (latitude, longitude) in degrees; correct it.")
  return float(lat), float(lon)


def positions_from_names(files):
  """{file: (latitude, longitude)} when every file's name ends in `_<latitude>_<longitude>`, else None."""
  found = {}
  for f in files:
    match = _NAME_COORDS.search(os.path.splitext(os.path.basename(f))[0])
    if not match:
      return None
    found[f] = check_position(float(match.group(1)), float(match.group(2)), f)
  return found


def positions_from_csv(path, files, gallery_dir):
  """{file: (latitude, longitude)} of every gallery file from a CSV of `file,latitude,longitude` (a header
  row with those names; `file` relative to the gallery folder, or absolute)."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise GleamError(f"--gallery_coords={path}: cannot read it ({e.strerror}); give the CSV of the gallery's "
                     "centres.") from None
  if not rows or not {"file", "latitude", "longitude"} <= set(rows[0]):
    raise GleamError(f"--gallery_coords={path} needs a header row with the columns file,latitude,longitude and a "
                     "row per gallery image.")
  by_file = {}
  for n, row in enumerate(rows, 2):
    try:
      lat, lon = float(row["latitude"]), float(row["longitude"])
    except (TypeError, ValueError):
      raise GleamError(f"{path} line {n}: latitude {row['latitude']!r} and longitude {row['longitude']!r} must be "
                       "numbers in degrees; correct the line.") from None
    by_file[os.path.abspath(os.path.join(gallery_dir, row["file"]))] = check_position(lat, lon, f"{path} line {n}")
  missing = [f for f in files if os.path.abspath(f) not in by_file]
  if missing:
    raise GleamError(f"--gallery_coords={path} has no row for {len(missing)} of the {len(files)} gallery images "
                     f"(first: {missing[0]}); add their rows (file relative to {gallery_dir}), or remove the images "
                     "from the gallery.")
  return {f: by_file[os.path.abspath(f)] for f in files}


def gallery_positions(files, gallery_dir, coords_file=None):
  """{gallery file: its centre (latitude, longitude)} from `coords_file` (a CSV, `positions_from_csv`) or from
  the files' names (`positions_from_names`); None where neither gives every file's."""
  return positions_from_csv(coords_file, files, gallery_dir) if coords_file else positions_from_names(files)


def summary(top1_m) -> dict:
  """Dis@1 (the mean distance of the top-1, metres), its median, and the share of queries whose top-1 is
  within each of WITHIN_M metres."""
  top1_m = np.asarray(top1_m, dtype=np.float64)
  return {"Dis@1_m": float(top1_m.mean()), "median_m": float(np.median(top1_m)),
          **{f"within_{d}m": float(np.mean(top1_m <= d)) for d in WITHIN_M}}


def format_distance(metres) -> str:
  return f"{metres:.0f} m" if metres < 10_000 else f"{metres / 1000:.1f} km"


def format_summary(result) -> str:
  within = ", ".join(f"{d} m {result[f'within_{d}m']:.1%}" for d in WITHIN_M)
  return (f"Dis@1 {format_distance(result['Dis@1_m'])} (median {format_distance(result['median_m'])}); top-1 "
          f"within {within}")
