"""GLEAM-X fine-tuning: the answer loss against transformers', the examples' answers, the metrics,
and the tiny job end to end (the loss falls, evaluation files, resumption onto the same batches)."""
import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

from config_files import tiny_config
from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax import explain, main
from gleam_jax.data import gleam_x
from gleam_jax.data.synthetic import city as city_lib
from gleam_jax.data.synthetic import spec as spec_lib
from gleam_jax.errors import GleamError
from gleam_jax.eval import explain as metrics
from gleam_jax.models.qwen2_5_vl import config as qcfg
from gleam_jax.models.qwen2_5_vl import modeling, params, processor, rope, tiny_dir
from gleam_jax.train import checkpoint, lora, sft
from gleam_jax.train import sharding as shd
from gleam_jax.utils.writer import read_metrics
from test_qwen_modeling import GRIDS, IMAGE, left_pad, pixels, prompt


def model_inputs(batch):
  """A collated batch (`sft.collate`) as the model's call arguments, and its labels."""
  return (jnp.asarray(batch["input_ids"]), jnp.transpose(jnp.asarray(batch["position_ids"]), (1, 0, 2)),
          jnp.asarray(batch["attention_mask"]), jnp.asarray(batch["pixel_values"]), batch["layout"]), \
      jnp.asarray(batch["labels"])


def test_answer_loss_matches_transformers(tmp_path):
  """Two right-padded examples of different lengths: our loss over the answer tokens equals
  `Qwen2_5_VLForConditionalGeneration(..., labels=...)`'s, from the same weights."""
  path = tiny_dir.write_tiny_qwen_dir(str(tmp_path / "qwen"), corpus=gleam_x.corpus())
  torch.manual_seed(0)
  reference = transformers.Qwen2_5_VLForConditionalGeneration(
      transformers.Qwen2_5_VLConfig.from_pretrained(path)).eval()
  reference.save_pretrained(path)
  proc, model = processor.load_processor(path), params.load_pretrained(path)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (64, 64, 3), np.uint8) for _ in range(4)]
  rows = [proc.build_sft_example(images[:2], gleam_x.QUESTIONS["en"], "Yes. Both views show a suburb."),
          proc.build_sft_example(images[2:], gleam_x.QUESTIONS["zh"], "否。无人机视角显示老城区，有一条河流；而卫星图像显示郊区住宅区。")]
  assert len(rows[0]["input_ids"]) != len(rows[1]["input_ids"])
  batch = sft.collate(rows, sft.padded_length([len(r["input_ids"]) for r in rows]), model.cfg)
  graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
  inputs, labels = model_inputs(batch)
  ours, accuracy = jax.jit(lambda w: sft.answer_loss(nnx.merge(graphdef, w, rest)(*inputs), labels))(weights)
  with torch.no_grad():
    theirs = reference(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                       attention_mask=torch.tensor(batch["attention_mask"]),
                       pixel_values=torch.tensor(batch["pixel_values"]),
                       image_grid_thw=torch.tensor(np.concatenate([r["image_grid_thw"] for r in rows])),
                       labels=torch.tensor(batch["labels"], dtype=torch.long)).loss
  np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)
  assert 0.0 <= float(accuracy) <= 1.0
  # in chunks of 7 positions (the last one padded): the same loss, accuracy and parameter gradients

  def loss(weights, chunk):
    m = nnx.merge(graphdef, weights, rest)
    hidden = m.hidden_states(*inputs)
    if chunk:
      return sft.answer_loss_chunked(m.logits, hidden, labels, chunk)
    return sft.answer_loss(m.logits(hidden), labels)
  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (full, full_acc), full_grads = grad(weights, 0)
  (chunked, chunked_acc), chunked_grads = grad(weights, 7)
  np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
  assert float(chunked_acc) == float(full_acc) == float(accuracy)
  for x, y in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(full_grads)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


FACTS = dict(archetype="suburb", street=city_lib.PRIMARY, buildings="dense", tallest_m=31, water=True, green=False,
             fields=False, motorway=False)


