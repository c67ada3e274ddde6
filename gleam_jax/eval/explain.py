"""GLEAM-X evaluation: verdict accuracy and the explanation's similarity to the reference.

`verdict(text)`: True for an answer that starts "Yes" / "是", False for "No" / "否" (after spaces and
quotes), None for any other start (counted as wrong, and reported as `answered` < 1). The text
similarity is ROUGE-L F1 (longest common subsequence) over lower-cased words in English and over
characters in Chinese, where words are not separated; punctuation is dropped in both.
The model's yes-probability (`yes_probability`: of "Yes" against "No" as the first answer token)
ranks pairs; its ROC AUC against the truth (`verdict_auc`) scores the verdict without a threshold.
`generate_answers` is how the trainer's evaluation and `python -m gleam_jax.explain --pairs` answer.
"""
import re

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
_CJK = r"[\u3400-\u9fff]"  # a Chinese character (CJK Unified Ideographs and Extension A)
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
    return re.findall(_CJK + r"|[a-z0-9]+", text)
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


def has_chinese(text):
  """Whether `text` holds a Chinese character (what `units` splits Chinese text into)."""
  return re.search(_CJK, text) is not None


def rouge_l(prediction, reference, lang):
  """ROUGE-L F1 of two texts in `lang` (see the module docstring), in [0, 1]."""
  p, r = units(prediction, lang), units(reference, lang)
  common = lcs_length(p, r)
  if common == 0:
    return 0.0
  precision, recall = common / len(p), common / len(r)
  return 2 * precision * recall / (precision + recall)


def explain_metrics(predictions, examples, yes_probabilities=None):
  """{'verdict_acc', 'answered', 'said_yes' (the share of answers that say "the same place": 0.5 for
  a model that sees, with half the pairs matching), 'rouge_l', per language '<lang>/verdict_acc',
  '<lang>/rouge_l', and per query modality '<modality>/verdict_acc', '<modality>/rouge_l' where the
  examples have several, and 'verdict_auc' (`verdict_auc`) with the answers' yes-probabilities} of
  generated answers against the examples' `match` and `answer`."""
  rows = []
  for text, ex in zip(predictions, examples, strict=True):
    v = verdict(text)
    rows.append((ex["lang"], ex.get("modality"), v, v == ex["match"], rouge_l(text, ex["answer"], ex["lang"])))
  groups = {None: rows}
  for r in rows:
    groups.setdefault(f"{r[0]}/", []).append(r)
  modalities = {r[1] for r in rows}
  if len(modalities) > 1:
    for r in rows:
      groups.setdefault(f"{r[1]}/", []).append(r)
  out = {}
  for prefix in [None] + sorted(k for k in groups if k is not None):
    chosen = groups[prefix]
    out[f"{prefix or ''}verdict_acc"] = float(np.mean([r[3] for r in chosen]))
    out[f"{prefix or ''}rouge_l"] = float(np.mean([r[4] for r in chosen]))
    if prefix is None:
      out["answered"] = float(np.mean([r[2] is not None for r in chosen]))
      out["said_yes"] = float(np.mean([r[2] is True for r in chosen]))
  if yes_probabilities is not None and None not in yes_probabilities:
    auc = verdict_auc(yes_probabilities, [ex["match"] for ex in examples])
    if auc is not None:
      out["verdict_auc"] = auc
  return out


def summary(metrics):
  """The metrics as the one line the trainer's evaluation and `explain --pairs` print."""
  auc = f", AUC {metrics['verdict_auc']:.3f}" if "verdict_auc" in metrics else ""
  later = (f" (follow-up answers {metrics['follow_up_rouge_l']:.3f})" if "follow_up_rouge_l" in metrics else "")
  return (f"verdict acc {metrics['verdict_acc']:.1%} (answered {metrics['answered']:.0%}, said yes "
          f"{metrics['said_yes']:.0%}{auc}), ROUGE-L {metrics['rouge_l']:.3f}{later}")


def verdict_token_ids(proc, lang):
  """(the first token of a "yes" answer, of a "no" answer) in `lang` (`gleam_x.VERDICTS`: "Yes." /
  "No.", "是。" / "否。"), or None for a language without them, or where the tokenizer starts either
  with a piece of a character (byte-level BPE without that character: its first byte is shared with
  other characters) or both with the same token."""
  from gleam_jax.data.gleam_x import VERDICTS  # pylint: disable=g-import-not-at-top
  if lang not in VERDICTS:
    return None
  yes, no = (proc.tokenizer.encode(text, add_special_tokens=False)[0] for text in VERDICTS[lang])
  whole = all(proc.decode([t]) and "\ufffd" not in proc.decode([t]) for t in (yes, no))
  return (yes, no) if whole and yes != no else None


def yes_probability(logits, token_ids):
  """P(yes | yes or no) of each row's next-token logits (B, V): the model's confidence that the two
  views show the same place, a score to rank pairs by (None without verdict tokens)."""
  if token_ids is None:
    return [None] * len(logits)
  margin = logits[:, token_ids[0]].astype(np.float64) - logits[:, token_ids[1]]
  return [float(p) for p in 1.0 / (1.0 + np.exp(-margin))]


