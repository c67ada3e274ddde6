"""The synthetic world: determinism, geometric consistency of the views, splits, bad input."""
import math

import numpy as np
import pytest

from gleam_jax.data import synthetic
from gleam_jax.data.synthetic import render
from gleam_jax.errors import GleamError

TINY = synthetic.spec_from_name("tiny")
# Larger images than `tiny` so that a marker's edges can be located to a pixel.
SHARP = synthetic.spec_from_name("tiny", sat_size=64, query_size=64, pano_height=64)
MAGENTA = (255, 0, 255)
CYAN = (0, 255, 255)


def _mask(img, rgb):
  img = img.astype(np.int32)
  want = np.array(rgb) > 128
  return np.all(np.where(want, img > 200, img < 60), axis=-1)


def _near(mask, u, v, tol=1.0):
  """Whether `mask` has a pixel within `tol` pixels of the continuous point (u, v)."""
  r0, r1 = max(int(math.floor(v - tol)), 0), int(math.floor(v + tol)) + 1
  c0, c1 = max(int(math.floor(u - tol)), 0), int(math.floor(u + tol)) + 1
  return bool(mask[r0:r1, c0:c1].any())


def test_shapes_and_metadata():
  views = synthetic.render_location(TINY, 0)
  assert views["satellite"].shape == views["streetmap"].shape == (32, 32, 3)
  assert views["panorama"].shape == (32, 64, 3)
  assert views["ground"].shape == (32, 32, 3)
  assert len(views["uav"]) == len(views["uav_cameras"]) == TINY.uav_views
  assert all(u.shape == (32, 32, 3) and u.dtype == np.uint8 for u in views["uav"])
  assert views["satellite"].dtype == np.uint8
  assert isinstance(views["city_name"], str) and views["city"] == 0
  lat, lon = views["coords"]
  assert -90 < lat < 90 and -180 < lon < 180
  assert 0 <= views["ground_heading_deg"] < 360
  assert synthetic.MODALITIES == ("uav", "streetmap", "panorama", "ground")


def test_deterministic_per_seed():
  a = synthetic.render_location(TINY, 5)
  b = synthetic.render_location(TINY, 5)
  for k in ("satellite", "streetmap", "panorama", "ground"):
    np.testing.assert_array_equal(a[k], b[k])
  for x, y in zip(a["uav"], b["uav"]):
    np.testing.assert_array_equal(x, y)
  other = synthetic.render_location(synthetic.spec_from_name("tiny", seed=1), 5)
  assert not np.array_equal(a["satellite"], other["satellite"])
  assert not np.array_equal(a["panorama"], other["panorama"])
  # another location of the same world looks different too
  assert not np.array_equal(a["satellite"], synthetic.render_location(TINY, 8)["satellite"])


def test_views_are_not_blank():
  views = synthetic.render_location(SHARP, 3)
  for k in ("satellite", "streetmap", "panorama", "ground", "uav"):
    img = views[k][0] if k == "uav" else views[k]
    assert img.std() > 8, k  # structure, not a flat colour
  pano = views["panorama"].astype(np.float32)
  sky = pano[:4].mean(axis=(0, 1))
  assert sky[2] > sky[0] + 30  # blue zenith


def _clear_view_locations(spec, dist, below_m, count, headings=None):
  """Locations that see `dist` metres along the ground camera's heading (or along every one of
  `headings`, degrees) over nothing taller than `below_m`."""
  found = []
  for lid in range(spec.num_locations):
    _, scene = render.location_scene(spec, lid)
    t = np.arange(0.0, dist, 0.5)
    clear = True
    for heading in headings or [render.ground_heading_deg(spec, lid)]:
      h = math.radians(heading)
      clear &= scene.height.reshape(-1)[scene.cells(t * math.sin(h), t * math.cos(h))].max() < below_m
    if clear:
      found.append(lid)
    if len(found) == count:
      return found
  raise AssertionError("no location with a clear view")


