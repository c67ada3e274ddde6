"""Qwen2.5-VL NNX port vs transformers' PyTorch model (float32, eager attention), tiny random configs.

The configs exercise window attention (several windows per image, clipped at odd borders), full-
attention blocks, GQA, M-RoPE with two images of different sizes in one prompt, and left padding.
"""
import dataclasses
import functools

import numpy as np
import pytest
import torch
import transformers
import jax
import jax.numpy as jnp
from flax import nnx

from gleam_jax.errors import GleamError
from gleam_jax.models.qwen2_5_vl import config as qcfg
from gleam_jax.models.qwen2_5_vl import modeling, params, rope

IMAGE, VIDEO, VSTART, VEND, PAD = 300, 301, 302, 303, 0
GRIDS = np.array([[1, 8, 12], [1, 10, 14]])  # merged grids 4x6 and 5x7 (odd), window 2x2 merged units
VIDEO_GRIDS = np.array([[2, 8, 8], [3, 4, 6]])  # 4 and 6 frames (2 per temporal patch)
SECONDS = np.array([0.5, 1.25], np.float32)  # seconds per temporal patch: fractional time positions


def hf_config(tie=False, vision_depth=3, fullatt=(1,), window_size=56):
  return transformers.Qwen2_5_VLConfig(
      vision_config=dict(depth=vision_depth, hidden_size=64, intermediate_size=96, num_heads=4, patch_size=14,
                         temporal_patch_size=2, spatial_merge_size=2, window_size=window_size, out_hidden_size=64,
                         fullatt_block_indexes=list(fullatt), in_channels=3),
      text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
                       rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[2, 3, 3])),
      image_token_id=IMAGE, video_token_id=301, vision_start_token_id=VSTART, vision_end_token_id=VEND,
      tie_word_embeddings=tie)


def torch_model(hf_cfg, seed=0):
  """The reference with every weight random (norm scales around 1, biases non-zero)."""
  torch.manual_seed(seed)
  model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, attn_implementation="eager")
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "layernorm" in name or \
          name.endswith("norm.weight") or "ln_q" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif "embed_tokens" in name:  # large enough that greedy decoding does not collapse into repeats
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(0.08 * torch.randn_like(p))
  return model.eval().float()


def jax_model(hf_cfg, torch_model_, directory):
  """The NNX model with the reference's weights, through a saved HF checkpoint (config.json + safetensors)."""
  torch_model_.save_pretrained(directory)
  model = params.load_pretrained(str(directory))
  assert model.cfg == qcfg.from_hf(hf_cfg)
  return model, model.cfg


def prompt(rng, n_text, grids, merge=2):
  """Text, then each image as <start> pad*n <end> followed by more text."""
  ids = list(rng.integers(3, 290, n_text))
  for n in rope.num_image_tokens(grids, merge):
    ids += [VSTART] + [IMAGE] * n + [VEND] + list(rng.integers(3, 290, 3))
  return ids


def visual_prompt(rng, n_text, items, merge=2):
  """Text, then each (placeholder token, grid) as <start> token*n <end> followed by more text."""
  ids = list(rng.integers(3, 290, n_text))
  for token, grid in items:
    ids += [VSTART] + [token] * (int(np.prod(grid)) // merge**2) + [VEND] + list(rng.integers(3, 290, 3))
  return ids


def image_and_video_batch(seed):
  """Two left-padded rows: an image then a video, and a video then an image; the visuals of each kind in
  the order they appear."""
  rng = np.random.default_rng(seed)
  ids, mask = left_pad([visual_prompt(rng, 5, [(IMAGE, GRIDS[0]), (VIDEO, VIDEO_GRIDS[0])]),
                        visual_prompt(rng, 8, [(VIDEO, VIDEO_GRIDS[1]), (IMAGE, GRIDS[1])]) + [7]])
  return ids, mask, pixels(rng, GRIDS), pixels(rng, VIDEO_GRIDS)


def token_types(ids):
  """HF's mm_token_type_ids: 1 for image placeholders, 2 for video placeholders."""
  return torch.tensor((ids == IMAGE) + 2 * (ids == VIDEO)).long()


def left_pad(rows):
  length = max(len(r) for r in rows)
  ids = np.full((len(rows), length), PAD, np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for i, r in enumerate(rows):
    ids[i, length - len(r):] = r
    mask[i, length - len(r):] = 1
  return ids, mask


def pixels(rng, grids, patch_dim=3 * 2 * 14 * 14):
  return rng.standard_normal((int(np.prod(grids, 1).sum()), patch_dim)).astype(np.float32)


def torch_logits(model, ids, mask, px, grids):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 pixel_values=torch.tensor(px), image_grid_thw=torch.tensor(grids),
                 mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64))).logits.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, pos, mask, px, layout):
  return nnx.merge(graphdef, state)(ids, pos, mask, px, layout)


