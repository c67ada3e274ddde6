"""GLEAM-X pairs whose query is a drone flight (its views as a video, before the satellite image): the
answer loss against transformers' with videos, the synthetic draw's flights, and a tiny job that trains,
evaluates and answers a pairs file of flights."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from config_files import tiny_config
from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax import explain, main
from gleam_jax.data import gleam_x, pair_files
from gleam_jax.data.gleam_x import FLIGHT_QUESTIONS
from gleam_jax.eval.explain import verdict
from gleam_jax.models.qwen2_5_vl import generation, params, processor, tiny_dir
from gleam_jax.train import sft
from gleam_jax.utils.writer import read_metrics
from test_sft import model_inputs


def test_flight_answer_loss_matches_transformers(tmp_path):
  """A right-padded batch of a flight's pair (4 frames at 2 fps, then the satellite image) and an image
  pair: our loss over the answer tokens equals `Qwen2_5_VLForConditionalGeneration(..., labels=...)`'s
  given the same images and video, from the same weights."""
  path = tiny_dir.write_tiny_qwen_dir(str(tmp_path / "qwen"), corpus=gleam_x.corpus(flights=True))
  torch.manual_seed(0)
  reference = transformers.Qwen2_5_VLForConditionalGeneration(
      transformers.Qwen2_5_VLConfig.from_pretrained(path)).eval()
  reference.save_pretrained(path)
  proc = processor.load_processor(path, video_min_pixels=56 * 56, video_max_pixels=448 * 448)  # the job's bounds
  model = params.load_pretrained(path)
  rng = np.random.default_rng(0)
  image = lambda: rng.integers(0, 256, (64, 64, 3), np.uint8)
  frames, satellite = [image() for _ in range(4)], image()
  flight = dict(query=frames, satellite=satellite, question=gleam_x.FLIGHT_QUESTIONS["en"], fps=2.0,
                answer="No. The drone video shows a suburb with a river, while the satellite image shows fields.")
  pair = dict(query=image(), satellite=image(), question=gleam_x.QUESTIONS["zh"], answer="是。两个视角都显示郊区住宅区。")
  rows = [sft.encode(proc, flight), sft.encode(proc, pair)]
  ids = rows[0]["input_ids"]
  visual = np.flatnonzero(np.isin(ids, [proc.video_token_id, proc.image_token_id]))
  assert ids[visual[0]] == proc.video_token_id and ids[visual[-1]] == proc.image_token_id  # the flight comes first
  assert rows[0]["second_per_grid_ts"].tolist() == [1.0] and rows[0]["video_grid_thw"].tolist() == [[2, 4, 4]]
  batch = sft.collate(rows, sft.padded_length([len(r["input_ids"]) for r in rows]), model.cfg)
  graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
  inputs, labels = model_inputs(batch)
  ours, _ = jax.jit(lambda w: sft.answer_loss(nnx.merge(graphdef, w, rest)(*inputs), labels))(weights)
  with torch.no_grad():
    theirs = reference(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                       attention_mask=torch.tensor(batch["attention_mask"]),
                       pixel_values=torch.tensor(np.concatenate([r["pixel_values"] for r in rows])),
                       image_grid_thw=torch.tensor(np.concatenate([r["image_grid_thw"] for r in rows])),
                       pixel_values_videos=torch.tensor(rows[0]["pixel_values_videos"]),
                       video_grid_thw=torch.tensor(rows[0]["video_grid_thw"]),
                       second_per_grid_ts=torch.tensor(rows[0]["second_per_grid_ts"]),
                       labels=torch.tensor(batch["labels"], dtype=torch.long)).loss
  np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)
  # the video's frames in the batch's pixels before the satellite's, then the image pair's
  np.testing.assert_array_equal(batch["pixel_values"], np.concatenate(
      [rows[0]["pixel_values_videos"], rows[0]["pixel_values"], rows[1]["pixel_values"]]))


def test_synthetic_flights_are_the_drone_views_of_the_place(tiny_cfg):
  """`examples.flights=1`: every drone pair asks about its location's views (a video, view order) with
  the flight question; the other pairs, and the draw itself, stay as without flights."""
  plain = gleam_x.examples(tiny_cfg, "train", 16, seed=3)
  flights = gleam_x.examples(tiny_cfg, "train", 16, seed=3, flights=1.0)
  assert any(p["modality"] == "uav" for p in plain) and any(p["modality"] != "uav" for p in plain)
  for p, f in zip(plain, flights, strict=True):
    assert f["satellite_location_id"] == p["satellite_location_id"] and f["match"] == p["match"]
    np.testing.assert_array_equal(f["satellite"], p["satellite"])
    if p["modality"] != "uav":
      assert f["modality"] == p["modality"] and f["answer"] == p["answer"] and f["question"] == p["question"]
      continue
    assert f["modality"] == gleam_x.FLIGHT and f["question"] == gleam_x.FLIGHT_QUESTIONS[f["lang"]]
    assert len(f["query"]) == 2  # the tiny world's drone views per location, one of them the plain pair's
    assert sum(np.array_equal(frame, p["query"]) for frame in f["query"]) == 1
    assert verdict(f["answer"]) == verdict(p["answer"]) == f["match"]
    if not f["match"]:
      assert "drone video" in f["answer"] or "无人机视频" in f["answer"], f["answer"]
  for a, b in zip(gleam_x.examples(tiny_cfg, "train", 16, seed=3, flights=0.0), plain, strict=True):
    assert a["modality"] == b["modality"] and a["answer"] == b["answer"]
    np.testing.assert_array_equal(a["query"], b["query"])


def test_tiny_flight_job_trains_evaluates_and_answers_a_pairs_file(tiny_cfg, tmp_path, monkeypatch):
  """Half the drone pairs as flights: the batches group flights apart, the loss falls, the evaluation
  scores flights as a modality, and `explain --pairs` on the job's flights written as a pairs file gives
  the answers greedy generation gives from the processor's video-first prompt."""
  config = tiny_config("x_sft", tiny_cfg.data_dir, arg="tiny,flights=1")
  assert config.examples.flights == 1.0
  workdir = str(tmp_path / "job")
  result = main.run(config, workdir)
  rows = read_metrics(workdir)
  losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
  assert np.mean([losses[7], losses[8]]) < losses[1] - 0.2, losses
  assert "flight/verdict_acc" in result and "uav/verdict_acc" not in result
  # each batch as two micro-batches of 4 rows (on a 4 x 2 data x tensor mesh; the flights' frames and
  # satellites in each): the same losses
  accumulated = str(tmp_path / "accumulated")
  main.run(tiny_config("x_sft", tiny_cfg.data_dir, arg="tiny,flights=1", grad_accum_steps=2,
                       **{"eval.at_end": False, "mesh.data": 4, "mesh.tensor": 2}), accumulated)
  again = {r["step"]: r["loss"] for r in read_metrics(accumulated) if "loss" in r}
  np.testing.assert_allclose([again[s] for s in range(1, 9)], [losses[s] for s in range(1, 9)], rtol=2e-5)
  examples = [ex for ex in gleam_x.job_examples(config, "eval") if ex["modality"] == gleam_x.FLIGHT][:2]
  assert examples
  pairs_path = pair_files.write_pairs(examples, str(tmp_path / "pairs"))
  with open(pairs_path, encoding="utf-8") as f:
    written = [json.loads(line) for line in f]
  assert [len(line["video"]) for line in written] == [len(ex["query"]) for ex in examples]
  out = str(tmp_path / "answers.jsonl")
  answered, metrics = explain.answer_pairs(pairs_path, out, workdir=workdir, max_new_tokens=12, log=lambda _: None)
  assert metrics["answered"] >= 0.0 and set(answered[0]) >= {"video", "images", "answer", "p_yes"}
  assert [os.path.basename(p) for p in answered[0]["video"]] == [os.path.basename(p) for p in written[0]["video"]]
  model, proc, _ = sft.load_trained(workdir)
  images, video_args = pair_files.prompt_visuals(pair_files.read_pairs(pairs_path)[0])
  inputs = proc.encode_prompt(images, examples[0]["question"], **video_args)
  tokens = generation.generate(model, inputs["input_ids"][None], None, max_new_tokens=12,
                               **processor.join_visuals([inputs]))
  assert answered[0]["answer"] == proc.decode(tokens[0]) and answered[0]["fps"] == 2.0
  # a stopped run's answer is reused for the same frames at the same rate, not at another
  for fps, reused in ((2.0, True), (1.0, False)):
    with open(pairs_path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(dict(line, fps=fps) if i == 0 else line) + "\n" for i, line in enumerate(written))
    with open(out + ".partial", "w", encoding="utf-8") as f:
      f.write(json.dumps(answered[0]) + "\n")
    logged = []
    explain.answer_pairs(pairs_path, out, workdir=workdir, max_new_tokens=12, log=logged.append)
    assert any(line.startswith("resuming: 1 of ") for line in logged) == reused, logged
  # `explain --video` with a job resizes the frames as its examples were: for a job of 24 x 24 examples,
  # the visuals it generates from are those `explain --pairs` builds for the same pair
  loaded = explain.load_model
  monkeypatch.setattr(explain, "load_model", lambda *a: (*loaded(*a)[:2], (24, 24), loaded(*a)[3]))
  asked = {}
  def generate(model, ids, **kw):
    asked.update(kw)
    raise InterruptedError("the inputs are what is checked")
  monkeypatch.setattr(generation, "generate", generate)
  folder = tmp_path / "flight0"
  folder.mkdir()
  frames = [shutil.copy(os.path.join(tmp_path, "pairs", frame), folder) for frame in written[0]["video"]]
  satellite = os.path.join(tmp_path, "pairs", written[0]["images"][0])
  with pytest.raises(InterruptedError):
    explain.explain(None, [satellite], workdir=workdir, video_dirs=[str(folder)], write=lambda _: None)
  images, video_args = pair_files.prompt_visuals(dict(query=frames, satellite=satellite, fps=2.0), (24, 24))
  expected = proc.encode_prompt(images, FLIGHT_QUESTIONS["en"], **video_args)
  assert asked["video_grid_thw"].tolist() == [[len(frames) // 2 + len(frames) % 2, 4, 4]]  # 56 x 56 frames
  for key in ("pixel_values_videos", "video_grid_thw", "pixel_values", "image_grid_thw", "second_per_grid_ts"):
    np.testing.assert_array_equal(asked[key], expected[key])
