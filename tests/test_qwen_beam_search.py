"""Beam search (`beam_search.beam_search`, `generate(num_beams=K)`) against transformers'
`generate(num_beams=K)`: the same hypotheses token for token and the same scores, with stop tokens,
length penalties, each early-stopping rule, several returned sequences, a repetition penalty and
left-padded batches of images."""
import json

import numpy as np
import pytest
import torch

from gleam_jax.errors import GleamError
from gleam_jax.models.qwen2_5_vl import beam_search, generation
from test_qwen_generation import STEPS, batch1, batch2, pair  # noqa: F401 (the fixture)
from test_qwen_modeling import IMAGE

FILL = 5  # what follows a finished hypothesis (transformers fills with pad_token_id where it is not 0)


def torch_beams(tm, ids, mask, px, grids, eos, **settings):
  with torch.no_grad():
    out = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px),
                      image_grid_thw=torch.tensor(grids), mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
                      max_new_tokens=STEPS, do_sample=False, eos_token_id=eos, pad_token_id=FILL, output_scores=True,
                      return_dict_in_generate=True, **settings)
  return out.sequences[:, ids.shape[1]:].numpy(), out.sequences_scores.numpy()


SETTINGS = {
    "3_beams": dict(num_beams=3),
    "4_beams_2_returned_length_penalty": dict(num_beams=4, num_return_sequences=2, length_penalty=0.5),
    "early_stopping": dict(num_beams=3, early_stopping=True),
    "never_stop_early": dict(num_beams=3, early_stopping="never", length_penalty=2.0),
    "repetition_penalty": dict(num_beams=3, repetition_penalty=1.3),
}


@pytest.mark.parametrize("make", [batch1, batch2], ids=["batch1", "left_padded_batch2"])
@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
@pytest.mark.parametrize("stops", ["none", "two"])
def test_beam_search_matches_hf(pair, make, settings, stops):  # noqa: F811
  tm, jm, _ = pair
  ids, mask, px, grids = make()
  if stops == "none":
    eos = [999]
  else:  # two tokens the greedy answers say early: hypotheses finish at different steps
    free = generation.generate(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=())
    eos = [int(free[0, 4]), int(free[-1, 7])]
  want, want_scores = torch_beams(tm, ids, mask, px, grids, eos, **settings)
  got, scores = beam_search.beam_search(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=eos,
                                        pad_token_id=FILL, **settings)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


def test_generate_with_beams_returns_the_best_hypothesis(pair):  # noqa: F811
  """`generate(num_beams=K)` is the best of `beam_search`, handed to the callback after the search; it
  differs from greedy here (so the search searches); one beam is greedy."""
  _, jm, _ = pair
  ids, mask, px, grids = batch2()
  best, _ = beam_search.beam_search(jm, ids, mask, px, grids, num_beams=3, max_new_tokens=STEPS, eos_token_ids=())
  streamed = []
  out = generation.generate(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=(), num_beams=3,
                            callback=lambda step, tokens: streamed.append(tokens.copy()))
  np.testing.assert_array_equal(out, best)
  np.testing.assert_array_equal(np.stack(streamed, 1), out)
  greedy = generation.generate(jm, ids, mask, px, grids, max_new_tokens=STEPS, eos_token_ids=())
  assert (out != greedy).any()
  np.testing.assert_array_equal(
      beam_search.beam_search(jm, ids, mask, px, grids, num_beams=1, max_new_tokens=STEPS, eos_token_ids=())[0], greedy)


def test_generation_config_with_beams_and_bad_settings(pair, tmp_path):  # noqa: F811
  _, jm, _ = pair
  (tmp_path / "generation_config.json").write_text(json.dumps(dict(num_beams=4, length_penalty=0.8,
                                                                   early_stopping=True)))
  assert generation.sampling_settings(str(tmp_path)) == dict(repetition_penalty=1.0, num_beams=4,
                                                             length_penalty=0.8, early_stopping=True)
  ids = np.array([[5, 6, 7]])
  with pytest.raises(GleamError, match="num_beams=3 searches greedily here; set temperature=0"):
    generation.generate(jm, ids, max_new_tokens=2, num_beams=3, temperature=0.7)
  with pytest.raises(GleamError, match="early_stopping one of"):
    generation.generate(jm, ids, max_new_tokens=2, num_beams=3, early_stopping="soon")
  with pytest.raises(GleamError, match="1 <= num_return_sequences <= num_beams"):
    beam_search.beam_search(jm, ids, max_new_tokens=2, num_beams=2, num_return_sequences=3)
  (tmp_path / "generation_config.json").write_text(json.dumps(dict(num_beams=4, do_sample=True)))
  with pytest.raises(GleamError, match="searches greedily here"):
    generation.sampling_settings(str(tmp_path))


def test_beam_search_on_a_sharded_model_finds_the_same_hypotheses(pair):  # noqa: F811
  """The model on (fsdp 2, tensor 4) of the 8 test devices, its cache sharded: the cache rows that
  follow the beams give one device's hypotheses and scores."""
  from flax import nnx
  from gleam_jax.models.qwen2_5_vl import modeling
  from gleam_jax.models.qwen2_5_vl.config import QWEN_SHARDING_RULES
  from gleam_jax.train import sharding
  _, jm, cfg = pair
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  sharded = modeling.create_model(cfg)
  nnx.update(sharded, nnx.state(jm))
  modeling.shard_model(sharded, mesh, QWEN_SHARDING_RULES)
  ids, mask, px, grids = batch2(seed=6)
  want, want_scores = beam_search.beam_search(jm, ids, mask, px, grids, num_beams=3, max_new_tokens=12,
                                              eos_token_ids=(), num_return_sequences=2)
  got, scores = beam_search.beam_search(sharded, ids, mask, px, grids, num_beams=3, max_new_tokens=12,
                                        eos_token_ids=(), num_return_sequences=2, mesh=mesh)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
