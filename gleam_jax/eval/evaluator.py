"""Retrieval evaluation of query modalities against one satellite gallery, with reports.

The protocol metrics are always computed from every gallery score (exact sharded matmul, chunked
over queries), as the published code does; the search index of `search_cfg` (exact or ScaNN)
retrieves the top-k shown in the PNGs, and with ScaNN its recall against the exact top-1 / top-10
is reported too (`search_recall@1`, `search_recall@10`).
"""
import logging
import os
import time

import jax
import numpy as np

from gleam_jax.errors import GleamError
from gleam_jax.eval import metrics as metrics_lib
from gleam_jax.eval import report
from gleam_jax.eval import retrieval
from gleam_jax.utils.progress import format_eta
from gleam_jax.utils.writer import MetricWriter

NUM_SHOWN = 5  # retrieved satellites per example query in the PNGs
MULTI_QUERY_SUFFIX = "_multiquery"  # the name a modality's multiple-query results are reported under


class _KeepDisplayImages:
  """Wraps an iterable of batches; keeps thumbnails of the rows whose running index `want(i)` is true."""

  def __init__(self, batches, want):
    self.batches = batches
    self.want = want
    self.images = {}

  def __iter__(self):
    offset = 0
    for batch in self.batches:
      shown = batch.get("raw", batch["image"])
      for j in range(len(batch["image"])):
        if self.want(offset + j):
          self.images[offset + j] = report.thumbnail(shown[j])
      offset += len(batch["image"])
      yield batch


def _is_one_shot(iterable):
  return iter(iterable) is iterable


def _reads_items(batches):
  """Batches that read single items again (`pipeline.EvalBatches`): the PNGs' images come from
  there, which also holds when each process decodes only its own rows of every batch."""
  return hasattr(batches, "display_images")


def _thumbnails(batches, positions):
  return {i: report.thumbnail(image) for i, image in batches.display_images(positions).items()}


def evaluate_retrieval(encode_query, encode_gallery, query_sets, gallery_batches, protocol="cvusa",
                       mesh=None, search_cfg=None, workdir=None, step=0, writer=None, num_examples_png=8,
                       split="test", ks=metrics_lib.RANKS, multi_query=()):
  """Embeds the gallery once and every modality's queries, searches, and reports the protocol.

  encode_query / encode_gallery: images (B,H,W,C) -> (B, D) embeddings (closed over parameters);
  encode_query may be a dict {modality: encode} (a model with a tower per modality).
  query_sets: {modality: iterable of batches}; gallery_batches: iterable of batches. A batch is a
  dict with 'image' (float32 NHWC, normalised), 'location_id' (int; query and gallery items of the
  same location match), optionally 'raw' (display images) and, for 'vigor' queries,
  'semi_positive_ids' (location ids of the semi-positive satellites, -1 padded). The modalities named
  in `multi_query` are also scored in University-1652's multiple-query setting, as
  `<modality>_multiquery`: one query per location, the mean of its views' embeddings. A re-iterable
  gallery (a list, a grain dataset) is read a second time for the few images shown in the PNGs; a
  one-shot iterator keeps a thumbnail of every gallery image instead.
  Writes `eval/<split>/<modality>/<metric>` rows to metrics.jsonl, `<workdir>/eval/<split>/summary*.md`,
  and PNGs under `<workdir>/eval/<split>/step<step>/`. Returns the flat metrics dict.
  """
  metrics_lib.check_protocol(protocol)
  check_multi_query(multi_query, query_sets, protocol)
  search_cfg = search_cfg or retrieval.search_config()
  write_files = workdir is not None and jax.process_index() == 0
  t0 = time.perf_counter()

  keep_gallery = None
  if num_examples_png and _is_one_shot(gallery_batches) and not _reads_items(gallery_batches):
    keep_gallery = _KeepDisplayImages(gallery_batches, lambda i: True)
    gallery_batches_for_embed = keep_gallery
  else:
    gallery_batches_for_embed = gallery_batches
  gallery, gallery_label_fields = retrieval.embed(encode_gallery, gallery_batches_for_embed, mesh,
                                                  what=f"the {split} gallery")
  gallery_labels = gallery_label_fields["location_id"].reshape(-1)
  num_gallery = len(gallery)
  index = retrieval.build_index(gallery, search_cfg, workdir if write_files else None, mesh)
  exact = index if isinstance(index, retrieval.ExactIndex) else retrieval.ExactIndex(
      gallery, mesh, search_cfg.query_chunk, search_cfg.gallery_chunk)
  backend = "exact" if index is exact else "scann"
  logging.info("Eval gallery: %d items embedded, %s index, %.1fs", num_gallery, backend, time.perf_counter() - t0)

  flat, by_modality, curves, examples, counts = {}, {}, {}, {}, {}
  for modality, batches in query_sets.items():
    keep = batches if _reads_items(batches) else _KeepDisplayImages(batches, lambda i: i < num_examples_png)
    encode = encode_query[modality] if isinstance(encode_query, dict) else encode_query
    queries, labels = retrieval.embed(encode, keep, mesh, what=f"the {split} {modality} queries")
    sets = [(modality, queries, labels)]
    if modality in multi_query:
      sets.append((f"{modality}{MULTI_QUERY_SUFFIX}",) + retrieval.mean_per_location(queries, labels["location_id"]))
    for name, name_queries, name_labels in sets:
      counts[name] = len(name_queries)
      result = _score_modality(protocol, exact, name_queries, name_labels, gallery_labels,
                               scann=None if index is exact else index)
      result["metrics"] = {**metrics_lib.summarize(protocol, result["stats"], num_gallery, ks),
                           **result.get("search", {})}
      by_modality[name] = result["metrics"]
      flat.update(report.metric_rows(result["metrics"], split, name))
      max_k = min(num_gallery, max(100, metrics_lib.one_percent_k(protocol, num_gallery)))
      curves[name] = metrics_lib.recall_curve(result["stats"]["rank"], max_k)
      logging.info("Eval %s/%s: %s", split, name, ", ".join(f"{k}={100 * v:.2f}" for k, v in result["metrics"].items()))
    if num_examples_png:
      shown = min(num_examples_png, len(queries))
      scores, indices = index.search(queries[:shown], NUM_SHOWN)
      if write_files:
        images = _thumbnails(batches, range(shown)) if _reads_items(batches) else keep.images
        examples[modality] = dict(query_images=[images[i] for i in range(shown)], scores=scores,
                                  indices=indices, query_labels=labels["location_id"].reshape(-1)[:shown])

  if write_files:
    own_writer = writer is None
    writer = writer or MetricWriter(workdir)
    writer.write(step, flat)
    if own_writer:
      writer.close()
    info = [f"Gallery: {num_gallery} items; search: {backend}; "
            f"queries: {', '.join(f'{m} {n}' for m, n in counts.items())}; "
            f"took {format_eta(time.perf_counter() - t0)}."]
    top1p = metrics_lib.one_percent_k(protocol, num_gallery)
    if top1p == 0:
      info.append("R@1% is left out: the gallery has fewer than 100 items (K = R // 100 = 0).")
    report.write_summary(workdir, step, split, report.summary_markdown(step, protocol, split, by_modality, info))
    out_dir = os.path.join(workdir, "eval", split, f"step{step}")
    report.save_recall_curve_png(curves, os.path.join(out_dir, "recall_curve.png"), num_gallery, top1p,
                                 title=f"{split} R@K, step {step}")
    for modality, curve in curves.items():
      report.save_recall_curve_png({modality: curve}, os.path.join(out_dir, f"{modality}_recall_curve.png"),
                                   num_gallery, top1p, title=f"{split}/{modality} R@K, step {step}")
    if examples:
      gallery_images = _gallery_images(examples, keep_gallery, gallery_batches)
      for modality, ex in examples.items():
        rows = []
        for q, (scores, indices, label) in enumerate(zip(ex["scores"], ex["indices"], ex["query_labels"])):
          rows.append({"query": ex["query_images"][q], "gallery": [gallery_images[i] for i in indices],
                       "scores": scores, "true_index": np.flatnonzero(gallery_labels[indices] == label),
                       "title": f"{modality} loc {int(label)}"})
        report.save_topk_grid_png(rows, os.path.join(out_dir, f"{modality}_top{NUM_SHOWN}.png"),
                                  title=f"{split}/{modality}, step {step}: top-{NUM_SHOWN} satellites "
                                        "(green = true location, red = wrong)")
  return flat


