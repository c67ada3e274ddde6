"""GLEAM-X evaluation: verdict accuracy and the explanation's similarity to the reference.

`verdict(text)`: True for an answer that starts "Yes" / "是", False for "No" / "否" (after spaces and
quotes), None for any other start (counted as wrong, and reported as `answered` < 1). The text
similarity is ROUGE-L F1 (longest common subsequence) over lower-cased words in English and over
characters in Chinese, where words are not separated; punctuation is dropped in both.
"""
import re

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
_QUOTES = "\"'“”‘’「」 *"


def verdict(text):
  start = text.strip().lstrip(_QUOTES).lower()
  if start.startswith(("不是", "否")):
    return False
  if start.startswith("是"):
    return True
  word = re.match(r"[a-z]+", start)
  return {"yes": True, "no": False}.get(word.group()) if word else None


def units(text, lang):
  """The units ROUGE-L compares: Chinese characters (and Latin words among them), or English words."""
  text = text.lower()
  if lang == "zh":
    return re.findall(r"[\u3400-\u9fff]|[a-z0-9]+", text)
  return _WORD.findall(text)


def lcs_length(a, b):
  """Length of the longest common subsequence of two sequences (dynamic programming, O(len a x len b))."""
  if not a or not b:
    return 0
  previous = [0] * (len(b) + 1)
  for x in a:
    current = [0]
    for j, y in enumerate(b):
      current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
    previous = current
  return previous[-1]


def rouge_l(prediction, reference, lang):
  """ROUGE-L F1 of two texts in `lang` (see the module docstring), in [0, 1]."""
  p, r = units(prediction, lang), units(reference, lang)
  common = lcs_length(p, r)
  if common == 0:
    return 0.0
  precision, recall = common / len(p), common / len(r)
  return 2 * precision * recall / (precision + recall)


def explain_metrics(predictions, examples):
  """{'verdict_acc', 'answered', 'rouge_l', and per language '<lang>/verdict_acc', '<lang>/rouge_l'}
  of generated answers against the examples' `match` and `answer`."""
  rows = []
  for text, ex in zip(predictions, examples, strict=True):
    v = verdict(text)
    rows.append((ex["lang"], v is not None, v == ex["match"], rouge_l(text, ex["answer"], ex["lang"])))
  out = {}
  for lang in sorted({r[0] for r in rows}) + [None]:
    chosen = [r for r in rows if lang is None or r[0] == lang]
    prefix = "" if lang is None else f"{lang}/"
    out[f"{prefix}verdict_acc"] = float(np.mean([r[2] for r in chosen]))
    out[f"{prefix}rouge_l"] = float(np.mean([r[3] for r in chosen]))
    if lang is None:
      out["answered"] = float(np.mean([r[1] for r in chosen]))
  return out
