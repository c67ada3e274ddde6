"""Eval reports: metrics rows, a markdown summary, PNG grids of retrieved satellites, R@K curves."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
TRUE_COLOR = "#1a9850"
WRONG_COLOR = "#d73027"


def to_display(image):
  """HWC image for display: uint8 as is; float is taken as ImageNet-normalised and un-normalised."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  if image.ndim == 3 and image.shape[-1] == 3:
    image = image * IMAGENET_STD + IMAGENET_MEAN
  return np.clip(image, 0.0, 1.0)


def thumbnail(image, max_side=128):
  """uint8 display copy, subsampled so its longer side is at most `max_side` (kept for PNGs)."""
  image = to_display(image)
  step = max(1, int(np.ceil(max(image.shape[:2]) / max_side)))
  image = image[::step, ::step]
  if image.dtype != np.uint8:
    image = (image * 255 + 0.5).astype(np.uint8)
  return image


def metric_rows(metrics, split, modality):
  """{'eval/<split>/<modality>/<name>': value}, the keys written to metrics.jsonl."""
  return {f"eval/{split}/{modality}/{name}": value for name, value in metrics.items()}


def _is_true(true_index, k):
  if true_index is None:
    return None
  marked = np.zeros(k, bool)
  marked[np.atleast_1d(np.asarray(true_index, np.int64))] = True
  return marked


def _draw_row(axes, query_image, gallery_images, scores, true_index, title=None):
  axes[0].imshow(to_display(query_image))
  axes[0].set_title(title or "query", fontsize=8)
  marked = _is_true(true_index, len(gallery_images))
  for j, ax in enumerate(axes[1:]):
    if j >= len(gallery_images):
      continue
    ax.imshow(to_display(gallery_images[j]))
    ax.set_title(f"#{j + 1}  {float(scores[j]):.3f}", fontsize=8)
    if marked is not None:
      color = TRUE_COLOR if marked[j] else WRONG_COLOR
      for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(4)
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])


def save_topk_grid_png(rows, path, title=None):
  """One row per query: the query then its retrieved gallery images, best first, with scores.

  rows: list of dicts with 'query', 'gallery' (list of HWC images), 'scores' and optionally
  'true_index' (positions among the shown images of the true references; the true ones are
  outlined in green, the others in red; no outline when absent or None) and 'title'.
  """
  k = max(len(r["gallery"]) for r in rows)
  fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.6 * (k + 1), 1.8 * len(rows)), squeeze=False)
  for r, ax_row in zip(rows, axes):
    _draw_row(ax_row, r["query"], r["gallery"], r["scores"], r.get("true_index"), r.get("title"))
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def save_topk_png(query_image, gallery_images, scores, path, true_index=None):
  """A query and its top-k gallery images in one row (see `save_topk_grid_png`)."""
  return save_topk_grid_png([{"query": query_image, "gallery": list(gallery_images), "scores": scores,
                              "true_index": true_index}], path)


def save_recall_curve_png(curves, path, num_gallery, top1p, title="R@K"):
  """curves: {modality: R@K fractions for K = 1..len}. The R@1% point (R@`top1p`, 0: none) is marked
  when it fits."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, curve in curves.items():
    ks = np.arange(1, len(curve) + 1)
    ax.plot(ks, 100 * np.asarray(curve), label=name)
  if 0 < top1p <= max(len(c) for c in curves.values()):
    ax.axvline(top1p, color="gray", linestyle=":", linewidth=1, label=f"1% ({top1p})")
  ax.set_xscale("log")
  ax.set_xlabel("K")
  ax.set_ylabel("recall@K (%)")
  ax.set_ylim(0, 100)
  ax.grid(True, which="both", alpha=0.3)
  ax.set_title(f"{title} (gallery {num_gallery})", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def summary_markdown(step, protocol, split, metrics_by_modality, info=()):
  """A markdown table, one row per modality, metrics in percent."""
  names = []
  for metrics in metrics_by_modality.values():
    names += [n for n in metrics if n not in names]
  lines = [f"# Retrieval eval, step {step}", "",
           f"Protocol `{protocol}`, split `{split}`. Values in %.", ""]
  lines += list(info) + ([""] if info else [])
  lines.append("| modality | " + " | ".join(names) + " |")
  lines.append("| --- | " + " | ".join("---:" for _ in names) + " |")
  for modality, metrics in metrics_by_modality.items():
    cells = [f"{100 * metrics[n]:.2f}" if n in metrics else "" for n in names]
    lines.append(f"| {modality} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_summary(workdir, step, split, text):
  """`<workdir>/eval/<split>/summary_step{step}.md` and the same text as
  `<workdir>/eval/<split>/summary.md` (the latest)."""
  directory = os.path.join(workdir, "eval", split)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"summary_step{step}.md")
  for p in (path, os.path.join(directory, "summary.md")):
    with open(p, "w") as f:
      f.write(text)
  return path
