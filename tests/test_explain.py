"""`python -m gleam_jax.explain`: a local Hugging Face directory, two images, the answer streamed."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from config_files import REPO
from video_fixtures import write_video
from gleam_jax import explain
from gleam_jax.data import video_files
from gleam_jax.data.gleam_x import FLIGHT_QUESTIONS
from gleam_jax.errors import GleamError
from gleam_jax.eval import explain as explain_eval
from gleam_jax.models.qwen2_5_vl import beam_search, generation, params, processor, tiny_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny random Qwen2.5-VL saved by transformers, with the fixture tokenizer and processor files."""
  path = tiny_dir.write_tiny_qwen_dir(str(tmp_path_factory.mktemp("qwen_explain")))
  torch.manual_seed(0)
  model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig.from_pretrained(path))
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def views(tmp_path_factory):
  root = tmp_path_factory.mktemp("views")
  rng = np.random.default_rng(0)
  paths = []
  for name, size in (("uav.jpg", (90, 70)), ("satellite.png", (64, 64))):
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(root / name)
    paths.append(str(root / name))
  return paths


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_the_streamed_answer_is_the_greedy_generation_decoded(model_dir, views, lang):
  """What streams to stdout, piece by piece, is the decoded greedy generation of GLEAM-X's question
  (in `lang`) about the two views, in order."""
  pieces = []
  text = explain.explain(model_dir, views, lang=lang, max_new_tokens=12, write=pieces.append, chunk=4)
  assert "".join(pieces) == text + "\n"
  proc = processor.load_processor(model_dir)
  inputs = proc.encode_prompt(explain.read_images(views), explain.QUESTIONS[lang])
  assert proc.decode(inputs["input_ids"]).count(explain.QUESTIONS[lang]) == 1
  tokens = generation.generate(params.load_pretrained(model_dir), inputs["input_ids"][None],
                               pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                               max_new_tokens=12)
  assert text == proc.decode(tokens[0]) and len(tokens[0]) == 12


def test_the_stream_holds_back_half_a_character(model_dir):
  """Byte-level BPE splits a Chinese character over tokens: no piece written ends in half of one."""
  proc = processor.load_processor(model_dir)
  answer = "是。两张图像显示同一个十字路口。"
  ids = proc.tokenizer.encode(answer, add_special_tokens=False)
  assert any("\ufffd" in proc.decode(ids[:n]) for n in range(1, len(ids)))  # the case exists here
  pieces = []
  stream = explain.TextStream(proc, pieces.append)
  for step, token in enumerate(ids):
    stream(step, np.array([token]))
  assert stream.close() == answer and "".join(pieces) == answer + "\n"
  assert not any("\ufffd" in piece for piece in pieces)


