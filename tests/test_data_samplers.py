"""Epoch-order samplers: unique locations per batch, modality balance, hard negatives, state."""
import json

import numpy as np
import pytest

from gleam_jax.data import samplers
from gleam_jax.data.config import MODALITIES, data_config
from gleam_jax.errors import GleamError

ALL = ("uav", "streetmap", "panorama", "ground")


def make_index(num_locations=300, uav_views=3, seed=0):
  """Records like synthetic_cvgl's: per location 1 streetmap, panorama, ground + uav_views UAV,
  locations on a line of latitude (so the nearest ones are the adjacent ids), shuffled records."""
  per = 3 + uav_views
  loc = np.repeat(np.arange(num_locations) * 7 + 100, per)
  mod = np.tile([MODALITIES.index(m) for m in ("streetmap", "panorama", "ground")] + [0] * uav_views, num_locations)
  lat = 40.0 + np.arange(num_locations) * 1e-3
  coords = np.stack([np.repeat(lat, per), np.full(len(loc), -74.0)], 1)
  perm = np.random.default_rng(seed).permutation(len(loc))
  return {"location_id": loc[perm], "modality": mod[perm].astype(np.int32), "coords": coords[perm]}


def batches(order, batch_size):
  assert len(order) % batch_size == 0
  return order.reshape(-1, batch_size)


def make_all(index, modalities=ALL, weights=None, seed=0):
  return [
      samplers.UniqueLocationShuffle(index, modalities, weights, seed=seed),
      samplers.GPSSampler(index, modalities, weights, seed=seed, neighbours_per_anchor=3, neighbour_range=4),
      samplers.DSSSampler(index, modalities, weights, seed=seed, neighbours_per_anchor=3, neighbour_range=4),
  ]