def test_answers_state_the_verdict_and_the_facts():
  other = dict(FACTS, archetype="oldtown", buildings="sparse", water=False, green=True)
  assert gleam_x.answer(True, FACTS, FACTS, "uav", "en") == (
      "Yes. Both views show a suburb around a main road, with dense buildings up to 31 m and a river.")
  assert gleam_x.answer(True, FACTS, FACTS, "uav", "zh") == "是。两个视角都显示主干道周围的郊区住宅区，有高达31米的密集建筑、一条河流。"
  assert gleam_x.answer(False, FACTS, other, "ground", "en") == (
      "No. The ground photo view shows a suburb with dense buildings up to 31 m and a river, while the "
      "satellite image shows an old town with scattered low buildings and parks and trees.")
  assert gleam_x.answer(False, dict(FACTS, water=False), dict(FACTS, water=True), "panorama", "zh") == (
      "否。全景视角显示郊区住宅区，没有一条河流；而卫星图像显示郊区住宅区，有一条河流。")
  assert gleam_x.answer(False, FACTS, FACTS, "streetmap", "en") == (
      "No. Both show a suburb, but the road layout and building shapes of the street map view do not match "
      "the satellite image.")
  for text in gleam_x.corpus():  # every answer the tiny tokenizer learns starts with a verdict it parses
    assert text in gleam_x.QUESTIONS.values() or metrics.verdict(text) is not None


def test_examples_pair_views_with_the_facts_of_their_places(tiny_cfg):
  examples = gleam_x.examples(tiny_cfg, "train", 12, seed=3)
  again = gleam_x.examples(tiny_cfg, "train", 12, seed=3)
  assert [e["answer"] for e in examples] == [e["answer"] for e in again]
  assert [e["match"] for e in examples] == [True, False] * 6
  spec = gleam_x.world_spec(tiny_cfg)
  for e in examples:
    assert (e["location_id"] == e["satellite_location_id"]) == e["match"]
    assert metrics.verdict(e["answer"]) == e["match"] and e["question"] == gleam_x.QUESTIONS[e["lang"]]
    q, s = gleam_x.place_facts(spec, e["location_id"]), gleam_x.place_facts(spec, e["satellite_location_id"])
    assert e["answer"] == gleam_x.answer(e["match"], q, s, e["modality"], e["lang"])
  assert {e["lang"] for e in examples} == {"en", "zh"}
  # hard negatives come from the query's own city, the others from another city
  city = lambda location: spec_lib.location_city(spec, location)
  for share, same_city in ((1.0, True), (0.0, False)):
    negatives = [e for e in gleam_x.examples(tiny_cfg, "train", 8, seed=4, hard_negatives=share) if not e["match"]]
    assert [city(e["location_id"]) == city(e["satellite_location_id"]) for e in negatives] == [same_city] * 4
  with pytest.raises(GleamError, match="data.name='vigor' records none"):
    gleam_x.world_spec(_renamed(tiny_cfg, "vigor"))


def _renamed(cfg, name):
  cfg = cfg.copy_and_resolve_references()
  cfg.name = name
  return cfg


