"""Augmentations keep (query, satellite) pairs aligned; photometric changes and preparation."""
import numpy as np
import pytest

from gleam_jax.data import augment
from gleam_jax.data.config import data_config, query_layout
from gleam_jax.errors import GleamError

S, PH = 48, 32  # satellite side; panorama height (width 2 * PH)


def marker_pair(azimuth_deg, radius=14):
  """A north-up satellite with a bright dot at `azimuth_deg` (clockwise from north) from its
  centre, and a panorama (azimuth grows left to right from north at column 0) with a bright column
  band at the same azimuth."""
  sat = np.zeros((S, S, 3), np.uint8)
  a = np.radians(azimuth_deg)
  y = int(round(S / 2 - 0.5 - radius * np.cos(a)))
  x = int(round(S / 2 - 0.5 + radius * np.sin(a)))
  sat[y - 1:y + 2, x - 1:x + 2] = 255
  pano = np.zeros((PH, 2 * PH, 3), np.uint8)
  col = int(np.floor(azimuth_deg / 360 * 2 * PH)) % (2 * PH)
  pano[:, col] = 255
  return pano, sat


def sat_azimuth(sat):
  ys, xs = np.nonzero(sat[..., 0])
  dy, dx = ys.mean() - (S / 2 - 0.5), xs.mean() - (S / 2 - 0.5)
  return np.degrees(np.arctan2(dx, -dy)) % 360


def pano_azimuth(pano):
  cols = np.nonzero(pano[0, :, 0])[0]
  assert len(cols) == 1
  return (cols[0] + 0.5) / pano.shape[1] * 360


def angle_gap(a, b):
  return abs((a - b + 180) % 360 - 180)


@pytest.mark.parametrize("azimuth", [0.0, 30.0, 90.0, 200.0, 315.0])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_and_panorama_roll_agree(azimuth, k):
  pano, sat = marker_pair(azimuth)
  assert angle_gap(sat_azimuth(sat), pano_azimuth(pano)) < 6  # the construction itself agrees
  q, s = augment.rotate_pair(pano, sat, "panorama", k)
  # rot90 by k turns the satellite counter-clockwise: the dot's azimuth drops by 90 k degrees
  assert angle_gap(sat_azimuth(s), azimuth - 90 * k) < 6
  assert angle_gap(sat_azimuth(s), pano_azimuth(q)) < 6


@pytest.mark.parametrize("azimuth", [10.0, 90.0, 200.0, 300.0])
def test_flip_keeps_panorama_and_satellite_aligned(azimuth):
  pano, sat = marker_pair(azimuth)
  q, s = augment.flip_pair(pano, sat)
  assert angle_gap(sat_azimuth(s), -azimuth) < 6
  assert angle_gap(sat_azimuth(s), pano_azimuth(q)) < 6


def test_streetmap_turns_with_satellite_and_ground_does_not():
  rng = np.random.default_rng(0)
  street, sat = rng.integers(0, 255, (2, S, S, 3), dtype=np.uint8)
  q, s = augment.rotate_pair(street, sat, "map", 3)
  np.testing.assert_array_equal(q, np.rot90(street, 3))
  np.testing.assert_array_equal(s, np.rot90(sat, 3))
  for modality in ("ground", "uav"):
    q, s = augment.rotate_pair(street, sat, "photo", 1)
    np.testing.assert_array_equal(q, street)
    np.testing.assert_array_equal(s, np.rot90(sat, 1))


def always(**kw):
  aug = dict(data_config().augment)
  aug.update(flip=0.0, rotate=0.0, color_jitter=0.0, blur_sharpen=0.0, dropout=0.0)
  aug.update(kw)
  return aug


def test_augment_pair_is_seeded_and_synchronised():
  pano, sat = marker_pair(60.0)
  example = {"query": pano, "satellite": sat, "modality_name": "panorama", "location_id": 3}
  aug = always(flip=0.5, rotate=0.75)
  outs = []
  for seed in range(20):
    out = augment.augment_pair(example, np.random.default_rng(seed), aug, "panorama")
    again = augment.augment_pair(example, np.random.default_rng(seed), aug, "panorama")
    np.testing.assert_array_equal(out["query"], again["query"])
    np.testing.assert_array_equal(out["satellite"], again["satellite"])
    assert angle_gap(sat_azimuth(out["satellite"]), pano_azimuth(out["query"])) < 6
    assert out["location_id"] == 3
    outs.append(round(sat_azimuth(out["satellite"])))
  assert len(set(outs)) >= 4  # flips and rotations did happen