def test_bad_requests_stop_before_loading(model_dir, views, tmp_path):
  with pytest.raises(GleamError, match="compares two views and 1 --image"):
    explain.explain(model_dir, views[:1])
  with pytest.raises(GleamError, match="--lang=fr"):
    explain.explain(model_dir, views, lang="fr")
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"not an image")
  with pytest.raises(GleamError, match=r"cannot read image .*broken.jpg"):
    explain.explain(str(tmp_path / "no_model"), [views[0], str(broken)])
  result = subprocess.run([sys.executable, "-m", "gleam_jax.explain", f"--model_dir={tmp_path}/no_model",
                           f"--image={views[0]}", f"--image={views[1]}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert result.stderr.startswith("error: ") and "no_model" in result.stderr, result.stderr


def test_pairs_file_answers_as_one_pair_at_a_time(model_dir, views, tmp_path):
  """`--pairs` (batched, left-padded rows; a short batch padded to a full one) writes for each pair the
  answer `explain` streams for it alone (with the pair's own system prompt where it has one); without
  reference answers it scores nothing."""
  pairs = tmp_path / "ask.jsonl"
  lines = [dict(images=views, lang="en"), dict(images=views[::-1], lang="zh"), dict(images=views, lang="zh"),
           dict(images=views, lang="en", system="You compare a drone photo with a satellite image.")]
  pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
  out = tmp_path / "answers" / "ask_answers.jsonl"
  result = subprocess.run([sys.executable, "-m", "gleam_jax.explain", f"--model_dir={model_dir}", f"--pairs={pairs}",
                           f"--out={out}", "--max_new_tokens=10", "--batch_size=3"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "4/4 pairs answered" in result.stderr and "4 answers written to" in result.stderr
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  alone = [explain.explain(model_dir, line["images"], lang=line["lang"], max_new_tokens=10, write=lambda _: None,
                           system=line.get("system")) for line in lines]
  assert [r["answer"] for r in rows] == alone
  assert [r["lang"] for r in rows] == ["en", "zh", "zh", "en"] and "reference" not in rows[0]
  assert not (tmp_path / "answers" / "ask_answers_metrics.json").exists()
  both = subprocess.run([sys.executable, "-m", "gleam_jax.explain", f"--model_dir={model_dir}", f"--pairs={pairs}",
                         f"--image={views[0]}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert both.returncode == 2 and "not both" in both.stderr, both.stderr


def test_a_short_last_batch_runs_the_full_batchs_compiled_functions(model_dir, views):
  """Five questions in batches of 2: the short last batch is padded to a full one, so the three batches
  compile one prefill and one decode loop, and each answer is that of its question asked alone."""
  model, proc = params.load_pretrained(model_dir), processor.load_processor(model_dir)
  examples = [dict(query=views[i % 2], satellite=views[1 - i % 2], lang="en", modality="uav",
                   question=explain.QUESTIONS["en"]) for i in range(5)]  # one prompt length, two prompts
  before = generation.prefill._cache_size(), generation.decode_chunk._cache_size()
  answers, _ = explain_eval.generate_answers(model, proc, examples, batch_size=2, max_new_tokens=6)
  assert (generation.prefill._cache_size(), generation.decode_chunk._cache_size()) == (before[0] + 1, before[1] + 1)
  alone, _ = explain_eval.generate_answers(model, proc, examples[4:], batch_size=1, max_new_tokens=6)
  assert answers[4] == alone[0]


def test_follow_up_questions_are_asked_after_the_reference_turns(model_dir, views, tmp_path):
  """A conversation that goes on: each later question is asked after the reference turns before it
  (the answer is the greedy generation from that prompt) and scored by ROUGE-L; a resumed run whose
  partial rows lack the follow-ups answers only those."""
  first, why, because = "Yes. The same crossroads.", "Which road?", "The one north of the roundabout."
  line = dict(images=views, messages=[dict(role="user", content="<image><image>" + explain.QUESTIONS["en"]),
                                      dict(role="assistant", content=first), dict(role="user", content=why),
                                      dict(role="assistant", content=because)])
  pairs = tmp_path / "talk.jsonl"
  pairs.write_text(json.dumps(line) + "\n" + json.dumps(dict(images=views[::-1], answer="No. A park.")) + "\n")
  rows, metrics = explain.answer_pairs(str(pairs), str(tmp_path / "answers.jsonl"), model_dir=model_dir,
                                       max_new_tokens=6, log=lambda _: None)
  proc = processor.load_processor(model_dir)
  inputs = proc.encode_prompt(explain.read_images(views), why, history=[(explain.QUESTIONS["en"], first)])
  tokens = generation.generate(params.load_pretrained(model_dir), inputs["input_ids"][None],
                               pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                               max_new_tokens=6)
  assert rows[0]["follow_ups"] == [dict(question=why, answer=proc.decode(tokens[0]), reference=because)]
  assert "follow_ups" not in rows[1]
  assert metrics["follow_up_rouge_l"] == pytest.approx(explain_eval.rouge_l(proc.decode(tokens[0]), because, "en"))
  assert "(follow-up answers" in explain_eval.summary(metrics)
  # stopped after the first answers: the follow-ups are answered on the next run, the first answers kept
  (tmp_path / "again.jsonl.partial").write_text("".join(
      json.dumps(dict({k: v for k, v in r.items() if k != "follow_ups"}, answer=f"Kept {i}.")) + "\n"
      for i, r in enumerate(rows)))
  lines = []
  again, _ = explain.answer_pairs(str(pairs), str(tmp_path / "again.jsonl"), model_dir=model_dir, max_new_tokens=6,
                                  log=lines.append)
  assert [r["answer"] for r in again] == ["Kept 0.", "Kept 1."] and again[0]["follow_ups"] == rows[0]["follow_ups"]
  assert "answering 1 follow-up questions after the reference turns" in lines


def test_follow_up_questions_after_the_models_own_answers(model_dir, views, tmp_path):
  """--follow_ups_after=own: each later question is asked after the model's own earlier answers (the
  first answer, then its answer to each question before), round by round; rows say which turns; a
  run of the other kind answers the follow-ups again and keeps the first answers."""
  first, why, because, where, there = "Yes.", "Which road?", "The north one.", "And the river?", "East."
  talk = dict(images=views, answer=first, follow_ups=[dict(question=why, answer=because),
                                                        dict(question=where, answer=there)])
  pairs = tmp_path / "talk.jsonl"
  pairs.write_text(json.dumps(talk) + "\n" + json.dumps(dict(images=views[::-1], answer="No.")) + "\n")
  rows, metrics = explain.answer_pairs(str(pairs), str(tmp_path / "own.jsonl"), model_dir=model_dir,
                                       max_new_tokens=5, log=lambda _: None, follow_ups_after="own")
  proc, model = processor.load_processor(model_dir), params.load_pretrained(model_dir)

  def greedy(question, history):
    inputs = proc.encode_prompt(explain.read_images(views), question, history=history)
    return proc.decode(generation.generate(model, inputs["input_ids"][None], pixel_values=inputs["pixel_values"],
                                           image_grid_thw=inputs["image_grid_thw"], max_new_tokens=5)[0])
  said = rows[0]["answer"]
  own_why = greedy(why, [(explain.QUESTIONS["en"], said)])
  own_where = greedy(where, [(explain.QUESTIONS["en"], said), (why, own_why)])
  assert rows[0]["follow_ups"] == [dict(question=why, answer=own_why, reference=because),
                                   dict(question=where, answer=own_where, reference=there)]
  assert rows[0]["follow_ups_after"] == "own" and "follow_ups" not in rows[1]
  forced_where = greedy(where, [(explain.QUESTIONS["en"], first), (why, because)])
  assert own_why != greedy(why, [(explain.QUESTIONS["en"], first)])  # so the turns asked after tell apart
  assert metrics["follow_up_rouge_l"] == pytest.approx(np.mean(
      [explain_eval.rouge_l(own_why, because, "en"), explain_eval.rouge_l(own_where, there, "en")]))
  # the same answers, then asked after the reference turns instead: only the follow-ups are asked again
  (tmp_path / "forced.jsonl.partial").write_text("".join(json.dumps(r) + "\n" for r in rows))
  lines = []
  forced, _ = explain.answer_pairs(str(pairs), str(tmp_path / "forced.jsonl"), model_dir=model_dir,
                                   max_new_tokens=5, log=lines.append)
  assert [r["answer"] for r in forced] == [r["answer"] for r in rows]
  assert forced[0]["follow_ups_after"] == "reference" and forced[0]["follow_ups"][1]["answer"] == forced_where
  assert "answering 2 follow-up questions after the reference turns" in lines
  with pytest.raises(GleamError, match="follow_ups_after='theirs'.*reference, own"):
    explain.answer_pairs(str(pairs), str(tmp_path / "x.jsonl"), model_dir=model_dir, follow_ups_after="theirs")


def test_yes_probability_is_transformers_next_token_odds(model_dir, views, tmp_path):
  """Each answered pair's `p_yes` is P("Yes") / (P("Yes") + P("No")) of the first answer token (in the
  pair's language) as transformers computes it from the same prompt (the pair's own system prompt
  included); the AUC of hand-set scores."""
  proc = processor.load_processor(model_dir)
  lines = [dict(images=views, lang="en"), dict(images=views[::-1], lang="zh"),
           dict(images=views, lang="en", system="You compare a drone photo with a satellite image.")]
  pairs = tmp_path / "ask.jsonl"
  pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
  rows, metrics = explain.answer_pairs(str(pairs), str(tmp_path / "answers.jsonl"), model_dir=model_dir,
                                       max_new_tokens=2, log=lambda _: None)
  assert metrics is None  # no references
  reference = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
  # this tokenizer has no token for 否 (byte-level BPE: its first byte starts other characters too)
  assert proc.decode(proc.tokenizer.encode("否", add_special_tokens=False)[:1]) == "\ufffd"
  assert explain_eval.verdict_token_ids(proc, "zh") is None and rows[1]["p_yes"] is None
  assert rows[2]["p_yes"] != pytest.approx(rows[0]["p_yes"], abs=1e-4)  # the system prompt is in the prompt
  for line, row in zip(lines[::2], rows[::2]):
    inputs = proc.encode_prompt(explain.read_images(line["images"]), explain.QUESTIONS[line["lang"]], line.get("system"))
    with torch.no_grad():
      logits = reference(input_ids=torch.tensor(inputs["input_ids"][None]), pixel_values=torch.tensor(inputs["pixel_values"]),
                         image_grid_thw=torch.tensor(inputs["image_grid_thw"])).logits[0, -1].numpy()
    yes, no = explain_eval.verdict_token_ids(proc, line["lang"])
    assert proc.decode([yes]).startswith("Yes") and proc.decode([no]).startswith("No")
    assert row["p_yes"] == pytest.approx(1 / (1 + np.exp(logits[no] - logits[yes])), abs=1e-4)  # logits to ~1e-4
  # ROC AUC by hand: of the 2 x 2 (match, non-match) score pairs, 3 ordered right, one tied
  assert explain_eval.verdict_auc([0.9, 0.4, 0.4, 0.1], [True, True, False, False]) == pytest.approx(3.5 / 4)
  assert explain_eval.verdict_auc([0.9, 0.4], [True, True]) is None
  assert explain_eval.yes_probability(np.asarray([[0.0, 2.0, 0.0]]), (1, 2)) == [pytest.approx(1 / (1 + np.exp(-2.0)))]
  assert explain_eval.yes_probability(np.zeros((2, 3)), None) == [None, None]


def test_a_model_split_over_devices_answers_the_same(model_dir, views, tmp_path):
  """--fsdp / --tensor: the model loaded straight into Qwen2.5-VL's sharding rules on 2 x 2 (and 1 x 4)
  of the 8 test devices gives the single device's answers and yes-probabilities."""
  one = explain.explain(model_dir, views, lang="en", max_new_tokens=10, write=lambda _: None)
  assert explain.explain(model_dir, views, lang="en", max_new_tokens=10, write=lambda _: None, fsdp=2, tensor=2) == one
  pairs = tmp_path / "ask.jsonl"
  pairs.write_text("".join(json.dumps(dict(images=v, lang="en")) + "\n" for v in (views, views[::-1])))
  rows, _ = explain.answer_pairs(str(pairs), str(tmp_path / "one.jsonl"), model_dir=model_dir, max_new_tokens=10,
                                 log=lambda _: None)
  split, _ = explain.answer_pairs(str(pairs), str(tmp_path / "split.jsonl"), model_dir=model_dir, max_new_tokens=10,
                                  log=lambda _: None, tensor=4)
  assert [r["answer"] for r in split] == [r["answer"] for r in rows] and rows[0]["answer"] == one
  assert [r["p_yes"] for r in split] == pytest.approx([r["p_yes"] for r in rows], abs=1e-5)
  with pytest.raises(GleamError, match=r"--fsdp=4 x --tensor=4 needs 16 devices; this process has 8"):
    explain.explain(model_dir, views, fsdp=4, tensor=4)


def test_sampling_settings_and_the_checkpoints_generation_config(model_dir, views, tmp_path):
  """`--generation_config` chooses tokens as the directory's generation_config.json says (here Qwen's
  released form: top_k 1 with a repetition penalty, i.e. greedy with the penalty; below 1 here, since
  this random model's greedy answer repeats no token for a penalty above 1 to act on); a flag given on
  the command line overrides the file; `--pairs` answers with the same settings, recorded in each row."""
  directory = tmp_path / "model"
  shutil.copytree(model_dir, directory)
  file = directory / "generation_config.json"
  settings = json.loads(file.read_text()) if file.exists() else {}
  file.write_text(json.dumps(settings | dict(do_sample=True, top_k=1, top_p=0.001, temperature=0.1,
                                             repetition_penalty=0.5)))
  ask = lambda d, **kw: explain.explain(str(d), views, max_new_tokens=16, write=lambda _: None, **kw)
  greedy = ask(directory)
  assert ask(directory, generation_config=True) == ask(model_dir, sampling=dict(repetition_penalty=0.5)) != greedy
  run = lambda *flags: subprocess.run(
      [sys.executable, "-m", "gleam_jax.explain", f"--model_dir={directory}", f"--image={views[0]}",
       f"--image={views[1]}", "--max_new_tokens=16", *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
  result = run("--generation_config", "--repetition_penalty=1.0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout == greedy + "\n"
  with pytest.raises(GleamError, match="top_k >= 0"):
    ask(directory / "absent", sampling=dict(top_k=-1))  # before the model is looked for
  # beam search (--num_beams): the best hypothesis, decoded
  proc = processor.load_processor(model_dir)
  inputs = proc.encode_prompt(explain.read_images(views), explain.QUESTIONS["en"])
  best, _ = beam_search.beam_search(params.load_pretrained(model_dir), inputs["input_ids"][None], None,
                                    inputs["pixel_values"], inputs["image_grid_thw"], num_beams=3, max_new_tokens=16)
  assert ask(model_dir, sampling=dict(num_beams=3)) == proc.decode(best[0])
  # --pairs with the same settings: each row records them and answers as one question does
  pairs = tmp_path / "ask.jsonl"
  pairs.write_text(json.dumps(dict(images=views)) + "\n")
  rows, _ = explain.answer_pairs(str(pairs), str(tmp_path / "beams.jsonl"), model_dir=model_dir, max_new_tokens=16,
                                 log=lambda _: None, decoding=dict(num_beams=3, temperature=0.0))
  assert rows[0]["answer"] == proc.decode(best[0]) and rows[0]["decoding"] == {"num_beams": 3}
  out = tmp_path / "file_settings.jsonl"
  result = subprocess.run([sys.executable, "-m", "gleam_jax.explain", f"--model_dir={directory}", f"--pairs={pairs}",
                           f"--out={out}", "--max_new_tokens=16", "--generation_config"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  row = json.loads(out.read_text())
  assert row["decoding"] == dict(temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=0.5, seed=0)
  assert row["answer"] == ask(model_dir, sampling=dict(repetition_penalty=0.5))


def test_pairs_sample_with_the_seed_given(model_dir, views, tmp_path):
  """`--pairs` with sampling: pair i draws with `--seed` + i whatever its batch (the first pair answers as
  `explain` with that seed, alone or batched with others); each row records its seed, and an answer
  drawn with another seed is not reused."""
  pairs = tmp_path / "ask.jsonl"
  pairs.write_text(json.dumps(dict(images=views)) + "\n")
  hot = dict(temperature=5.0)  # a random model at a high temperature: seeds give different answers
  answer = lambda seed, out: explain.answer_pairs(str(pairs), str(tmp_path / out), model_dir=model_dir,
                                                  max_new_tokens=12, log=lambda _: None, decoding=hot, seed=seed)[0][0]
  one = lambda seed: explain.explain(model_dir, views, max_new_tokens=12, write=lambda _: None, sampling=hot, seed=seed)
  first, second = answer(1, "a.jsonl"), answer(2, "b.jsonl")
  assert first["decoding"] == dict(temperature=5.0, seed=1) and second["decoding"] == dict(temperature=5.0, seed=2)
  assert first["answer"] == one(1) and second["answer"] == one(2) != one(1)
  logged = []
  (tmp_path / "b.jsonl.partial").write_text(json.dumps(first) + "\n")  # seed 1's answer, kept by a stopped run
  rows, _ = explain.answer_pairs(str(pairs), str(tmp_path / "b.jsonl"), model_dir=model_dir, max_new_tokens=12,
                                 log=logged.append, decoding=hot, seed=2)
  assert rows[0]["answer"] == second["answer"] and not any("resuming" in line for line in logged)
  # three pairs in batches of 2 (the last one padded): pair i answers as `explain` with seed 1 + i
  pairs.write_text("".join(json.dumps(dict(images=v)) + "\n" for v in (views, views[::-1], views)))
  rows, _ = explain.answer_pairs(str(pairs), str(tmp_path / "c.jsonl"), model_dir=model_dir, max_new_tokens=12,
                                 log=lambda _: None, decoding=hot, seed=1, batch_size=2)
  assert rows[0]["answer"] == first["answer"] and rows[2]["answer"] == one(3)
  assert rows[1]["answer"] == explain.explain(model_dir, views[::-1], max_new_tokens=12, write=lambda _: None,
                                              sampling=hot, seed=2)


def test_a_video_folder_streams_the_greedy_answer_about_its_frames(model_dir, views, tmp_path):
  """--video: a folder's frames in name order (a stray text file skipped), asked about after the image,
  stream the greedy generation of the processor's video inputs; without a prompt, one folder and one image
  are GLEAM-X's flight pair (the frames first, the flight question)."""
  frames = tmp_path / "flight"
  frames.mkdir()
  rng = np.random.default_rng(4)
  for i in (2, 0, 1):
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8)).save(frames / f"frame_{i}.png")
  (frames / "notes.txt").write_text("not a frame")
  pieces = []
  text = explain.explain(model_dir, views[1:], prompt="Where was this flight?", max_new_tokens=6,
                         write=pieces.append, video_dirs=[str(frames)], fps=1.0)
  assert "".join(pieces) == text + "\n"
  proc = processor.load_processor(model_dir)
  video = explain.read_images(sorted(str(p) for p in frames.glob("*.png")))
  inputs = proc.encode_prompt(explain.read_images(views[1:]), "Where was this flight?", videos=[video], fps=1.0)
  assert inputs["video_grid_thw"][0, 0] == 2 and inputs["second_per_grid_ts"].tolist() == [2.0]
  tokens = generation.generate(params.load_pretrained(model_dir), inputs["input_ids"][None],
                               pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                               pixel_values_videos=inputs["pixel_values_videos"],
                               video_grid_thw=inputs["video_grid_thw"],
                               second_per_grid_ts=inputs["second_per_grid_ts"], max_new_tokens=6)
  assert text == proc.decode(tokens[0])
  # --video_fps: the folder as every frame of a 1-second clip at 3 fps, sampled down to 1 fps (frames 0, 1)
  sampled = explain.explain(model_dir, views[1:], prompt="Where was this flight?", max_new_tokens=6,
                            write=lambda _: None, video_dirs=[str(frames)], fps=1.0, video_fps=3.0)
  # the two kept frames of three at 3 fps stand for 2 frames a second (transformers' sampled_fps)
  two = proc.encode_prompt(explain.read_images(views[1:]), "Where was this flight?", videos=[video[:2]], fps=2.0)
  assert two["video_grid_thw"][0, 0] == 1 and two["second_per_grid_ts"].tolist() == [1.0]
  tokens = generation.generate(params.load_pretrained(model_dir), two["input_ids"][None],
                               pixel_values=two["pixel_values"], image_grid_thw=two["image_grid_thw"],
                               pixel_values_videos=two["pixel_values_videos"], video_grid_thw=two["video_grid_thw"],
                               second_per_grid_ts=two["second_per_grid_ts"], max_new_tokens=6)
  assert sampled == proc.decode(tokens[0]) and sampled != text  # not the three frames asked about above
  # no --prompt: GLEAM-X's flight pair, the frames first, then the satellite image, asked the flight question
  flight = explain.explain(model_dir, views[1:], max_new_tokens=6, write=lambda _: None, video_dirs=[str(frames)],
                           fps=1.0, lang="zh")
  asked = proc.encode_prompt(explain.read_images(views[1:]), FLIGHT_QUESTIONS["zh"], videos=[video], fps=1.0,
                             videos_first=True)
  tokens = generation.generate(params.load_pretrained(model_dir), asked["input_ids"][None], max_new_tokens=6,
                               **{k: asked[k] for k in processor.VISUAL_KEYS})
  assert flight == proc.decode(tokens[0])
  with pytest.raises(GleamError, match="flight question compares one drone flight with one satellite image"):
    explain.explain(model_dir, views, video_dirs=[str(frames)])
  with pytest.raises(GleamError, match="--video=.* is not a folder"):
    explain.explain(model_dir, views[1:], prompt="?", video_dirs=[str(tmp_path / "none")])
  # from the command line, --video alone is a request: it gets as far as the (missing) model
  run = subprocess.run([sys.executable, "-m", "gleam_jax.explain", f"--model_dir={tmp_path}/no_model",
                        f"--video={frames}", "--prompt=?"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert run.returncode == 2 and run.stderr.startswith("error: ") and "no_model" in run.stderr, run.stderr


def test_a_video_file_is_asked_about_as_its_sampled_frames(model_dir, views, tmp_path):
  """`--video=flight.mp4`: the answer about the clip sampled at --fps is the answer about a folder of
  the same frames at the rate they stand for; --video_fps is refused for a file (it records its own)."""
  clip = write_video(tmp_path / "flight.mp4", 95)
  frames, rate, _ = video_files.read_clip(clip, 2.0)
  folder = tmp_path / "frames"
  folder.mkdir()
  for i, frame in enumerate(frames):
    Image.fromarray(frame).save(folder / f"{i:03d}.png")
  from_file = explain.explain(model_dir, views[1:], max_new_tokens=6, write=lambda _: None, video_dirs=[clip])
  from_folder = explain.explain(model_dir, views[1:], max_new_tokens=6, write=lambda _: None,
                                video_dirs=[str(folder)], fps=rate)
  assert from_file == from_folder
  # a pairs file's video file: the same answer, the row naming the file (frames extracted under the data dir)
  pairs = tmp_path / "flights.jsonl"
  pairs.write_text(json.dumps(dict(video="flight.mp4", images=[views[1]])) + "\n")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("GLEAM_DATA_DIR", str(tmp_path / "data"))
    rows, _ = explain.answer_pairs(str(pairs), str(tmp_path / "answers.jsonl"), model_dir=model_dir,
                                   max_new_tokens=6, log=lambda _: None)
  assert rows[0]["answer"] == from_file and rows[0]["video_file"] == clip and rows[0]["fps"] == rate
  with pytest.raises(GleamError, match="--video=.*flight.mp4: --video_fps is for a folder"):
    explain.explain(model_dir, views[1:], video_dirs=[clip], video_fps=30.0)


def test_image_resize_reaches_a_directorys_processor(model_dir):
  """`--image_resize=torchvision` resizes a model directory's images as transformers' torchvision image
  processor does (tests/test_qwen_processor.py); the default is its PIL processor's."""
  assert explain.load_model(model_dir, image_resize="torchvision")[1].image_config.image_resize == "torchvision"
  assert explain.load_model(model_dir)[1].image_config.image_resize == "pil"