def test_verdicts_and_rouge_l_on_hand_checked_texts():
  assert [metrics.verdict(t) for t in ("Yes. Both", " \"No, the", "Nope", "Not sure", "是。两个", "否。", "不是。", "maybe")] == [
      True, False, None, None, True, False, False, None]
  # 6 and 5 words, common subsequence "the cat on mat": P 4/6, R 4/5
  assert metrics.rouge_l("The cat sat on the mat.", "the cat on a mat", "en") == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
  assert metrics.rouge_l("两个视角都显示", "两个视角显示", "zh") == pytest.approx(12 / 13)  # P 6/7, R 1
  examples = [dict(lang="en", match=True, answer="Yes. A river.", modality="uav"),
              dict(lang="en", match=False, answer="No. A park.", modality="uav"),
              dict(lang="zh", match=False, answer="否。河流。", modality="ground")]
  out = metrics.explain_metrics(["Yes. A river.", "Maybe", "是。河流。"], examples)
  assert out["verdict_acc"] == pytest.approx(1 / 3) and out["answered"] == pytest.approx(2 / 3)
  assert out["said_yes"] == pytest.approx(2 / 3)
  assert out["en/verdict_acc"] == 0.5 and out["zh/verdict_acc"] == 0.0
  assert out["en/rouge_l"] == 0.5 and out["zh/rouge_l"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
  zh_rouge = out["zh/rouge_l"]
  assert (out["uav/verdict_acc"], out["uav/rouge_l"], out["ground/verdict_acc"], out["ground/rouge_l"]) == (0.5, 0.5, 0.0, zh_rouge)
  one_modality = metrics.explain_metrics(["Yes."], examples[:1])
  assert sorted(one_modality) == ["answered", "en/rouge_l", "en/verdict_acc", "rouge_l", "said_yes", "verdict_acc"]


def sft_config(data_dir, **fields):
  return tiny_config("x_sft", data_dir, **fields)


def test_tiny_job_learns_evaluates_and_resumes_onto_the_same_batches(tiny_cfg, tmp_path, capsys, monkeypatch):
  workdir = str(tmp_path / "job")
  monkeypatch.setattr(sft, "EVAL_PROGRESS_SECONDS", 0)  # a progress line after every batch but the last
  result = main.run(sft_config(tiny_cfg.data_dir), workdir)
  progress = re.findall(r"step 8: eval (\d+)/(\d+) pairs answered, [\d.]+ pairs/s, ETA [\d:?]+", capsys.readouterr().out)
  assert progress and all(int(done) < int(total) for done, total in progress), progress
  rows = read_metrics(workdir)
  losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
  assert sorted(losses) == list(range(1, 9))
  assert np.mean([losses[7], losses[8]]) < losses[1] - 0.2, losses
  assert set(result) >= {"verdict_acc", "answered", "rouge_l", "en/verdict_acc", "zh/rouge_l"}
  assert rows[-1]["eval/explain/verdict_acc"] == result["verdict_acc"]
  with open(os.path.join(workdir, "eval", "explain_step8.md"), encoding="utf-8") as f:
    table = f.read()
  assert table.count("\n| ") == 2 + 8  # header, rule and 8 sample answers
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  # `python -m gleam_jax.explain --workdir=` answers with the trained model: as the evaluation did
  config = sft_config(tiny_cfg.data_dir)
  first = gleam_x.examples(config.data, "test", 1, int(config.seed) + 1, langs=tuple(config.examples.langs))[0]
  paths = [str(tmp_path / "query.png"), str(tmp_path / "satellite.png")]
  Image.fromarray(first["query"]).save(paths[0])
  Image.fromarray(first["satellite"]).save(paths[1])
  text = explain.explain(None, paths, lang=first["lang"], max_new_tokens=16, workdir=workdir, write=lambda _: None)
  assert explain.explain(None, paths, lang=first["lang"], max_new_tokens=16, workdir=workdir, write=lambda _: None,
                         fsdp=2, tensor=2) == text  # the checkpoint read into the job's sharding rules on 4 devices
  sample = table.split("\n| 0 | ")[1].split("\n")[0]
  assert re.search(rf"\| {re.escape(text.replace('|', '/').replace(chr(10), ' '))} \| 0\.\d\d \|$", sample), (sample, text)
  # a job stopped after step 4's checkpoint resumes onto the batches it would have read
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
  main.run(sft_config(tiny_cfg.data_dir, **{"eval.at_end": False}), resumed)
  again = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
  np.testing.assert_allclose([again[s] for s in range(1, 9)], [losses[s] for s in range(1, 9)], rtol=1e-5)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["trainer"] == "sft"
  # each batch as two micro-batches of 4 rows (on a 4 x 2 data x tensor mesh), gradients accumulated: the
  # same losses, token accuracies and gradient norms step for step
  accumulated = str(tmp_path / "accumulated")
  main.run(sft_config(tiny_cfg.data_dir, grad_accum_steps=2, **{"eval.at_end": False, "mesh.data": 4,
                                                                "mesh.tensor": 2}), accumulated)
  assert "(batch in 2 micro-batches)" in capsys.readouterr().out
  for key in ("loss", "token_acc", "grad_norm"):
    want = {r["step"]: r[key] for r in rows if key in r}
    got = {r["step"]: r[key] for r in read_metrics(accumulated) if key in r}
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)], rtol=2e-5, err_msg=key)


