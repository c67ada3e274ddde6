"""Beam search for Qwen2.5-VL with the static-size KV cache, as transformers' `generate(num_beams=K)`.

The prompt is run once per row (the vision tower too); its cache is then repeated for the K beams.
Every step, under one compiled `lax.while_loop`:

  1. the log-softmax of each beam's next-token logits (after the repetition penalty, if any) plus the
     beam's score: (B, K x V) candidates;
  2. the best 2K of them (more when there are several stop tokens, so that K stay open when the best
     ones stop); a candidate stops on a stop token or at `max_new_tokens`;
  3. the best K candidates that do not stop become the beams; the KV cache rows follow their beams;
  4. of the first K candidates, those that stop join the finished hypotheses, scored by their summed
     log-probability / length ** `length_penalty`, and the best K finished ones are kept;
  5. the search ends when no open beam can beat the worst finished one (`early_stopping=False`:
     judged at the current length; 'never': at the longest with a positive length penalty; True: once
     K have finished), when every candidate stops, or after `max_new_tokens`.

These are transformers' rules (`GenerationMixin._beam_search`), so the same hypotheses come out, token
for token (tested). Beam search here is greedy (no sampling).

    tokens, scores = beam_search(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                                 num_beams=4, max_new_tokens=64)
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gleam_jax.errors import GleamError
from gleam_jax.models.qwen2_5_vl.config import QWEN_SHARDING_RULES
from gleam_jax.models.qwen2_5_vl.generation import (Prompt, Sampling, check_beam_settings, check_sampling,
                                                    decode_kernels, next_logits, penalise_repeats, seen_tokens)

_FAR = -1.0e9  # transformers' score of a hypothesis that must not be chosen


def beam_search(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *, num_beams: int,
                max_new_tokens: int = 64, length_penalty: float = 1.0, early_stopping=False,
                num_return_sequences: int = 1, repetition_penalty: float = 1.0, eos_token_ids=None,
                pad_token_id: int | None = None, cache_len: int | None = None, mesh=None, rules=QWEN_SHARDING_RULES,
                fuse_projections: bool = True, on_prefill=None, pixel_values_videos=None, video_grid_thw=None,
                second_per_grid_ts=None) -> tuple[np.ndarray, np.ndarray]:
  """The best `num_return_sequences` of `num_beams` hypotheses per row: (tokens (B x R, n) int32, the
  new tokens of row b's r-th best at b x R + r, `pad_token_id` after a hypothesis ends; scores (B x R,)
  float32, each hypothesis' summed log-probabilities / its length ** `length_penalty`). Inputs as for
  `generation.generate` (`on_prefill` too); also `generation.generate(..., num_beams=K)`, which returns the
  best hypothesis' tokens."""
  if not 1 <= num_return_sequences <= max(num_beams, 1):
    raise GleamError(f"beam_search: num_beams={num_beams}, num_return_sequences={num_return_sequences}; need "
                     "1 <= num_return_sequences <= num_beams.")
  check_beam_settings(num_beams, early_stopping)
  penalty = check_sampling(repetition_penalty=repetition_penalty)
  prompt = Prompt.of(model, input_ids, attention_mask, pixel_values, image_grid_thw, max_new_tokens, cache_len,
                     eos_token_ids, pad_token_id, mesh, rules,
                     videos=(pixel_values_videos, video_grid_thw, second_per_grid_ts))
  graphdef, state = nnx.split(model)
  logits, carry, cache = prompt.prefill(graphdef, state, Sampling())
  if on_prefill is not None:
    on_prefill(np.asarray(logits, np.float32))
  seen = (seen_tokens(jnp.asarray(prompt.input_ids), jnp.asarray(prompt.attention_mask), logits.shape[-1])
          if penalty.penalised else None)
  kernels = decode_kernels(model, fuse_projections)
  sequences, scores, lengths = _search(
      graphdef, state, kernels, cache, logits, carry["positions"], carry["slot"], seen, prompt.stop_ids,
      beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=float(length_penalty),
      early_stopping=early_stopping, penalty=penalty.repetition_penalty, stops=len(prompt.eos), pad=prompt.pad)
  r = num_return_sequences
  lengths = np.asarray(lengths)[:, :r].reshape(-1)
  tokens = np.asarray(sequences)[:, :r].reshape(-1, max_new_tokens)[:, :lengths.max()]
  return tokens.astype(np.int32), np.asarray(scores)[:, :r].reshape(-1).astype(np.float32)


def _take(x, index):
  """x (B, N, ...) at index (B, M) along axis 1."""
  return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "beams", "max_new_tokens", "length_penalty",
                                             "early_stopping", "penalty", "stops", "pad"))
