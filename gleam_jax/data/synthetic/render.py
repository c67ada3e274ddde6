"""The five views of a location, rendered from its city's rasters, and the projection of world points.

Local frame of a location: x east, y north, z up, in metres; origin on the ground at the location.
Cell lookup: the point (x, y) lies in raster cell (i0 + floor(-y), j0 + floor(x)).

Conventions (all pixel coordinates are continuous: pixel (c, r) covers [c, c+1) x [r, r+1)):
- satellite / streetmap: north-up orthographic, `footprint_m` wide, centred on the location:
  u = (x + F/2) / F * S, v = (F/2 - y) / F * S.
- panorama: equirectangular, camera `camera_height_m` above the location. Column 0 looks north and
  the heading grows clockwise (east at W/4, south at W/2, west at 3W/4): u = heading / 360 * W.
  Row 0 is the zenith, the horizon is at P/2: v = (90 - elevation) / 180 * P.
- ground: pinhole camera at the panorama's centre, level (no pitch, no roll), horizontal field of
  view `ground_fov_deg`, looking along `ground_heading_deg` (clockwise from north).
- uav: pinhole cameras on an orbit (bearing, radius, altitude drawn per view), level horizon
  (no roll), looking at the location's origin, field of view `uav_fov_deg`.
"""
import dataclasses
import math

import numpy as np

from gleam_jax.data.synthetic import city as city_lib
from gleam_jax.data.synthetic import spec as spec_lib
from gleam_jax.errors import GleamError

SKY_HORIZON = np.array((205, 218, 232), np.float32)
SKY_ZENITH = np.array((80, 125, 195), np.float32)
HAZE = np.array((190, 200, 210), np.float32)
# Distances of the samples along a street-level ray: 0.5 m apart near the camera, then 3% apart.
_NEAR = np.arange(0.5, 16.0, 0.5)
STREET_DISTANCES = np.concatenate([_NEAR, 16.0 * 1.03 ** np.arange(1, 80)]).astype(np.float32)
STREET_DISTANCES = STREET_DISTANCES[STREET_DISTANCES <= 160.0]
UAV_COARSE_STEPS = 32
UAV_REFINE_STEPS = 3
UAV_MAX_RANGE_M = 300.0
UAV_CLEARANCE_M = 15.0
FLOOR_M = 3.2  # storey height: walls get a darker band of windows per storey


@dataclasses.dataclass
class Scene:
  """The rasters a location is rendered from, and where the location lies in them."""
  height: np.ndarray
  top: np.ndarray
  side: np.ndarray
  cls: np.ndarray
  map_rgb: np.ndarray
  i0: int
  j0: int
  max_height: float
  land_rgb: np.ndarray

  def cells(self, x, y):
    """Flat raster index of the cells holding local points (x, y), clipped to the raster."""
    n_i, n_j = self.height.shape
    i = np.clip(self.i0 - y, 0, n_i - 1).astype(np.int32)  # truncation is floor on [0, n)
    j = np.clip(self.j0 + x, 0, n_j - 1).astype(np.int32)
    return i * n_j + j


def city_of(spec, location_id):
  return city_lib.build_city(spec.seed, spec_lib.location_city(spec, location_id), spec.city_size_m)


def location_cell(spec, location_id, city):
  if len(city.candidates) == 0:
    raise GleamError(f"city {city.index} of the synthetic world has no streets to stand on: "
                     "increase city_size_m.")
  _, k = spec_lib.location_city_and_index(spec, location_id)
  # the k-th location of a city stands in the k-th tile of the city's tile order, so nearby
  # locations (train or test) rarely share a place
  n_tiles = len(city.tile_starts) - 1
  tile = city.tile_order[k % n_tiles]
  lo, hi = city.tile_starts[tile], city.tile_starts[tile + 1]
  rng = spec_lib.location_rng(spec, location_id, 0)
  flat = int(city.candidates[lo + rng.integers(hi - lo)])
  return divmod(flat, city.height.shape[1])