def verdict_auc(yes_probabilities, matches):
  """ROC AUC of the yes-probabilities against the truth (ties count half); None without both kinds."""
  scores = np.asarray(yes_probabilities, np.float64)
  truth = np.asarray(matches, bool)
  positive, negative = scores[truth], scores[~truth]
  if not len(positive) or not len(negative):
    return None
  above = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
  return float(above / (len(positive) * len(negative)))


def follow_up_questions(examples):
  """[(example index, the example asked its follow-up question)] of every later turn of the examples'
  conversations: asked after the conversation before it (`history`), with the reference answers as
  what was said (teacher-forced, as multi-turn evaluations go); 'answer' is the turn's reference."""
  asked = []
  for i, ex in enumerate(examples):
    history = [(ex["question"], ex["answer"])]
    for question, answer in ex.get("follow_ups") or ():
      asked.append((i, dict(ex, question=question, answer=answer, history=list(history))))
      history.append((question, answer))
  return asked


def answer_follow_ups(asked, ask, first_answers=None):
  """`ask`'s answers (a function of a list of examples to their answers) to every entry of `asked`
  (`follow_up_questions(examples)`), in that order. Without `first_answers` each later question is
  asked after the reference turns (teacher-forced), all at once. With the model's answers to each
  example's first question (by example index), it is asked after the model's own earlier answers
  (how a conversation with the model goes on), one round of turns at a time, since each round needs
  the one before."""
  if first_answers is None:
    return list(ask([ex for _, ex in asked]))
  answers, said = [None] * len(asked), {i: [first_answers[i]] for i, _ in asked}
  for turn in range(1, 1 + max((len(ex["history"]) for _, ex in asked), default=0)):
    now = [k for k, (_, ex) in enumerate(asked) if len(ex["history"]) == turn]
    own = [dict(ex, history=[(question, said[i][j]) for j, (question, _) in enumerate(ex["history"])])
           for i, ex in (asked[k] for k in now)]
    for k, text in zip(now, ask(own), strict=True):
      answers[k] = text
      said[asked[k][0]].append(text)
  return answers


def follow_up_rouge_l(answers, asked):
  """Mean ROUGE-L of the answers to `follow_up_questions` against their references."""
  return float(np.mean([rouge_l(text, ex["answer"], ex["lang"]) for text, (_, ex) in zip(answers, asked, strict=True)]))


def _encode_prompt(proc, example, image_size):
  from gleam_jax.data import pair_files  # pylint: disable=g-import-not-at-top
  images, video_args = pair_files.prompt_visuals(example, image_size)
  return proc.encode_prompt(images, example["question"], example.get("system"), example.get("history", ()),
                            **video_args)


def generate_answers(model, proc, examples, batch_size, max_new_tokens, mesh=None, image_size=None, on_batch=None,
                     decoding=None, seed=0):
  """(answers (decoded text; greedy unless `decoding`, `generation.generate`'s token-choice keywords,
  says otherwise), yes-probabilities (`yes_probability` of the first answer token)) of `model` to the
  examples' questions about their two images, or a drone flight's video and its satellite image (after
  the example's `history` of earlier turns, where it has one), in the examples' order. When `decoding`
  samples, example i draws with seed `seed` + i (or `seed[i]`, one per example), whatever its batch.
  Batched by language and modality (prompts of about one length; rows left-padded as generation
  needs); `on_batch(answered, [(example index, answer, yes-probability), ...])` after each batch."""
  from gleam_jax.models.qwen2_5_vl import generation, processor  # pylint: disable=g-import-not-at-top
  cfg = model.cfg
  groups = {}
  for i, ex in enumerate(examples):
    groups.setdefault((ex["lang"], ex["modality"]), []).append(i)
  answers, yes, answered = [None] * len(examples), [None] * len(examples), 0
  example_seeds = generation.row_seeds(seed, len(examples))
  for (lang, _), members in groups.items():
    token_ids = verdict_token_ids(proc, lang)
    for start in range(0, len(members), batch_size):
      chunk = members[start:start + batch_size]
      prompts = [_encode_prompt(proc, examples[i], image_size) for i in chunk]
      seeds = [example_seeds[i] for i in chunk]
      if len(examples) > batch_size:  # a short batch as a full one (copies of its last row): one compiled shape
        prompts += prompts[-1:] * (batch_size - len(chunk))
        seeds += seeds[-1:] * (batch_size - len(chunk))
      length = max(len(p["input_ids"]) for p in prompts)
      input_ids = np.full((len(prompts), length), cfg.pad_token_id, np.int32)
      mask = np.zeros((len(prompts), length), np.int32)
      for r, p in enumerate(prompts):
        input_ids[r, length - len(p["input_ids"]):], mask[r, length - len(p["input_ids"]):] = p["input_ids"], 1
      first = []
      tokens = generation.generate(model, input_ids, mask, max_new_tokens=max_new_tokens, mesh=mesh,
                                   on_prefill=first.append, seed=seeds, **processor.join_visuals(prompts),
                                   **(decoding or {}))
      for r, (i, p_yes) in enumerate(zip(chunk, yes_probability(first[0][:len(chunk)], token_ids))):
        answers[i], yes[i] = proc.decode(tokens[r]), p_yes
      answered += len(chunk)
      if on_batch:
        on_batch(answered, [(i, answers[i], yes[i]) for i in chunk])
  return answers, yes
