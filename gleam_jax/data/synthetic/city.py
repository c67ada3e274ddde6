"""Procedural cities rasterised into 1 m cells: a 2.5-D heightfield with colour and class rasters.

A city is built once per process (`build_city` is cached) and every view of every location in it
is a resampling (satellite, streetmap) or a ray march (panorama, ground, uav) of these rasters.
Raster frame: row i grows to the south, column j to the east; cell (i, j) covers 1 m x 1 m.

Each city draws an archetype (downtown grid, suburb, old town, industrial grid, garden city) and
perturbs it: road layout (rotated grid or organic jittered lattice), block and lot sizes, building
heights, roof palette (walls take a lighter, desaturated tint of their own roof), river, parks,
plazas, tree density. Everything is drawn from `np.random.default_rng((seed, city))`.
"""
import dataclasses
import functools
import math

import numpy as np

from gleam_jax.data.synthetic.spec import VIEW_MARGIN_M

# Classes of the `cls` raster.
LAND, PARK, FIELD, WATER, PLAZA, FOOTPATH, RESIDENTIAL, PRIMARY, MOTORWAY, BUILDING, TREE, MARKER = range(12)
CLASS_NAMES = ("land", "park", "field", "water", "plaza", "footpath", "residential", "primary",
               "motorway", "building", "tree", "marker")
ROAD_CLASSES = (FOOTPATH, RESIDENTIAL, PRIMARY, MOTORWAY)
ROAD_WIDTH_M = {FOOTPATH: 2.0, RESIDENTIAL: 7.0, PRIMARY: 12.0, MOTORWAY: 22.0}
LOCATION_CLASSES = (FOOTPATH, RESIDENTIAL, PRIMARY, PLAZA)  # where a street-level camera may stand
MAX_BUILDING_M = 60.0
BLOCK_M = 32
LOCATION_TILE_M = 40  # locations are spread over tiles of this size (see render.location_cell)
ROOF_JITTER = 20.0  # per-building spread of roof colour around the city palette

# Street-map palette (OpenStreetMap-like, the same in every city).
MAP_RGB = np.array([
    (242, 239, 233),  # land
    (200, 250, 204),  # park
    (238, 240, 213),  # field
    (170, 211, 223),  # water
    (221, 221, 232),  # plaza
    (250, 128, 114),  # footpath
    (255, 255, 255),  # residential
    (252, 214, 164),  # primary
    (232, 146, 162),  # motorway
    (217, 208, 201),  # building
    (200, 250, 204),  # tree (not drawn on the map; only used if a tree stands on bare land)
    (255, 0, 255),  # marker
], np.uint8)
MAP_BUILDING_OUTLINE = np.array((190, 176, 166), np.uint8)
MAP_ROAD_CASING = np.array((190, 185, 180), np.uint8)

CITY_NAMES = ("Aldmere", "Brisport", "Calderon", "Dunhaven", "Eastwick", "Farrowgate", "Glenmoor",
              "Harlow Bay", "Isenford", "Juniper Falls", "Kestrel", "Lowenburg", "Marisol",
              "Northcliff", "Oakhurst", "Pellston", "Quarrytown", "Rivenmark", "Saltash", "Thornbury")

SUN_AZIMUTH_DEG = 200.0  # compass bearing towards the sun (clockwise from north)
SUN_ELEVATION_DEG = 50.0


@dataclasses.dataclass
class CityStyle:
  archetype: str
  layout: str  # 'grid' or 'organic'
  block_m: tuple
  grid_angle_deg: float
  lot_m: tuple  # building frontage along the road
  depth_m: tuple
  setback_m: tuple
  height_median_m: float
  height_sigma: float
  fill: float  # chance that a lot gets a building
  gable: float  # share of houses with gable roofs
  trees: float  # tree density (relative)
  parks: float  # parks per hectare of urban area x 100
  plazas: float  # chance that an intersection gets a plaza
  river: bool
  roof_palette: np.ndarray  # (k, 3) float
  wall_tint: np.ndarray  # (3,) float
  land_rgb: np.ndarray
  asphalt_rgb: np.ndarray


