"""KV-cache generation vs transformers `generate` (greedy, token for token, also with a repetition
penalty and a checkpoint's generation_config.json), its logits processors, sampling, stop tokens,
streaming, a single compiled decode step, and the model on an 8-device (fsdp=2, tensor=4) mesh."""
import json

import numpy as np
import pytest
import torch
import transformers
import jax
import jax.numpy as jnp
from flax import nnx

from gleam_jax.errors import GleamError
from gleam_jax.models.qwen2_5_vl import generation, modeling, rope
from gleam_jax.models.qwen2_5_vl.config import QWEN_SHARDING_RULES
from gleam_jax.train import sharding
from test_qwen_modeling import GRIDS, IMAGE, PAD, SECONDS, VIDEO_GRIDS, hf_config, image_and_video_batch, \
    jax_logits, jax_model, left_pad, pixels, prompt, token_types, torch_model

STEPS = 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  hf_cfg = hf_config()
  tm = torch_model(hf_cfg, seed=3)
  jm, cfg = jax_model(hf_cfg, tm, tmp_path_factory.mktemp("qwen"))
  return tm, jm, cfg


def torch_generate(tm, ids, mask, px, grids, eos, **sampling):
  with torch.no_grad():
    out = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      pixel_values=torch.tensor(px), image_grid_thw=torch.tensor(grids),
                      mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)), max_new_tokens=STEPS,
                      **({"do_sample": False} | sampling), eos_token_id=eos, pad_token_id=PAD)
  return out[:, ids.shape[1]:].numpy()


def batch1(seed=0):
  rng = np.random.default_rng(seed)
  ids, mask = left_pad([prompt(rng, 6, GRIDS)])
  return ids, mask, pixels(rng, GRIDS), GRIDS


def batch2(seed=1):
  """Two prompts of different lengths (left padded), one image each, of different sizes."""
  rng = np.random.default_rng(seed)
  ids, mask = left_pad([prompt(rng, 4, GRIDS[:1]), prompt(rng, 12, GRIDS[1:]) + [9, 10]])
  return ids, mask, pixels(rng, GRIDS), GRIDS


@pytest.mark.parametrize("make", [batch1, batch2], ids=["batch1", "left_padded_batch2"])
def test_greedy_matches_hf_generate(pair, make):
  tm, jm, cfg = pair
  ids, mask, px, grids = make()
  ref = torch_generate(tm, ids, mask, px, grids, eos=[999])  # no stop token: all 32 steps
  streamed = []
  out = generation.generate(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=(),
                            callback=lambda step, toks: streamed.append((step, toks.copy())))
  assert ref.shape == (ids.shape[0], STEPS)
  np.testing.assert_array_equal(out, ref)
  assert len(set(ref[0].tolist())) > 3  # not a degenerate repetition
  # Streaming: one callback per step, in order, with the returned tokens.
  assert [s for s, _ in streamed] == list(range(STEPS))
  np.testing.assert_array_equal(np.stack([t for _, t in streamed], 1), out)
  # Without the fused q/k/v and gate/up copies (less memory): the same tokens.
  unfused = generation.generate(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=(),
                                fuse_projections=False)
  np.testing.assert_array_equal(unfused, ref)
  assert generation.decode_kernels(jm, fuse_projections=False)["layers"] is None