def test_layer_decay_job_names_its_vision_towers_multipliers(tiny_cfg, tmp_path, capsys):
  """`optim.layer_decay` in a GLEAM-X job: the vision tower's layers get d^k (`optim.layer_decay_mults`),
  printed as the GLEAM-C job prints them; the job trains."""
  config = sft_config(tiny_cfg.data_dir, total_steps=3, **{"eval.at_end": False, "optim.layer_decay": 0.5})
  main.run(config, str(tmp_path / "job"))
  assert re.search(r"lr multipliers x1 \(\d+ tensors\), x0\.5 \(\d+\), x0\.25 \(\d+\)", capsys.readouterr().out)
  assert np.isfinite([r["loss"] for r in read_metrics(str(tmp_path / "job")) if "loss" in r]).all()


def test_bad_sft_settings_are_named(tiny_cfg, tmp_path):
  with pytest.raises(GleamError, match="config.examples.train=1"):
    main.run(sft_config(tiny_cfg.data_dir, **{"examples.train": 1}), str(tmp_path / "a"))
  with pytest.raises(GleamError, match="config.optim.warmup_steps=9 is not below the 8 total steps"):
    main.run(sft_config(tiny_cfg.data_dir, **{"optim.warmup_steps": 9}), str(tmp_path / "w"))
  with pytest.raises(GleamError, match="config.examples.langs has 'fr'"):
    main.run(sft_config(tiny_cfg.data_dir, **{"examples.langs": ("en", "fr")}), str(tmp_path / "b"))
  with pytest.raises(GleamError, match=r"config.batch_size=64 is larger than the training examples of"):
    main.run(sft_config(tiny_cfg.data_dir, batch_size=64), str(tmp_path / "c"))
  with pytest.raises(GleamError, match=r"config.grad_accum_steps=3 must be a positive divisor of config.batch_size=8"):
    main.run(sft_config(tiny_cfg.data_dir, grad_accum_steps=3), str(tmp_path / "d"))
  with pytest.raises(GleamError, match=r"a micro-batch of 8 // 2\)=4 does not divide over the mesh's data axes"):
    main.run(sft_config(tiny_cfg.data_dir, grad_accum_steps=2), str(tmp_path / "e"))
  with pytest.raises(GleamError, match=r"config.examples.flights=1.5: the share of drone pairs .* is in \[0, 1\]"):
    main.run(sft_config(tiny_cfg.data_dir, **{"examples.flights": 1.5}), str(tmp_path / "f"))
  with pytest.raises(GleamError, match=r"config.examples.negatives_top_k=0: draw negatives from at least"):
    main.run(sft_config(tiny_cfg.data_dir, **{"examples.negatives_from": str(tmp_path / "c_job"),
                                              "examples.negatives_top_k": 0}), str(tmp_path / "g"))


def test_lora_merge_adds_the_scaled_product_and_starts_at_the_model():
  params = {"language_model": {"layers": {0: {"mlp": {"up_proj": {"kernel": jnp.ones((3, 2))}},
                                              "input_layernorm": {"scale": jnp.ones(3)}}}}}
  cfg = sft_config("/unused").lora.copy_and_resolve_references()
  cfg.rank = 2
  adapters = lora.init(params, cfg, seed=0)
  assert list(adapters) == ["language_model.layers.0.mlp.up_proj.kernel"]
  same = lora.merge(params, adapters, scale=8.0)  # B starts at zero: the model as it is
  np.testing.assert_array_equal(same["language_model"]["layers"][0]["mlp"]["up_proj"]["kernel"], np.ones((3, 2)))
  adapters = {"language_model.layers.0.mlp.up_proj.kernel": {"a": jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
                                                             "b": jnp.asarray([[0.5, 0.0], [0.0, -1.0]])}}
  merged = lora.merge(params, adapters, scale=2.0)["language_model"]["layers"][0]
  np.testing.assert_allclose(merged["mlp"]["up_proj"]["kernel"], [[2.0, 1.0], [1.0, -1.0], [2.0, -1.0]])
  np.testing.assert_array_equal(merged["input_layernorm"]["scale"], np.ones(3))
  cfg.targets = (r"^vision/",)
  with pytest.raises(GleamError, match="match no Linear kernel"):
    lora.init(params, cfg, seed=0)
  cfg.targets = (r"layernorm",)  # a norm scale is no kernel
  with pytest.raises(GleamError, match="match no Linear kernel"):
    lora.init(params, cfg, seed=0)