ARCHETYPES = {
    "downtown": dict(layout="grid", block_m=(70, 110), lot_m=(16, 34), depth_m=(16, 30),
                     setback_m=(0.5, 2.5), height_median_m=24.0, height_sigma=0.45, fill=0.9,
                     gable=0.0, trees=0.35, parks=0.6, plazas=0.12,
                     roof=[(120, 125, 130), (70, 75, 82), (200, 200, 195), (90, 130, 140), (150, 110, 90),
                           (60, 90, 120), (175, 165, 120)]),
    "suburb": dict(layout="organic", block_m=(80, 120), lot_m=(12, 18), depth_m=(9, 13),
                   setback_m=(4.0, 8.0), height_median_m=6.5, height_sigma=0.25, fill=0.8, gable=0.85,
                   trees=1.0, parks=0.8, plazas=0.0,
                   roof=[(160, 70, 50), (110, 60, 45), (80, 80, 90), (60, 80, 120), (185, 110, 70),
                         (140, 140, 135), (50, 110, 80)]),
    "oldtown": dict(layout="organic", block_m=(50, 80), lot_m=(8, 15), depth_m=(10, 16),
                    setback_m=(0.0, 1.0), height_median_m=12.0, height_sigma=0.3, fill=0.95, gable=0.6,
                    trees=0.3, parks=0.5, plazas=0.3,
                    roof=[(190, 95, 55), (165, 80, 50), (200, 140, 80), (140, 70, 55), (110, 100, 95),
                          (215, 170, 110)]),
    "industrial": dict(layout="grid", block_m=(110, 160), lot_m=(25, 55), depth_m=(20, 45),
                       setback_m=(4.0, 10.0), height_median_m=9.0, height_sigma=0.3, fill=0.75,
                       gable=0.0, trees=0.25, parks=0.3, plazas=0.0,
                       roof=[(210, 210, 210), (170, 175, 180), (120, 140, 160), (160, 90, 70), (90, 95, 100),
                             (230, 225, 200)]),
    "garden": dict(layout="grid", block_m=(80, 120), lot_m=(12, 22), depth_m=(10, 18),
                   setback_m=(3.0, 7.0), height_median_m=11.0, height_sigma=0.5, fill=0.7, gable=0.4,
                   trees=0.8, parks=1.6, plazas=0.08,
                   roof=[(90, 140, 80), (180, 80, 60), (70, 110, 170), (220, 200, 120), (150, 150, 160),
                         (120, 70, 120), (200, 120, 90)]),
}
ARCHETYPE_ORDER = ("downtown", "suburb", "oldtown", "industrial", "garden")


def make_style(seed, city):
  rng = np.random.default_rng((seed, 7, city))
  order = list(ARCHETYPE_ORDER)
  np.random.default_rng((seed, 8)).shuffle(order)
  archetype = order[city % len(order)]
  a = ARCHETYPES[archetype]
  jitter = lambda lo_hi, s=0.15: tuple(float(v * (1 + rng.uniform(-s, s))) for v in lo_hi)
  palette = np.array(a["roof"], np.float32)
  palette = np.clip(palette * rng.uniform(0.85, 1.15, (1, 3)) + rng.normal(0, 10, palette.shape), 20, 240)
  return CityStyle(
      archetype=archetype, layout=a["layout"], block_m=jitter(a["block_m"]),
      grid_angle_deg=float(rng.uniform(0, 90)), lot_m=jitter(a["lot_m"]), depth_m=jitter(a["depth_m"]),
      setback_m=a["setback_m"], height_median_m=a["height_median_m"] * float(rng.uniform(0.8, 1.25)),
      height_sigma=a["height_sigma"], fill=a["fill"], gable=a["gable"], trees=a["trees"],
      parks=a["parks"], plazas=a["plazas"], river=bool(rng.uniform() < 0.6), roof_palette=palette,
      wall_tint=np.array((205, 198, 185), np.float32) + rng.normal(0, 12, 3).astype(np.float32),
      land_rgb=np.array((110, 125, 80), np.float32) + rng.normal(0, 8, 3).astype(np.float32),
      asphalt_rgb=np.array((95, 95, 98), np.float32) + rng.normal(0, 6, 3).astype(np.float32))


@dataclasses.dataclass
class City:
  index: int
  name: str
  style: CityStyle
  origin_latlon: tuple  # (lat, lon) of the raster's south-west corner
  height: np.ndarray  # (N, N) float32 metres
  # Colour rasters are RGBA uint8 (alpha unused) so that one uint32 gather fetches a colour.
  top: np.ndarray  # (N, N, 4): colour seen from above (shadows baked in)
  side: np.ndarray  # (N, N, 4): colour of the vertical faces of a cell (lit by facing)
  cls: np.ndarray  # (N, N) uint8
  map_rgb: np.ndarray  # (N, N, 4): the street-map rendering
  candidates: np.ndarray  # flat indices of cells where a location may be, grouped by tile
  tile_starts: np.ndarray  # candidates[tile_starts[t]:tile_starts[t + 1]] lie in tile t
  tile_order: np.ndarray  # a seeded permutation of the tiles: the k-th location uses tile_order[k]
  block_max: np.ndarray  # (N/BLOCK_M, N/BLOCK_M) highest point of each block, to bound ray marches