def location_scene(spec, location_id, markers=()):
  """The scene of a location. `markers` (for tests): pillars (x, y, radius_m, height_m, rgb) in the
  local frame, drawn into a copy of the rasters so they show in every view."""
  city = city_of(spec, location_id)
  i0, j0 = location_cell(spec, location_id, city)
  b, r = city_lib.BLOCK_M, int(UAV_MAX_RANGE_M + 100) // city_lib.BLOCK_M + 1
  bi, bj = i0 // b, j0 // b
  max_height = float(city.block_max[max(bi - r, 0):bi + r + 1, max(bj - r, 0):bj + r + 1].max())
  scene = Scene(city.height, city.top, city.side, city.cls, city.map_rgb, i0, j0, max_height,
                city.style.land_rgb)
  if markers:
    scene = _with_markers(scene, markers)
  return city, scene


def _with_markers(scene, markers):
  r = int(spec_lib.VIEW_MARGIN_M) + 260
  n_i, n_j = scene.height.shape
  a0, a1 = max(scene.i0 - r, 0), min(scene.i0 + r, n_i)
  b0, b1 = max(scene.j0 - r, 0), min(scene.j0 + r, n_j)
  crop = lambda a: np.array(a[a0:a1, b0:b1])
  s = Scene(crop(scene.height), crop(scene.top), crop(scene.side), crop(scene.cls), crop(scene.map_rgb),
            scene.i0 - a0, scene.j0 - b0, scene.max_height, scene.land_rgb)
  ii, jj = np.mgrid[0:a1 - a0, 0:b1 - b0]
  cx, cy = jj - s.j0 + 0.5, s.i0 - ii - 0.5  # local coordinates of cell centres
  for x, y, radius, height, rgb in markers:
    m = (cx - x) ** 2 + (cy - y) ** 2 <= radius ** 2
    s.height[m] = height
    s.top[m, :3] = rgb
    s.side[m, :3] = rgb
    s.map_rgb[m, :3] = rgb
    s.cls[m] = city_lib.MARKER
    s.max_height = max(s.max_height, float(height))
  return s


# ----------------------------------------------------------------------------------------------
# Cameras.

def ground_heading_deg(spec, location_id):
  return float(spec_lib.location_rng(spec, location_id, 1).uniform(0.0, 360.0))


def uav_cameras(spec, location_id):
  """One dict per UAV view: position (x, y, z) in metres, the bearing it looks along, its pitch
  below the horizon and its field of view. A drone flies at least UAV_CLEARANCE_M above the
  highest point within 20 m of it (so it is never inside a tower)."""
  city = city_of(spec, location_id)
  i0, j0 = location_cell(spec, location_id, city)
  rng = spec_lib.location_rng(spec, location_id, 2)
  base = rng.uniform(0.0, 360.0)
  cams = []
  for k in range(spec.uav_views):
    bearing = (base + 360.0 * k / spec.uav_views + rng.uniform(-20, 20)) % 360.0  # of the drone
    radius = rng.uniform(*spec.uav_radius_m)
    b = math.radians(bearing)
    ci, cj = int(i0 - radius * math.cos(b)), int(j0 + radius * math.sin(b))
    below = city.height[max(ci - 20, 0):ci + 21, max(cj - 20, 0):cj + 21]
    altitude = max(rng.uniform(*spec.uav_altitude_m), float(below.max()) + UAV_CLEARANCE_M)
    cams.append({"position_m": (radius * math.sin(b), radius * math.cos(b), altitude),
                 "heading_deg": (bearing + 180.0) % 360.0,
                 "pitch_deg": math.degrees(math.atan2(altitude, radius)),
                 "fov_deg": float(spec.uav_fov_deg)})
  return cams


def _uav_basis(cam):
  c = np.array(cam["position_m"], np.float64)
  forward = -c / np.linalg.norm(c)
  right = np.array([forward[1], -forward[0], 0.0])
  right /= np.linalg.norm(right)
  up = np.cross(right, forward)
  return c, forward, right, up


def _focal_px(size, fov_deg):
  return (size / 2) / math.tan(math.radians(fov_deg) / 2)


