"""GLEAM-X on your own pairs: JSON Lines pairs files (data/pair_files.py), a job trained on them and
`python -m gleam_jax.explain --pairs` answering them."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers
from PIL import Image

from config_files import REPO, tiny_config
from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax import explain, export, main
from gleam_jax.data import gleam_x, pair_files
from gleam_jax.errors import GleamError
from gleam_jax.models.qwen2_5_vl import processor, tiny_dir
from gleam_jax.train import sft
from gleam_jax.utils.writer import read_metrics

QUESTION_EN, QUESTION_ZH = gleam_x.QUESTIONS["en"], gleam_x.QUESTIONS["zh"]
FLIGHT_EN, FLIGHT_ZH = gleam_x.FLIGHT_QUESTIONS["en"], gleam_x.FLIGHT_QUESTIONS["zh"]


def _image(path, size, seed):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8)).save(path)


def _write_lines(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n" for line in lines)
  return str(path)


def test_the_three_layouts_read_as_the_same_pairs(tmp_path):
  """Ours, Qwen's fine-tuning layout and LLaMA-Factory's give the same pair; what a line leaves out is
  derived (match from the verdict, lang from the characters, GLEAM-X's question, modality 'pair')."""
  for name in ("q.jpg", "s.png"):
    _image(tmp_path / "img" / name, (40, 30), seed=len(name))
  images = ["img/q.jpg", "img/s.png"]
  answer = "No. The drone view shows a suburb, while the satellite image shows an old town."
  lines = [
    dict(images=images, answer=answer),
    dict(image=images, conversations=[dict(**{"from": "human"}, value="<image>\n<image>\n" + QUESTION_EN),
                                      dict(**{"from": "gpt"}, value=answer)]),
    dict(images=images, messages=[dict(role="user", content="<image><image>" + QUESTION_EN),
                                  dict(role="assistant", content=answer)]),
    "",  # blank lines are skipped
    dict(images=images, messages=[dict(role="user", content="<image><image>" + QUESTION_ZH),
                                  dict(role="assistant", content="是。两个视角都显示广场周围的老城区。")], modality="uav"),
    dict(images=images, answer="Looks alike.", match=True, lang="en", question="Same place?"),
  ]
  pairs = pair_files.read_pairs(_write_lines(tmp_path / "pairs.jsonl", lines))
  assert len(pairs) == 5
  paths = [str(tmp_path / p) for p in images]
  for i, pair in enumerate(pairs[:3]):
    assert pair == dict(query=paths[0], satellite=paths[1], match=False, lang="en", modality="pair",
                        question=QUESTION_EN, answer=answer, system=None, follow_ups=[],
                        line=f"{tmp_path}/pairs.jsonl:{i + 1}")
  assert (pairs[3]["match"], pairs[3]["lang"], pairs[3]["question"], pairs[3]["modality"]) == (True, "zh", QUESTION_ZH, "uav")
  assert pairs[3]["line"].endswith(":5")
  assert (pairs[4]["match"], pairs[4]["question"]) == (True, "Same place?")
  assert pair_files.summary(pairs) == [
      "5 pairs, 5 with an answer", "match: False 3, True 2", "lang: en 4, zh 1", "modality: pair 4, uav 1",
      "query sizes (w x h): 30x40 5", "satellite sizes (w x h): 30x40 5"]
  # the same pairs as one JSON array (the .json datasets of Qwen's scripts and LLaMA-Factory), entries named
  with open(tmp_path / "pairs.json", "w", encoding="utf-8") as f:
    json.dump([line for line in lines if line], f, ensure_ascii=False, indent=2)
  from_array = pair_files.read_pairs(str(tmp_path / "pairs.json"))
  assert [p["line"] for p in from_array] == [f"{tmp_path}/pairs.json:entry {i}" for i in range(1, 6)]
  assert [{k: v for k, v in p.items() if k != "line"} for p in from_array] == [
      {k: v for k, v in p.items() if k != "line"} for p in pairs]
  query, satellite = pair_files.visuals_of(pairs[0])[0]
  assert query.shape == satellite.shape == (40, 30, 3) and query.dtype == np.uint8
  assert [im.shape for im in pair_files.visuals_of(pairs[0], size=(28, 56))[0]] == [(28, 56, 3)] * 2
  # another image root; questions without answers read when answers are not needed
  moved = tmp_path / "elsewhere"
  os.rename(tmp_path / "img", moved)
  asked = pair_files.read_pairs(_write_lines(tmp_path / "ask.jsonl", [dict(images=["q.jpg", "s.png"], lang="zh")]),
                                image_root=str(moved), need_answers=False)
  assert asked[0]["query"] == str(moved / "q.jpg") and asked[0]["answer"] is None and asked[0]["match"] is None
  assert asked[0]["question"] == QUESTION_ZH


def test_conversations_with_a_system_prompt_and_follow_up_turns(tmp_path):
  """A leading system turn (or 'system') and later question/answer turns are read in all three layouts,
  written back by `write_pairs`, trained on (labels on every answer) and counted by `summary`."""
  for name in ("q.png", "s.png"):
    _image(tmp_path / name, (56, 56), seed=len(name))
  images, system = ["q.png", "s.png"], "You compare a drone photo with a satellite image."
  first, why, because = "Yes. The same crossroads.", "Which road?", "The one north of the roundabout."
  lines = [
    dict(image=images, conversations=[{"from": "system", "value": system},
                                      {"from": "human", "value": "<image>\n<image>\n" + QUESTION_EN},
                                      {"from": "gpt", "value": first}, {"from": "human", "value": why},
                                      {"from": "gpt", "value": because}]),
    dict(images=images, system=system, messages=[dict(role="user", content="<image><image>" + QUESTION_EN),
                                                 dict(role="assistant", content=first), dict(role="user", content=why),
                                                 dict(role="assistant", content=because)]),
    dict(images=images, answer=first, system=system, follow_ups=[dict(question=why, answer=because)]),
    dict(images=images, system=system, history=[["<image><image>", first]], instruction=why.split()[0],
         input=" ".join(why.split()[1:]), output=because),  # LLaMA-Factory's Alpaca layout
  ]
  pairs = pair_files.read_pairs(_write_lines(tmp_path / "talk.jsonl", lines))
  for pair in pairs:
    assert (pair["question"], pair["answer"], pair["match"]) == (QUESTION_EN, first, True)
    assert (pair["system"], pair["follow_ups"]) == (system, [(why.replace(" ", "\n"), because)] if "history" in
                                                    lines[pairs.index(pair)] else [(why, because)])
  assert pair_files.summary(pairs)[1:3] == ["match: True 4", "4 with follow-up turns, 4 with a system prompt (1 distinct)"]
  proc = processor.load_processor(tiny_dir.write_tiny_qwen_dir(str(tmp_path / "qwen"), min_pixels=56 * 56,
                                                               max_pixels=56 * 56))
  example = sft.encode(proc, pairs[0])
  want = proc.build_sft_example(pair_files.visuals_of(pairs[0])[0], QUESTION_EN, first, system=system,
                                follow_ups=[(why, because)])
  np.testing.assert_array_equal(example["labels"], want["labels"])
  text = proc.decode(example["input_ids"], skip_special_tokens=False)
  assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>") and text.count("<|im_start|>assistant") == 2
  assert proc.decode(example["labels"][example["labels"] >= 0]) == first + because  # both answers, no question
  # written in our layout and read back: the same pairs
  synthetic = [dict(pairs[0], query=pair_files.visuals_of(pairs[0])[0][0], satellite=pair_files.visuals_of(pairs[0])[0][1])]
  again = pair_files.read_pairs(pair_files.write_pairs(synthetic, str(tmp_path / "written")))
  assert {k: again[0][k] for k in ("question", "answer", "system", "follow_ups", "match")} == {
      k: pairs[0][k] for k in ("question", "answer", "system", "follow_ups", "match")}
  bad = {
    "role": ([dict(role="user", content="Same?"), dict(role="tool", content="...")], r"'messages' has turns from tool; .*user, assistant, system only"),
    "order": ([dict(role="user", content="Same?"), dict(role="user", content="Really?")],
              r"'messages' must hold a user turn .*; this one has user -> user"),
    "system later": ([dict(role="user", content="Same?"), dict(role="system", content=system)],
                     r"'messages' must hold .* this one has user -> system"),
    "unanswered": ([dict(role="user", content="Same?"), dict(role="assistant", content=first),
                    dict(role="user", content=why)], r"'messages' ends with a question after the first answer"),
    "images later": ([dict(role="user", content="Same?"), dict(role="assistant", content=first),
                      dict(role="user", content="<image>" + why), dict(role="assistant", content=because)],
                     r"an <image> placeholder in a later question"),
    "only a system turn": ([dict(role="system", content=system)], r"'messages' must hold .* this one has no turns"),
  }
  for what, (turns, message) in bad.items():
    with pytest.raises(GleamError, match=r"talk.jsonl:1: " + message):
      pair_files.read_pairs(_write_lines(tmp_path / "talk.jsonl", [dict(images=images, messages=turns)]))
  alpaca = pair_files.read_pairs(_write_lines(tmp_path / "talk.jsonl", [
      dict(images=images, instruction="<image>\n<image>\n" + QUESTION_ZH, input="", output="是。同一个路口。")]))
  assert (alpaca[0]["question"], alpaca[0]["answer"], alpaca[0]["lang"], alpaca[0]["follow_ups"]) == (
      QUESTION_ZH, "是。同一个路口。", "zh", [])
  for line, message in ((dict(images=images, answer=first, follow_ups=[why]), r"'follow_ups' must be a list"),
                        (dict(images=images, instruction="Same?", output=first, history=["Why?"]),
                         r"the Alpaca layout holds text 'instruction'"),
                        (dict(images=images, instruction="<image>Why?", output=because, history=[["<image><image>Same?", first]]),
                         r"an <image> placeholder in a later question"),
                        (dict(images=images, answer=first, system=["x"]), r"'system' must be text")):
    with pytest.raises(GleamError, match=r"talk.jsonl:1: " + message):
      pair_files.read_pairs(_write_lines(tmp_path / "talk.jsonl", [line]))


def test_a_job_records_its_system_prompt_and_is_asked_with_it(tmp_path):
  """A job trained on pairs with a system prompt writes it to system_prompt.json; `explain --workdir`,
  `explain --pairs` and (through the same `load_model`) `localize` ask with it unless told otherwise."""
  system = "You compare a drone photo with a satellite image."
  lines = []
  for i in range(8):
    for role in ("q", "s"):
      _image(tmp_path / f"{role}{i}.png", (56, 56), seed=10 * i + len(role))
    lines.append(dict(images=[f"q{i}.png", f"s{i}.png"], answer=("Yes. The same river." if i % 2 else "No. A park."),
                      system=system, follow_ups=[dict(question="Why?", answer="The river bends alike.")] * (i < 3)))
  train = _write_lines(tmp_path / "train.jsonl", lines)
  workdir = str(tmp_path / "job")
  evaluated = main.run(tiny_config("x_sft", "/no/data/needed", **{
      "total_steps": 3, "checkpoint.every_steps": 3, "eval.max_new_tokens": 4, "examples.train_file": train,
      "examples.eval_file": train}), workdir)
  # the evaluation asks the follow-ups too, as `explain --pairs` does with the job's system prompt
  rows, answered = explain.answer_pairs(train, str(tmp_path / "eval.jsonl"), workdir=workdir, max_new_tokens=4,
                                        log=lambda _: None)
  assert "follow_up_rouge_l" in evaluated and answered == pytest.approx(evaluated)
  assert [len(r.get("follow_ups", [])) for r in rows] == [1, 1, 1, 0, 0, 0, 0, 0]
  with open(os.path.join(workdir, "system_prompt.json"), encoding="utf-8") as f:
    assert json.load(f) == dict(system=system, distinct=1)
  assert sft.trained_system_prompt(workdir) == (system, 1)
  views = [str(tmp_path / "q1.png"), str(tmp_path / "s1.png")]
  ask = _write_lines(tmp_path / "ask.jsonl", [dict(images=[f"q{i}.png", f"s{i}.png"]) for i in range(2)])
  answer = lambda **kw: explain.answer_pairs(ask, str(tmp_path / f"a{len(kw)}{kw.get('system', '')[:3]}.jsonl"),
                                             workdir=workdir, max_new_tokens=4, log=lambda _: None, **kw)[0]
  as_trained, told, other = answer(), answer(system=system), answer(system="You are a helpful assistant.")
  assert [r["p_yes"] for r in as_trained] == pytest.approx([r["p_yes"] for r in told], abs=1e-6)
  assert [r["p_yes"] for r in as_trained] != pytest.approx([r["p_yes"] for r in other], abs=1e-6)
  assert all(r["system"] == system for r in as_trained) and all("system" in r for r in other)
  # what a stopped run answered with one system prompt is not reused when asking with another
  (tmp_path / "resumed.jsonl.partial").write_text("".join(json.dumps(r) + "\n" for r in as_trained))
  logged = []
  explain.answer_pairs(ask, str(tmp_path / "resumed.jsonl"), workdir=workdir, max_new_tokens=4, log=logged.append,
                       system="Another prompt.")
  assert not any(line.startswith("resuming") for line in logged) and "2/2 pairs answered" in logged[-2]
  alone = explain.explain(None, views, max_new_tokens=4, workdir=workdir, write=lambda _: None)
  assert alone == explain.explain(None, views, max_new_tokens=4, workdir=workdir, write=lambda _: None, system=system)
  # exported, the prompt is the chat template's default system turn (transformers) and explain's default
  out = str(tmp_path / "exported")
  assert "its system prompt is the default (chat_template.json)" in export.export(workdir, out)
  with open(os.path.join(out, "chat_template.json"), encoding="utf-8") as f:
    template = json.load(f)["chat_template"]
  hf_text = transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(
      [dict(role="user", content="Same place?")], chat_template=template, tokenize=False, add_generation_prompt=True)
  assert hf_text == processor.chat_prompt(0, "Same place?", system)
  assert explain.explain(out, views, max_new_tokens=4, write=lambda _: None) == alone
  # several prompts: none is assumed; a job from before the record: Qwen2.5-VL's default
  sft.write_system_prompt(workdir, [dict(system=system), dict(system=None), dict()])
  assert sft.trained_system_prompt(workdir) == (None, 2)
  with open(os.path.join(workdir, "system_prompt.json"), encoding="utf-8") as f:
    assert json.load(f)["prompts"] == [None, system]
  assert sft.trained_system_prompt(str(tmp_path)) == (None, 0)


def test_a_video_query_reads_as_its_frames(tmp_path):
  """A query given as a video (a drone flight's frames: a list of paths, or a folder read in name order)
  comes before the satellite image, the one image; in our layout and LLaMA-Factory's (`videos`, the
  `<video>` placeholder dropped). Its question defaults to the flight's, its modality to 'flight'."""
  frames = {}
  for k in (3, 1, 2):  # written out of order: a folder is read in name order
    _image(tmp_path / "flight" / f"{k:04d}.png", (24, 32), seed=k)
    frames[k] = np.asarray(Image.open(tmp_path / "flight" / f"{k:04d}.png"))
  (tmp_path / "flight" / "notes.txt").write_text("not a frame")
  _image(tmp_path / "sat.png", (40, 40), seed=9)
  _image(tmp_path / "q.png", (40, 30), seed=8)
  frame = lambda k: str(tmp_path / "flight" / f"{k:04d}.png")
  yes, no = "Yes. The flight passes the same roundabout.", "No. The flight follows a river the map lacks."
  lines = [
    dict(video=["flight/0002.png", "flight/0001.png"], images=["sat.png"], answer=yes, fps=4),
    dict(video="flight", image="sat.png", answer="否。航线沿着一条河。"),
    dict(videos=[["flight/0001.png", "flight/0003.png"]], images=["sat.png"], modality="uav",
         messages=[dict(role="user", content="<video><image>Is this the place?"), dict(role="assistant", content=no)]),
    dict(videos=["flight"], images=["sat.png"], fps=0.5,
         messages=[dict(role="user", content="<video>\n<image>\n" + FLIGHT_EN), dict(role="assistant", content=yes)]),
    dict(images=["q.png", "sat.png"], answer=no, fps=3.0),  # an image pair: no fps
  ]
  pairs = pair_files.read_pairs(_write_lines(tmp_path / "pairs.jsonl", lines))
  assert pairs[0] == dict(query=[frame(2), frame(1)], satellite=str(tmp_path / "sat.png"), match=True, lang="en",
                          modality="flight", question=FLIGHT_EN, answer=yes, system=None, follow_ups=[], fps=4.0,
                          line=f"{tmp_path}/pairs.jsonl:1")
  assert (pairs[1]["query"], pairs[1]["fps"], pairs[1]["lang"], pairs[1]["question"], pairs[1]["match"]) == (
      [frame(1), frame(2), frame(3)], 2.0, "zh", FLIGHT_ZH, False)
  assert (pairs[2]["query"], pairs[2]["question"], pairs[2]["answer"], pairs[2]["match"], pairs[2]["modality"]) == (
      [frame(1), frame(3)], "Is this the place?", no, False, "uav")
  assert (pairs[3]["query"], pairs[3]["question"], pairs[3]["match"], pairs[3]["fps"], pairs[3]["modality"]) == (
      [frame(1), frame(2), frame(3)], FLIGHT_EN, True, 0.5, "flight")
  assert pairs[4]["query"] == str(tmp_path / "q.png") and "fps" not in pairs[4] and pairs[4]["modality"] == "pair"
  assert [pair_files.is_video_pair(p) for p in pairs] == [True, True, True, True, False]
  assert pair_files.summary(pairs) == [
      "5 pairs, 5 with an answer", "match: False 3, True 2",
      "4 with a video query (0 from video files), 2-3 frames, fps: 0.5 1, 2 2, 4 1",
      "lang: en 4, zh 1", "modality: flight 3, pair 1, uav 1", "query sizes (w x h): 30x40 1",
      "frame sizes (w x h): 32x24 10", "satellite sizes (w x h): 40x40 5"]
  # the visuals: ([satellite], [frames]) for a video, ([query, satellite], []) for images; paths or arrays
  satellite = np.asarray(Image.open(tmp_path / "sat.png"))
  images, videos = pair_files.visuals_of(pairs[1])
  assert len(images) == 1 and len(videos) == 1 and len(videos[0]) == 3
  np.testing.assert_array_equal(images[0], satellite)
  for got, k in zip(videos[0], (1, 2, 3)):
    np.testing.assert_array_equal(got, frames[k])
  images, videos = pair_files.visuals_of(pairs[0], size=(28, 56))
  assert [im.shape for im in images] == [(28, 56, 3)] and [f.shape for f in videos[0]] == [(28, 56, 3)] * 2
  assert videos[0][0].dtype == np.uint8 and not np.array_equal(videos[0][0], videos[0][1])  # frames 2, 1: distinct
  images, videos = pair_files.visuals_of(pairs[4])
  assert videos == [] and [im.shape for im in images] == [(40, 30, 3), (40, 40, 3)]
  drawn = dict(query=[frames[3], frames[1]], satellite=satellite)
  images, videos = pair_files.visuals_of(drawn)
  assert images[0] is satellite and videos[0][0] is frames[3] and videos[0][1] is frames[1]
  images, videos = pair_files.visuals_of(drawn, size=(12, 16))
  np.testing.assert_array_equal(videos[0][1], np.asarray(Image.fromarray(frames[1]).resize((16, 12), Image.BILINEAR)))
  assert images[0].shape == (12, 16, 3)
  assert [im.shape for im in pair_files.visuals_of(pairs[4], size=(28, 28))[0]] == [(28, 28, 3)] * 2
  images, video_args = pair_files.prompt_visuals(pairs[0])  # the processor's arguments: the video first
  assert [im.shape for im in images] == [(40, 40, 3)] and video_args.keys() == {"videos", "fps", "videos_first"}
  assert (video_args["fps"], video_args["videos_first"], len(video_args["videos"][0])) == (4.0, True, 2)
  np.testing.assert_array_equal(video_args["videos"][0][0], frames[2])
  assert pair_files.prompt_visuals(pairs[4])[1] == {} and len(pair_files.prompt_visuals(pairs[4])[0]) == 2


def test_bad_video_pairs_are_named(tmp_path):
  _image(tmp_path / "f" / "0001.png", (8, 8), 0)
  _image(tmp_path / "s.png", (8, 8), 1)
  (tmp_path / "empty").mkdir()
  ask = [dict(role="user", content="<video><image>Same?"), dict(role="assistant", content="Yes. Same.")]
  bad = {
    "two images": (dict(video=["f/0001.png"], images=["s.png", "s.png"], answer="Yes."),
                   r"pairs.jsonl:1: a pair with a video query has one image, the satellite, in 'images'; "
                   r"this line has"),
    "no image": (dict(video=["f/0001.png"], answer="Yes."), r"pairs.jsonl:1: a pair with a video query has one image"),
    "missing frame": (dict(video=["f/0001.png", "f/nope.png"], images=["s.png"], answer="Yes."),
                      r"pairs.jsonl:1: frame .*f/nope.png not found; paths are relative to the pairs file's folder"),
    "no frames": (dict(video=[], images=["s.png"], answer="Yes."),
                  r"pairs.jsonl:1: a video is its frames, a list of at least one image path in order"),
    "frame paths": (dict(video=["f/0001.png", 2], images=["s.png"], answer="Yes."),
                    r"pairs.jsonl:1: a video is its frames"),
    "no folder": (dict(video="nowhere", images=["s.png"], answer="Yes."),
                  r"pairs.jsonl:1: video .*nowhere is neither a folder of frames nor a video file .*; give the "
                  r"frames .* as a list of paths or a folder, or the video file"),
    "a missing video file": (dict(videos=["flight.mp4"], images=["s.png"], messages=ask),
                             r"pairs.jsonl:1: video: video .*flight.mp4 not found"),
    "an empty folder": (dict(video="empty", images=["s.png"], answer="Yes."),
                        r"pairs.jsonl:1: video=.*empty has no images"),
    "fps 0": (dict(video=["f/0001.png"], images=["s.png"], answer="Yes.", fps=0),
              r"pairs.jsonl:1: 'fps' is the rate the video's frames were sampled at .*, a number > 0 .*this line has 0\."),
    "fps < 0": (dict(video=["f/0001.png"], images=["s.png"], answer="Yes.", fps=-2.5),
                r"pairs.jsonl:1: 'fps' .* has -2.5"),
    "fps text": (dict(video=["f/0001.png"], images=["s.png"], answer="Yes.", fps="2"),
                 r"pairs.jsonl:1: 'fps' .* has '2'"),
    "video later": (dict(videos=[["f/0001.png"]], images=["s.png"], messages=ask + [
                        dict(role="user", content="<video>Why?"), dict(role="assistant", content="The roads.")]),
                    r"pairs.jsonl:1: a <video> placeholder in a later question; .*belong to the first question"),
    "two videos": (dict(videos=[["f/0001.png"], ["f/0001.png"]], images=["s.png"], messages=ask),
                   r"pairs.jsonl:1: 'videos' holds a pair's one video .* as a one-entry list; this line has"),
    "both keys": (dict(video=["f/0001.png"], videos=[["f/0001.png"]], images=["s.png"], answer="Yes."),
                  r"pairs.jsonl:1: both 'video' and 'videos'; give the pair's one video in one of them"),
  }
  for what, (line, message) in bad.items():
    with pytest.raises(GleamError, match=message):
      pair_files.read_pairs(_write_lines(tmp_path / "pairs.jsonl", [line]))
  # the same lines, well formed, read
  assert pair_files.read_pairs(_write_lines(tmp_path / "pairs.jsonl", [
      dict(videos=[["f/0001.png"]], images=["s.png"], messages=ask, fps=1)]))[0]["fps"] == 1.0
  # frames of two sizes: named with the line when the pair is read for a batch, fine resized to one size
  _image(tmp_path / "f" / "0002.png", (8, 12), 1)
  mixed = pair_files.read_pairs(_write_lines(tmp_path / "pairs.jsonl", [
      dict(video=["f/0001.png", "f/0002.png"], images=["s.png"], answer="Yes.")]))[0]
  with pytest.raises(GleamError, match=r"pairs.jsonl:1: the video's frames differ in size \(.*\).*examples.image_size"):
    pair_files.visuals_of(mixed)
  assert [f.shape for f in pair_files.visuals_of(mixed, size=(8, 8))[1][0]] == [(8, 8, 3)] * 2


def test_a_video_example_is_written_as_its_frames_and_read_back(tmp_path):
  """`write_pairs` writes a video example's frames as PNG files (`video`), the satellite as the one
  image and its `fps`; read back, the pair has the same frames, pixel for pixel."""
  rng = np.random.default_rng(3)
  view = lambda: rng.integers(0, 256, (24, 32, 3), np.uint8)
  flight, other = [view() for _ in range(3)], [view() for _ in range(2)]
  examples = [
    dict(query=flight, satellite=view(), match=True, lang="en", modality="flight", question=FLIGHT_EN,
         answer="Yes. The same bridge.", fps=5.0),
    dict(query=view(), satellite=view(), match=False, lang="en", modality="uav", question=QUESTION_EN,
         answer="No. A park."),
    dict(query=tuple(other), satellite=view(), match=False, lang="zh", modality="flight", question=FLIGHT_ZH,
         answer="否。不是同一座桥。", follow_ups=[("为什么？", "河流的走向不同。")]),
  ]
  path = pair_files.write_pairs(examples, str(tmp_path / "out"), "flights.jsonl")
  with open(path, encoding="utf-8") as f:
    written = [json.loads(line) for line in f]
  assert written[0]["video"] == [f"images/flights_000000_query_f{k:03d}.png" for k in range(3)]
  assert (written[0]["images"], written[0]["fps"]) == (["images/flights_000000_satellite.png"], 5.0)
  assert (written[2]["fps"], len(written[2]["video"])) == (2.0, 2)
  assert "video" not in written[1] and "fps" not in written[1] and written[1]["images"] == [
      "images/flights_000001_query.png", "images/flights_000001_satellite.png"]
  pairs = pair_files.read_pairs(path)
  for pair, example in zip(pairs, examples):
    images, videos = pair_files.visuals_of(pair)
    want_images, want_videos = pair_files.visuals_of(example)
    assert len(images) == len(want_images) and [len(v) for v in videos] == [len(v) for v in want_videos]
    for got, want in zip(images + sum(videos, []), want_images + sum(want_videos, [])):
      np.testing.assert_array_equal(got, want)
    for key in ("match", "lang", "modality", "question", "answer"):
      assert pair[key] == example[key]
  assert videos and len(videos[0]) == 2  # the last pair checked is a video
  assert (pairs[0]["fps"], pairs[2]["fps"], pairs[2]["follow_ups"]) == (5.0, 2.0, [("为什么？", "河流的走向不同。")])
  assert pairs[0]["query"] == [str(tmp_path / "out" / p) for p in written[0]["video"]]
  assert pair_files.summary(pairs) == [
      "3 pairs, 3 with an answer", "match: False 2, True 1",
      "1 with follow-up turns, 0 with a system prompt (0 distinct)",
      "2 with a video query (0 from video files), 2-3 frames, fps: 2 1, 5 1", "lang: en 2, zh 1", "modality: flight 2, uav 1",
      "query sizes (w x h): 32x24 1", "frame sizes (w x h): 32x24 5", "satellite sizes (w x h): 32x24 3"]


def test_bad_pairs_files_are_named(tmp_path):
  _image(tmp_path / "q.png", (8, 8), 0)
  bad = {
    "not JSON": (["{\"images\": [\"q.png\""], r"pairs.jsonl:1: not JSON"),
    "text": (['"q.png"'], r"pairs.jsonl:1: each pair is a JSON object, not str"),
    "an array of lists": (["[[1, 2]]"], r"pairs.jsonl:entry 1: each pair is a JSON object, not list"),
    "a broken array": (["[", '{"images": ["q.png", "q.png"], "answer": "Yes."},', "]"],
                       r"pairs.jsonl:3: not JSON .*read as one JSON array of pairs"),
    "one image": ([dict(images=["q.png"], answer="Yes.")], r"pairs.jsonl:1: a GLEAM-X pair has two images"),
    "missing image": ([dict(images=["q.png", "q.png"], answer="Yes."), dict(images=["q.png", "nope.png"], answer="No.")],
                      r"pairs.jsonl:2: image .*nope.png not found"),
    "turns": ([dict(images=["q.png", "q.png"], messages=[dict(role="user", content=[{"type": "image"}])])],
              r"pairs.jsonl:1: 'messages' must be a list of \{\"role\": ..., \"content\": \"text\"\} turns"),
    "image paths": ([dict(images=["q.png", 3], answer="Yes.")], r"pairs.jsonl:1: a GLEAM-X pair has two images"),
    "no verdict": ([dict(images=["q.png", "q.png"], answer="Perhaps.")], r"pairs.jsonl:1: the answer does not start"),
    "no answer": ([dict(images=["q.png", "q.png"])], r"pairs.jsonl:1: no answer"),
    "empty": ([""], r"holds no pairs"),
  }
  for what, (lines, message) in bad.items():
    with pytest.raises(GleamError, match=message):
      pair_files.read_pairs(_write_lines(tmp_path / "pairs.jsonl", lines))
  with pytest.raises(GleamError, match=r"pairs file .*absent.jsonl not found"):
    pair_files.read_pairs(str(tmp_path / "absent.jsonl"))


def test_batches_group_examples_by_image_layout(tmp_path):
  """Examples of one modality with images of two sizes go to two batch groups (one compiled step each);
  `examples.image_size` resizes them into one."""
  proc = processor.load_processor(tiny_dir.write_tiny_qwen_dir(str(tmp_path / "qwen"), min_pixels=56 * 56,
                                                               max_pixels=112 * 112))
  rng = np.random.default_rng(0)
  views = lambda h, w: rng.integers(0, 256, (h, w, 3), np.uint8)
  examples = [dict(query=views(*size), satellite=views(56, 56), question="Same?", answer="Yes.", modality=m)
              for size, m in (((56, 56), "uav"), ((56, 112), "uav"), ((56, 56), "uav"), ((112, 56), "ground"))]
  rows = sft.EncodedRows(proc, examples, keep=False)
  assert rows.group_names() == ["uav 4x4+4x4", "uav 4x8+4x4", "uav 4x4+4x4", "ground"]
  again = rows[1]  # re-encoded: as the first pass saw it
  assert len(again["input_ids"]) == rows.lengths[1] and again["image_grid_thw"].tolist() == [[1, 4, 8], [1, 4, 4]]
  same = sft.EncodedRows(proc, examples, image_size=(56, 56))
  assert same.group_names() == ["uav", "uav", "uav", "ground"] and len(set(same.lengths)) == 1
  with pytest.raises(GleamError, match=r"config.batch_size=2 is larger than .*'uav 4x8\+4x4': 1.*examples.image_size"):
    sft.Batches(rows, rows.group_names(), 2, 0, 64, None)


def test_a_job_on_pairs_files_trains_and_answers_as_on_the_synthetic_draw(tiny_cfg, tmp_path):
  """The tiny job's own pairs written as files (`python -m gleam_jax.data.pair_files`) train the same
  losses, step for step, and evaluate to the same metrics as the synthetic draw; `explain --pairs` on
  the held-out file gives the job's evaluation again."""
  pairs_dir = tmp_path / "pairs"
  for draw in ("train", "eval"):
    out = subprocess.run([sys.executable, "-m", "gleam_jax.data.pair_files", "--config=configs/x_sft.py:tiny",
                          f"--config.data.data_dir={tiny_cfg.data_dir}", f"--draw={draw}", f"--out={pairs_dir}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{pairs_dir}/{draw}.jsonl" in out.stdout
  check = subprocess.run([sys.executable, "-m", "gleam_jax.data.pair_files", f"--check={pairs_dir}/eval.jsonl"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
  assert check.returncode == 0 and check.stdout.splitlines()[:2] == ["8 pairs, 8 with an answer", "match: False 4, True 4"]
  both = subprocess.run([sys.executable, "-m", "gleam_jax.data.pair_files", f"--check={pairs_dir}/eval.jsonl",
                         f"--out={pairs_dir}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert both.returncode == 2 and both.stderr.strip().splitlines() == [
      "error: give --out (write a job's synthetic pairs there) or --check (describe a pairs file), one of them."]
  files = {"examples.train_file": str(pairs_dir / "train.jsonl"), "examples.eval_file": str(pairs_dir / "eval.jsonl")}
  fields = {"total_steps": 4, "checkpoint.every_steps": 4}
  synthetic = main.run(tiny_config("x_sft", tiny_cfg.data_dir, **fields), str(tmp_path / "synthetic"))
  from_files = main.run(tiny_config("x_sft", "/no/data/needed", **fields, **files), str(tmp_path / "files"))
  losses = lambda w: [r["loss"] for r in read_metrics(str(tmp_path / w)) if "loss" in r]
  assert len(losses("files")) == 4
  np.testing.assert_allclose(losses("files"), losses("synthetic"), rtol=1e-6)
  assert from_files == pytest.approx(synthetic)
  lines = []
  rows, metrics = explain.answer_pairs(files["examples.eval_file"], str(tmp_path / "out" / "answers.jsonl"),
                                       workdir=str(tmp_path / "files"), batch_size=3, max_new_tokens=16,
                                       log=lines.append)
  assert metrics == pytest.approx(from_files)
  assert all(0 < r["p_yes"] < 1 for r in rows)  # the job's tokenizer has whole tokens for Yes / No / 是 / 否
  assert from_files["verdict_auc"] == pytest.approx(
      explain.explain_eval.verdict_auc([r["p_yes"] for r in rows], [r["match"] for r in rows]))
  with open(tmp_path / "out" / "answers_metrics.json") as f:
    assert json.load(f) == pytest.approx(from_files)
  with open(tmp_path / "out" / "answers.jsonl", encoding="utf-8") as f:
    written = [json.loads(line) for line in f]
  assert written == rows and len(rows) == 8 and [r["line"].rsplit(":", 1)[1] for r in rows] == [str(i) for i in range(1, 9)]
  assert all(r["verdict"] == sft.explain_metrics.verdict(r["answer"]) and "reference" in r for r in rows)
  assert any("pairs answered" in line for line in lines) and lines[-1].endswith("answers.jsonl")
  assert not (tmp_path / "out" / "answers.jsonl.partial").exists()
  # a run stopped after three answers resumes with the other five (what the partial file holds is kept)
  before = [dict(rows[0], answer="Yes. Answered before the stop."), *rows[1:3]]
  (tmp_path / "again").mkdir()
  other_model = dict(rows[3], answer="Yes. Another model's answer.", model=str(tmp_path / "other"))
  (tmp_path / "again" / "answers.jsonl.partial").write_text(
      "".join(json.dumps(r) + "\n" for r in [*before, other_model]) + '{"line": "cut off by the st')
  lines = []
  again, _ = explain.answer_pairs(files["examples.eval_file"], str(tmp_path / "again" / "answers.jsonl"),
                                  workdir=str(tmp_path / "files"), batch_size=3, max_new_tokens=16, log=lines.append)
  without_p = lambda rows: [{k: v for k, v in r.items() if k != "p_yes"} for r in rows]
  assert without_p(again) == without_p([before[0], *rows[1:]])  # the yes-probabilities of other batches: to float
  assert [r["p_yes"] for r in again] == pytest.approx([r["p_yes"] for r in [before[0], *rows[1:]]], abs=1e-5)
  assert not (tmp_path / "again" / "answers.jsonl.partial").exists()
  assert lines[0].startswith("resuming: 3 of 8 pairs answered before") and any(l.startswith("5/5 pairs answered") for l in lines)
  with pytest.raises(GleamError, match="examples.train_file is set but examples.eval_file is not"):
    main.run(tiny_config("x_sft", "/no/data/needed", **{"examples.train_file": files["examples.train_file"]}),
             str(tmp_path / "no_eval"))