class _Canvas:
  """The rasters being drawn, and stamping of rotated rectangles, discs and thick segments."""

  def __init__(self, n, land_rgb):
    self.n = n
    self.height = np.zeros((n, n), np.float32)
    self.top = np.empty((n, n, 3), np.float32)
    self.top[:] = land_rgb
    self.side = np.zeros((n, n, 3), np.float32)
    self.cls = np.full((n, n), LAND, np.uint8)
    self.angle = np.zeros((n, n), np.float32)  # building orientation, for wall normals

  def window(self, cx, cy, radius):
    i0, i1 = max(int(cy - radius), 0), min(int(cy + radius) + 2, self.n)
    j0, j1 = max(int(cx - radius), 0), min(int(cx + radius) + 2, self.n)
    if i0 >= i1 or j0 >= j1:
      return None
    dy = (np.arange(i0, i1, dtype=np.float32) + np.float32(0.5 - cy))[:, None]
    dx = (np.arange(j0, j1, dtype=np.float32) + np.float32(0.5 - cx))[None, :]
    return (slice(i0, i1), slice(j0, j1)), dx, dy

  def rect(self, cx, cy, half_u, half_v, angle):
    """Mask of a rectangle rotated by `angle` (radians, raster frame): (slices, mask, u, v)."""
    w = self.window(cx, cy, math.hypot(half_u, half_v) + 1)
    if w is None:
      return None
    sl, dx, dy = w
    c, s = math.cos(angle), math.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    return sl, (np.abs(u) <= half_u) & (np.abs(v) <= half_v), u, v

  def segment(self, x0, y0, x1, y1, half_width):
    """Mask of a thick segment: (slices, mask, t along it in metres)."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    length = math.hypot(x1 - x0, y1 - y0)
    angle = math.atan2(y1 - y0, x1 - x0)
    r = self.rect(cx, cy, length / 2 + half_width, half_width, angle)
    if r is None:
      return None
    sl, _, u, v = r
    # round caps: distance to the segment
    uc = np.clip(u, -length / 2, length / 2)
    mask = (u - uc) ** 2 + v ** 2 <= half_width ** 2
    return sl, mask, u + length / 2


def _class_set(*classes):
  """A lookup table: `_class_set(A, B)[cls]` is True where cls is A or B (faster than np.isin)."""
  table = np.zeros(256, bool)
  table[list(classes)] = True
  return table


def _chunks(x0, y0, x1, y1, max_len=50.0):
  length = math.hypot(x1 - x0, y1 - y0)
  n = max(1, int(math.ceil(length / max_len)))
  for k in range(n):
    a, b = k / n, (k + 1) / n
    yield x0 + (x1 - x0) * a, y0 + (y1 - y0) * a, x0 + (x1 - x0) * b, y0 + (y1 - y0) * b


def _road_network(style, rng, n):
  """Road segments (x0, y0, x1, y1, cls) in the raster frame."""
  segs = []
  c = n / 2
  if style.layout == "grid":
    th = math.radians(style.grid_angle_deg)
    ex, ey = (math.cos(th), math.sin(th)), (-math.sin(th), math.cos(th))
    reach = n * 0.75
    lines = []
    for axis in (0, 1):
      pos, k = -reach + rng.uniform(0, style.block_m[1]), 0
      while pos < reach:
        cls = PRIMARY if k % int(rng.integers(3, 6)) == 0 else RESIDENTIAL
        lines.append((axis, pos, cls))
        pos += rng.uniform(*style.block_m)
        k += 1
    cross = {0: sorted(p for a, p, _ in lines if a == 1), 1: sorted(p for a, p, _ in lines if a == 0)}
    motorway = int(rng.integers(len(lines))) if rng.uniform() < 0.5 else -1
    for li, (axis, pos, cls) in enumerate(lines):
      if li == motorway:
        cls = MOTORWAY
      stops = [-reach] + cross[axis] + [reach]
      for a, b in zip(stops[:-1], stops[1:]):
        if cls == RESIDENTIAL and rng.uniform() < 0.12:
          continue  # a dead end: blocks merge, which makes places tell apart
        pa = (a, pos) if axis == 0 else (pos, a)
        pb = (b, pos) if axis == 0 else (pos, b)
        to_xy = lambda p: (c + p[0] * ex[0] + p[1] * ey[0], c + p[0] * ex[1] + p[1] * ey[1])
        segs.append((*to_xy(pa), *to_xy(pb), cls))
  else:
    b = float(np.mean(style.block_m))
    m = int(n / b) + 3
    th = rng.uniform(0, math.pi / 2)
    ct, st = math.cos(th), math.sin(th)
    k = np.arange(m) - m / 2
    gx, gy = np.meshgrid(k * b, k * b)
    gx = gx + rng.uniform(-0.3, 0.3, gx.shape) * b
    gy = gy + rng.uniform(-0.3, 0.3, gy.shape) * b
    nx, ny = c + gx * ct - gy * st, c + gx * st + gy * ct
    primary_rows = set(rng.choice(m, size=max(1, m // 5), replace=False).tolist())
    primary_cols = set(rng.choice(m, size=max(1, m // 5), replace=False).tolist())
    for r in range(m):
      for q in range(m):
        if q + 1 < m:  # along a row
          cls = PRIMARY if r in primary_rows else RESIDENTIAL
          if cls == PRIMARY or rng.uniform() < 0.85:
            segs.append((nx[r, q], ny[r, q], nx[r, q + 1], ny[r, q + 1], cls))
        if r + 1 < m:
          cls = PRIMARY if q in primary_cols else RESIDENTIAL
          if cls == PRIMARY or rng.uniform() < 0.85:
            segs.append((nx[r, q], ny[r, q], nx[r + 1, q], ny[r + 1, q], cls))
    if rng.uniform() < 0.5:  # a curved motorway across the city
      phase, amp, wl = rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.2) * n, rng.uniform(0.8, 1.6) * n
      ang = rng.uniform(0, math.pi)
      ts = np.linspace(-0.8 * n, 0.8 * n, 60)
      off = amp * np.sin(2 * math.pi * ts / wl + phase)
      px = c + ts * math.cos(ang) - off * math.sin(ang)
      py = c + ts * math.sin(ang) + off * math.cos(ang)
      for q in range(len(ts) - 1):
        segs.append((px[q], py[q], px[q + 1], py[q + 1], MOTORWAY))
  return segs


def _draw_fields(cv, rng, urban):
  """A patchwork of striped fields outside the urban area."""
  size = rng.uniform(60, 110)
  th = rng.uniform(0, math.pi)
  out = np.nonzero(~urban)
  yy, xx = out[0].astype(np.float32), out[1].astype(np.float32)
  u = xx * np.float32(math.cos(th)) + yy * np.float32(math.sin(th))
  v = yy * np.float32(math.cos(th)) - xx * np.float32(math.sin(th))
  fid = (np.floor(u / size).astype(np.int64) * 7919 + np.floor(v / (size * 1.3)).astype(np.int64) * 104729)
  crops = np.array([(175, 160, 95), (120, 150, 70), (150, 120, 80), (95, 130, 60), (190, 180, 120)], np.float32)
  pick = (fid * 2654435761 + int(rng.integers(1 << 30))) % len(crops)
  stripes = 1.0 + 0.08 * np.sin(np.float32(2 * math.pi / 4.0) * np.where(pick % 2 == 0, u, v))
  cv.top[out] = crops[pick] * stripes[:, None]
  cv.cls[out] = FIELD


def _draw_river(cv, rng):
  n = cv.n
  width = rng.uniform(18, 40)
  ang = rng.uniform(0, math.pi)
  phase, amp, wl = rng.uniform(0, 2 * math.pi), rng.uniform(0.04, 0.15) * n, rng.uniform(0.6, 1.5) * n
  shift = rng.uniform(-0.25, 0.25) * n
  ts = np.linspace(-0.8 * n, 0.8 * n, 80)
  off = shift + amp * np.sin(2 * math.pi * ts / wl + phase)
  px = n / 2 + ts * math.cos(ang) - off * math.sin(ang)
  py = n / 2 + ts * math.sin(ang) + off * math.cos(ang)
  water = np.array((55, 85, 110), np.float32)
  for q in range(len(ts) - 1):
    r = cv.segment(px[q], py[q], px[q + 1], py[q + 1], width / 2)
    if r is not None:
      sl, mask, _ = r
      cv.cls[sl][mask] = WATER
      cv.top[sl][mask] = water


def _draw_parks(cv, rng, style, urban_cells):
  n = cv.n
  count = rng.poisson(style.parks * urban_cells / 1e4 / 100 * 4)
  grass = np.array((85, 140, 70), np.float32)
  parks = []
  for _ in range(count):
    cx, cy = rng.uniform(0.1, 0.9, 2) * n
    hu, hv = rng.uniform(20, 60), rng.uniform(20, 50)
    ang = math.radians(style.grid_angle_deg) if style.layout == "grid" else rng.uniform(0, math.pi)
    r = cv.rect(cx, cy, hu, hv, ang)
    if r is None:
      continue
    sl, mask, u, v = r
    mask &= _class_set(LAND, FIELD)[cv.cls[sl]]
    cv.cls[sl][mask] = PARK
    cv.top[sl][mask] = grass
    parks.append((cx, cy, hu, hv, ang))
    if rng.uniform() < 0.45:  # a pond
      rr = cv.rect(cx + rng.uniform(-0.3, 0.3) * hu, cy, hu * 0.35, hv * 0.3, ang + rng.uniform(-0.5, 0.5))
      if rr is not None:
        sl2, m2, u2, v2 = rr
        m2 &= (u2 / (hu * 0.35)) ** 2 + (v2 / (hv * 0.3)) ** 2 <= 1
        m2 &= cv.cls[sl2] == PARK
        cv.cls[sl2][m2] = WATER
        cv.top[sl2][m2] = (60, 95, 120)
  return parks


def _draw_park_paths(cv, rng, parks):
  path = np.array((185, 170, 140), np.float32)
  for cx, cy, hu, hv, ang in parks:
    c, s = math.cos(ang), math.sin(ang)
    for _ in range(int(rng.integers(1, 4))):
      a, b = rng.uniform(-1, 1, 2), rng.uniform(-1, 1, 2)
      a[int(rng.integers(2))] = rng.choice((-1, 1))
      p0 = (cx + a[0] * hu * c - a[1] * hv * s, cy + a[0] * hu * s + a[1] * hv * c)
      p1 = (cx - b[0] * hu * c + b[1] * hv * s, cy - b[0] * hu * s - b[1] * hv * c)
      r = cv.segment(*p0, *p1, 1.0)
      if r is not None:
        sl, mask, _ = r
        mask &= cv.cls[sl] == PARK
        cv.cls[sl][mask] = FOOTPATH
        cv.top[sl][mask] = path


def _draw_roads(cv, style, segs):
  colours = {FOOTPATH: np.array((185, 170, 140), np.float32), RESIDENTIAL: style.asphalt_rgb * 1.12,
             PRIMARY: style.asphalt_rgb, MOTORWAY: style.asphalt_rgb * 0.8}
  marking = np.array((225, 225, 215), np.float32)
  for cls in (FOOTPATH, RESIDENTIAL, PRIMARY, MOTORWAY):
    for x0, y0, x1, y1, k in segs:
      if k != cls:
        continue
      for ch in _chunks(x0, y0, x1, y1):
        r = cv.segment(*ch, ROAD_WIDTH_M[cls] / 2)
        if r is None:
          continue
        sl, mask, t = r
        cv.cls[sl][mask] = cls
        cv.top[sl][mask] = colours[cls]
        cv.height[sl][mask] = 0.0
        if cls in (PRIMARY, MOTORWAY):  # dashed centre line
          rr = cv.segment(*ch, 0.5)
          if rr is not None:
            sl2, m2, t2 = rr
            m2 &= (t2 % 6.0) < 3.0
            cv.top[sl2][m2] = marking


def _draw_plazas(cv, rng, style, segs):
  if style.plazas <= 0:
    return
  paving = np.array((190, 180, 165), np.float32)
  for x0, y0, x1, y1, k in segs:
    if k == MOTORWAY or rng.uniform() > style.plazas * 0.5:
      continue
    ang = math.atan2(y1 - y0, x1 - x0)
    half = rng.uniform(10, 20)
    side = rng.choice((-1, 1))
    along, across = ROAD_WIDTH_M[k] / 2 + half, side * (ROAD_WIDTH_M[k] / 2 + half)  # beside the road
    cx = x0 + along * math.cos(ang) - across * math.sin(ang)
    cy = y0 + along * math.sin(ang) + across * math.cos(ang)
    r = cv.rect(cx, cy, half, half, ang)
    if r is None:
      continue
    sl, mask, u, v = r
    mask &= cv.cls[sl] == LAND
    tiles = ((np.floor(u / 3) + np.floor(v / 3)) % 2)[mask]
    cv.cls[sl][mask] = PLAZA
    cv.top[sl][mask] = paving * (0.94 + 0.06 * tiles)[:, None]
    # a monument in the middle
    rr = cv.rect(cx, cy, 1.5, 1.5, ang)
    if rr is not None:
      sl2, m2, _, _ = rr
      m2 &= cv.cls[sl2] == PLAZA
      cv.height[sl2][m2] = rng.uniform(4, 9)
      cv.top[sl2][m2] = (150, 140, 120)
      cv.side[sl2][m2] = (120, 112, 100)
      cv.cls[sl2][m2] = BUILDING


def _draw_buildings(cv, rng, style, segs, urban):
  sun = _sun_vector()
  for x0, y0, x1, y1, k in segs:
    if k in (MOTORWAY, FOOTPATH):
      continue
    length = math.hypot(x1 - x0, y1 - y0)
    if length < 12:
      continue
    ang = math.atan2(y1 - y0, x1 - x0)
    dx, dy = (x1 - x0) / length, (y1 - y0) / length
    for side in (-1, 1):
      nx, ny = -dy * side, dx * side
      t = ROAD_WIDTH_M[k] / 2 + 3.0
      while t < length - 8.0:
        w = rng.uniform(*style.lot_m)
        cx0, cy0 = x0 + dx * (t + w / 2), y0 + dy * (t + w / 2)
        inside = urban[min(max(int(cy0), 0), cv.n - 1), min(max(int(cx0), 0), cv.n - 1)]
        if rng.uniform() < style.fill * (1.0 if inside else 0.08):
          depth = rng.uniform(*style.depth_m)
          setback = rng.uniform(*style.setback_m)
          off = ROAD_WIDTH_M[k] / 2 + setback + depth / 2
          _building(cv, rng, style, cx0 + nx * off, cy0 + ny * off, w / 2 - rng.uniform(0.5, 2.0),
                    depth / 2, ang, sun)
        t += w


def _building(cv, rng, style, cx, cy, hu, hv, ang, sun):
  if hu < 2.5 or hv < 2.5:
    return
  r = cv.rect(cx, cy, hu + 1.0, hv + 1.0, ang)
  if r is None:
    return
  sl, mask, u, v = r
  if not np.all(cv.cls[sl][mask] == LAND):
    return  # would touch a road, water, park, plaza or another building
  mask = (np.abs(u) <= hu) & (np.abs(v) <= hv)
  height = float(np.clip(style.height_median_m * math.exp(rng.normal(0, style.height_sigma)), 3.0,
                         MAX_BUILDING_M))
  # the city's palette sets the style; each building varies it, so that buildings tell apart
  roof = style.roof_palette[int(rng.integers(len(style.roof_palette)))] * rng.uniform(0.8, 1.2)
  roof = np.clip(roof + rng.normal(0, ROOF_JITTER, 3), 15, 245).astype(np.float32)
  wall = np.clip(0.5 * roof + 0.5 * style.wall_tint, 0, 255)
  h = np.full(u.shape, height, np.float32)
  shade = np.ones(u.shape, np.float32)
  if rng.uniform() < style.gable and min(hu, hv) < 9:
    # a ridge along the long axis, roof pitch ~30 deg; the slope facing the sun is brighter
    across, half = (v, hv) if hu >= hv else (u, hu)
    h = height + 0.55 * (half - np.abs(across))
    normal_sign = np.sign(across)
    # horizontal normal of each slope in the raster frame
    if hu >= hv:
      n_x, n_y = -math.sin(ang) * normal_sign, math.cos(ang) * normal_sign
    else:
      n_x, n_y = math.cos(ang) * normal_sign, math.sin(ang) * normal_sign
    shade = 0.85 + 0.3 * (n_x * sun[0] + n_y * sun[1])
  else:
    edge = (np.abs(u) > hu - 1.0) | (np.abs(v) > hv - 1.0)
    shade = np.where(edge, 0.82, 1.0).astype(np.float32)
  cv.height[sl][mask] = h[mask]
  cv.top[sl][mask] = roof * shade[mask][:, None]
  cv.side[sl][mask] = wall
  cv.cls[sl][mask] = BUILDING
  cv.angle[sl][mask] = ang


def _draw_trees(cv, rng, style, segs, parks):
  spots = []
  for x0, y0, x1, y1, k in segs:  # street trees
    if k != RESIDENTIAL or rng.uniform() > style.trees * 0.7:
      continue
    length = math.hypot(x1 - x0, y1 - y0)
    dx, dy = (x1 - x0) / max(length, 1e-6), (y1 - y0) / max(length, 1e-6)
    spacing = rng.uniform(8, 14)
    side_off = ROAD_WIDTH_M[k] / 2 + 2.5
    for side in (-1, 1):
      for t in np.arange(spacing / 2, length, spacing):
        spots.append((x0 + dx * t - dy * side * side_off, y0 + dy * t + dx * side * side_off, 2.2))
  for cx, cy, hu, hv, ang in parks:  # park trees in clusters
    for _ in range(int(rng.poisson(hu * hv / 80 * max(style.trees, 0.5)))):
      a, b = rng.uniform(-1, 1, 2)
      c, s = math.cos(ang), math.sin(ang)
      spots.append((cx + a * hu * c - b * hv * s, cy + a * hu * s + b * hv * c, 3.5))
  n = cv.n
  for _ in range(int(rng.poisson(style.trees * n * n / 900))):  # gardens and wild trees
    x, y = rng.uniform(0, n, 2)
    spots.append((x, y, 3.0))
  greens = np.array([(60, 100, 45), (45, 85, 40), (80, 115, 50), (70, 95, 60)], np.float32)
  sun = _sun_vector()
  for x, y, rmean in spots:
    i, j = int(y), int(x)
    if not (0 <= i < n and 0 <= j < n) or cv.cls[i, j] not in (LAND, PARK, FIELD):
      continue
    radius = float(np.clip(rng.normal(rmean, 0.7), 1.5, 5.0))
    top_h = float(np.clip(rng.normal(3.0 * radius, 1.5), 4.0, 16.0))
    r = cv.rect(x, y, radius, radius, 0.0)
    if r is None:
      continue
    sl, mask, u, v = r
    d2 = (u * u + v * v) / (radius * radius)
    mask = (d2 <= 1.0) & _class_set(LAND, PARK, FIELD, TREE)[cv.cls[sl]]
    dome = np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))
    h = 0.45 * top_h + 0.55 * top_h * dome
    green = greens[int(rng.integers(len(greens)))] * rng.uniform(0.85, 1.15)
    light = 0.8 + 0.35 * (u * sun[0] + v * sun[1]) / radius
    higher = mask & (h > cv.height[sl])
    cv.height[sl][higher] = h[higher]
    cv.top[sl][higher] = green * light[higher][:, None]
    cv.side[sl][higher] = green * 0.7
    cv.cls[sl][higher] = TREE


def _sun_vector():
  """Horizontal unit vector towards the sun in the raster frame (x east, y south)."""
  az = math.radians(SUN_AZIMUTH_DEG)
  return math.sin(az), -math.cos(az)


def _shadows(height):
  """Cells in the shadow of the heightfield, swept row by row away from the (southern) sun."""
  sx, sy = _sun_vector()
  assert sy > abs(sx), "the sweep assumes the sun is within 45 deg of south"
  slope = sx / sy  # columns moved per row towards the sun
  drop = math.hypot(1.0, slope) * math.tan(math.radians(SUN_ELEVATION_DEG))
  n = height.shape[0]
  shadow_h = np.empty_like(height)
  shadow_h[-1] = height[-1]
  prev_off = 0
  for i in range(n - 2, -1, -1):
    off = int(round((n - 1 - i) * slope))
    step = off - prev_off  # the sun-side neighbour of (i, j) is (i + 1, j + step)
    prev_off = off
    src = shadow_h[i + 1]
    if step > 0:
      src = np.concatenate([src[step:], np.full(step, src[-1])])
    elif step < 0:
      src = np.concatenate([np.full(-step, src[0]), src[:step]])
    np.maximum(height[i], src - drop, out=shadow_h[i])
  return shadow_h > height + 0.3


def _wall_shading(cv):
  """Lights each building wall by how its face turns to the sun (face normal from the building's
  orientation, picked to agree with the staircase normal of the raster boundary)."""
  bi, bj = np.nonzero(cv.cls == BUILDING)
  h = cv.height
  pad = np.pad(h, 1, mode="edge")
  hb = h[bi, bj] - 1.0
  lower = lambda di, dj: (pad[bi + 1 + di, bj + 1 + dj] < hb).astype(np.float32)
  ns_x = lower(0, 1) - lower(0, -1)
  ns_y = lower(1, 0) - lower(-1, 0)
  ang = cv.angle[bi, bj]
  best = np.full(bi.shape, -np.inf, np.float32)
  face_x = np.zeros(bi.shape, np.float32)
  face_y = np.zeros(bi.shape, np.float32)
  for k in range(4):
    fx, fy = np.cos(ang + k * math.pi / 2), np.sin(ang + k * math.pi / 2)
    dot = fx * ns_x + fy * ns_y
    better = dot > best
    best = np.where(better, dot, best)
    face_x = np.where(better, fx, face_x)
    face_y = np.where(better, fy, face_y)
  sx, sy = _sun_vector()
  lit = np.clip(face_x * sx + face_y * sy, 0, 1) * math.cos(math.radians(SUN_ELEVATION_DEG))
  cv.side[bi, bj] *= (0.55 + 0.6 * lit)[:, None]


def _street_map(ground_cls):
  """Flat map colours: land use, roads with a casing, buildings with an outline; no trees."""
  rgb = MAP_RGB[ground_cls].copy()
  pad = np.pad(ground_cls, 1, mode="edge")
  neighbours = [pad[1:-1, 2:], pad[1:-1, :-2], pad[2:, 1:-1], pad[:-2, 1:-1]]
  roads = _class_set(RESIDENTIAL, PRIMARY, MOTORWAY)
  is_road = roads[ground_cls]
  near_road = np.zeros_like(is_road)
  for nb in neighbours:
    near_road |= roads[nb]
  rgb[near_road & ~is_road & (ground_cls != BUILDING)] = MAP_ROAD_CASING
  building = ground_cls == BUILDING
  outline = np.zeros_like(building)
  for nb in neighbours:
    outline |= nb != BUILDING
  rgb[building & outline] = MAP_BUILDING_OUTLINE
  return rgb


@functools.lru_cache(maxsize=16)
def build_city(seed, city, size_m):
  """The rasters of city `city` of the world with `seed` (cached per process)."""
  rng = np.random.default_rng((seed, 11, city))
  style = make_style(seed, city)
  n = int(size_m)
  cv = _Canvas(n, style.land_rgb)
  yy = np.arange(n, dtype=np.float32)[:, None] - n / 2
  xx = np.arange(n, dtype=np.float32)[None, :] - n / 2
  ang = np.arctan2(yy, xx)
  wobble = 1 + 0.12 * np.sin(3 * ang + rng.uniform(0, 6.3)) + 0.06 * np.sin(5 * ang + rng.uniform(0, 6.3))
  urban = np.hypot(xx, yy) < 0.44 * n * wobble
  del yy, xx, ang, wobble
  _draw_fields(cv, rng, urban)
  if style.river:
    _draw_river(cv, rng)
  parks = _draw_parks(cv, rng, style, int(urban.sum()))
  segs = _road_network(style, rng, n)
  _draw_roads(cv, style, segs)
  _draw_park_paths(cv, rng, parks)
  _draw_plazas(cv, rng, style, segs)
  _draw_buildings(cv, rng, style, segs, urban)
  ground_cls = cv.cls.copy()
  _draw_trees(cv, rng, style, segs, parks)
  _wall_shading(cv)
  # texture: per-cell noise (grass and trees grainier than asphalt) and patchy land
  sigma = np.array([9, 8, 7, 4, 4, 5, 3, 3, 3, 4, 12, 0], np.float32)[cv.cls]
  noise = rng.standard_normal((n, n), np.float32) * sigma
  patches = rng.standard_normal((n // 16 + 1, n // 16 + 1), np.float32)
  patches = np.repeat(np.repeat(patches, 16, 0), 16, 1)[:n, :n]
  soft = _class_set(LAND, PARK, FIELD)[cv.cls]
  cv.top += (noise + np.where(soft, 7.0 * patches, 0.0))[..., None]
  shadow = _shadows(cv.height)
  cv.top[shadow] *= np.array((0.55, 0.58, 0.68), np.float32)
  # faces of non-building cells show the cell's top colour (tree crowns, slopes, roads)
  no_side = ~_class_set(BUILDING, TREE)[cv.cls]
  cv.side[no_side] = cv.top[no_side]
  candidates = np.flatnonzero(_class_set(*LOCATION_CLASSES)[ground_cls] & _open_ground(cv.height)
                              & _interior(n))
  candidates, tile_starts, tile_order = _tiles(candidates, n, rng)
  names = list(CITY_NAMES)
  np.random.default_rng((seed, 9)).shuffle(names)
  lat = float(rng.uniform(-45, 60))
  lon = float(rng.uniform(-170, 170))
  return City(index=city, name=names[city % len(names)] + ("" if city < len(names) else f" {city}"),
              style=style, origin_latlon=(lat, lon), height=cv.height,
              top=_rgba(cv.top), side=_rgba(cv.side), cls=cv.cls, map_rgb=_rgba(_street_map(ground_cls)),
              candidates=candidates, tile_starts=tile_starts, tile_order=tile_order,
              block_max=_block_max(cv.height))


def _block_max(height):
  n = height.shape[0]
  m = -(-n // BLOCK_M) * BLOCK_M
  padded = np.zeros((m, m), np.float32)
  padded[:n, :n] = height
  return padded.reshape(m // BLOCK_M, BLOCK_M, m // BLOCK_M, BLOCK_M).max(axis=(1, 3))


def _open_ground(height, clearance=2):
  """Cells with flat ground (no tree, building or monument) within `clearance` cells: a street
  camera stands at a cell corner, and nothing should stand on it."""
  out = height < 0.3
  for axis in (0, 1):  # a square erosion is two separable ones
    free = out.copy()
    for d in range(1, clearance + 1):
      lo = [slice(None)] * 2
      hi = [slice(None)] * 2
      lo[axis], hi[axis] = slice(None, -d), slice(d, None)
      out[tuple(lo)] &= free[tuple(hi)]
      out[tuple(hi)] &= free[tuple(lo)]
  return out


def _rgba(rgb):
  out = np.full(rgb.shape[:2] + (4,), 255, np.uint8)
  out[..., :3] = np.clip(rgb, 0, 255)
  return out


def _tiles(candidates, n, rng):
  """Groups candidate cells by LOCATION_TILE_M tiles (tiles without a candidate dropped)."""
  per_row = -(-n // LOCATION_TILE_M)
  i, j = np.divmod(candidates, n)
  tile = (i // LOCATION_TILE_M) * per_row + j // LOCATION_TILE_M
  order = np.argsort(tile, kind="stable")
  candidates, tile = candidates[order], tile[order]
  starts = np.flatnonzero(np.diff(tile, prepend=-1))
  tile_starts = np.append(starts, len(candidates))
  return candidates, tile_starts, rng.permutation(len(starts))


def _interior(n):
  m = int(VIEW_MARGIN_M) + 1
  inside = np.zeros((n, n), bool)
  inside[m:n - m, m:n - m] = True
  return inside
