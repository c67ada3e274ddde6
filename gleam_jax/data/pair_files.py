"""GLEAM-X pairs from your own files: JSON Lines, one pair per line, the two images by path.

Each line is read in any of three layouts (mixed freely):

    {"images": ["uav/0001.jpg", "sat/0001.png"], "answer": "Yes. Both views show ...",
     "match": true, "lang": "en", "modality": "uav", "question": "..."}            # ours
    {"image": ["uav/0001.jpg", "sat/0001.png"], "conversations": [
       {"from": "human", "value": "<image>\\n<image>\\nDo these ...?"}, {"from": "gpt", "value": "Yes. ..."}]}
                                                                                  # Qwen2.5-VL's fine-tuning scripts
    {"images": [...], "messages": [{"role": "user", "content": "<image><image>Do these ...?"},
                                   {"role": "assistant", "content": "Yes. ..."}]}  # LLaMA-Factory (ShareGPT)

The images are the query view, then the satellite image; relative paths are read from the file's
folder, or from `image_root`. Only the images are required to ask; training and scoring need the
answer. What a line leaves out is derived: `match` from the answer's verdict (`eval.explain.verdict`:
"Yes"/"No", "是"/"否"), `lang` 'zh' when the answer or question holds Chinese characters, else 'en',
`question` GLEAM-X's in that language (`<image>` placeholders dropped: the processor places the
images), `modality` 'pair'.

`write_pairs` writes examples in our layout (PNG files beside the JSONL), and

    python -m gleam_jax.data.pair_files --config=configs/x_sft.py:tiny --draw=eval --out=DIR

writes the synthetic world's GLEAM-X pairs that way: the layout to fill with your own;
`--check=FILE` reads a pairs file (every line and image checked) and describes it.
"""
import json
import os
import re

from PIL import Image

from gleam_jax.data.augment import resize
from gleam_jax.data import gleam_x
from gleam_jax.data.gleam_x import QUESTIONS
from gleam_jax.data.sources import read_image
from gleam_jax.errors import GleamError, make_dir
from gleam_jax.eval.explain import has_chinese, verdict

DEFAULT_MODALITY = "pair"
_PLACEHOLDER = re.compile(r"<image>\s*")


def _turns(line, where):
  """(question, answer) of a conversation in the Qwen or ShareGPT layout, or (None, None)."""
  if "conversations" in line:
    key, who, text, user, assistant = "conversations", "from", "value", ("human", "user"), ("gpt", "assistant")
  elif "messages" in line:
    key, who, text, user, assistant = "messages", "role", "content", ("user",), ("assistant",)
  else:
    return None, None
  turns = line[key]
  if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get(text), str) for t in turns):
    raise GleamError(f"{where}: '{key}' must be a list of {{\"{who}\": ..., \"{text}\": \"text\"}} turns.")
  turns = [(t.get(who), t[text]) for t in turns]
  question = next((text for who, text in turns if who in user), None)
  answer = next((text for who, text in turns if who in assistant), None)
  return question, answer


def _pair(line, where, root):
  images = line.get("images", line.get("image"))
  if isinstance(images, str):
    images = [images]
  if not isinstance(images, list) or len(images) != 2 or not all(isinstance(i, str) for i in images):
    raise GleamError(f"{where}: a GLEAM-X pair has two images (the query view, then the satellite image) in "
                     f"'images'; this line has {images!r}.")
  paths = []
  for image in images:
    path = os.path.join(root, os.path.expanduser(image))
    if not os.path.isfile(path):
      raise GleamError(f"{where}: image {path} not found; paths are relative to the pairs file's folder "
                       "(or to config.examples.image_root).")
    paths.append(path)
  question, answer = _turns(line, where)
  question = line.get("question", question)
  answer = line.get("answer", answer)
  question = _PLACEHOLDER.sub("", question).strip() if question else None
  text = (answer or "") + (question or "")
  lang = line.get("lang", "zh" if has_chinese(text) else "en")
  if lang not in QUESTIONS and not question:
    raise GleamError(f"{where}: lang {lang!r} has no default question ({', '.join(QUESTIONS)}); give 'question'.")
  match = line.get("match", verdict(answer) if answer else None)
  if answer is not None and match is None:
    raise GleamError(f"{where}: the answer does not start with a verdict (Yes/No, 是/否); give 'match': "
                     "true or false.")
  return dict(query=paths[0], satellite=paths[1], match=None if match is None else bool(match), lang=lang,
              modality=str(line.get("modality", DEFAULT_MODALITY)), question=question or QUESTIONS[lang],
              answer=answer, line=where)