def test_greedy_with_images_and_videos_matches_hf_generate(pair):
  """A left-padded batch with an image and a video in each row: 32 greedy tokens as transformers' generate
  from pixel_values_videos / video_grid_thw / second_per_grid_ts; beam search takes videos too."""
  tm, jm, _ = pair
  ids, mask, px, vpx = image_and_video_batch(7)
  videos = dict(pixel_values_videos=vpx, video_grid_thw=VIDEO_GRIDS, second_per_grid_ts=SECONDS)
  with torch.no_grad():
    ref = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px),
                      image_grid_thw=torch.tensor(GRIDS), mm_token_type_ids=token_types(ids),
                      **{k: torch.tensor(v) for k, v in videos.items()}, max_new_tokens=STEPS, do_sample=False,
                      eos_token_id=[999], pad_token_id=PAD)[:, ids.shape[1]:].numpy()
  out = generation.generate(jm, ids, mask, px, GRIDS, max_new_tokens=STEPS, eos_token_ids=(), **videos)
  np.testing.assert_array_equal(out, ref)
  assert len(set(ref[0].tolist())) > 3
  beams = generation.generate(jm, ids, mask, px, GRIDS, max_new_tokens=6, eos_token_ids=(), num_beams=3, **videos)
  with torch.no_grad():
    ref_beams = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            pixel_values=torch.tensor(px), image_grid_thw=torch.tensor(GRIDS),
                            mm_token_type_ids=token_types(ids), **{k: torch.tensor(v) for k, v in videos.items()},
                            max_new_tokens=6, do_sample=False, num_beams=3, eos_token_id=[999],
                            pad_token_id=PAD)[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(beams, ref_beams)
  with pytest.raises(GleamError, match="pixel_values_videos and video_grid_thw together"):
    generation.generate(jm, ids, mask, px, GRIDS, max_new_tokens=2, pixel_values_videos=vpx)
  with pytest.raises(GleamError, match="video tokens"):
    generation.generate(jm, ids, mask, px, GRIDS, max_new_tokens=2)


def test_tied_embeddings_greedy_matches_hf(tmp_path):
  """`decode_kernels` uses the embedding itself when the output projection is tied."""
  hf_cfg = hf_config(tie=True)
  tm = torch_model(hf_cfg, seed=2)
  jm, cfg = jax_model(hf_cfg, tm, tmp_path)
  assert cfg.tie_word_embeddings
  ids, mask, px, grids = batch2(seed=9)
  ref = torch_generate(tm, ids, mask, px, grids, eos=[999])
  out = generation.generate(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=(), chunk=8)
  np.testing.assert_array_equal(out, ref)


def test_stop_token_pads_like_hf(pair):
  tm, jm, cfg = pair
  ids, mask, px, grids = batch2()
  free = generation.generate(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=())
  eos = int(free[0, 5])  # row 0 stops at step 5 (or earlier if the token came before)
  out = generation.generate(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=(eos,))
  ref = torch_generate(tm, ids, mask, px, grids, eos=[eos])
  np.testing.assert_array_equal(out[:, :ref.shape[1]], ref)
  first = int(np.flatnonzero(out[0] == eos)[0])
  assert first <= 5 and np.all(out[0, first + 1:] == PAD)
  # one stop token may be given as an int, as transformers takes it
  np.testing.assert_array_equal(generation.generate(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=eos),
                                out)


def test_decode_chunk_compiles_once(pair):
  _, jm, _ = pair
  ids, mask, px, grids = batch1(seed=7)
  before = generation.decode_chunk._cache_size()
  generation.generate(jm, ids, mask, px, grids, max_new_tokens=12, eos_token_ids=(), chunk=4)
  assert generation.decode_chunk._cache_size() - before <= 1
  generation.generate(jm, ids, mask, px, grids, max_new_tokens=10, eos_token_ids=(), chunk=4)  # 3 + 4 + 2 steps
  assert generation.decode_chunk._cache_size() - before <= 1  # same shapes: reused


def test_nearby_prompt_lengths_share_one_compiled_prefill(pair):
  """Prompts are left-padded to a multiple of `PROMPT_MULTIPLE` tokens: a prompt with more left padding
  (up to the next multiple) reuses the compiled prefill and gives the same tokens."""
  _, jm, _ = pair
  ids, mask, px, grids = batch1(seed=8)
  extra = -ids.shape[1] % generation.PROMPT_MULTIPLE
  assert extra > 1, ids.shape  # room for more padding within the bucket
  want = generation.generate(jm, ids, mask, px, grids, max_new_tokens=6, eos_token_ids=())
  before = generation.prefill._cache_size()
  more = lambda a: np.pad(a, ((0, 0), (extra, 0)), constant_values=0)
  got = generation.generate(jm, more(ids), more(mask), px, grids, max_new_tokens=6, eos_token_ids=())
  np.testing.assert_array_equal(got, want)
  assert generation.prefill._cache_size() == before


def step_by_step(jm, cfg, ids, mask, px, grids, steps, eos):
  """Prefill, then `decode_step` once per token from Python: the reference for the in-jit loop."""
  pos, _ = rope.get_rope_index(ids, grids, mask, image_token_id=IMAGE, spatial_merge_size=2)
  graphdef, state = nnx.split(jm)
  cache = generation.init_cache(cfg, ids.shape[0], ids.shape[1] + steps)
  stop = jnp.asarray(eos, jnp.int32)
  _, carry, cache = generation.prefill(
      graphdef, state, cache, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(pos), jnp.asarray(px),
      modeling.vision_inputs(grids, cfg), jax.random.split(jax.random.key(0), len(ids)), sampling=generation.Sampling(),
      stop_ids=stop)
  out = [np.asarray(carry["tokens"])]
  kernels = generation.decode_kernels(jm)
  for _ in range(steps - 1):
    carry, cache = generation.decode_step(graphdef, state, kernels, cache, carry, sampling=generation.Sampling(),
                                          stop_ids=stop, pad_id=PAD)
    out.append(np.asarray(carry["tokens"]))
  return np.stack(out, 1)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_loop_equals_step_by_step_and_streams_in_order(pair, chunk):
  _, jm, cfg = pair
  ids, mask, px, grids = batch2(seed=8)
  free = step_by_step(jm, cfg, ids, mask, px, grids, 20, eos=(-1,))
  eos = int(free[1, 7])  # a stop token in the middle of the second chunk of 5
  ref = step_by_step(jm, cfg, ids, mask, px, grids, 20, eos=(eos,))
  streamed = []
  out = generation.generate(jm, ids, mask, px, grids, max_new_tokens=20, eos_token_ids=(eos,), chunk=chunk,
                            callback=lambda step, toks: streamed.append((step, toks.copy())))
  last = max(int(np.flatnonzero(row == eos)[0]) if (row == eos).any() else 19 for row in ref)
  np.testing.assert_array_equal(out, ref[:, :last + 1])  # stops once every row has stopped
  assert [s for s, _ in streamed] == list(range(out.shape[1]))
  np.testing.assert_array_equal(np.stack([t for _, t in streamed], 1), out)


def test_prefill_logits_equal_full_forward(pair):
  _, jm, cfg = pair
  ids, mask, px, grids = batch2(seed=4)
  full = jax_logits(jm, cfg, ids, mask, px, grids)[:, -1]
  pos, _ = rope.get_rope_index(ids, grids, mask, image_token_id=IMAGE, spatial_merge_size=2)
  graphdef, state = nnx.split(jm)
  cache = generation.init_cache(cfg, 2, ids.shape[1] + 4)
  logits, carry, cache = generation.prefill(
      graphdef, state, cache, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(pos), jnp.asarray(px),
      modeling.vision_inputs(grids, cfg), jax.random.split(jax.random.key(0), 2), sampling=generation.Sampling(),
      stop_ids=jnp.asarray([2]))
  np.testing.assert_array_equal(np.asarray(carry["tokens"]), full.argmax(-1))
  np.testing.assert_array_equal(np.asarray(carry["positions"]), pos.max(axis=(0, 2)) + 1)
  assert int(carry["slot"]) == ids.shape[1]
  np.testing.assert_allclose(np.asarray(logits), full, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cache["mask"])[:, :ids.shape[1]], mask.astype(bool))


