"""Protocol metrics on hand-computed inputs and against loop re-derivations of the published code."""
import numpy as np
import pytest

from gleam_jax.errors import GleamError
from gleam_jax.eval import metrics


def sample4geo_recalls(sim, true_index, ks):
  """Sample4Geo's loop: per query count references strictly above the true one; K = R//100 last."""
  topk = list(ks) + [sim.shape[1] // 100]
  results = np.zeros(len(topk))
  for i in range(len(sim)):
    ranking = 0
    for j in range(sim.shape[1]):
      ranking += sim[i, j] > sim[i, true_index[i]]
    for n, k in enumerate(topk):
      if ranking < k:
        results[n] += 1
  return results / len(sim)


def university_baseline(sim, query_labels, gallery_labels):
  """The University-1652 baseline loop: reversed argsort, junk removed, CMC and trapezoid AP. (Its sort
  is numpy's default, not stable: its order among exactly tied scores is arbitrary; ours is stable.)"""
  num_gallery = len(gallery_labels)
  cmc_total = np.zeros(num_gallery)
  ap_total = 0.0
  for i in range(len(sim)):
    index = np.argsort(sim[i], kind="stable")[::-1]
    good = np.argwhere(gallery_labels == query_labels[i]).flatten()
    junk = np.argwhere(gallery_labels == -1).flatten()
    if good.size == 0:
      continue
    index = index[~np.isin(index, junk)]
    rows_good = np.argwhere(np.isin(index, good)).flatten()
    cmc = np.zeros(num_gallery)
    cmc[rows_good[0]:] = 1
    ap = 0.0
    for n in range(len(good)):
      precision = (n + 1) / (rows_good[n] + 1)
      old_precision = n / rows_good[n] if rows_good[n] != 0 else 1.0
      ap += (1.0 / len(good)) * (old_precision + precision) / 2
    cmc_total += cmc
    ap_total += ap
  return cmc_total / len(sim), ap_total / len(sim)


def test_cvusa_hand_computed_with_ties():
  sim = np.array([[0.9, 0.5, 0.9, 0.1],  # tie with the true one: not counted -> rank 0
                  [0.2, 0.8, 0.7, 0.9],  # two strictly higher -> rank 2
                  [0.3, 0.3, 0.3, 0.3]])  # all tied -> rank 0
  true_index = np.array([0, 2, 3])
  np.testing.assert_array_equal(metrics.strict_rank(sim, true_index), [0, 2, 0])
  got = metrics.cvusa_metrics(sim, true_index)
  assert got == pytest.approx({"R@1": 2 / 3, "R@5": 1.0, "R@10": 1.0})
  assert "R@1%" not in got  # R // 100 = 0 for 4 references


def test_cvusa_one_percent_uses_r_div_100():
  # 250 references -> K = 2. Ranks 0, 2, 1 -> R@1% counts ranks < 2.
  sim = np.zeros((3, 250))
  true_index = np.array([0, 1, 2])
  sim[0, 0] = 1.0
  sim[1, 1] = 0.5
  sim[1, 10:12] = 0.9
  sim[2, 2] = 0.5
  sim[2, 7] = 0.6
  got = metrics.cvusa_metrics(sim, true_index)
  assert got["R@1%"] == pytest.approx(2 / 3)
  assert got["R@1"] == pytest.approx(1 / 3)


def test_cvusa_matches_sample4geo_loop_on_random_ties():
  rng = np.random.default_rng(0)
  sim = np.round(rng.normal(size=(40, 300)), 1)  # rounding makes many ties
  true_index = rng.integers(0, 300, size=40)
  got = metrics.cvusa_metrics(sim, true_index)
  ref = sample4geo_recalls(sim, true_index, metrics.RANKS)
  np.testing.assert_allclose([got["R@1"], got["R@5"], got["R@10"], got["R@1%"]], ref)


def test_vigor_hand_computed_hit_rate():
  sim = np.array([[0.1, 0.5, 0.9, 0.6, 0.2],  # 2 and 3 above the positive, both semi -> hit, rank 2
                  [0.5, 0.7, 0.1, 0.1, 0.9],  # 1 (not semi) and 4 above -> miss, rank 2
                  [0.1, 0.1, 0.8, 0.8, 0.1]])  # tie with 3 -> rank 0, hit
  positive = np.array([1, 0, 2])
  semi = np.array([[2, 3], [4, -1], [0, 1]])
  ranks, hits = metrics.vigor_stats(sim, positive, semi)
  np.testing.assert_array_equal(ranks, [2, 2, 0])
  np.testing.assert_array_equal(hits, [True, False, True])
  got = metrics.vigor_metrics(sim, positive, semi)
  assert got == pytest.approx({"R@1": 1 / 3, "R@5": 1.0, "R@10": 1.0, "hit_rate": 2 / 3})


def test_vigor_semi_positive_listed_twice_counts_once():
  sim = np.array([[0.1, 0.9, 0.8, 0.5]])
  ranks, hits = metrics.vigor_stats(sim, np.array([0]), np.array([[1, 1]]))
  assert ranks[0] == 3 and not hits[0]


def test_university_hand_computed_several_positives_junk_and_distractors():
  gallery = np.array([5, 7, 5, -1, 9, 7])  # -1 junk; 9 a distractor location without queries
  sim = np.array([[0.2, 0.9, 0.5, 0.95, 0.1, 0.3],
                  [0.1, 0.8, 0.2, 0.0, 0.3, 0.4],
                  [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
                  [0.3, 0.2, 0.1, 0.0, 0.9, 0.1]])
  queries = np.array([5, 7, 5, 42])  # 42 has no reference: AP 0, still in the mean
  ranks, ap = metrics.university_stats(sim, queries, gallery)
  # q0: junk 3 removed -> labels [7, 5, 7, 5, 9]: goods at 1, 3.
  # AP = 1/2 * (0 + 1/2)/2 + 1/2 * (1/3 + 2/4)/2 = 1/8 + 5/24 = 1/3.
  # q1: [7, 7, 9, 5, 5] -> goods at 0, 1, AP = 1. q2: all tied, reversed stable order [5, 4, 2, 1, 0]
  # -> labels [7, 9, 5, 7, 5], goods at 2, 4: AP = 1/2 * (0 + 1/3)/2 + 1/2 * (1/4 + 2/5)/2 = 0.2458333.
  np.testing.assert_array_equal(ranks, [1, 0, 2, metrics.NO_TRUE_RANK])
  np.testing.assert_allclose(ap, [1 / 3, 1.0, 1 / 12 + 0.1625, 0.0])
  got = metrics.university_metrics(sim, queries, gallery)
  # R@1% = CMC[round(6 * 0.01)] = CMC[0] = R@1: the baseline reports it for any gallery size
  assert got == pytest.approx({"R@1": 1 / 4, "R@5": 3 / 4, "R@10": 3 / 4, "R@1%": 1 / 4,
                               "mAP": (1 / 3 + 1 + 1 / 12 + 0.1625) / 4})


def test_university_matches_baseline_loop_and_one_percent_is_cmc_index():
  rng = np.random.default_rng(1)
  # 951 references, as University-1652's drone -> satellite gallery: R@1% is CMC[round(9.51)] = CMC[10]
  gallery = rng.integers(-1, 140, size=951)  # repeats (several positives), -1 junk, unmatched distractors
  queries = rng.integers(0, 150, size=200)
  sim = np.round(rng.normal(size=(200, 951)), 1)
  got = metrics.university_metrics(sim, queries, gallery)
  cmc, m_ap = university_baseline(sim, queries, gallery)
  np.testing.assert_allclose([got["R@1"], got["R@5"], got["R@10"], got["R@1%"], got["mAP"]],
                             [cmc[0], cmc[4], cmc[9], cmc[10], m_ap])
  assert cmc[10] != cmc[9]  # the inputs tell CMC[round(R * 0.01)] from CMC[R // 100]


def test_one_percent_rule_differs_between_protocols():
  # 200 references: a first true reference at rank 2 is in University's CMC[2], not in Sample4Geo's R // 100 = 2.
  stats = {"rank": np.array([2]), "ap": np.array([1 / 3])}
  assert metrics.summarize("university", stats, 200)["R@1%"] == 1.0
  assert metrics.summarize("cvusa", {"rank": np.array([2])}, 200)["R@1%"] == 0.0
  # University: CMC[round(R * 0.01)], Python's round (half to even); Sample4Geo: R // 100
  for r, university_k, cvusa_k in [(951, 11, 9), (150, 3, 1), (250, 3, 2), (350, 5, 3), (60, 2, 0), (40, 1, 0)]:
    assert (metrics.one_percent_k("university", r), metrics.one_percent_k("cvusa", r)) == (university_k, cvusa_k)


def test_recall_curve():
  np.testing.assert_allclose(metrics.recall_curve([0, 2, 5], 6), [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1.0])


def test_chunked_stats_equal_dense():
  rng = np.random.default_rng(2)
  gallery_labels = rng.permutation(500)
  sim = rng.normal(size=(70, 500))
  q_labels = {"location_id": gallery_labels[rng.integers(0, 500, 70)],
              "semi_positive_ids": gallery_labels[rng.integers(0, 500, (70, 3))]}
  for protocol in metrics.PROTOCOLS:
    dense = metrics.summarize(protocol, metrics.protocol_stats(protocol, sim, q_labels, gallery_labels), 500)
    parts = [metrics.protocol_stats(protocol, sim[s:s + 16], {k: v[s:s + 16] for k, v in q_labels.items()},
                                    gallery_labels) for s in range(0, 70, 16)]
    chunked = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert metrics.summarize(protocol, chunked, 500) == dense


def test_bad_labels_raise_clear_errors():
  sim = np.zeros((1, 3))
  with pytest.raises(GleamError, match="no reference in the gallery"):
    metrics.protocol_stats("cvusa", sim, {"location_id": np.array([9])}, np.array([1, 2, 3]))
  with pytest.raises(GleamError, match="query location_id -1 has no reference"):  # -1 pads semi-positives only
    metrics.protocol_stats("vigor", sim, {"location_id": np.array([-1]), "semi_positive_ids": np.array([[2, -1]])},
                           np.array([1, 2, 3]))
  with pytest.raises(GleamError, match="more than once"):
    metrics.protocol_stats("cvusa", sim, {"location_id": np.array([1])}, np.array([1, 1, 3]))
  with pytest.raises(GleamError, match="unknown evaluation protocol"):
    metrics.protocol_stats("cvact", sim, {"location_id": np.array([1])}, np.array([1, 2, 3]))


def test_best_threshold_accuracy_on_hand_checked_scores():
  # called matches from the top: none 2/4, 0.9 -> 3/4, 0.8 -> 2/4, 0.7 -> 3/4, all 2/4; the first best wins
  assert metrics.best_threshold_accuracy([0.7, 0.9, 0.2, 0.8], [True, True, False, False]) == (0.75, 0.9)
  # a cut never splits equal scores: 0.5 and 0.5 are both matches or neither
  assert metrics.best_threshold_accuracy([0.5, 0.5, 0.1], [True, False, False]) == (2 / 3, float("inf"))
  assert metrics.best_threshold_accuracy([0.5, 0.5, 0.1], [True, True, False]) == (1.0, 0.5)
  assert metrics.best_threshold_accuracy([0.3, 0.2], [False, False]) == (1.0, float("inf"))