def read_pairs(path, image_root=None, need_answers=True):
  """The pairs of a JSONL file (see the module docstring) as GLEAM-X examples whose 'query' and
  'satellite' are image paths (read by `images_of`); every image is checked to exist. With
  `need_answers`, a line without an answer is an error (training and scoring need one)."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise GleamError(f"pairs file {path} not found: give a JSON Lines file, one pair per line "
                     "(gleam_jax/data/pair_files.py).")
  root = os.path.expanduser(image_root) if image_root else os.path.dirname(os.path.abspath(path))
  pairs = []
  with open(path, encoding="utf-8") as f:
    for number, text in enumerate(f, 1):
      if not text.strip():
        continue
      where = f"{path}:{number}"
      try:
        line = json.loads(text)
      except json.JSONDecodeError as e:
        raise GleamError(f"{where}: not JSON ({e.msg} at column {e.colno}); each line holds one pair as a "
                         "JSON object.") from None
      if not isinstance(line, dict):
        raise GleamError(f"{where}: each line holds one pair as a JSON object, not {type(line).__name__}.")
      pair = _pair(line, where, root)
      if need_answers and pair["answer"] is None:
        raise GleamError(f"{where}: no answer ('answer', or the assistant's turn); training and scoring need one.")
      pairs.append(pair)
  if not pairs:
    raise GleamError(f"pairs file {path} holds no pairs.")
  return pairs


def images_of(example, size=None):
  """[query, satellite] as uint8 RGB arrays: read (upright) where the example holds paths, resized to
  `size` (height, width) when given."""
  images = [read_image(x) if isinstance(x, str) else x for x in (example["query"], example["satellite"])]
  return [resize(image, size) for image in images] if size else images


def write_pairs(examples, out_dir, name="pairs.jsonl"):
  """Writes examples in our layout: `out_dir/name` and their images as PNG in `out_dir/images/`;
  returns the JSONL path."""
  make_dir(os.path.join(out_dir, "images"), "--out")
  path = os.path.join(out_dir, name)
  with open(path, "w", encoding="utf-8") as f:
    for i, ex in enumerate(examples):
      images = []
      for role in ("query", "satellite"):
        relative = os.path.join("images", f"{os.path.splitext(name)[0]}_{i:06d}_{role}.png")
        Image.fromarray(ex[role]).save(os.path.join(out_dir, relative))
        images.append(relative)
      line = dict(images=images, question=ex["question"], answer=ex["answer"], match=bool(ex["match"]),
                  lang=ex["lang"], modality=ex["modality"])
      f.write(json.dumps(line, ensure_ascii=False) + "\n")
  return path


def summary(pairs):
  """Lines describing a pairs file: how many pairs, matching or not, per language and modality, and
  the image sizes (read from the files' headers), so a file can be checked before a job reads it."""
  from collections import Counter  # pylint: disable=g-import-not-at-top
  from gleam_jax.data.photo_camera import open_image  # pylint: disable=g-import-not-at-top
  count = lambda key: ", ".join(f"{k} {n}" for k, n in sorted(Counter(str(p[key]) for p in pairs).items()))
  sizes = Counter()
  for p in pairs:
    for role in ("query", "satellite"):
      with open_image(p[role]) as image:
        sizes[(role, image.size)] += 1
  size_text = lambda role: ", ".join(f"{w}x{h} {n}" for (r, (w, h)), n in sorted(sizes.items()) if r == role)
  answered = [p for p in pairs if p["answer"] is not None]
  lines = [f"{len(pairs)} pairs, {len(answered)} with an answer"]
  if answered:
    lines.append(f"match: {count('match')}")
  lines += [f"lang: {count('lang')}", f"modality: {count('modality')}",
            f"query sizes (w x h): {size_text('query')}", f"satellite sizes (w x h): {size_text('satellite')}"]
  return lines


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise GleamError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  if bool(args.out) == bool(args.check):
    raise GleamError("give --out (write a job's synthetic pairs there) or --check (describe a pairs file), "
                     "one of them.")
  if args.check:
    print("\n".join(summary(read_pairs(args.check, args.image_root, need_answers=False))))
    return
  examples = gleam_x.job_examples(args.config, args.draw)
  path = write_pairs(examples, os.path.expanduser(args.out), f"{args.draw}.jsonl")
  print(f"{len(examples)} {args.draw} pairs written to {path}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  from gleam_jax.errors import parse_flags, stop_on_bad_input
  config_flags.DEFINE_config_file("config", "configs/x_sft.py", "A GLEAM-X config: its world and example draw.")
  flags.DEFINE_string("out", None, "Folder to write <draw>.jsonl and images/ into.")
  flags.DEFINE_enum("draw", "eval", ["train", "eval"], "The job's training pairs (examples.train of them) or its "
                    "held-out pairs (examples.eval).")
  flags.DEFINE_string("check", None, "Instead of --out: a pairs file to read and describe (every line and image "
                      "checked).")
  flags.DEFINE_string("image_root", None, "With --check: the folder image paths are relative to.")

  def _main(argv):
    with stop_on_bad_input():
      main(argv)
  app.run(_main, flags_parser=parse_flags)