def check_multi_query(multi_query, query_sets, protocol):
  """`multi_query` names modalities among `query_sets` (their names), under a protocol where a location
  is one reference."""
  unknown = [m for m in multi_query if m not in query_sets]
  if unknown:
    raise GleamError(f"eval.multi_query names {unknown}, which this evaluation does not query (it queries "
                     f"{', '.join(query_sets)}): name some of those, or add the modality to eval.modalities.")
  if multi_query and protocol == "vigor":
    raise GleamError("eval.multi_query averages the views of one location, but under protocol 'vigor' each "
                     "panorama has its own semi-positive satellites: clear eval.multi_query for VIGOR.")


def _score_modality(protocol, exact, queries, labels, gallery_labels, scann=None):
  """Per-query protocol stats from exact similarity chunks; with a ScaNN index, also its recall
  against the exact top-1 and top-10."""
  parts, hits1, hits10 = [], 0, 0
  for start, sim in exact.similarity_chunks(queries):
    chunk_labels = {k: v[start:start + len(sim)] for k, v in labels.items()}
    parts.append(metrics_lib.protocol_stats(protocol, sim, chunk_labels, gallery_labels))
    if scann is not None:
      k = min(10, sim.shape[1])
      _, approx_top = scann.search(queries[start:start + len(sim)], k)
      found = sim[np.arange(len(sim))[:, None], approx_top]  # exact scores of what the index returned
      # A result tied with the exact best (k-th best) counts as found: any of the tied items is a right answer.
      hits1 += int(np.sum(found[:, 0] >= sim.max(axis=1)))
      kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]
      hits10 += np.sum(found >= kth[:, None]) / k
  stats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  result = {"stats": stats}
  if scann is not None:
    result["search"] = {"search_recall@1": hits1 / len(queries), "search_recall@10": hits10 / len(queries)}
  return result


def _gallery_images(examples, keep_gallery, gallery_batches):
  """Display images of the gallery items shown in the PNGs: from the kept thumbnails, or by reading
  the (re-iterable) gallery a second time."""
  needed = set(int(i) for ex in examples.values() for i in np.asarray(ex["indices"]).reshape(-1))
  if _reads_items(gallery_batches):
    return _thumbnails(gallery_batches, sorted(needed))
  if keep_gallery is not None:
    return {i: keep_gallery.images[i] for i in needed}
  second_pass = _KeepDisplayImages(gallery_batches, lambda i: i in needed)
  for _ in second_pass:
    pass
  return second_pass.images
