"""GLEAM-X pairs from your own files: JSON Lines, one pair per line, the two images by path (or a JSON
array of the same objects, as the `.json` datasets of Qwen2.5-VL's fine-tuning scripts and
LLaMA-Factory are written). The query may instead be a video: a drone flight given as its frames.

Each pair is read in any of these layouts (mixed freely):

    {"images": ["uav/0001.jpg", "sat/0001.png"], "answer": "Yes. Both views show ...",
     "match": true, "lang": "en", "modality": "uav", "question": "..."}            # ours
    {"image": ["uav/0001.jpg", "sat/0001.png"], "conversations": [
       {"from": "human", "value": "<image>\\n<image>\\nDo these ...?"}, {"from": "gpt", "value": "Yes. ..."}]}
                                                                                  # Qwen2.5-VL's fine-tuning scripts
    {"images": [...], "messages": [{"role": "user", "content": "<image><image>Do these ...?"},
                                   {"role": "assistant", "content": "Yes. ..."}]}  # LLaMA-Factory (ShareGPT)
    {"images": [...], "instruction": "<image><image>Do these ...?", "output": "Yes. ..."}
                                                                  # LLaMA-Factory (Alpaca; input, history)
    {"video": ["flight/0001.jpg", "flight/0002.jpg", ...], "images": ["sat/0001.png"], "fps": 2.0,
     "answer": "Yes. ..."}           # ours, a video query ("video": "flight/" reads a folder, "flight.mp4" a file)
    {"videos": ["flight.mp4"], "images": ["sat/0001.png"], "messages": [
       {"role": "user", "content": "<video><image>Do these ...?"}, {"role": "assistant", "content": "Yes. ..."}]}
                                                                  # LLaMA-Factory, a video query

The images are the query view, then the satellite image; or, with a video, the video is the query
(its frames in order: a list of image paths, or a folder whose image files are the frames in name
order, or a video file; one video a pair) and the satellite image is the one image, `fps` (default 2.0)
the rate the frames were sampled at. A video file (.mp4, .mov, ...; needs PyAV) is sampled at `fps` as
transformers' Qwen2.5-VL video processor samples it, and its frames are extracted once as PNG files
under `<data dir>/video_frames/` (`data/video_files.py`); the pair's rate is then what the kept frames
stand for. Relative paths are read from the file's folder, or from `image_root`. Only
the images (and the video) are required to ask; training and scoring need the answer. A conversation
may go on: later user / assistant turns (ours: `"follow_ups": [{"question": ..., "answer": ...}]`)
are trained on too (the loss covers every answer); the verdict is the first answer's, and each later
question is asked after the reference turns before it. A system prompt (a leading system turn, or
`"system"`) replaces Qwen2.5-VL's default one wherever the pair is asked. What a line leaves out is
derived: `match` from the answer's verdict (`eval.explain.verdict`: "Yes"/"No", "是"/"否"), `lang`
'zh' when the answer or question holds Chinese characters, else 'en', `question` GLEAM-X's in that
language (a flight's question for a video; `<image>` and `<video>` placeholders dropped: the
processor places the images and the video), `modality` 'pair' ('flight' for a video).

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
from gleam_jax.data import gleam_x, video_files
from gleam_jax.data.gleam_x import FLIGHT_QUESTIONS, QUESTIONS
from gleam_jax.data.sources import image_files, read_image
from gleam_jax.errors import GleamError, make_dir
from gleam_jax.models.qwen2_5_vl.processor import check_frame_sizes
from gleam_jax.eval.explain import has_chinese, verdict

DEFAULT_MODALITY = "pair"
DEFAULT_FPS = 2.0  # the rate a video's frames were sampled at, when a line does not say
_PLACEHOLDER = re.compile(r"<(?:image|video)>\s*")


_ROLES = {"conversations": ("from", "value", {"human": "user", "user": "user", "gpt": "assistant",
                                                "assistant": "assistant", "system": "system"}),
          "messages": ("role", "content", {"user": "user", "assistant": "assistant", "system": "system"})}


def _our_follow_ups(line, where):
  follow_ups = line.get("follow_ups", [])
  if not isinstance(follow_ups, list) or not all(
      isinstance(t, dict) and isinstance(t.get("question"), str) and isinstance(t.get("answer"), str)
      for t in follow_ups):
    raise GleamError(f"{where}: 'follow_ups' must be a list of {{\"question\": \"text\", \"answer\": \"text\"}} turns.")
  return [(t["question"], t["answer"]) for t in follow_ups]


def _alpaca_rounds(line, where):
  """[(question, answer)] of a line in LLaMA-Factory's Alpaca layout: `history` ([question, answer]
  pairs said before), then `instruction` (+ a non-empty `input` on the next line) and `output`."""
  history, fields = line.get("history") or [], [line.get(k, "") for k in ("instruction", "input", "output")]
  if not all(isinstance(f, str) for f in fields) or not isinstance(history, list) or not all(
      isinstance(h, list) and len(h) == 2 and all(isinstance(t, str) for t in h) for h in history):
    raise GleamError(f"{where}: the Alpaca layout holds text 'instruction', 'input' and 'output', and 'history' "
                     "as a list of [question, answer] pairs.")
  instruction, extra, output = fields
  question = instruction + ("\n" + extra if extra else "")
  return [tuple(h) for h in history] + [(question, output or None)]


def _conversation(line, where):
  """(system prompt or None, [(question, answer or None), ...]) of a line: its conversation in the Qwen
  or ShareGPT layout (an optional system turn, then user and assistant turns in turn), or our layout's
  `follow_ups` after a first round left to 'question' / 'answer'."""
  key = next((k for k in _ROLES if k in line), None)
  if key is None:
    rounds = _alpaca_rounds(line, where) if "instruction" in line else [(None, None)] + _our_follow_ups(line, where)
    return None, _images_first(rounds, where)
  who, text, roles = _ROLES[key]
  turns = line[key]
  if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get(text), str) for t in turns):
    raise GleamError(f"{where}: '{key}' must be a list of {{\"{who}\": ..., \"{text}\": \"text\"}} turns.")
  unknown = sorted({str(t.get(who)) for t in turns} - set(roles))
  if unknown:
    raise GleamError(f"{where}: '{key}' has turns from {', '.join(unknown)}; a GLEAM-X conversation holds "
                     f"turns from {', '.join(roles)} only.")
  turns = [(roles[t[who]], t[text]) for t in turns]
  system = turns.pop(0)[1] if turns and turns[0][0] == "system" else None
  in_turn = ["user", "assistant"] * (len(turns) // 2) + ["user"] * (len(turns) % 2)
  if not turns or [role for role, _ in turns] != in_turn:
    raise GleamError(f"{where}: '{key}' must hold a user turn (the question about the images), then the "
                     "assistant's answer, then any further question and answer in turn (after an optional "
                     "system turn); this one has " + (" -> ".join(role for role, _ in turns) or "no turns") + ".")
  rounds = [(turns[i][1], turns[i + 1][1] if i + 1 < len(turns) else None) for i in range(0, len(turns), 2)]
  if len(rounds) > 1 and rounds[-1][1] is None:
    raise GleamError(f"{where}: '{key}' ends with a question after the first answer; every follow-up "
                     "question needs its answer (only a lone question may be asked without one).")
  return system, _images_first(rounds, where)


def _images_first(rounds, where):
  for question, _ in rounds[1:]:
    found = _PLACEHOLDER.search(question)
    if found:
      tag = found.group().strip()
      raise GleamError(f"{where}: {'an' if tag == '<image>' else 'a'} {tag} placeholder in a later question; the "
                       "two images (or the video and the satellite image) belong to the first question.")
  return rounds


def _file(name, where, root, what):
  path = os.path.join(root, os.path.expanduser(name))
  if not os.path.isfile(path):
    raise GleamError(f"{where}: {what} {path} not found; paths are relative to the pairs file's folder "
                     "(or to config.examples.image_root).")
  return path


def _video(line, where):
  """A line's video, None without one: ours `video`, or LLaMA-Factory's `videos` holding exactly one."""
  if "video" in line and "videos" in line:
    raise GleamError(f"{where}: both 'video' and 'videos'; give the pair's one video in one of them.")
  if "videos" not in line:
    return line.get("video")
  videos = line["videos"]
  if not isinstance(videos, list) or len(videos) != 1:
    raise GleamError(f"{where}: 'videos' holds a pair's one video (the drone flight: a list of frame paths, or a "
                     f"folder of them) as a one-entry list; this line has {videos!r}.")
  return videos[0]


def _frames(video, where, root, fps, data_dir):
  """(frame paths, their rate, the video file or None) of a video given as a list of image paths (in
  order) or a folder whose image files are the frames in name order, both sampled at `fps`; or as a
  video file, sampled at `fps` and extracted once (`video_files.extract_frames`: the rate is then what
  the kept frames stand for)."""
  if isinstance(video, str):
    path = os.path.join(root, os.path.expanduser(video))
    if video_files.is_video_file(path):
      return *video_files.extract_frames(path, fps, f"{where}: video", data_dir), path
    if not os.path.isdir(path):
      raise GleamError(f"{where}: video {path} is neither a folder of frames nor a video file "
                       f"({', '.join(video_files.VIDEO_EXTENSIONS)}); give the frames (image files) as a list of "
                       "paths or a folder, or the video file, relative to the pairs file's folder (or to "
                       "config.examples.image_root).")
    return image_files(path, f"{where}: video")[0], fps, None
  if not isinstance(video, list) or not video or not all(isinstance(f, str) for f in video):
    raise GleamError(f"{where}: a video is its frames, a list of at least one image path in order (or a folder of "
                     f"them, or a video file); this line has {video!r}.")
  return [_file(frame, where, root, "frame") for frame in video], fps, None


def _fps(line, where):
  fps = line.get("fps", DEFAULT_FPS)
  if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
    raise GleamError(f"{where}: 'fps' is the rate the video's frames were sampled at (a video file's: the rate to "
                     f"sample it at), a number > 0 (default {DEFAULT_FPS}); this line has {fps!r}.")
  return float(fps)


def _pair(line, where, root, data_dir=None):
  video = _video(line, where)
  images = line.get("images", line.get("image"))
  if isinstance(images, str):
    images = [images]
  valid = isinstance(images, list) and all(isinstance(i, str) for i in images)
  if video is not None and not (valid and len(images) == 1):
    raise GleamError(f"{where}: a pair with a video query has one image, the satellite, in 'images'; this line "
                     f"has {images!r}.")
  if video is None and not (valid and len(images) == 2):
    raise GleamError(f"{where}: a GLEAM-X pair has two images (the query view, then the satellite image) in "
                     f"'images'; this line has {images!r}.")
  paths = [_file(image, where, root, "image") for image in images]
  if video is not None:
    frames, fps, video_file = _frames(video, where, root, _fps(line, where), data_dir)
    paths.insert(0, frames)
  system, rounds = _conversation(line, where)
  question = line.get("question", rounds[0][0])
  answer = line.get("answer", rounds[0][1])
  system = line.get("system", system)
  if not (system is None or isinstance(system, str)):
    raise GleamError(f"{where}: 'system' must be text (the system prompt), not {type(system).__name__}.")
  question = _PLACEHOLDER.sub("", question).strip() if question else None
  text = (answer or "") + (question or "")
  lang = line.get("lang", "zh" if has_chinese(text) else "en")
  questions = QUESTIONS if video is None else FLIGHT_QUESTIONS
  if lang not in questions and not question:
    raise GleamError(f"{where}: lang {lang!r} has no default question ({', '.join(questions)}); give 'question'.")
  if rounds[1:] and answer is None:
    raise GleamError(f"{where}: follow-up turns need the first question's answer ('answer', or the assistant's "
                     "turn).")
  match = line.get("match", verdict(answer) if answer else None)
  if answer is not None and match is None:
    raise GleamError(f"{where}: the answer does not start with a verdict (Yes/No, 是/否); give 'match': "
                     "true or false.")
  pair = dict(query=paths[0], satellite=paths[1], match=None if match is None else bool(match), lang=lang,
              modality=str(line.get("modality", DEFAULT_MODALITY if video is None else gleam_x.FLIGHT)),
              question=question or questions[lang], answer=answer, system=system, follow_ups=rounds[1:], line=where)
  if video is not None:
    pair["fps"] = fps
    if video_file:
      pair["video_file"] = video_file
  return pair


def _entries(path):
  """(where, parsed entry) of a JSON Lines file, line by line, or of a JSON array file (the `.json`
  datasets of Qwen2.5-VL's fine-tuning scripts and LLaMA-Factory: `[{...}, {...}]`), entry by entry."""
  with open(path, encoding="utf-8") as f:
    head = f.read(4096).lstrip("\ufeff \t\r\n")[:1]
    f.seek(0)
    if head == "[":
      try:
        entries = json.load(f)
      except json.JSONDecodeError as e:
        raise GleamError(f"{path}:{e.lineno}: not JSON ({e.msg} at column {e.colno}); the file starts with '[', "
                         "so it is read as one JSON array of pairs.") from None
      yield from ((f"{path}:entry {i}", entry) for i, entry in enumerate(entries, 1))
      return
    for number, text in enumerate(f, 1):
      if not text.strip():
        continue
      try:
        yield f"{path}:{number}", json.loads(text)
      except json.JSONDecodeError as e:
        raise GleamError(f"{path}:{number}: not JSON ({e.msg} at column {e.colno}); each line holds one pair as a "
                         "JSON object.") from None


def read_pairs(path, image_root=None, need_answers=True, data_dir=None):
  """The pairs of a JSON Lines file, or of a JSON array file, (see the module docstring) as GLEAM-X
  examples whose 'query' and 'satellite' are image paths (read by `visuals_of`); a video's 'query' is
  its list of frame paths and 'fps' its rate (a video file's extracted frames, the file in
  'video_file'). Every image and frame is checked to exist. With `need_answers`, a pair without an
  answer is an error (training and scoring need one). `data_dir`: where video files' frames are
  extracted (`video_files.extract_frames`; default $GLEAM_DATA_DIR, else ~/gleam_data)."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise GleamError(f"pairs file {path} not found: give a JSON Lines file, one pair per line, or a JSON array "
                     "of pairs (gleam_jax/data/pair_files.py).")
  root = os.path.expanduser(image_root) if image_root else os.path.dirname(os.path.abspath(path))
  pairs = []
  for where, line in _entries(path):
    if not isinstance(line, dict):
      raise GleamError(f"{where}: each pair is a JSON object, not {type(line).__name__}.")
    pair = _pair(line, where, root, data_dir)
    if need_answers and pair["answer"] is None:
      raise GleamError(f"{where}: no answer ('answer', or the assistant's turn); training and scoring need one.")
    pairs.append(pair)
  if not pairs:
    raise GleamError(f"pairs file {path} holds no pairs.")
  return pairs


def is_video_pair(example):
  """Whether the example's query is a video: a list of frames (paths or arrays)."""
  return isinstance(example["query"], (list, tuple))


def _array(image, size):
  image = read_image(image) if isinstance(image, str) else image
  return resize(image, size) if size else image


def visuals_of(example, size=None):
  """(images, videos) as uint8 RGB arrays, read (upright) where the example holds paths, resized to
  `size` (height, width) when given: ([query, satellite], []) for an image pair, ([satellite],
  [frames]) for a video pair."""
  satellite = _array(example["satellite"], size)
  if is_video_pair(example):
    frames = [_array(frame, size) for frame in example["query"]]
    check_frame_sizes([(f.shape[1], f.shape[0]) for f in frames], example.get("line", "A flight"),
                      ", or resize every image and frame to one (config.examples.image_size)")
    return [satellite], [frames]
  return [_array(example["query"], size), satellite], []


def prompt_visuals(example, size=None):
  """(images, keyword arguments) for the processor's `encode_prompt` / `build_sft_example`: a video pair's
  satellite image, with its video (`videos`, `fps`) first in the prompt; an image pair's two images."""
  images, videos = visuals_of(example, size)
  if not videos:
    return images, {}
  return images, dict(videos=videos, fps=float(example.get("fps", DEFAULT_FPS)), videos_first=True)


def write_pairs(examples, out_dir, name="pairs.jsonl"):
  """Writes examples in our layout: `out_dir/name` and their images (a video's frames) as PNG in
  `out_dir/images/`; returns the JSONL path."""
  make_dir(os.path.join(out_dir, "images"), "--out")
  path = os.path.join(out_dir, name)

  def save(image, file_name):
    relative = os.path.join("images", f"{os.path.splitext(name)[0]}_{file_name}.png")
    Image.fromarray(image).save(os.path.join(out_dir, relative))
    return relative

  with open(path, "w", encoding="utf-8") as f:
    for i, ex in enumerate(examples):
      line = {}
      if is_video_pair(ex):
        line["video"] = [save(frame, f"{i:06d}_query_f{k:03d}") for k, frame in enumerate(ex["query"])]
        line["images"] = [save(ex["satellite"], f"{i:06d}_satellite")]
        line["fps"] = float(ex.get("fps", DEFAULT_FPS))
      else:
        line["images"] = [save(ex[role], f"{i:06d}_{role}") for role in ("query", "satellite")]
      line.update(question=ex["question"], answer=ex["answer"], match=bool(ex["match"]), lang=ex["lang"],
                  modality=ex["modality"])
      if ex.get("system") is not None:
        line["system"] = ex["system"]
      if ex.get("follow_ups"):
        line["follow_ups"] = [dict(question=q, answer=a) for q, a in ex["follow_ups"]]
      f.write(json.dumps(line, ensure_ascii=False) + "\n")
  return path


def summary(pairs):
  """Lines describing a pairs file: how many pairs, matching or not, per language and modality, with a
  video query (their frame counts and rates), and the image and frame sizes (read from the files'
  headers), so a file can be checked before a job reads it."""
  from collections import Counter  # pylint: disable=g-import-not-at-top
  from gleam_jax.data.photo_camera import open_image  # pylint: disable=g-import-not-at-top
  count = lambda key, among=pairs: ", ".join(f"{k} {n}" for k, n in sorted(Counter(str(p[key]) for p in among).items()))
  sizes = Counter()
  for p in pairs:
    files = [("frame", frame) for frame in p["query"]] if is_video_pair(p) else [("query", p["query"])]
    for role, file in files + [("satellite", p["satellite"])]:
      with open_image(file) as image:
        sizes[(role, image.size)] += 1
  size_text = lambda role: ", ".join(f"{w}x{h} {n}" for (r, (w, h)), n in sorted(sizes.items()) if r == role)
  answered = [p for p in pairs if p["answer"] is not None]
  lines = [f"{len(pairs)} pairs, {len(answered)} with an answer"]
  if answered:
    lines.append(f"match: {count('match')}")
  conversations = sum(bool(p.get("follow_ups")) for p in pairs)
  systems = Counter(p["system"] for p in pairs if p.get("system") is not None)
  if conversations or systems:
    lines.append(f"{conversations} with follow-up turns, {sum(systems.values())} with a system prompt "
                 f"({len(systems)} distinct)")
  videos = [p for p in pairs if is_video_pair(p)]
  if videos:
    frames = [len(p["query"]) for p in videos]
    files = sum("video_file" in p for p in videos)
    rates = ", ".join(f"{k:g} {n}" for k, n in sorted(Counter(round(p["fps"], 3) for p in videos).items()))
    lines.append(f"{len(videos)} with a video query ({files} from video files), {min(frames)}-{max(frames)} "
                 f"frames, fps: {rates}")
  lines += [f"lang: {count('lang')}", f"modality: {count('modality')}"]
  if len(videos) < len(pairs):
    lines.append(f"query sizes (w x h): {size_text('query')}")
  if videos:
    lines.append(f"frame sizes (w x h): {size_text('frame')}")
  lines.append(f"satellite sizes (w x h): {size_text('satellite')}")
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
  from gleam_jax.train import sft  # pylint: disable=g-import-not-at-top (GLEAM-C's negatives, where the job mines them)
  examples = gleam_x.job_examples(args.config, args.draw, sft.job_negatives(args.config, args.draw))
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