def test_sampling_follows_softmax_and_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]], jnp.float32))
  keys = jax.random.split(jax.random.key(0), 20000)
  freq = lambda s: np.bincount(np.asarray(jax.vmap(lambda k: generation.sample(logits, k[None], s)[0])(keys)),
                               minlength=4) / len(keys)
  np.testing.assert_allclose(freq(generation.Sampling(1.0, 1.0)), [0.5, 0.25, 0.15, 0.1], atol=0.015)
  # top_p 0.7: the nucleus is {0, 1} (mass before token 2 is 0.75 >= 0.7), renormalised to 2/3, 1/3.
  np.testing.assert_allclose(freq(generation.Sampling(1.0, 0.7)), [2 / 3, 1 / 3, 0, 0], atol=0.015)
  # temperature 0.5 squares the probabilities before normalising.
  p = np.array([0.5, 0.25, 0.15, 0.1]) ** 2
  np.testing.assert_allclose(freq(generation.Sampling(0.5, 1.0)), p / p.sum(), atol=0.015)
  np.testing.assert_array_equal(np.asarray(generation.sample(logits, keys[:1], generation.Sampling())), [0])


def test_temperature_sampling_is_seeded_and_varied(pair):
  _, jm, _ = pair
  ids, mask, px, grids = batch1(seed=5)
  a = generation.generate(jm, ids, mask, px, grids, max_new_tokens=16, temperature=1.5, top_p=0.95, seed=1,
                          eos_token_ids=())
  b = generation.generate(jm, ids, mask, px, grids, max_new_tokens=16, temperature=1.5, top_p=0.95, seed=1,
                          eos_token_ids=())
  c = generation.generate(jm, ids, mask, px, grids, max_new_tokens=16, temperature=1.5, top_p=0.95, seed=2,
                          eos_token_ids=())
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  # a row draws with its own seed whatever the rows beside it: row 1 of (seed 7, seed 1) is `a`
  two = generation.generate(jm, np.concatenate([ids, ids]), np.concatenate([mask, mask]), np.concatenate([px, px]),
                            np.concatenate([grids, grids]), max_new_tokens=16, temperature=1.5, top_p=0.95,
                            seed=[7, 1], eos_token_ids=())
  np.testing.assert_array_equal(two[1:], a)
  assert (two[0] != a[0]).any()
  with pytest.raises(GleamError, match=r"seed has shape \(3,\); give an int or one seed per row \(1\)"):
    generation.generate(jm, ids, mask, px, grids, max_new_tokens=2, temperature=1.0, seed=[1, 2, 3])


