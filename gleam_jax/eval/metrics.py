"""Retrieval metrics of the published CVGL protocols, re-derived from their reference code.

- 'cvusa' (CVUSA, CVACT; Sample4Geo `evaluate/cvusa_and_cvact.py`): one true reference per query.
  A query's rank is the number of references scoring STRICTLY higher than its true reference
  (ties go to the query); R@K = fraction with rank < K; R@1% uses K = R // 100.
- 'vigor' (Sample4Geo `evaluate/vigor.py`): R@K on the positive satellite with the same rule, and the
  hit rate: a hit when every reference scoring strictly higher than the positive is one of the
  query's semi-positives (so the top-1 is the positive or a semi-positive).
- 'university' (University-1652 / SUES-200 baseline `evaluate_gpu.py`): several true references per
  query (same location label), junk references (label -1) removed from the ranking, distractor
  locations kept. The gallery is ranked by `argsort(score)[::-1]`; the baseline's default sort is not
  stable, so its order among exactly tied scores is arbitrary, ours is stable (ties put the later
  gallery index first). CMC[k] counts a query when its first true reference is within the top k + 1;
  AP is the baseline's trapezoid average of precisions; R@1% is CMC[round(R * 0.01)] (Python's round,
  half to even: R = 951 -> CMC[10]), reported for any R; mean over ALL queries (a query without any
  true reference counts 0, as the baseline).

Every function works on a chunk of query rows of the similarity matrix (queries x gallery), so a
large evaluation runs chunk by chunk: `protocol_stats` per chunk, concatenate, `summarize`.
Scores are fractions in [0, 1]. With fewer than 100 gallery items R // 100 is 0, so the 'cvusa' and
'vigor' R@1% (always 0 there) is left out of the results.
"""
import numpy as np

from gleam_jax.errors import GleamError

PROTOCOLS = ("cvusa", "vigor", "university")
RANKS = (1, 5, 10)
JUNK_LABEL = -1
NO_TRUE_RANK = np.iinfo(np.int64).max  # rank of a query without any true reference: never counted


def one_percent_k(protocol, num_gallery):
  """K such that the protocol's R@1% is R@K (rank < K); 0 where it is not reported. 'cvusa' / 'vigor':
  R // 100 (= int(R * 0.01)), as Sample4Geo; 'university': round(R * 0.01) + 1, the baseline's
  CMC[round(R * 0.01)] (Python's round, half to even: R = 951 -> K = 11, R = 250 -> K = 3)."""
  if protocol == "university":
    return round(int(num_gallery) * 0.01) + 1
  return int(num_gallery) // 100


def index_of_labels(gallery_labels, labels, what="query", padded=False):
  """Gallery index of each label in `labels` (gallery labels must be unique). With `padded` (lists of
  semi-positives), -1 is padding and stays -1; otherwise every label must be a gallery location."""
  gallery_labels = np.asarray(gallery_labels)
  labels = np.asarray(labels)
  order = np.argsort(gallery_labels, kind="stable")
  sorted_labels = gallery_labels[order]
  if len(sorted_labels) > 1 and np.any(sorted_labels[1:] == sorted_labels[:-1]):
    dup = sorted_labels[1:][sorted_labels[1:] == sorted_labels[:-1]][0]
    raise GleamError(f"gallery location_id {int(dup)} occurs more than once; this protocol needs one reference "
                     "per location: use protocol='university' for several references per location.")
  pos = np.clip(np.searchsorted(sorted_labels, labels), 0, max(len(order) - 1, 0))
  found = (sorted_labels[pos] == labels) if len(order) else np.zeros(labels.shape, bool)
  missing = ~found & (labels != JUNK_LABEL) if padded else ~found
  if np.any(missing):
    raise GleamError(f"{what} location_id {int(labels[missing].flat[0])} has no reference in the gallery: "
                     "the gallery must hold the satellite image of every query location.")
  return np.where(found, order[pos], -1)


def strict_rank(similarity, true_index):
  """(Q,) number of gallery items scoring strictly higher than each query's true reference."""
  sim = np.asarray(similarity)
  true_index = np.asarray(true_index)
  gt = sim[np.arange(len(sim)), true_index]
  return np.sum(sim > gt[:, None], axis=1)


def vigor_stats(similarity, positive_index, semi_positive_index):
  """(ranks, hits): strict rank of the positive, and VIGOR's hit (no non-semi-positive above it).

  semi_positive_index: (Q, S) gallery indices of the semi-positives, -1 where there are fewer.
  """
  sim = np.asarray(similarity)
  rows = np.arange(len(sim))
  higher = sim > sim[rows, np.asarray(positive_index)][:, None]
  ranks = higher.sum(axis=1)
  semi = np.asarray(semi_positive_index).reshape(len(sim), -1)
  semi_higher = np.zeros(len(sim), np.int64)
  for j in range(semi.shape[1]):
    valid = semi[:, j] >= 0
    # A semi-positive listed twice must not be subtracted twice.
    first = np.all(semi[:, :j] != semi[:, j:j + 1], axis=1)
    semi_higher += valid & first & higher[rows, np.where(valid, semi[:, j], 0)]
  return ranks, (ranks - semi_higher) == 0