def project_point(spec, location_id, view, world_xyz, view_index=0):
  """Pixel (u, v) (continuous, see the module doc) where the local point `world_xyz` appears in
  `view`, or None when it is behind the camera or outside the image. Occlusion is not tested."""
  if view not in spec_lib.VIEWS:
    raise GleamError(f"unknown view {view!r}: use one of {list(spec_lib.VIEWS)}.")
  spec_lib.location_split(spec, location_id)
  x, y, z = (float(t) for t in world_xyz)
  if view in ("satellite", "streetmap"):
    f, s = spec.footprint_m, spec.sat_size
    u, v = (x + f / 2) / f * s, (f / 2 - y) / f * s
    size_u = size_v = s
  elif view == "panorama":
    dz = z - spec.camera_height_m
    horizontal = math.hypot(x, y)
    if horizontal < 1e-9 and abs(dz) < 1e-9:
      return None
    heading = math.degrees(math.atan2(x, y)) % 360.0
    elevation = math.degrees(math.atan2(dz, horizontal))
    u = heading / 360.0 * spec.pano_width
    v = (90.0 - elevation) / 180.0 * spec.pano_height
    size_u, size_v = spec.pano_width, spec.pano_height
  else:
    q = spec.query_size
    if view == "ground":
      h = math.radians(ground_heading_deg(spec, location_id))
      forward, right, up = np.array([math.sin(h), math.cos(h), 0.0]), np.array(
          [math.cos(h), -math.sin(h), 0.0]), np.array([0.0, 0.0, 1.0])
      d = np.array([x, y, z - spec.camera_height_m])
      fov = spec.ground_fov_deg
    else:
      cams = uav_cameras(spec, location_id)
      if not 0 <= view_index < len(cams):
        raise GleamError(f"uav view_index {view_index} does not exist: the spec has {len(cams)} UAV views.")
      c, forward, right, up = _uav_basis(cams[view_index])
      d = np.array([x, y, z]) - c
      fov = spec.uav_fov_deg
    depth = float(d @ forward)
    if depth <= 1e-6:
      return None
    fpx = _focal_px(q, fov)
    u = q / 2 + fpx * float(d @ right) / depth
    v = q / 2 - fpx * float(d @ up) / depth
    size_u = size_v = q
  if not (0.0 <= u < size_u and 0.0 <= v < size_v):
    return None
  return float(u), float(v)


# ----------------------------------------------------------------------------------------------
# Renderers.

def _ortho(scene, raster, spec, size):
  """Top-down resampling of `raster` over the footprint, box-filtered from sub-pixel samples."""
  f = spec.footprint_m
  ss = max(1, int(math.ceil(f / size - 1e-9)))
  offs = (np.arange(size * ss) + 0.5) / ss * (f / size)
  x = offs - f / 2
  y = f / 2 - offs
  idx = scene.cells(x[None, :], y[:, None])
  img = _unpack(_packed(raster)[idx])
  out = img[0::ss, 0::ss].copy()
  for a in range(ss):
    for b in range(ss):
      if a or b:
        out += img[a::ss, b::ss]
  return out * np.float32(1 / ss ** 2)


def _packed(rgba):
  """An RGBA raster as one uint32 per cell, flat."""
  return rgba.view(np.uint32).reshape(-1)


def _unpack(packed):
  return packed.view(np.uint8).reshape(packed.shape + (4,))[..., :3].astype(np.float32)


def _sky(elevation):
  t = np.sqrt(np.clip(elevation * np.float32(2 / math.pi), 0.0, 1.0))[..., None]
  return SKY_HORIZON + (SKY_ZENITH - SKY_HORIZON) * t


def _shade_hits(scene, cell, wall, z_wall, dist):
  """Colour of ray hits: wall colour (with storey bands) on faces, top colour otherwise, hazed."""
  packed = np.where(wall, _packed(scene.side)[cell], _packed(scene.top)[cell])
  rgb = _unpack(packed)
  storey = z_wall % FLOOR_M
  band = (storey > 0.45 * FLOOR_M) & (storey < 0.8 * FLOOR_M) & wall
  band &= scene.cls.reshape(-1)[cell] == city_lib.BUILDING
  fog = 1.0 - np.exp(dist.astype(np.float32) * np.float32(-1 / 450.0))
  rgb *= ((1.0 - fog) * np.where(band, np.float32(0.72), np.float32(1.0)))[..., None]
  rgb += HAZE * fog[..., None]
  return rgb