def test_right_padding_is_rejected(pair):
  _, jm, _ = pair
  from gleam_jax.errors import GleamError
  with pytest.raises(GleamError, match="LEFT padded"):
    generation.generate(jm, np.array([[5, 6, PAD]]), np.array([[1, 1, 0]]), max_new_tokens=2)


def test_text_only_prompt_with_the_processors_empty_image_arrays(pair):
  """The processor gives a prompt without images (0, patch_dim) pixel_values and a (0, 3) grid: the
  same as passing none."""
  _, jm, cfg = pair
  ids = np.array([[5, 6, 7, 8]])
  none = generation.generate(jm, ids, max_new_tokens=4, eos_token_ids=())
  empty = generation.generate(jm, ids, None, np.zeros((0, cfg.vision.patch_dim), np.float32), np.zeros((0, 3), int),
                              max_new_tokens=4, eos_token_ids=())
  np.testing.assert_array_equal(empty, none)


def test_pixel_rows_that_do_not_match_the_grid_are_rejected(pair):
  """The vision tower gathers patch rows by index (an index past the end would read a clamped row):
  too few, too many or too wide pixel_values stop before the model runs, with both shapes."""
  _, jm, cfg = pair
  from gleam_jax.errors import GleamError
  ids, mask, px, grids = batch1()
  for bad in (px[:-4], np.concatenate([px, px[:4]]), px[:, :-1]):
    with pytest.raises(GleamError, match=rf"pixel_values has shape \({bad.shape[0]}, {bad.shape[1]}\) but "
                                         rf"image_grid_thw .* needs \({px.shape[0]}, {cfg.vision.patch_dim}\)"):
      generation.generate(jm, ids, mask, bad, grids, max_new_tokens=2)


def test_sharded_mesh_same_logits_and_tokens(pair):
  _, jm, cfg = pair
  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  ids, mask, px, grids = batch2(seed=6)
  ref_logits = jax_logits(jm, cfg, ids, mask, px, grids)
  ref_tokens = generation.generate(jm, ids, mask, px, grids, max_new_tokens=8, eos_token_ids=())
  sharded = modeling.create_model(cfg)
  nnx.update(sharded, nnx.state(jm))
  modeling.shard_model(sharded, mesh, QWEN_SHARDING_RULES)
  q = sharded.language_model.layers[0].self_attn.q_proj.kernel.get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 16)

  @jax.jit
  def forward(state, ids, pos, mask, px, layout):
    return nnx.merge(graphdef, state)(ids, pos, mask, px, layout)

  graphdef, state = nnx.split(sharded)
  pos, _ = rope.get_rope_index(ids, grids, mask, image_token_id=IMAGE, spatial_merge_size=2)
  logits = forward(state, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask), jnp.asarray(px),
                   modeling.vision_inputs(grids, cfg))
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-5)
  tokens = generation.generate(sharded, ids, mask, px, grids, max_new_tokens=8, eos_token_ids=(), mesh=mesh)
  np.testing.assert_array_equal(tokens, ref_tokens)