def jax_logits(model, cfg, ids, mask, px, grids):
  pos, _ = rope.get_rope_index(ids, grids, mask, image_token_id=cfg.image_token_id,
                               spatial_merge_size=cfg.vision.spatial_merge_size)
  layout = modeling.vision_inputs(grids, cfg)
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask),
                             jnp.asarray(px), layout))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  hf_cfg = hf_config()
  tm = torch_model(hf_cfg)
  jm, cfg = jax_model(hf_cfg, tm, tmp_path_factory.mktemp("qwen"))
  return tm, jm, cfg


def test_vision_layout_matches_hf_window_index():
  from transformers.vision_utils import get_vision_window_index, get_vision_cu_seqlens
  grids = np.array([[1, 8, 12], [1, 10, 14], [2, 4, 6]])
  layout = rope.vision_layout(grids, 2, 56, 14)
  window_index, cu_window = get_vision_window_index(torch.tensor(grids), 2, 56, 14)
  np.testing.assert_array_equal(layout.merged_inverse, np.argsort(window_index.numpy()))
  np.testing.assert_array_equal(layout.patch_index.reshape(-1, 4)[:, 0] // 4, window_index.numpy())
  # Window blocks hold exactly HF's windows (consecutive in window order, sizes from cu_window_seqlens).
  n = len(layout.patch_index)
  sizes = (layout.window_blocks < n).sum(1)
  np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(sizes)]), cu_window.numpy())
  np.testing.assert_array_equal(layout.window_blocks[layout.window_blocks < n], np.arange(n))
  np.testing.assert_array_equal(layout.window_blocks.reshape(-1)[layout.window_unblock], np.arange(n))
  # Full-attention blocks: one per frame, sizes as HF's cu_seqlens.
  cu = get_vision_cu_seqlens(torch.tensor(grids)).numpy()
  np.testing.assert_array_equal((layout.image_blocks < n).sum(1), np.diff(cu))
  np.testing.assert_array_equal(layout.image_blocks.reshape(-1)[layout.image_unblock], np.arange(n))


def test_rope_index_matches_hf(pair):
  tm, _, cfg = pair
  rng = np.random.default_rng(0)
  rows = [prompt(rng, 5, GRIDS[:1]) , prompt(rng, 9, GRIDS[1:])]
  rows[1] += [7, 8]
  ids, mask = left_pad(rows)
  pos, deltas = rope.get_rope_index(ids, GRIDS, mask, image_token_id=IMAGE, spatial_merge_size=2)
  ref_pos, ref_deltas = tm.model.get_rope_index(
      torch.tensor(ids), torch.tensor((ids == IMAGE).astype(np.int64)), image_grid_thw=torch.tensor(GRIDS),
      attention_mask=torch.tensor(mask))
  np.testing.assert_array_equal(pos, ref_pos.numpy())
  np.testing.assert_array_equal(deltas, ref_deltas.numpy())


def test_rope_index_with_videos_matches_hf(pair):
  tm, _, cfg = pair
  ids, mask, _, _ = image_and_video_batch(4)
  ours = rope.get_rope_index(ids, GRIDS, mask, image_token_id=IMAGE, spatial_merge_size=2, video_grid_thw=VIDEO_GRIDS,
                             second_per_grid_ts=SECONDS, video_token_id=VIDEO,
                             tokens_per_second=cfg.vision.tokens_per_second)
  ref = tm.model.get_rope_index(torch.tensor(ids), token_types(ids), image_grid_thw=torch.tensor(GRIDS),
                                video_grid_thw=torch.tensor(VIDEO_GRIDS), second_per_grid_ts=torch.tensor(SECONDS),
                                attention_mask=torch.tensor(mask))
  np.testing.assert_array_equal(ours[0], ref[0].numpy())
  np.testing.assert_array_equal(ours[1], ref[1].numpy())
  # The second video's temporal patches are 1.25 s apart: positions start + (0, 2, 5) at 2 tokens per second
  # (truncated products), not the frame index.
  row = np.flatnonzero(ids[1] == VIDEO)
  times = np.unique(ours[0][0, 1, row]) - ours[0][1, 1, row].min()
  assert cfg.vision.tokens_per_second == tm.config.vision_config.tokens_per_second
  np.testing.assert_array_equal(times, (np.arange(3) * np.float32(cfg.vision.tokens_per_second * 1.25)).astype(int))
  assert len(set(times.tolist())) == 3