def _street_level(scene, azimuth, elevation, cam_h):
  """Ray march of a level camera at street level. `azimuth` (C,) radians clockwise from north, one
  per image column (each column is a vertical plane); `elevation` (R, C) radians per pixel."""
  d = STREET_DISTANCES
  k_n = len(d)
  n_c = len(azimuth)
  azimuth = azimuth.astype(np.float32)
  elevation = elevation.astype(np.float32)
  idx = scene.cells(np.sin(azimuth)[:, None] * d, np.cos(azimuth)[:, None] * d)  # (C, K)
  h = scene.height.reshape(-1)[idx]
  reach = np.maximum.accumulate(np.arctan2(h - np.float32(cam_h), d), axis=1)  # highest angle so far
  offset = np.arange(n_c, dtype=np.float32) * 4.0
  flat = (reach + offset[:, None]).reshape(-1)  # non-decreasing: one search for all columns
  k = np.searchsorted(flat, (elevation + offset).reshape(-1)).reshape(elevation.shape)
  k -= k_n * np.arange(n_c)
  hit = k < k_n
  np.minimum(k, k_n - 1, out=k)
  flat_k = k + k_n * np.arange(n_c)
  cell = idx.reshape(-1)[flat_k]
  d_prev = np.concatenate([[0.0], d[:-1]]).astype(np.float32)[k]
  z_prev = cam_h + d_prev * np.tan(elevation)
  wall = z_prev < h.reshape(-1)[flat_k]
  rgb = _shade_hits(scene, cell, wall, z_prev, np.where(wall, d_prev, d[k]))
  if hit.all():
    return rgb
  far = np.where((elevation >= 0)[..., None], _sky(elevation), 0.5 * HAZE + 0.5 * scene.land_rgb)
  return np.where(hit[..., None], rgb, far)


def render_panorama(spec, scene):
  p, w = spec.pano_height, spec.pano_width
  azimuth = (np.arange(w) + 0.5) / w * 2 * math.pi
  elevation = math.pi / 2 - (np.arange(p) + 0.5) / p * math.pi
  return _street_level(scene, azimuth, np.broadcast_to(elevation[:, None], (p, w)), spec.camera_height_m)


def render_ground(spec, scene, heading_deg):
  q = spec.query_size
  fpx = _focal_px(q, spec.ground_fov_deg)
  a = (np.arange(q) + 0.5 - q / 2) / fpx  # x_c / z_c per column
  b = (q / 2 - (np.arange(q) + 0.5)) / fpx  # y_c / z_c per row
  azimuth = math.radians(heading_deg) + np.arctan(a)
  elevation = np.arctan(b[:, None] / np.sqrt(1 + a[None, :] ** 2))
  return _street_level(scene, azimuth, elevation, spec.camera_height_m)