def test_decode_kernels_made_once_per_parameter_set(pair):
  _, jm, cfg = pair
  kernels = generation.decode_kernels(jm)
  np.testing.assert_array_equal(np.asarray(kernels["rows"]), np.asarray(jm.lm_head.kernel[...]).T)
  attn, mlp = jm.language_model.layers[1].self_attn, jm.language_model.layers[1].mlp
  np.testing.assert_array_equal(
      np.asarray(kernels["layers"][1]["qkv"]),
      np.concatenate([np.asarray(p.kernel[...]) for p in (attn.q_proj, attn.k_proj, attn.v_proj)], 1))
  np.testing.assert_array_equal(np.asarray(kernels["layers"][1]["gate_up"]),
                                np.concatenate([np.asarray(mlp.gate_proj.kernel[...]),
                                                np.asarray(mlp.up_proj.kernel[...])], 1))
  assert generation.decode_kernels(jm)["rows"] is kernels["rows"]  # cached while the parameters live
  other = modeling.create_model(cfg, seed=1)
  other_kernels = generation.decode_kernels(other)
  np.testing.assert_array_equal(np.asarray(other_kernels["rows"]), np.asarray(other.lm_head.kernel[...]).T)
  # New values for one projection (as after a training step): new kernels, the old entry is dropped.
  key = (True,) + tuple(id(a) for a in generation._parameter_arrays(other))  # fused projections
  up = other.language_model.layers[0].mlp.up_proj.kernel
  up[...] = up[...] * 2.0
  gate_up = np.asarray(generation.decode_kernels(other)["layers"][0]["gate_up"])
  np.testing.assert_array_equal(gate_up[:, cfg.text.intermediate_size:], np.asarray(up[...]))
  import gc
  gc.collect()
  assert key not in generation._DECODE_KERNELS
  key = (True,) + tuple(id(a) for a in generation._parameter_arrays(other))  # fused projections
  assert key in generation._DECODE_KERNELS
  del other, other_kernels, up
  gc.collect()
  assert key not in generation._DECODE_KERNELS  # dropped with the model's parameters


def test_fused_decoder_equals_unfused(pair):
  """The decoder with q/k/v and gate/up fused gives the logits of the five separate projections."""
  _, jm, cfg = pair
  rng = np.random.default_rng(4)
  ids, mask = left_pad([list(rng.integers(3, 200, 9)), list(rng.integers(3, 200, 6))])
  pos, _ = rope.get_rope_index(ids, None, mask, image_token_id=IMAGE, spatial_merge_size=2)
  x = jm.embed(jnp.asarray(ids))
  causal = modeling.causal_mask(mask, ids.shape[1])
  plain, _ = jm.language_model(x, jnp.asarray(pos), causal)
  fused, _ = jm.language_model(x, jnp.asarray(pos), causal, fused=generation.decode_kernels(jm)["layers"])
  np.testing.assert_allclose(np.asarray(fused), np.asarray(plain), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [batch1, batch2], ids=["batch1", "left_padded_batch2"])
def test_repetition_penalty_matches_hf_generate(pair, make):
  """Greedy with transformers' repetition penalty over the prompt's tokens (left padding left out) and
  the answer's: token for token, and not the unpenalised answer."""
  tm, jm, _ = pair
  ids, mask, px, grids = make()
  ref = torch_generate(tm, ids, mask, px, grids, eos=[999], repetition_penalty=1.5)
  out = generation.generate(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=(), repetition_penalty=1.5,
                            chunk=8)
  np.testing.assert_array_equal(out, ref)
  plain = generation.generate(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=())
  assert (out != plain).any()  # the penalty changes the answer here
  # a penalty below 1 favours repeats, the same way
  np.testing.assert_array_equal(
      generation.generate(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=(), repetition_penalty=0.7),
      torch_generate(tm, ids, mask, px, grids, eos=[999], repetition_penalty=0.7))


def test_a_checkpoints_generation_config_samples_as_hf(pair, tmp_path):
  """Qwen2.5-VL-Instruct's generation_config.json samples with top_k 1 (so a seed cannot matter), a low
  temperature and top_p, and a repetition penalty: transformers' generate with that file's settings and
  ours with `sampling_settings` give the same tokens."""
  tm, jm, _ = pair
  file = dict(do_sample=True, repetition_penalty=1.3, temperature=0.1, top_p=0.001, top_k=1, eos_token_id=[999])
  (tmp_path / "generation_config.json").write_text(json.dumps(file))
  settings = generation.sampling_settings(str(tmp_path))
  assert settings == dict(repetition_penalty=1.3, temperature=0.1, top_k=1, top_p=0.001, min_p=0.0)
  ids, mask, px, grids = batch2(seed=4)
  ref = torch_generate(tm, ids, mask, px, grids, eos=[999], do_sample=True, repetition_penalty=1.3,
                       temperature=0.1, top_p=0.001, top_k=1)
  out = generation.generate(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=(), seed=3, **settings)
  np.testing.assert_array_equal(out, ref)