def test_lora_beside_the_layers_gives_the_merged_kernels_loss_and_gradients():
  """The train step's adapters beside their layers (`lora.attach`: x W + s (x A) B) give the loss and
  adapter gradients of the merged kernels W + s A B, for decoder, vision, patch-embedding and lm_head
  kernels."""
  cfg = qcfg.tiny()
  cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, depth=2),
                    text=dataclasses.replace(cfg.text, num_hidden_layers=1))
  rng = np.random.default_rng(4)
  ids, mask = left_pad([prompt(rng, 5, GRIDS[:1])])
  ids, px = jnp.asarray(ids), jnp.asarray(pixels(rng, GRIDS[:1]))
  pos, _ = rope.get_rope_index(ids, GRIDS[:1], mask, image_token_id=IMAGE, spatial_merge_size=2)
  layout = modeling.vision_inputs(GRIDS[:1], cfg)
  graphdef, model_params, rest = nnx.split(modeling.create_model(cfg, seed=3), nnx.Param, ...)
  pure = nnx.to_pure_dict(model_params)
  lcfg = sft_config("/unused").lora.copy_and_resolve_references()
  lcfg.rank, lcfg.targets = 3, (lora.DECODER_PROJECTIONS, r"^visual/(patch_embed/proj|blocks/1/attn/qkv)/",
                                r"^lm_head/")
  adapters = lora.init(pure, lcfg, seed=0)
  assert len(adapters) == 7 + 3
  adapters = {k: {"a": a["a"], "b": jnp.asarray(rng.standard_normal(a["b"].shape) * 0.1, jnp.float32)}
              for k, a in adapters.items()}

  def loss(adapters, beside):
    if beside:
      model = lora.attach(nnx.merge(graphdef, pure, rest), adapters, 2.0)
    else:
      model = nnx.merge(graphdef, lora.merge(pure, adapters, 2.0), rest)
    logits = model(ids, jnp.asarray(pos), jnp.asarray(mask), px, layout)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))

  (merged, g_merged), (beside, g_beside) = (jax.jit(jax.value_and_grad(lambda a, b=b: loss(a, b)))(adapters)
                                            for b in (False, True))
  np.testing.assert_allclose(beside, merged, rtol=1e-6)
  for k in adapters:
    for part in "ab":
      np.testing.assert_allclose(g_beside[k][part], g_merged[k][part], rtol=1e-4, atol=1e-6, err_msg=f"{k}/{part}")
  assert float(jnp.abs(g_beside["visual.patch_embed.proj.kernel"]["a"]).max()) > 0
  with pytest.raises(GleamError, match="only nnx.Linear kernels"):
    lora.attach(nnx.merge(graphdef, pure, rest), {"language_model.embed_tokens.embedding": adapters[k]}, 1.0)