@pytest.mark.parametrize("k", [0, 1])
def test_marker_appears_where_projected_in_every_view(k):
  spec = SHARP
  dist, radius, height = 55.0, 5.0, 45.0
  location_id = _clear_view_locations(spec, dist - radius, 10.0, 2)[k]
  heading = math.radians(render.ground_heading_deg(spec, location_id))
  ahead = (dist * math.sin(heading), dist * math.cos(heading))  # in the ground camera's view
  centre = (3.0, -2.0)  # where the drones look
  views = synthetic.render_location(spec, location_id, markers=[(*ahead, radius, height, MAGENTA)])
  # a second render: the central pillar would hide the first one from the street-level cameras
  low = 35.0  # below the drones, above most roofs that could hide it
  uav_views = synthetic.render_location(spec, location_id, markers=[(*centre, radius, low, CYAN)])

  for view in ("satellite", "streetmap"):
    for (x, y), rgb, imgs in ((ahead, MAGENTA, views), (centre, CYAN, uav_views)):
      uv = synthetic.project_point(spec, location_id, view, (x, y, 0.0))
      assert uv is not None and _near(_mask(imgs[view], rgb), *uv, tol=0.5), view

  # Street level: the near face of the pillar just below its top is magenta, and just above it
  # there is sky; the pillar is centred on its projected column.
  x, y = ahead
  near = (x - radius * math.sin(heading), y - radius * math.cos(heading))
  for view in ("panorama", "ground"):
    mask = _mask(views[view], MAGENTA)
    below_top = synthetic.project_point(spec, location_id, view, (*near, height - 4.0))
    above_top = synthetic.project_point(spec, location_id, view, (*near, height + 4.0))
    assert below_top is not None and above_top is not None
    assert _near(mask, *below_top, tol=0.5), view
    assert not _near(mask, *above_top, tol=0.5), view
    u, _ = synthetic.project_point(spec, location_id, view, (x, y, height - 4.0))
    row = np.flatnonzero(mask[int(below_top[1])])
    assert row.size and abs((row.min() + row.max() + 1) / 2 - u) <= 1.0, view

  # UAV: the top of the central pillar is cyan in every drone view.
  for k in range(spec.uav_views):
    uv = synthetic.project_point(spec, location_id, "uav", (*centre, low), view_index=k)
    mask = _mask(uav_views["uav"][k], CYAN)
    assert uv is not None and _near(mask, *uv, tol=0.5), k
    # and only inside the projected outline of the pillar
    outline = np.array([synthetic.project_point(
        spec, location_id, "uav", (centre[0] + radius * math.cos(a), centre[1] + radius * math.sin(a), z),
        view_index=k) for a in np.linspace(0, 2 * math.pi, 16) for z in (0.0, low)])
    vv, uu = np.nonzero(mask)
    assert uu.min() >= outline[:, 0].min() - 1.5 and uu.max() + 1 <= outline[:, 0].max() + 1.5
    assert vv.min() >= outline[:, 1].min() - 1.5 and vv.max() + 1 <= outline[:, 1].max() + 1.5


def test_panorama_is_north_aligned_and_clockwise():
  spec = SHARP
  lid = _clear_view_locations(spec, 12.0, 8.0, 1, headings=(0.0, 90.0))[0]
  w, p = spec.pano_width, spec.pano_height
  markers = [(0.0, 12.0, 2.0, 60.0, MAGENTA), (12.0, 0.0, 2.0, 60.0, CYAN)]  # north, east
  pano = synthetic.render_location(spec, lid, markers=markers)["panorama"]
  row = p // 4  # 45 deg up: above every roof nearby, below both pillars' tops
  north = np.flatnonzero(_mask(pano, MAGENTA)[row])
  east = np.flatnonzero(_mask(pano, CYAN)[row])
  assert north.size and east.size
  # north straddles column 0 (wraps around), east is centred a quarter turn to the right
  assert set(north) <= set(range(0, 4)) | set(range(w - 4, w))
  assert abs(east.mean() + 0.5 - w / 4) <= 1.0
  assert synthetic.project_point(spec, lid, "panorama", (0.0, 12.0, 2.0)) == pytest.approx((0.0, p / 2))
  assert synthetic.project_point(spec, lid, "panorama", (-12.0, 0.0, 2.0)) == pytest.approx((3 * w / 4, p / 2))
  assert synthetic.project_point(spec, lid, "panorama", (0.0, 0.0, 100.0))[1] == pytest.approx(0.0)


def test_points_outside_or_behind_project_to_none():
  spec, lid = TINY, 0
  far = spec.footprint_m
  assert synthetic.project_point(spec, lid, "satellite", (far, 0.0, 0.0)) is None
  h = math.radians(render.ground_heading_deg(spec, lid))
  behind = (-10 * math.sin(h), -10 * math.cos(h), 2.0)
  assert synthetic.project_point(spec, lid, "ground", behind) is None
  cam = synthetic.render_location(spec, lid)["uav_cameras"][0]
  x, y, z = cam["position_m"]
  assert synthetic.project_point(spec, lid, "uav", (2 * x, 2 * y, z)) is None  # behind the drone
  assert synthetic.project_point(spec, lid, "uav", (0.0, 0.0, 0.0)) == pytest.approx(
      (spec.query_size / 2, spec.query_size / 2))


def test_splits_disjoint_sized_and_cross_city_held_out():
  spec = TINY
  ids = {s: synthetic.split_location_ids(spec, s) for s in synthetic.SPLITS}
  assert len(ids["train"]) == spec.train_locations
  assert len(ids["test"]) == spec.test_locations
  assert len(ids["test_cross_city"]) == spec.cross_city_locations
  assert all(v.dtype == np.int64 for v in ids.values())
  all_ids = np.concatenate(list(ids.values()))
  assert len(np.unique(all_ids)) == len(all_ids)
  held_out = set(range(spec.num_cities - spec.cross_city, spec.num_cities))
  same = lambda s: {render.spec_lib.location_city(spec, int(i)) for i in ids[s]}
  assert same("test_cross_city") == held_out
  assert same("train") == same("test") == set(range(spec.num_cities)) - held_out
  cid = int(ids["test_cross_city"][0])
  assert synthetic.render_location(spec, cid)["city"] in held_out