def university_stats(similarity, query_labels, gallery_labels, junk_label=JUNK_LABEL):
  """(ranks, ap): position of the first true reference after junk removal (NO_TRUE_RANK where the
  query has none) and the baseline's AP of each query row."""
  sim = np.asarray(similarity)
  gallery_labels = np.asarray(gallery_labels)
  ranks = np.full(len(sim), NO_TRUE_RANK, np.int64)
  ap = np.zeros(len(sim), np.float64)
  for i, (row, label) in enumerate(zip(sim, np.asarray(query_labels))):
    order = np.argsort(row, kind="stable")[::-1]
    ranked = gallery_labels[order]
    ranked = ranked[ranked != junk_label]
    rows_good = np.flatnonzero(ranked == label)
    if len(rows_good) == 0:
      continue
    ranks[i] = rows_good[0]
    i_good = np.arange(len(rows_good))
    precision = (i_good + 1) / (rows_good + 1)
    old_precision = np.where(rows_good != 0, i_good / np.maximum(rows_good, 1), 1.0)
    ap[i] = np.sum((old_precision + precision) / 2) / len(rows_good)
  return ranks, ap


def recall_at_k(ranks, ks):
  """{f'R@{k}': fraction of queries with rank < k}."""
  ranks = np.asarray(ranks)
  return {f"R@{k}": float(np.mean(ranks < k)) for k in ks}


def recall_curve(ranks, max_k):
  """R@K for K = 1..max_k (array of max_k fractions)."""
  ranks = np.asarray(ranks)
  counts = np.bincount(ranks[ranks < max_k], minlength=max_k)
  return np.cumsum(counts) / max(len(ranks), 1)


def protocol_stats(protocol, similarity, query_labels, gallery_labels):
  """Per-query statistics of one chunk of query rows.

  query_labels: dict with 'location_id' (Q,) and, for 'vigor', optionally 'semi_positive_ids'
  (Q, S) location ids (-1 padded). Returns a dict of (Q,) arrays ('rank', and 'hit' or 'ap').
  """
  check_protocol(protocol)
  location = np.asarray(query_labels["location_id"]).reshape(-1)
  if protocol == "university":
    ranks, ap = university_stats(similarity, location, gallery_labels)
    return {"rank": ranks, "ap": ap}
  true_index = index_of_labels(gallery_labels, location)
  if protocol == "cvusa":
    return {"rank": strict_rank(similarity, true_index)}
  semi_ids = query_labels.get("semi_positive_ids")
  if semi_ids is None:
    semi_ids = np.full((len(location), 0), JUNK_LABEL)
  semi_index = index_of_labels(gallery_labels, np.asarray(semi_ids).reshape(len(location), -1), "semi-positive",
                               padded=True)
  ranks, hits = vigor_stats(similarity, true_index, semi_index)
  return {"rank": ranks, "hit": hits}


def summarize(protocol, stats, num_gallery, ks=RANKS):
  """The protocol's metrics from per-query `stats` (concatenated over all chunks)."""
  check_protocol(protocol)
  ranks = np.asarray(stats["rank"])
  out = recall_at_k(ranks, ks)
  top1p = one_percent_k(protocol, num_gallery)
  if top1p > 0:
    out["R@1%"] = float(np.mean(ranks < top1p))
  if protocol == "vigor":
    out["hit_rate"] = float(np.mean(stats["hit"]))
  if protocol == "university":
    out["mAP"] = float(np.sum(stats["ap"]) / max(len(ranks), 1))
  return out


def cvusa_metrics(similarity, true_index, ks=RANKS):
  """CVUSA / CVACT metrics of a dense similarity matrix with one true gallery index per query."""
  return summarize("cvusa", {"rank": strict_rank(similarity, true_index)}, np.shape(similarity)[1], ks)


def vigor_metrics(similarity, positive_index, semi_positive_index, ks=RANKS):
  ranks, hits = vigor_stats(similarity, positive_index, semi_positive_index)
  return summarize("vigor", {"rank": ranks, "hit": hits}, np.shape(similarity)[1], ks)


def university_metrics(similarity, query_labels, gallery_labels, ks=RANKS):
  ranks, ap = university_stats(similarity, query_labels, gallery_labels)
  return summarize("university", {"rank": ranks, "ap": ap}, np.shape(similarity)[1], ks)


def check_protocol(protocol):
  if protocol not in PROTOCOLS:
    raise GleamError(f"unknown evaluation protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}.")


def best_threshold_accuracy(scores, matches):
  """(the highest accuracy of the verdict `score >= t` over every threshold t, that t; inf when
  calling nothing a match is best). Chosen on the pairs it scores, it is an upper bound for a
  threshold set on other pairs."""
  scores, matches = np.asarray(scores, np.float64), np.asarray(matches, bool)
  order = np.argsort(-scores, kind="stable")
  ranked, truth = scores[order], matches[order]
  k = np.arange(len(scores) + 1)  # the first k pairs called matches
  true_pos = np.concatenate([[0], np.cumsum(truth)])
  correct = true_pos + (np.sum(~truth) - (k - true_pos))
  cut = np.concatenate([[True], ranked[:-1] > ranked[1:], [True]])  # k between distinct scores
  best = int(np.argmax(np.where(cut, correct, -1)))
  return float(correct[best] / len(scores)), float(ranked[best - 1]) if best else float("inf")