def test_lora_job_trains_only_the_adapters(tiny_cfg, tmp_path):
  """lora=4: the model's parameters stay as initialised, the adapters move, AdamW holds state for the
  adapters only, the loss falls; `explain --workdir` answers with the adapters folded in."""
  workdir = str(tmp_path / "lora")
  config = sft_config(tiny_cfg.data_dir, **{"lora.rank": 4, "optim.lr": 1e-2})
  main.run(config, workdir)
  losses = [r["loss"] for r in read_metrics(workdir) if "loss" in r]
  assert np.mean(losses[-2:]) < losses[0] - 0.1, losses
  # in two micro-batches (the frozen model's gradients not summed): the same losses
  accumulated = str(tmp_path / "accumulated")
  main.run(sft_config(tiny_cfg.data_dir, grad_accum_steps=2, **{"lora.rank": 4, "optim.lr": 1e-2, "eval.at_end": False,
                                                                "mesh.data": 4, "mesh.tensor": 2}), accumulated)
  np.testing.assert_allclose([r["loss"] for r in read_metrics(accumulated) if "loss" in r], losses, rtol=2e-5)
  mesh = shd.make_mesh(config.mesh)
  model, _, _ = sft.load_model_and_processor(config, workdir, mesh)  # the job's initial model
  initial = nnx_params(model)
  _, state = sft.create_train_state(model, config.optim, 8, mesh, config.sharding_rules, lora_cfg=config.lora)
  manager = checkpoint.make_manager(workdir)
  trained, _, _ = checkpoint.restore(manager, state)
  manager.close()
  for x, y in zip(jax.tree.leaves(trained["params"]["model"]), jax.tree.leaves(initial)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert any(np.abs(np.asarray(a["b"])).max() > 0 for a in trained["params"]["lora"].values())
  adapter_size = sum(x.size for x in jax.tree.leaves(trained["params"]["lora"]))
  assert sum(x.size for x in jax.tree.leaves(trained["opt_state"])) <= 2 * adapter_size + 16
  first = gleam_x.examples(config.data, "test", 1, 1, langs=tuple(config.examples.langs))[0]
  paths = [str(tmp_path / "query.png"), str(tmp_path / "satellite.png")]
  Image.fromarray(first["query"]).save(paths[0])
  Image.fromarray(first["satellite"]).save(paths[1])
  text = explain.explain(None, paths, lang=first["lang"], max_new_tokens=16, workdir=workdir, write=lambda _: None)
  assert explain.explain(None, paths, lang=first["lang"], max_new_tokens=16, workdir=workdir, write=lambda _: None,
                         tensor=2) == text  # the adapters read replicated beside the split model
  with open(os.path.join(workdir, "eval", "explain_step8.md"), encoding="utf-8") as f:
    sample = f.read().split("\n| 0 | ")[1].split("\n")[0]
  assert re.search(rf"\| {re.escape(text.replace('|', '/').replace(chr(10), ' '))} \| 0\.\d\d \|$", sample), (sample, text)


def nnx_params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_a_job_from_a_hugging_face_directory(tiny_cfg, tmp_path):
  """hf_dir=: the real-weights recipe (bfloat16 parameters and compute, rematerialised layers, the loss over
  chunks of positions, the vision tower frozen) on a tiny directory laid out as a released one: the job
  starts from the weights read, the vision tower stays as read, the decoder moves, the loss falls, and
  `explain --workdir` answers with the trained model as the evaluation did."""
  hf = tiny_dir.write_tiny_qwen_dir(str(tmp_path / "hf"), corpus=gleam_x.corpus(), max_pixels=448 * 448)
  torch.manual_seed(0)
  transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig.from_pretrained(hf)).save_pretrained(hf)
  config = tiny_config("x_sft", tiny_cfg.data_dir, arg=f"tiny,hf_dir={hf},lr=3e-3", **{"eval.max_new_tokens": 8})
  assert (config.model.dtype, config.model.param_dtype, config.model.remat, config.loss_chunk) == (
      "bfloat16", "bfloat16", True, 128) and config.optim.frozen == (r"^model/visual/",)
  workdir = str(tmp_path / "job")
  result = main.run(config, workdir)
  losses = [r["loss"] for r in read_metrics(workdir) if "loss" in r]
  assert np.isfinite(losses).all() and np.mean(losses[-2:]) < losses[0] - 0.5, losses
  assert not os.path.exists(os.path.join(workdir, "tiny_qwen"))  # the directory's tokenizer and processor
  read = nnx_params(params.load_pretrained(hf, param_dtype="bfloat16"))
  model, _, _ = sft.load_trained(workdir)
  trained = nnx_params(model)
  flat = lambda tree: {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  read, trained = flat(read), flat(trained)
  assert read.keys() == trained.keys() and all(v.dtype == jnp.bfloat16 for v in trained.values())
  for name in read:
    if "visual" in name:
      np.testing.assert_array_equal(np.asarray(trained[name]), np.asarray(read[name]), err_msg=name)
  assert any(not np.array_equal(np.asarray(trained[n]), np.asarray(read[n])) for n in read if "language_model" in n)
  first = gleam_x.examples(config.data, "test", 1, int(config.seed) + 1, langs=tuple(config.examples.langs))[0]
  paths = [str(tmp_path / "query.png"), str(tmp_path / "satellite.png")]
  Image.fromarray(first["query"]).save(paths[0])
  Image.fromarray(first["satellite"]).save(paths[1])
  text = explain.explain(None, paths, lang=first["lang"], max_new_tokens=8, workdir=workdir, write=lambda _: None)
  with open(os.path.join(workdir, "eval", "explain_step8.md"), encoding="utf-8") as f:
    sample = f.read().split("\n| 0 | ")[1].split("\n")[0]
  assert f"| {text.replace('|', '/').replace(chr(10), ' ')} |" in sample and "verdict_acc" in result