def test_haversine_and_nearest():
  # one degree of latitude on a sphere of radius 6371 km
  np.testing.assert_allclose(samplers.haversine_m(10.0, 20.0, 11.0, 20.0), np.pi / 180 * 6_371_000, rtol=1e-12)
  np.testing.assert_allclose(samplers.haversine_m(0.0, 0.0, 0.0, 90.0), np.pi / 2 * 6_371_000, rtol=1e-12)
  rng = np.random.default_rng(1)
  for coords in (rng.uniform([40, -74], [40.05, -73.95], size=(500, 2)),  # one city
                 rng.uniform([-89, -180], [89, 180], size=(500, 2))):  # the whole globe, across the date line
    got = samplers.nearest_locations(coords, 5)
    d = samplers.haversine_m(coords[:, None, 0], coords[:, None, 1], coords[None, :, 0], coords[None, :, 1])
    np.fill_diagonal(d, np.inf)
    np.testing.assert_array_equal(got, np.argsort(d, axis=1)[:, :5])  # all pairs, by brute force
  # locations at one place: each one's neighbours are the others there, ties by position
  same = np.array([[40.0, -74.0]] * 4 + [[40.001, -74.0]])
  got = samplers.nearest_locations(same, 3)
  np.testing.assert_array_equal(got[:4], [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
  assert set(got[4]) < {0, 1, 2, 3} and list(got[4]) == sorted(got[4])  # 3 of the 4 tied at the same distance
  assert samplers.nearest_locations(same[:1], 3).shape == (1, 0)


@pytest.mark.parametrize("batch_size", [8, 32])
def test_no_location_twice_in_a_batch_and_balanced(batch_size):
  index = make_index()
  weights = {"uav": 2.0, "streetmap": 1.0, "panorama": 1.0, "ground": 0.5}
  for s in make_all(index, weights=weights):
    for epoch in range(2):
      order = s.epoch_order(epoch, batch_size)
      for b in batches(order, batch_size):
        assert len(np.unique(index["location_id"][b])) == batch_size, s.name
      # modality shares follow the weights (up to the dropped remainder)
      total = 300 * 4
      counts = np.bincount(index["modality"][order], minlength=4)
      expected = np.array([2.0, 1.0, 1.0, 0.5]) / 4.5 * total
      assert np.all(np.abs(counts - expected) <= total - len(order) + 1), (s.name, counts, expected)
      assert total - len(order) < 3 * batch_size


def test_phase1_epoch_is_every_panorama_once():
  index = make_index()
  s = samplers.UniqueLocationShuffle(index, ("panorama",), seed=3)
  order = s.epoch_order(0, 30)  # 300 locations: nothing dropped
  assert len(order) == 300
  assert np.all(index["modality"][order] == MODALITIES.index("panorama"))
  assert len(np.unique(index["location_id"][order])) == 300


def test_uav_views_rotate_over_epochs():
  index = make_index(num_locations=40, uav_views=3)
  s = samplers.UniqueLocationShuffle(index, ("uav",), seed=0)
  seen = set()
  for epoch in range(12):
    order = s.epoch_order(epoch, 10)
    assert len(np.unique(index["location_id"][order])) == 40  # one view per location per epoch
    seen.update(order.tolist())
  assert len(seen) == 120  # every view used over the epochs


def test_deterministic_per_seed_and_epoch():
  index = make_index()
  for a, b, c in zip(make_all(index, seed=5), make_all(index, seed=5), make_all(index, seed=6)):
    np.testing.assert_array_equal(a.epoch_order(2, 16), b.epoch_order(2, 16))
    assert not np.array_equal(a.epoch_order(2, 16), a.epoch_order(3, 16))
    assert not np.array_equal(a.epoch_order(2, 16), c.epoch_order(2, 16))


def neighbour_pairs_per_batch(order, index, table_of_location, batch_size):
  """Mean number of (member, one of its listed neighbours) pairs inside a batch."""
  pairs = []
  for b in batches(order, batch_size):
    locs = set(index["location_id"][b].tolist())
    pairs.append(sum(len(locs & set(table_of_location[l])) for l in locs))
  return np.mean(pairs)


def test_gps_neighbours_share_a_batch():
  index = make_index()
  gps = samplers.GPSSampler(index, ("panorama",), seed=0, neighbours_per_anchor=3, neighbour_range=3)
  shuffle = samplers.UniqueLocationShuffle(index, ("panorama",), seed=0)
  ids = gps.location_ids
  nearest = {ids[i]: set(ids[gps.nearest[i, :3]].tolist()) for i in range(len(ids))}
  # on a line the 3 nearest of a location are among its ids +-3 steps
  for i in (0, 150, 299):
    assert nearest[ids[i]] <= set(ids[max(0, i - 3):i + 4].tolist()) - {ids[i]}
  order = gps.epoch_order(0, 20)
  first = order[:20]
  anchor = index["location_id"][first[0]]
  assert nearest[anchor] <= set(index["location_id"][first].tolist())
  hard = neighbour_pairs_per_batch(order, index, nearest, 20)
  easy = neighbour_pairs_per_batch(shuffle.epoch_order(0, 20), index, nearest, 20)
  assert hard > 3 * easy, (hard, easy)


def test_dss_neighbours_share_a_batch_and_state_round_trips():
  index = make_index()
  dss = samplers.DSSSampler(index, ("panorama", "ground"), seed=0, neighbours_per_anchor=4, neighbour_range=4)
  ids = dss.location_ids
  rng = np.random.default_rng(0)
  table = np.stack([rng.choice(np.delete(ids, i), size=6, replace=False) for i in range(len(ids))])
  before = dss.epoch_order(0, 25)
  dss.set_neighbours(table)
  after = dss.epoch_order(0, 25)
  listed = {ids[i]: set(table[i, :4].tolist()) for i in range(len(ids))}
  assert neighbour_pairs_per_batch(after, index, listed, 25) > 2 * (
      neighbour_pairs_per_batch(before, index, listed, 25))
  for b in batches(after, 25):
    assert len(np.unique(index["location_id"][b])) == 25

  state = json.loads(json.dumps(dss.get_state()))
  other = samplers.DSSSampler(index, ("panorama", "ground"), seed=99, neighbours_per_anchor=4, neighbour_range=4)
  other.set_state(state)
  np.testing.assert_array_equal(other.epoch_order(0, 25), after)
  np.testing.assert_array_equal(other.epoch_order(7, 25), dss.epoch_order(7, 25))

  # rows may come in any order when their location ids are given
  perm = rng.permutation(len(ids))
  third = samplers.DSSSampler(index, ("panorama", "ground"), seed=0, neighbours_per_anchor=4, neighbour_range=4)
  third.set_neighbours(table[perm], location_ids=ids[perm])
  np.testing.assert_array_equal(third.epoch_order(0, 25), after)


def test_state_round_trip_plain_and_gps():
  index = make_index()
  for s in make_all(index, seed=11)[:2]:
    state = json.loads(json.dumps(s.get_state()))
    fresh = type(s)(index, ALL, seed=0) if s.name == "shuffle" else type(s)(
        index, ALL, seed=0, neighbours_per_anchor=3, neighbour_range=4)
    assert not np.array_equal(fresh.epoch_order(1, 16), s.epoch_order(1, 16))
    fresh.set_state(state)
    np.testing.assert_array_equal(fresh.epoch_order(1, 16), s.epoch_order(1, 16))
  with pytest.raises(GleamError, match="sampler state is for 'gps'"):
    samplers.UniqueLocationShuffle(index).set_state(make_all(index)[1].get_state())


def test_dss_state_round_trips_when_the_table_covers_more_locations_than_the_sampler():
  """Phase 2: the trainer's neighbour table has a row per location of the split, and a modality may be
  held by only some locations (University-1652's street views): the state keeps the table's rows."""
  index = make_index(num_locations=40)
  ground = MODALITIES.index("ground")
  some = ~((index["modality"] == ground) & (index["location_id"] % 2 == 0))  # ground views at odd ids only
  index = {k: v[some] for k, v in index.items()}
  every = np.unique(index["location_id"])
  table = np.stack([np.roll(every, -j) for j in range(1, 5)], 1)
  dss = samplers.DSSSampler(index, ("ground",), seed=0, neighbours_per_anchor=1, neighbour_range=2)
  dss.set_neighbours(table, every)
  fresh = samplers.DSSSampler(index, ("ground",), seed=0, neighbours_per_anchor=1, neighbour_range=2)
  fresh.set_state(json.loads(json.dumps(dss.get_state())))
  np.testing.assert_array_equal(fresh.epoch_order(3, 4), dss.epoch_order(3, 4))
  np.testing.assert_array_equal(fresh._positions, dss._positions)


def test_bad_inputs():
  index = make_index(num_locations=10)
  with pytest.raises(GleamError, match="batch size 16 is impossible"):
    samplers.UniqueLocationShuffle(index).epoch_order(0, 16)
  only_pano = {k: v[index["modality"] == 2] for k, v in index.items()}
  with pytest.raises(GleamError, match="no records of modalities"):
    samplers.UniqueLocationShuffle(only_pano, ("uav",))
  with pytest.raises(GleamError, match=r"no records of modalities \('uav',\) \(it holds \['panorama'\]\)"):
    samplers.UniqueLocationShuffle(only_pano, ("panorama", "uav"))  # one missing of two (its epochs never filled)
  with pytest.raises(GleamError, match="one row per location"):
    samplers.DSSSampler(index).set_neighbours(np.zeros((3, 2), int))


def test_make_sampler_from_config():
  index = make_index()
  for name, cls in (("shuffle", samplers.UniqueLocationShuffle), ("gps", samplers.GPSSampler),
                    ("dss", samplers.DSSSampler)):
    cfg = data_config(modalities=ALL, sampler={"name": name}, seed=4)
    s = samplers.make_sampler(cfg, index)
    assert type(s) is cls and s.seed == 4 and len(s.modality_ids) == 4