def test_coords_follow_metric_offsets():
  spec = TINY
  a, b = (synthetic.render_location(spec, i) for i in (0, 2))  # same city: 2 same-area cities
  assert a["city"] == b["city"]
  city = render.city_of(spec, 0)
  (ia, ja), (ib, jb) = (render.location_cell(spec, i, city) for i in (0, 2))
  metres = math.hypot(ia - ib, ja - jb)
  dlat = (a["coords"][0] - b["coords"][0]) * 111_320
  dlon = (a["coords"][1] - b["coords"][1]) * 111_320 * math.cos(math.radians(a["coords"][0]))
  assert math.hypot(dlat, dlon) == pytest.approx(metres, rel=1e-3, abs=0.1)
  other = synthetic.render_location(spec, 1)
  assert other["city"] != a["city"] and abs(other["coords"][0] - a["coords"][0]) + abs(
      other["coords"][1] - a["coords"][1]) > 0.01


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(GleamError, match="tiny"):
    synthetic.spec_from_name("huge")
  with pytest.raises(GleamError, match="sat_size"):
    synthetic.spec_from_name("tiny", sat_size=0)
  with pytest.raises(GleamError, match="pano_height"):
    synthetic.spec_from_name("tiny", pano_height=4096)
  with pytest.raises(GleamError, match="query_size"):
    synthetic.WorldSpec(query_size=64.5)
  with pytest.raises(GleamError, match="cross_city"):
    synthetic.WorldSpec(num_cities=3, cross_city=3)
  with pytest.raises(GleamError, match="unknown WorldSpec field"):
    synthetic.spec_from_name("tiny", satsize=64)
  with pytest.raises(GleamError, match="unknown split"):
    synthetic.split_location_ids(TINY, "val")
  with pytest.raises(GleamError, match="location id"):
    synthetic.render_location(TINY, TINY.num_locations)
  with pytest.raises(GleamError, match="unknown view"):
    synthetic.project_point(TINY, 0, "aerial", (0, 0, 0))
  with pytest.raises(GleamError, match="view_index"):
    synthetic.project_point(TINY, 0, "uav", (0, 0, 0), view_index=TINY.uav_views)


def test_baseline_retrieval_on_hand_checked_inputs():
  from gleam_jax.data.synthetic import baselines
  img = np.zeros((4, 4, 3), np.uint8)
  img[:2] = (255, 0, 0)  # half red, half black
  h = baselines.colour_histogram(img)
  assert h.shape == (512,) and h[7 * 64] == pytest.approx(0.5) and h[0] == pytest.approx(0.5)
  gallery = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  queries = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.5]])  # -> 0, 1, 2 by cosine
  assert baselines.recall_at_1_cosine(queries, gallery, np.array([0, 1, 2])) == pytest.approx(1.0)
  assert baselines.recall_at_1_cosine(queries, gallery, np.array([0, 0, 0])) == pytest.approx(1 / 3)
  hg = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
  hq = np.array([[0.0, 0.6, 0.4], [0.4, 0.6, 0.0]])
  assert baselines.recall_at_1_chi2(hq, hg, np.array([1, 0])) == pytest.approx(1.0)
  table = baselines.baseline_table(TINY, "test", limit=6, log=None)
  assert set(table) == set(synthetic.MODALITIES)
  assert table["uav"]["queries"] == 6 * TINY.uav_views
  assert all(0.0 <= r["raw_cosine"] <= 1.0 for r in table.values())


def test_views_figure_is_written(tmp_path):
  from PIL import Image
  path = tmp_path / "views.png"
  synthetic.save_views_figure(TINY, 0, str(path))
  w, h = Image.open(path).size
  assert w > 2 * h > 0


def test_cameras_stand_in_open_space():
  spec = TINY
  for lid in range(spec.num_locations):
    _, scene = render.location_scene(spec, lid)
    near = scene.height[scene.i0 - 2:scene.i0 + 2, scene.j0 - 2:scene.j0 + 2]
    assert near.max() < 0.3, lid  # street cameras: 2 m of open ground around
    for cam in render.uav_cameras(spec, lid):
      x, y, z = cam["position_m"]
      i, j = int(scene.i0 - y), int(scene.j0 + x)
      below = scene.height[max(i - 20, 0):i + 21, max(j - 20, 0):j + 21]
      assert z >= below.max() + render.UAV_CLEARANCE_M - 1e-6, lid
      assert spec.uav_altitude_m[0] <= z