def test_merge_visuals_orders_images_and_videos_by_their_placeholders():
  cfg = qcfg.tiny(image_token_id=IMAGE, video_token_id=VIDEO)
  ids, _, px, vpx = image_and_video_batch(5)
  merged, grids = modeling.merge_visuals(ids, cfg, px, GRIDS, vpx, VIDEO_GRIDS)
  np.testing.assert_array_equal(grids, [GRIDS[0], VIDEO_GRIDS[0], VIDEO_GRIDS[1], GRIDS[1]])
  image_rows, video_rows = np.prod(GRIDS, 1), np.prod(VIDEO_GRIDS, 1)
  expected = [px[:image_rows[0]], vpx[:video_rows[0]], vpx[video_rows[0]:], px[image_rows[0]:]]
  np.testing.assert_array_equal(merged, np.concatenate(expected))
  # Only one kind: its inputs as they are.
  assert modeling.merge_visuals(ids, cfg, px, GRIDS, None, None)[0] is px
  assert modeling.merge_visuals(ids, cfg, None, None, vpx, VIDEO_GRIDS)[0] is vpx


def test_vision_tower_matches_hf(pair):
  tm, jm, cfg = pair
  px = pixels(np.random.default_rng(1), GRIDS)
  with torch.no_grad():
    ref = tm.model.visual(torch.tensor(px), grid_thw=torch.tensor(GRIDS)).pooler_output.numpy()
  visual = nnx.jit(lambda m, px, layout: m(px, layout))
  out = np.asarray(visual(jm.visual, jnp.asarray(px), modeling.vision_inputs(GRIDS, cfg)))
  assert out.shape == ref.shape == (24 + 35, 64)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_logits_two_images_match_hf(pair):
  tm, jm, cfg = pair
  rng = np.random.default_rng(2)
  ids, mask = left_pad([prompt(rng, 6, GRIDS)])
  px = pixels(rng, GRIDS)
  ref = torch_logits(tm, ids, mask, px, GRIDS)
  out = jax_logits(jm, cfg, ids, mask, px, GRIDS)
  assert np.abs(ref).max() > 0.1  # a non-trivial model
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_logits_images_and_videos_match_hf(pair):
  """A left-padded batch with an image and a video per row (the video first in one row): HF's
  pixel_values_videos / video_grid_thw / second_per_grid_ts against our merged vision stream."""
  tm, jm, cfg = pair
  ids, mask, px, vpx = image_and_video_batch(6)
  with torch.no_grad():
    ref = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px),
             image_grid_thw=torch.tensor(GRIDS), pixel_values_videos=torch.tensor(vpx),
             video_grid_thw=torch.tensor(VIDEO_GRIDS), second_per_grid_ts=torch.tensor(SECONDS),
             mm_token_type_ids=token_types(ids)).logits.numpy()
  modeling.check_image_tokens(ids, GRIDS, cfg, VIDEO_GRIDS)
  pos, _ = rope.get_rope_index(ids, GRIDS, mask, image_token_id=IMAGE, spatial_merge_size=2,
                               video_grid_thw=VIDEO_GRIDS, second_per_grid_ts=SECONDS, video_token_id=VIDEO,
                               tokens_per_second=cfg.vision.tokens_per_second)
  merged, grids = modeling.merge_visuals(ids, cfg, px, GRIDS, vpx, VIDEO_GRIDS)
  graphdef, state = nnx.split(jm)
  out = np.asarray(_forward(graphdef, state, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask),
                            jnp.asarray(merged), modeling.vision_inputs(grids, cfg)))
  valid = mask.astype(bool)
  assert np.abs(ref[valid]).max() > 0.1
  np.testing.assert_allclose(out[valid], ref[valid], atol=1e-4, rtol=0)


def test_logits_left_padded_batch_match_hf(pair):
  tm, jm, cfg = pair
  rng = np.random.default_rng(3)
  ids, mask = left_pad([prompt(rng, 4, GRIDS[:1]), prompt(rng, 11, GRIDS[1:]) + [9, 10, 11]])
  px = pixels(rng, GRIDS)
  ref = torch_logits(tm, ids, mask, px, GRIDS)
  out = jax_logits(jm, cfg, ids, mask, px, GRIDS)
  valid = mask.astype(bool)
  np.testing.assert_allclose(out[valid], ref[valid], atol=1e-4, rtol=0)