def render_uav(spec, scene, cam):
  """Ray march over the heightfield: coarse steps from where a ray drops below the highest
  roof to where it meets the ground, then bisection of the first step that ends below the surface."""
  q = spec.query_size
  c, forward, right, up = _uav_basis(cam)
  fpx = _focal_px(q, spec.uav_fov_deg)
  a = (np.arange(q) + 0.5 - q / 2) / fpx
  b = (q / 2 - (np.arange(q) + 0.5)) / fpx
  rays = (forward + a[None, :, None] * right + b[:, None, None] * up).reshape(-1, 3).astype(np.float32)
  rx, ry, rz = rays[:, 0], rays[:, 1], np.minimum(rays[:, 2], -1e-6)
  ox, oy, oz = (float(v) for v in c)
  dh = np.hypot(rx, ry)
  t_ground = oz / -rz
  t_end = np.minimum(t_ground * 1.001 + 1e-3, UAV_MAX_RANGE_M / np.maximum(dh, 1e-9))
  t_start = np.clip((oz - scene.max_height - 0.01) / -rz, 0.0, t_end)
  h_flat = scene.height.reshape(-1)

  n_i, n_j = scene.height.shape
  ai, aj = scene.i0 - oy, scene.j0 + ox  # the camera in raster coordinates (row, column)

  def below(t, rx, ry, rz):  # as scene.cells, with fewer temporaries: this is the hot loop
    fi = t * -ry
    fi += ai
    np.clip(fi, 0, n_i - 1, out=fi)
    fj = t * rx
    fj += aj
    np.clip(fj, 0, n_j - 1, out=fj)
    idx = fi.astype(np.int32)
    idx *= n_j
    idx += fj.astype(np.int32)
    z = t * rz
    z += oz
    return z <= h_flat[idx]

  steps = np.arange(1, UAV_COARSE_STEPS + 1, dtype=np.float32) / UAV_COARSE_STEPS
  ts = t_start[:, None] + (t_end - t_start)[:, None] * steps  # (n, K)
  hits = below(ts, rx[:, None], ry[:, None], rz[:, None])
  any_hit = hits.any(axis=1)
  first = np.argmax(hits, axis=1)
  rows = np.arange(len(rx))
  hi = ts[rows, first]
  lo = np.where(first > 0, ts[rows, np.maximum(first - 1, 0)], t_start)
  for _ in range(UAV_REFINE_STEPS):
    mid = 0.5 * (lo + hi)
    m = below(mid, rx, ry, rz)
    hi = np.where(m, mid, hi)
    lo = np.where(m, lo, mid)
  cell = scene.cells(ox + hi * rx, oy + hi * ry)
  z_lo = oz + lo * rz
  wall = z_lo < h_flat[cell] - 0.05
  dist = hi * np.sqrt(dh * dh + rz * rz)
  rgb = _shade_hits(scene, cell, wall, z_lo, dist)
  if not any_hit.all():
    far = np.where((rays[:, 2] >= 0)[:, None], _sky(np.arctan2(rays[:, 2], dh)), HAZE)
    rgb = np.where(any_hit[:, None], rgb, far)
  return rgb.reshape(q, q, 3)


def _photometric(img, rng, gain_sd, haze_max=0.0):
  """Per-image exposure and white balance (and haze for drones): views of one place never share
  exact colours, as photos from different sensors do not."""
  gain = (rng.normal(1.0, gain_sd) * rng.normal(1.0, gain_sd / 2, 3)).astype(np.float32)
  img = img * gain
  if haze_max > 0:
    a = rng.uniform(0.0, haze_max)
    img = img * (1 - a) + HAZE * a
  return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_location(spec, location_id, markers=()):
  """All views of one location (see the module doc for conventions) and its metadata."""
  city, scene = location_scene(spec, location_id, markers)
  rng = spec_lib.location_rng(spec, location_id, 3)
  heading = ground_heading_deg(spec, location_id)
  cams = uav_cameras(spec, location_id)
  i0, j0 = location_cell(spec, location_id, city)
  north_m, east_m = city.height.shape[0] - i0, j0  # from the city raster's south-west corner
  lat0, lon0 = city.origin_latlon
  lat = lat0 + north_m / 111_320.0
  lon = lon0 + east_m / (111_320.0 * math.cos(math.radians(lat0)))
  return {
      "satellite": _photometric(_ortho(scene, scene.top, spec, spec.sat_size), rng, 0.06),
      "streetmap": np.clip(_ortho(scene, scene.map_rgb, spec, spec.sat_size) + 0.5, 0, 255).astype(np.uint8),
      "panorama": _photometric(render_panorama(spec, scene), rng, 0.06),
      "ground": _photometric(render_ground(spec, scene, heading), rng, 0.06),
      "uav": [_photometric(render_uav(spec, scene, cam), rng, 0.06, haze_max=0.2) for cam in cams],
      "city": int(city.index),
      "city_name": city.name,
      "coords": (float(lat), float(lon)),
      "ground_heading_deg": heading,
      "uav_cameras": cams,
  }