def test_generation_config_fields_and_defaults(tmp_path):
  """As transformers reads the file: greedy unless do_sample (the penalty either way); its defaults
  (temperature 1, top_k 50, top_p 1) for what a sampling file leaves out; no file: greedy."""
  assert generation.sampling_settings(str(tmp_path)) == {}
  write = lambda **g: (tmp_path / "generation_config.json").write_text(json.dumps(g))
  write(repetition_penalty=1.05, temperature=0.7, top_k=20)
  assert generation.sampling_settings(str(tmp_path)) == dict(repetition_penalty=1.05)
  write(do_sample=True, top_p=0.8)
  assert generation.sampling_settings(str(tmp_path)) == dict(repetition_penalty=1.0, temperature=1.0, top_k=50,
                                                             top_p=0.8, min_p=0.0)
  write(do_sample=True, top_p=1.5)
  with pytest.raises(GleamError, match="0 < top_p <= 1"):
    generation.sampling_settings(str(tmp_path))
  (tmp_path / "generation_config.json").write_text("{broken")
  with pytest.raises(GleamError, match="generation_config.json is not valid JSON"):
    generation.sampling_settings(str(tmp_path))


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.6), dict(temperature=1.0, min_p=0.2),
    dict(temperature=0.8, top_k=12, top_p=0.9, min_p=0.05, repetition_penalty=1.2), dict(repetition_penalty=0.8)])
def test_processed_logits_equal_transformers_processors(sampling):
  """The distribution a token is drawn from equals what transformers' processors leave, in their order
  (repetition penalty, temperature, top-k, top-p, min-p), on logits with ties at the top-k boundary."""
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (4, 40)).astype(np.float32)
  logits[:, 7] = logits[:, 8] = np.sort(logits, axis=1)[:, -5]  # ties around the 5th largest
  ids = rng.integers(0, 40, (4, 9))
  mask = np.ones_like(ids)
  mask[1, :3] = mask[3, :5] = 0  # left padding, not penalised
  s = generation.check_sampling(**sampling)
  processors = transformers.LogitsProcessorList()
  if s.penalised:
    processors.append(transformers.RepetitionPenaltyLogitsProcessor(
        s.repetition_penalty, prompt_ignore_length=torch.tensor((mask != 0).argmax(1))))
  if s.temperature > 0:
    processors.append(transformers.TemperatureLogitsWarper(s.temperature))
    if s.top_k:
      processors.append(transformers.TopKLogitsWarper(s.top_k))
    if s.top_p < 1:
      processors.append(transformers.TopPLogitsWarper(s.top_p))
    if s.min_p:
      processors.append(transformers.MinPLogitsWarper(s.min_p))
  ref = processors(torch.tensor(ids), torch.tensor(logits)).numpy()
  seen = generation.seen_tokens(jnp.asarray(ids), jnp.asarray(mask), 40) if s.penalised else None
  ours = np.asarray(generation.processed_logits(jnp.asarray(logits), s, seen))
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
  np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)
  assert np.isinf(ref).any() or not s.temperature  # the filters remove tokens here


def test_top_k_and_min_p_sample_inside_their_sets():
  logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]], jnp.float32))
  keys = jax.random.split(jax.random.key(0), 20000)
  freq = lambda s: np.bincount(np.asarray(jax.vmap(lambda k: generation.sample(logits, k[None], s)[0])(keys)),
                               minlength=4) / len(keys)
  np.testing.assert_allclose(freq(generation.Sampling(1.0, top_k=2)), [4 / 7, 3 / 7, 0, 0], atol=0.015)
  # min_p 0.4: kept where p >= 0.4 * 0.4
  np.testing.assert_allclose(freq(generation.Sampling(1.0, min_p=0.4)), [4 / 9, 3 / 9, 2 / 9, 0], atol=0.015)
  # top_k 1 is greedy whatever the temperature
  np.testing.assert_allclose(freq(generation.Sampling(5.0, top_k=1)), [1, 0, 0, 0])


@pytest.mark.parametrize("bad, message", [
    (dict(top_k=-1), "top_k >= 0"), (dict(top_k=1.5), "whole top_k"), (dict(min_p=1.5), "0 <= min_p <= 1"),
    (dict(repetition_penalty=0.0), "repetition_penalty > 0"), (dict(temperature=-1.0), "temperature >= 0")])
def test_bad_sampling_settings_are_refused(pair, bad, message):
  _, jm, _ = pair
  with pytest.raises(GleamError, match=message):
    generation.generate(jm, np.array([[5, 6, 7]]), max_new_tokens=2, **bad)