def test_photometric_changes():
  rng = np.random.default_rng(0)
  image = rng.integers(40, 200, (32, 32, 3), dtype=np.uint8)
  jit = augment.photometric(image, np.random.default_rng(1), always(color_jitter=1.0))
  assert jit.dtype == np.uint8 and jit.shape == image.shape and not np.array_equal(jit, image)
  blurred = augment.blur_or_sharpen(image, np.random.default_rng(0), (1.0, 1.0))
  sharp = augment.blur_or_sharpen(image, np.random.default_rng(3), (1.0, 1.0))
  local_var = lambda x: np.abs(np.diff(x.astype(float), axis=1)).mean()
  changed = sorted([local_var(blurred), local_var(sharp)])
  assert changed[0] < local_var(image) < changed[1]  # one blurred, one sharpened
  holes = augment.coarse_dropout(image, np.random.default_rng(2), 4, 0.25)
  assert 0 < (holes == 0).all(-1).sum() <= 4 * 8 * 8
  grid = augment.grid_dropout(image, np.random.default_rng(2), 0.25)
  assert (grid == 0).all(-1).mean() > 0.1
  for seed, size in [(2, 0.25), (3, 0.05), (4, 1.0)]:  # squares of `hole` at every `unit`, cut at the borders
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    unit = int(rng.integers(max(2, int(size * min(h, w) / 2)), max(3, int(size * min(h, w)) + 1)))
    hole, oy, ox = max(1, unit // 2), int(rng.integers(0, unit)), int(rng.integers(0, unit))
    want = image.copy()
    for y in range(oy - unit, h, unit):
      for x in range(ox - unit, w, unit):
        want[max(y, 0):max(y + hole, 0), max(x, 0):max(x + hole, 0)] = 0
    np.testing.assert_array_equal(augment.grid_dropout(image, np.random.default_rng(seed), size), want)
  identity = augment.photometric(image, np.random.default_rng(1), always())
  np.testing.assert_array_equal(identity, image)


def test_prepare_resizes_and_normalises():
  cfg = data_config(modalities=("panorama",), panorama_size=(16, 32), satellite_size=(24, 24))
  mean = np.asarray(cfg.mean)
  pixel = np.rint(mean * 255).astype(np.uint8)
  pano = np.broadcast_to(pixel, (PH, 2 * PH, 3)).copy()
  sat = np.full((S, S, 3), 255, np.uint8)
  out = augment.PreparePair(cfg)({"query": pano, "satellite": sat, "modality": 2, "modality_name": "panorama",
                                  "location_id": 5})
  assert out["query"].shape == (16, 32, 3) and out["satellite"].shape == (24, 24, 3)
  assert out["query"].dtype == np.float32
  np.testing.assert_allclose(out["query"], 0.0, atol=0.5 / 255 / 0.224)
  np.testing.assert_allclose(out["satellite"], np.broadcast_to((1 - mean) / np.asarray(cfg.std), (24, 24, 3)), rtol=1e-6)
  # every modality keeps its own layout's size, also when several are trained together
  mixed = augment.PreparePair(data_config(modalities=("panorama", "uav"), query_size=(20, 20),
                                          panorama_size=(16, 32)))
  assert mixed({"query": pano, "satellite": sat, "modality": 2, "modality_name": "panorama",
                "location_id": 5})["query"].shape == (16, 32, 3)
  assert mixed({"query": sat, "satellite": sat, "modality": 0, "modality_name": "uav",
                "location_id": 5})["query"].shape == (20, 20, 3)


def marker_pixels(image):
  """(row, col) centroid and columns of the magenta marker in a rendered view."""
  r, g, b = (image[..., c].astype(int) for c in range(3))
  mask = (r > 150) & (b > 150) & (g < 100)
  ys, xs = np.nonzero(mask)
  assert len(ys) > 0, "marker not visible"
  return ys.mean(), xs.mean(), np.unique(xs)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rendered_location_stays_aligned_under_rot90_and_roll(k):
  from gleam_jax.data import synthetic
  spec = synthetic.spec_from_name("tiny")
  loc = int(synthetic.split_location_ids(spec, "train")[0])
  x, y, height = 30.0, 12.0, 40.0  # a tall magenta pillar east-north-east of the location
  views = synthetic.render_location(spec, loc, markers=[(x, y, 4.0, height, (255, 0, 255))])
  sat, pano = views["satellite"], views["panorama"]
  s, w = sat.shape[0], pano.shape[1]
  u_sat, v_sat = synthetic.project_point(spec, loc, "satellite", (x, y, height))
  u_pano, _ = synthetic.project_point(spec, loc, "panorama", (x, y, height / 2))
  row, col, _ = marker_pixels(sat)
  assert abs(col + 0.5 - u_sat) < 2 and abs(row + 0.5 - v_sat) < 2
  assert angle_gap((marker_pixels(pano)[1] + 0.5) / w * 360, u_pano / w * 360) < 8

  q, r = augment.rotate_pair(pano, sat, "panorama", k)
  # np.rot90 (counter-clockwise) moves pixel (u, v) of an s x s image to (v, s - u), k times
  u, v = u_sat, v_sat
  for _ in range(k):
    u, v = v, s - u
  row, col, _ = marker_pixels(r)
  assert abs(col + 0.5 - u) < 2 and abs(row + 0.5 - v) < 2
  sat_az = np.degrees(np.arctan2(col + 0.5 - s / 2, s / 2 - (row + 0.5))) % 360
  pano_az = (marker_pixels(q)[1] + 0.5) / w * 360
  assert angle_gap(pano_az, (u_pano - k * w / 4) / w * 360) < 8
  assert angle_gap(sat_az, pano_az) < 10

  fq, fr = augment.flip_pair(pano, sat)
  row, col, _ = marker_pixels(fr)
  sat_az = np.degrees(np.arctan2(col + 0.5 - s / 2, s / 2 - (row + 0.5))) % 360
  assert angle_gap(sat_az, (marker_pixels(fq)[1] + 0.5) / w * 360) < 10


def test_ground_photo_in_panorama_frame_matches_the_panorama():
  """A rendered ground photo warped into the panorama frame at its heading shows what the
  location's panorama shows in those columns (the two renders differ only in their photometric
  noise), and nothing elsewhere."""
  from gleam_jax.data import synthetic
  from gleam_jax.data.panorama_frame import FILL_RGB, photo_to_panorama
  spec = synthetic.spec_from_name("tiny", pano_height=48, query_size=48)
  for location_id in (0, 5):
    views = synthetic.render_location(spec, location_id)
    heading = views["ground_heading_deg"]
    canvas = photo_to_panorama(views["ground"], heading, spec.ground_fov_deg, spec.pano_height)
    assert canvas.shape == views["panorama"].shape
    filled = np.any(canvas != np.asarray(FILL_RGB, np.uint8), axis=-1)
    # the photo covers 90 deg of azimuth (a quarter of the columns) centred on its heading
    cols = np.flatnonzero(filled.any(axis=0))
    assert abs(len(cols) - spec.pano_width / 4) <= 2
    centre = np.angle(np.mean(np.exp(1j * (cols + 0.5) / spec.pano_width * 2 * np.pi)), deg=True) % 360
    assert min(abs(centre - heading), 360 - abs(centre - heading)) < 4
    diff = np.abs(canvas[filled].astype(float) - views["panorama"][filled].astype(float)).mean()
    other = np.abs(canvas[filled].astype(float) - np.roll(views["panorama"], spec.pano_width // 2, 1)[filled]).mean()
    assert diff < 12 and diff < other / 2


def test_ground_frame_needs_a_heading():
  cfg = data_config(modalities=("ground",), ground_frame="panorama")
  photo = np.zeros((S, S, 3), np.uint8)
  with pytest.raises(GleamError, match="heading_deg=nan"):
    augment.query_in_frame(photo, "ground", {"heading_deg": float("nan"), "fov_deg": 90.0}, cfg)
  out = augment.query_in_frame(photo, "ground", {"heading_deg": 10.0, "fov_deg": 90.0}, cfg)
  assert out.shape == (S, 2 * S, 3)
  assert augment.query_in_frame(photo, "uav", {}, cfg) is photo
  with pytest.raises(GleamError, match="ground_frame"):
    data_config(ground_frame="pano")


def test_uav_ground_points_project_as_the_renderer_projects_them():
  """`satellite_frame.ground_to_photo` puts ground points where the synthetic world's renderer
  (`render.project_point`) sees them in each UAV view, from the camera values a record stores."""
  from gleam_jax.data import synthetic
  from gleam_jax.data.satellite_frame import ground_to_photo
  from gleam_jax.data.synthetic import render
  spec = synthetic.spec_from_name("tiny")
  points = np.array([[10.0, -20.0], [0.0, 0.0], [-30.0, 15.0], [25.0, 30.0], [-5.0, -40.0]])
  for location_id in (0, 3):
    for k, cam in enumerate(render.uav_cameras(spec, location_id)):
      u, v, ahead = ground_to_photo(points[:, 0], points[:, 1], cam["heading_deg"], cam["pitch_deg"],
                                    cam["position_m"][2], cam["fov_deg"], spec.query_size, spec.query_size)
      for (x, y), uk, vk, a in zip(points, u, v, ahead):
        expected = render.project_point(spec, location_id, "uav", (x, y, 0.0), k)
        if expected is not None:
          assert a
          np.testing.assert_allclose((uk, vk), expected, atol=1e-6)


def test_uav_view_in_satellite_frame_matches_its_satellite():
  """Rendered UAV views projected onto the ground in the satellite frame look like their location's
  satellite (same place, north-up): more correlated with it than with other locations' satellites
  and than with it turned by 90 degrees; the ground the camera does not see is the fill colour."""
  from gleam_jax.data import synthetic
  from gleam_jax.data.panorama_frame import FILL_RGB
  from gleam_jax.data.satellite_frame import uav_to_satellite
  spec = synthetic.spec_from_name("tiny", sat_size=48, query_size=48)
  locations = (0, 3, 6, 9)
  views = {i: synthetic.render_location(spec, i) for i in locations}
  for i in locations:
    for image, cam in zip(views[i]["uav"], views[i]["uav_cameras"]):
      warped = uav_to_satellite(image, cam["heading_deg"], cam["pitch_deg"], cam["position_m"][2], cam["fov_deg"],
                                spec.footprint_m, spec.sat_size)
      seen = np.any(warped != np.asarray(FILL_RGB, np.uint8), axis=-1)
      assert 0.3 < seen.mean() < 1.0  # the drone sees most of the tile, not what lies behind it

      def correlation(sat):  # over the seen pixels, each channel's mean removed
        a, b = warped[seen].astype(float), sat[seen].astype(float)
        a, b = a - a.mean(0), b - b.mean(0)
        return (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())

      others = [correlation(views[j]["satellite"]) for j in locations if j != i]
      own = correlation(views[i]["satellite"])
      assert own > 0.2 and own > max(others + [correlation(np.rot90(views[i]["satellite"]))]) + 0.05


def test_uav_frame_needs_the_camera():
  cfg = data_config(modalities=("uav",), uav_frame="satellite")
  assert augment.warps_query(cfg, "uav") and not augment.warps_query(cfg, "ground")
  photo = np.zeros((S, S, 3), np.uint8)
  camera = {"heading_deg": 30.0, "pitch_deg": 45.0, "altitude_m": 60.0, "fov_deg": 60.0, "footprint_m": 128.0}
  with pytest.raises(GleamError, match="uav_frame='satellite'.*pitch_deg=nan"):
    augment.query_in_frame(photo, "uav", dict(camera, pitch_deg=float("nan")), cfg)
  with pytest.raises(GleamError, match="pitch <= 90"):
    augment.query_in_frame(photo, "uav", dict(camera, pitch_deg=-10.0), cfg)
  assert augment.query_in_frame(photo, "uav", camera, cfg).shape == (S, S, 3)
  assert augment.query_in_frame(photo, "ground", camera, cfg) is photo
  with pytest.raises(GleamError, match="uav_frame"):
    data_config(uav_frame="bev")


def test_uav_in_satellite_frame_turns_with_its_satellite():
  """A UAV view in the satellite frame has the 'map' layout: the satellite's k*90 rotation turns it
  too, so a mark at the same place in both stays at the same place."""
  cfg = data_config(modalities=("uav",), uav_frame="satellite")
  layout = query_layout(cfg, "uav")
  assert layout == "map" and query_layout(data_config(), "uav") == "photo"
  query = np.zeros((S, S, 3), np.uint8)
  query[5, 30] = 255
  for k in (1, 2, 3):
    q, s = augment.rotate_pair(query, query.copy(), layout, k)
    np.testing.assert_array_equal(q, s)