def _search(graphdef, state, kernels, cache, logits, positions, slot, seen, stop_ids, *, beams, max_new_tokens,
            length_penalty, early_stopping, penalty, stops, pad):
  """The search after the prompt: `cache`, `logits` (B, V), `positions` (B,) and `seen` of B rows."""
  model = nnx.merge(graphdef, state)
  b, vocab = logits.shape
  k, steps = beams, max_new_tokens
  keep = max(2, 1 + stops) * k  # candidates kept each step
  expand = lambda x: jnp.repeat(x, k, axis=0)
  first = expand(logits)
  loop = dict(
      t=jnp.int32(0), logits=first, cache=jax.tree.map(expand, cache), positions=expand(positions),
      seen=None if seen is None else expand(seen),
      running=jnp.full((b, k, steps), pad, jnp.int32),
      running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_FAR),  # only the first beam's tokens at t = 0
      sequences=jnp.full((b, k, steps), pad, jnp.int32), scores=jnp.full((b, k), _FAR, jnp.float32),
      lengths=jnp.zeros((b, k), jnp.int32), finished=jnp.zeros((b, k), bool),
      improvable=jnp.ones((b, 1), bool), stopping=jnp.zeros((b, keep), bool))

  def running(loop):
    open_beams = ~(jnp.all(loop["finished"]) & (early_stopping is True))
    return (loop["t"] < steps) & jnp.any(loop["improvable"]) & open_beams & ~jnp.all(loop["stopping"])

  def step(loop):
    t = loop["t"]
    log_probs = jax.nn.log_softmax(loop["logits"], axis=-1)
    if loop["seen"] is not None:
      log_probs = penalise_repeats(log_probs, loop["seen"], penalty)
    log_probs = (log_probs.reshape(b, k, vocab) + loop["running_scores"][..., None]).reshape(b, k * vocab)
    top_scores, top_index = jax.lax.top_k(log_probs, keep)
    source, tokens = top_index // vocab, top_index % vocab
    candidates = jnp.where(jnp.arange(steps) == t, tokens[..., None], _take(loop["running"], source))
    stopping = jnp.isin(tokens, stop_ids) | (t + 1 >= steps)
    # the best K that go on
    open_scores = top_scores + jnp.where(stopping, _FAR, 0.0)
    _, best = jax.lax.top_k(open_scores, k)
    beam_rows = (jnp.arange(b)[:, None] * k + _take(source, best)).reshape(-1)
    # the first K that stop join the finished hypotheses
    new = stopping & (jnp.arange(keep) < k)[None]
    scores = top_scores / ((t + 1).astype(jnp.float32) ** length_penalty)
    full = jnp.all(loop["finished"], axis=-1, keepdims=True) & (early_stopping is True)
    scores = scores + jnp.where(full | ~loop["improvable"] | ~new, _FAR, 0.0)
    merged = jnp.concatenate([loop["scores"], scores], axis=1)
    _, kept = jax.lax.top_k(merged, k)
    pick = lambda old, candidate: _take(jnp.concatenate([old, candidate], axis=1), kept)
    finished = dict(sequences=pick(loop["sequences"], candidates), scores=_take(merged, kept),
                    lengths=pick(loop["lengths"], jnp.full((b, keep), t + 1, jnp.int32)),
                    finished=pick(loop["finished"], new))
    running_scores = _take(open_scores, best)
    # can an open beam still beat the worst finished hypothesis?
    length = steps if (early_stopping == "never" and length_penalty > 0.0) else t + 1
    best_possible = running_scores[:, :1] / (jnp.float32(length) ** length_penalty)
    worst = jnp.where(finished["finished"], jnp.min(finished["scores"], axis=1, keepdims=True), _FAR)
    improvable = loop["improvable"] & jnp.any(best_possible > worst, axis=-1, keepdims=True)
    next_tokens = _take(tokens, best).reshape(-1)
    cache = jax.tree.map(lambda x: x[beam_rows], loop["cache"])
    seen = loop["seen"]
    if seen is not None:
      seen = seen[beam_rows].at[jnp.arange(b * k), next_tokens].set(True)
    go_on = (t + 1 < steps) & jnp.any(improvable) & ~jnp.all(stopping)
    logits, cache = jax.lax.cond(
        go_on, lambda c: next_logits(model, kernels, c, next_tokens, loop["positions"], slot + t),
        lambda c: (loop["logits"], c), cache)
    return dict(loop, **finished, t=t + 1, logits=logits, cache=cache, positions=loop["positions"] + 1, seen=seen,
                running=_take(candidates, best), running_scores=running_scores, improvable=improvable,
                stopping=stopping)

  loop = jax.lax.while_loop(running, step, loop)
  return loop["sequences"], loop["scores"], loop["lengths"]