def test_text_only_and_tied_embeddings_match_hf(tmp_path):
  hf_cfg = hf_config(tie=True, vision_depth=1, fullatt=(0,))
  tm = torch_model(hf_cfg, seed=1)
  jm, cfg = jax_model(hf_cfg, tm, tmp_path)
  assert cfg.tie_word_embeddings and not hasattr(jm, "lm_head")
  ids = np.random.default_rng(4).integers(3, 290, (2, 13))
  mask = np.ones_like(ids)
  with torch.no_grad():
    ref = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  pos = np.broadcast_to(np.arange(13), (3, 2, 13))
  out = np.asarray(jm(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)))
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_bfloat16_compute_close_to_float32(pair):
  tm, jm, cfg = pair
  bf = modeling.create_model(cfg.replace(dtype="bfloat16"))
  nnx.update(bf, nnx.state(jm, nnx.Param))
  rng = np.random.default_rng(5)
  ids, mask = left_pad([prompt(rng, 6, GRIDS)])
  px = pixels(rng, GRIDS)
  ref = jax_logits(jm, cfg, ids, mask, px, GRIDS)
  out = jax_logits(bf, cfg, ids, mask, px, GRIDS)
  assert out.dtype == np.float32
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert rel < 0.05, rel
  assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_remat_gives_the_same_loss_and_gradients():
  cfg = qcfg.tiny()
  cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, depth=2),
                    text=dataclasses.replace(cfg.text, num_hidden_layers=1))
  rng = np.random.default_rng(8)
  grids = GRIDS[:1]
  ids, mask = left_pad([prompt(rng, 5, grids)])
  ids, px = jnp.asarray(ids), jnp.asarray(pixels(rng, grids))
  pos, _ = rope.get_rope_index(ids, grids, mask, image_token_id=IMAGE, spatial_merge_size=2)
  layout = modeling.vision_inputs(grids, cfg)

  def loss_and_grads(remat):
    model = modeling.create_model(cfg.replace(remat=remat), seed=3)
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state):
      logits = nnx.merge(graphdef, state)(ids, jnp.asarray(pos), jnp.asarray(mask), px, layout)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))
    return jax.value_and_grad(f)(state)

  (loss, grads), (loss_r, grads_r) = loss_and_grads(False), loss_and_grads(True)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(g_r, g, atol=1e-6)
  assert float(jnp.abs(grads["visual"]["blocks"][0]["attn"]["qkv"]["kernel"][...]).max()) > 0


def test_abstract_model_allocates_nothing():
  cfg = qcfg.qwen2_5_vl_3b()
  model = modeling.abstract_model(cfg)
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  n = sum(int(np.prod(x.shape)) for x in leaves)
  assert 3.5e9 < n < 3.9e9, n  # Qwen2.5-VL-3B: ~3.75B parameters with tied embeddings
  assert model.language_model.layers[0].self_attn.k_proj.kernel.shape == (2048, 256)
  assert model.visual.merger.mlp[2].kernel.shape == (5120, 2048)


def test_config_round_trips_through_transformers(tmp_path):
  for name in qcfg.PRESETS:
    cfg = qcfg.get(name)
    assert qcfg.from_hf(qcfg.to_hf(cfg)) == cfg
  assert qcfg.qwen2_5_vl_7b().text.num_key_value_heads == 4 and not qcfg.qwen2_5_vl_7b().tie_word_embeddings
  with pytest.raises(GleamError, match="config.json"):
    qcfg.from_pretrained_dir(str(tmp_path))
  with pytest.raises(GleamError, match="preset"):
    qcfg.get("qwen2_5_vl_70b")


def test_image_token_count_mismatch_is_a_clear_error():
  cfg = qcfg.tiny()
  with pytest.raises(GleamError, match="image tokens"):
    modeling.check_image_tokens(np.array([[IMAGE] * 5]), GRIDS[:1], cfg)
  with pytest.raises(GleamError, match="1 video tokens .* gives 0 merged video tokens"):
    modeling.check_image_tokens(np.array([[5, cfg.video_token_id]]), None, cfg)
  with pytest.raises(GleamError, match="pixel_values_videos has shape"):
    modeling.check_pixel_values(np.zeros((3, cfg.vision.patch_dim)), VIDEO_GRIDS[:1], cfg,
                                names=("pixel_values_videos", "video_grid_thw"))
  with pytest.raises(GleamError, match="video_grid_thw needs video_token_id"):
    rope.get_rope_index(np.array([[5]]), None, None, image_token_id=IMAGE, spatial_merge_size=2,
                        video_grid_thw=VIDEO_GRIDS)
  with pytest.raises(GleamError, match="second_per_grid_ts has 1 values for 2 videos"):
    rope.get_rope_index(np.array([[5]]), None, None, image_token_id=IMAGE, spatial_merge_size=2,
                        video_grid_thw=VIDEO_GRIDS, second_per_grid_ts=[1.0], video_token_id=VIDEO)
  with pytest.raises(GleamError, match="mrope_section"):
    qcfg.tiny(text=qcfg.TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   mrope_section=(16, 24, 24)))
