"""KV-cache generation for Qwen2.5-VL: a jitted prefill, then decoding in compiled loops of `chunk` steps.

The cache is preallocated at a static size: k, v, each one (batch, kv_heads, max_len, head_dim) array
per layer (XLA copied each layer's slice out of one stacked array every step), and a (batch, max_len)
mask of the slots holding real tokens (left padding is False). Prefill writes slots [0, L) and samples
the first token; decode step s writes slot L + s - 1. `decode_chunk` runs up to `chunk` decode steps in
one `lax.while_loop` (slot, positions, tokens, done and each row's rng key travel in a `carry` of
arrays; the loop stops early once every row is done) and donates the cache, so XLA updates it in place;
`decode_step` is the same step as its own compiled function. On a CPU, one call per token cost about as
much in dispatch and host round trips as the step itself at batch 1.

Positions follow HF: prompt tokens get `rope.get_rope_index` positions; generated token s of row b gets
position max(prompt positions of b) + 1 + s on all three M-RoPE axes (HF's attention-mask cumsum plus
`rope_deltas`).

    tokens = generate(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                      max_new_tokens=64, temperature=0.0)          # greedy
    tokens = generate(..., temperature=0.7, top_p=0.9, seed=0, callback=lambda step, toks: ...)
    tokens = generate(..., **sampling_settings(model_dir))         # as the checkpoint's generation_config.json
    tokens = generate(..., callback=print_token, chunk=1)          # every token the moment it exists

Rows that emitted a stop token continue with `pad_token_id` (as HF `generate`); the loop ends when every
row has stopped or after `max_new_tokens`.
"""
import dataclasses
import functools
import weakref
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from gleam_jax.errors import GleamError
from gleam_jax.models.qwen2_5_vl.config import QWEN_SHARDING_RULES, eos_tuple, generation_config
from gleam_jax.models.qwen2_5_vl.modeling import (Qwen2_5_VL, check_image_tokens, check_pixel_values,
                                                   fused_decoder_kernels, position_and_vision_inputs)
from gleam_jax.train import sharding


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen, in transformers' order: the repetition penalty (also when greedy),
  then, when sampling (temperature > 0), temperature, top-k, top-p and min-p. temperature 0 is greedy;
  top_k 0, top_p 1, min_p 0 and repetition_penalty 1 are off (transformers' `generate` samples with
  top_k 50 unless told otherwise; here every filter is asked for)."""
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  min_p: float = 0.0
  repetition_penalty: float = 1.0

  @property
  def penalised(self) -> bool:
    return self.repetition_penalty != 1.0


def check_sampling(**settings) -> Sampling:
  """The `Sampling` of `generate`'s keywords, or one clear error naming the bad value."""
  s = Sampling(**{k: type(getattr(Sampling, k))(v) for k, v in settings.items()})
  if s.temperature < 0.0 or not 0.0 < s.top_p <= 1.0 or s.top_k != settings.get("top_k", 0) or s.top_k < 0 \
      or not 0.0 <= s.min_p <= 1.0 or s.repetition_penalty <= 0.0:
    given = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    raise GleamError(f"generate: {given}; need temperature >= 0, 0 < top_p <= 1, a whole top_k >= 0 (0: off), "
                     "0 <= min_p <= 1 and repetition_penalty > 0 (1: off).")
  return s


def check_settings(**settings) -> dict:
  """`generate`'s token-choice keywords (`Sampling`'s, and num_beams, length_penalty, early_stopping),
  checked: one clear error naming a bad value or a mix beam search does not take."""
  beams = {k: settings.pop(k) for k in ("num_beams", "length_penalty", "early_stopping") if k in settings}
  sampling = check_sampling(**settings)
  check_beam_settings(beams.get("num_beams", 1), beams.get("early_stopping", False), sampling.temperature)
  return dataclasses.asdict(sampling) | beams


EARLY_STOPPING = (False, True, "never")  # transformers' beam-search stopping rules


def check_beam_settings(num_beams, early_stopping, temperature=0.0):
  if num_beams < 1 or early_stopping not in EARLY_STOPPING:
    raise GleamError(f"beam search: num_beams={num_beams}, early_stopping={early_stopping!r}; need num_beams >= 1 "
                     f"and early_stopping one of {EARLY_STOPPING}.")
  if num_beams > 1 and temperature > 0:
    raise GleamError(f"num_beams={num_beams} searches greedily here; set temperature=0 (top_k, top_p and min_p "
                     "then do not apply) or num_beams=1 to sample.")


def sampling_settings(model_dir: str) -> dict:
  """`generate`'s token-choice keywords as transformers' `generate` reads a checkpoint's
  `generation_config.json` (no file: greedy): its repetition penalty; when it says `do_sample`, its
  temperature, top_k, top_p and min_p with transformers' defaults (1.0, 50, 1.0, none) for those it
  leaves out; with num_beams > 1, the beam search's (length_penalty, early_stopping)."""
  g = generation_config(model_dir)
  if not g:
    return {}
  value = lambda key, default: default if g.get(key) is None else g[key]
  settings = dict(repetition_penalty=float(value("repetition_penalty", 1.0)))
  if value("do_sample", False):
    settings.update(temperature=float(value("temperature", 1.0)), top_k=int(value("top_k", 50)),
                    top_p=float(value("top_p", 1.0)), min_p=float(value("min_p", 0.0)))
  if value("num_beams", 1) > 1:
    settings.update(num_beams=int(g["num_beams"]), length_penalty=float(value("length_penalty", 1.0)),
                    early_stopping=value("early_stopping", False))
  check_settings(**settings)
  return settings


CACHE_AXES = ("batch", "kv_heads", "cache_len", "head_dim")  # attention reads (L, S) rows per head


def init_cache(cfg, batch: int, max_len: int, mesh=None, rules=QWEN_SHARDING_RULES) -> dict:
  """Zero cache: k, v tuples of one `CACHE_AXES` array per layer, and the slot mask; on `mesh`, k/v are
  sharded under `rules` (batch, kv heads)."""
  t = cfg.text
  shape = (batch, t.num_key_value_heads, max_len, t.head_dim)
  dtype = jnp.dtype(cfg.dtype)
  layers = t.num_hidden_layers
  cache = {"k": tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
           "v": tuple(jnp.zeros(shape, dtype) for _ in range(layers)), "mask": jnp.zeros((batch, max_len), bool)}
  if mesh is not None:
    kv = NamedSharding(mesh, sharding.logical_to_spec(CACHE_AXES, rules, shape, mesh))
    mask = NamedSharding(mesh, sharding.logical_to_spec(("batch", "cache_len"), rules, (batch, max_len), mesh))
    cache = sharding.place(cache, {"k": (kv,) * layers, "v": (kv,) * layers, "mask": mask})
  return cache


def seen_tokens(input_ids, attention_mask, vocab: int):
  """(B, V) bool: the tokens each row's prompt holds (left padding left out, as transformers 5's
  repetition penalty leaves it out)."""
  ids = jnp.where(attention_mask.astype(bool), input_ids, vocab)  # padding goes to a column dropped after
  rows = jnp.arange(ids.shape[0])[:, None]
  return jnp.zeros((ids.shape[0], vocab + 1), bool).at[rows, ids].set(True)[:, :vocab]


def penalise_repeats(logits, seen, penalty: float):
  """transformers' repetition penalty: a seen token's logit divided by `penalty` (multiplied where
  negative)."""
  return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def sample(logits, keys, sampling: Sampling, seen=None):
  """logits (B, V) float32 -> tokens (B,) int32, row b drawn with keys[b] (B,). `seen` (B, V): the tokens
  of each row so far, for the repetition penalty."""
  logits = processed_logits(logits, sampling, seen)
  if sampling.temperature <= 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def step_keys(keys, step):
  """Each row's key (B,) for decode step `step`: a row's draws depend on its own seed alone."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)


def row_seeds(seed, batch: int) -> np.ndarray:
  """`generate`'s seed as one per row: an int gives row r seed + r; a sequence gives each row its own."""
  seeds = np.asarray(seed, np.int64)
  if seeds.ndim == 0:
    seeds = seeds + np.arange(batch)
  if seeds.shape != (batch,):
    raise GleamError(f"generate: seed has shape {seeds.shape}; give an int or one seed per row ({batch}).")
  return (seeds % 2**32).astype(np.uint32)


def processed_logits(logits, sampling: Sampling, seen=None):
  """The logits a token is drawn from (greedy: its argmax), as transformers' logits processors leave
  them: penalised, then (when sampling) divided by the temperature, tokens outside top-k, top-p and
  min-p at -inf."""
  if sampling.penalised:
    logits = penalise_repeats(logits, seen, sampling.repetition_penalty)
  if sampling.temperature <= 0.0:
    return logits
  logits = logits / sampling.temperature
  if sampling.top_k > 0:  # ties with the k-th largest stay, as in transformers
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < sampling.top_p, sorted_logits, -jnp.inf)  # top-1 always kept
    logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  if sampling.min_p > 0.0:  # below min_p times the most likely token's probability (which always stays)
    probs = jax.nn.softmax(logits, axis=-1)
    logits = jnp.where(probs < sampling.min_p * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, logits)
  return logits


def _with_token(carry, tokens):
  """`carry` with `tokens` (B,) among each row's seen tokens (where the repetition penalty tracks them)."""
  if "seen" not in carry:
    return carry
  return dict(carry, seen=carry["seen"].at[jnp.arange(tokens.shape[0]), tokens].set(True))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def prefill(graphdef, state, cache, input_ids, attention_mask, position_ids, pixel_values, layout, keys, *,
            sampling: Sampling, stop_ids):
  """Runs the prompt, fills cache slots [0, L) and samples the first token.

  Returns (logits (B, V) at the last position, before any repetition penalty; carry; cache). `carry` is
  what `decode_step` consumes: tokens (B,), their M-RoPE positions (B,), done (B,), the cache slot they
  go to, each row's rng key (`keys`, (B,)) and, with a repetition penalty, each row's seen tokens (B, V).
  """
  model = nnx.merge(graphdef, state)
  length, max_len = input_ids.shape[1], cache["mask"].shape[1]
  valid = attention_mask.astype(bool)
  cache = dict(cache, mask=jax.lax.dynamic_update_slice(cache["mask"], valid, (0, 0)))
  causal = jnp.arange(max_len)[None, :] <= jnp.arange(length)[:, None]
  mask = causal[None] & cache["mask"][:, None, :]
  x = model.embed(input_ids, pixel_values, layout)
  hidden, cache = model.language_model(x, position_ids, mask, cache, 0)
  logits = model.logits(hidden[:, -1])
  seen = seen_tokens(input_ids, attention_mask, logits.shape[-1]) if sampling.penalised else None
  tokens = sample(logits, step_keys(keys, 0), sampling, seen)
  carry = dict(tokens=tokens, positions=jnp.max(position_ids, axis=(0, 2)).astype(jnp.int32) + 1,
               done=jnp.isin(tokens, stop_ids), slot=jnp.int32(length), keys=keys)
  if seen is not None:
    carry = _with_token(dict(carry, seen=seen), tokens)
  return logits, carry, cache


_DECODE_KERNELS: dict[tuple, dict] = {}  # ids of the source parameter arrays -> their derived kernels


def _parameter_arrays(model: Qwen2_5_VL) -> list:
  """The arrays `decode_kernels` derives its kernels from."""
  arrays = [] if model.cfg.tie_word_embeddings else [model.lm_head.kernel[...]]
  for layer in model.language_model.layers:
    attn, mlp = layer.self_attn, layer.mlp
    arrays += [p[...] for p in (attn.q_proj.kernel, attn.k_proj.kernel, attn.v_proj.kernel, attn.q_proj.bias,
                                attn.k_proj.bias, attn.v_proj.bias, mlp.gate_proj.kernel, mlp.up_proj.kernel)]
  return arrays


def decode_kernels(model: Qwen2_5_VL, fuse_projections: bool = True) -> dict:
  """Decode-step weight layouts, made once per parameter set and kept while its arrays live:

    rows    the output projection as (vocab, hidden): the tied embedding as it is, or the transpose of
            the untied `lm_head.kernel` (hidden, vocab). A few rows of hidden states times (hidden, vocab)
            ran 2.5x slower on XLA CPU than against the (vocab, hidden) layout (batch 8, vocabulary 32768:
            the output projection was most of a decode step), and the transpose itself costs as much as
            ~30 decode steps at batch 1.
    layers  `modeling.fused_decoder_kernels`: q/k/v and gate/up each as one matmul (None without
            `fuse_projections`: the layers' own projections).

  Costs one copy of the untied `lm_head` and of those decoder kernels. The cache entry is keyed by the
  source arrays and dropped when any of them is freed, so new parameters (e.g. after `nnx.update`) get
  new kernels."""
  arrays = _parameter_arrays(model)
  if any(isinstance(a, jax.core.Tracer) for a in arrays):
    kernels = _derived_kernels(model, fuse_projections)
  else:
    key = (bool(fuse_projections),) + tuple(id(a) for a in arrays)
    kernels = _DECODE_KERNELS.get(key)
    if kernels is None:
      kernels = _DECODE_KERNELS[key] = _derived_kernels(model, fuse_projections)
      for a in arrays:
        weakref.finalize(a, _DECODE_KERNELS.pop, key, None)
  if model.cfg.tie_word_embeddings:  # used as is; not kept in the cache, which would keep it alive
    kernels = dict(kernels, rows=model.language_model.embed_tokens.embedding[...])
  return kernels


def _derived_kernels(model: Qwen2_5_VL, fuse_projections: bool) -> dict:
  kernels = dict(layers=fused_decoder_kernels(model.language_model) if fuse_projections else None)
  if not model.cfg.tie_word_embeddings:
    kernels["rows"] = jnp.transpose(model.lm_head.kernel[...])
  return kernels


def _logits(model: Qwen2_5_VL, rows, hidden):
  """`model.logits(hidden)` for hidden (B, hidden), computed against `rows = decode_kernels(model)['rows']`."""
  dtype = jnp.dtype(model.cfg.dtype)
  out = jax.lax.dot_general(hidden.astype(dtype), rows.astype(dtype), (((1,), (1,)), ((), ())))
  return out.astype(jnp.float32)


def next_logits(model, kernels, cache, tokens, positions, slot):
  """Feeds `tokens` (B,) into cache slot `slot` at M-RoPE positions `positions` (B,) on a merged model;
  returns (the next-token logits (B, V) float32, cache). `kernels` from `decode_kernels`."""
  cache = dict(cache, mask=jax.lax.dynamic_update_slice(
      cache["mask"], jnp.ones((tokens.shape[0], 1), bool), (0, slot)))
  x = model.embed(tokens[:, None])
  position_ids = jnp.broadcast_to(positions[None, :, None], (3, tokens.shape[0], 1))
  hidden, cache = model.language_model(x, position_ids, cache["mask"][:, None, :], cache, slot, kernels["layers"])
  return _logits(model, kernels["rows"], hidden[:, -1]), cache


def _decode(model, kernels, cache, carry, sampling: Sampling, stop_ids, pad_id):
  """One decode step on a merged model (traced inside `decode_step` and `decode_chunk`); `kernels` from
  `decode_kernels`."""
  positions, slot = carry["positions"], carry["slot"]
  logits, cache = next_logits(model, kernels, cache, carry["tokens"], positions, slot)
  next_tokens = sample(logits, step_keys(carry["keys"], slot), sampling, carry.get("seen"))
  next_tokens = jnp.where(carry["done"], pad_id, next_tokens)
  carry = dict(carry, tokens=next_tokens, positions=positions + 1, slot=slot + 1,
               done=carry["done"] | jnp.isin(next_tokens, stop_ids))
  return _with_token(carry, next_tokens), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def decode_step(graphdef, state, kernels, cache, carry, *, sampling: Sampling, stop_ids, pad_id):
  """Feeds `carry['tokens']` (B,) into cache slot `carry['slot']` at M-RoPE positions `carry['positions']`
  and samples the next tokens (finished rows emit `pad_id`); `kernels` = `decode_kernels(model)`.
  Returns (carry, cache) for the next step."""
  return _decode(nnx.merge(graphdef, state), kernels, cache, carry, sampling, stop_ids, pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "chunk"), donate_argnames=("cache",))
def decode_chunk(graphdef, state, kernels, cache, carry, steps, *, sampling: Sampling, stop_ids, pad_id,
                 chunk: int):
  """Up to `steps` (<= `chunk`, a traced scalar) decode steps in one compiled `while_loop`, which stops
  early once every row is done. Returns (tokens (B, chunk) of which the first `count` columns are the new
  tokens, count, carry, cache). One call per chunk instead of one per token: no Python dispatch, no host
  round trip and no re-flattening of the parameters between steps."""
  model = nnx.merge(graphdef, state)
  batch = carry["tokens"].shape[0]

  def running(loop):
    i, _, carry, _ = loop
    return (i < steps) & ~jnp.all(carry["done"])

  def step(loop):
    i, out, carry, cache = loop
    carry, cache = _decode(model, kernels, cache, carry, sampling, stop_ids, pad_id)
    return i + 1, jax.lax.dynamic_update_slice(out, carry["tokens"][:, None], (0, i)), carry, cache

  out = jnp.zeros((batch, chunk), jnp.int32)
  count, out, carry, cache = jax.lax.while_loop(running, step, (jnp.int32(0), out, carry, cache))
  return out, count, carry, cache


def generate(model: Qwen2_5_VL, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping=False, eos_token_ids=None,
             pad_token_id: int | None = None, seed=0,
             callback: Callable[[int, np.ndarray], None] | None = None, chunk: int = 32,
             cache_len: int | None = None, mesh=None, rules=QWEN_SHARDING_RULES,
             fuse_projections: bool = True,
             on_prefill: Callable[[np.ndarray], None] | None = None,
             pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None) -> np.ndarray:
  """Generates up to `max_new_tokens` per row; returns them (B, n) as int32 NumPy (n <= max_new_tokens).

  `input_ids`/`attention_mask` (B, L) are left padded; `pixel_values`/`image_grid_thw` as for the model;
  videos as transformers' processor gives them: `pixel_values_videos`, `video_grid_thw` and
  `second_per_grid_ts` (seconds per temporal patch, for the positions; 1 per video when not given).
  temperature, top_p, top_k, min_p and repetition_penalty choose each token as transformers' `generate`
  does (`Sampling`; greedy by default; `sampling_settings(model_dir)` gives a checkpoint's own).
  `seed`: an int (row r draws with seed + r) or one seed per row; a row's draws depend on its seed
  alone, not on the rows batched with it.
  `num_beams` > 1: transformers' beam search (`beam_search.beam_search`, with `length_penalty` and
  `early_stopping`), the best hypothesis returned; `callback` then receives its tokens after the search.
  `callback(step, tokens)` receives each step's (B,) tokens on the host, in order, as each chunk of up to
  `chunk` decode steps (one compiled loop, see `decode_chunk`) returns; `chunk=1` hands over every token
  the moment it exists, a larger chunk runs faster (no per-token dispatch and host round trip).
  `cache_len`: KV-cache slots (default: prompt + max_new_tokens rounded up to a multiple of 64, so that
  nearby prompt lengths and token budgets reuse the compiled functions; the prompt itself is left-padded
  to a multiple of `PROMPT_MULTIPLE` tokens for the same reason).
  With `mesh` (a model placed by `modeling.shard_model`), the KV cache is sharded under `rules` too.
  `fuse_projections`: decode with q/k/v and gate/up as one matmul each (`decode_kernels`), faster at
  the cost of a copy of those weights while the parameters live; False where memory is short (a 3B
  model in bfloat16: ~3.6 GB), the same tokens.
  `on_prefill(logits)` receives the prompt's next-token logits (B, V) float32 on the host (what the
  first new token is drawn from: e.g. the probability of a "Yes" answer).
  """
  if chunk < 1:
    raise GleamError(f"generate: chunk={chunk}; use at least 1.")
  sampling = check_sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty)
  if num_beams != 1:
    from gleam_jax.models.qwen2_5_vl import beam_search  # pylint: disable=g-import-not-at-top (it builds on this module)
    check_beam_settings(num_beams, early_stopping, temperature)
    tokens, _ = beam_search.beam_search(
        model, input_ids, attention_mask, pixel_values, image_grid_thw, num_beams=num_beams,
        max_new_tokens=max_new_tokens, length_penalty=length_penalty, early_stopping=early_stopping,
        repetition_penalty=repetition_penalty, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
        cache_len=cache_len, mesh=mesh, rules=rules, fuse_projections=fuse_projections, on_prefill=on_prefill,
        pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts)
    for step in range(tokens.shape[1] if callback is not None else 0):
      callback(step, tokens[:, step])
    return tokens
  prompt = Prompt.of(model, input_ids, attention_mask, pixel_values, image_grid_thw, max_new_tokens, cache_len,
                     eos_token_ids, pad_token_id, mesh, rules,
                     videos=(pixel_values_videos, video_grid_thw, second_per_grid_ts))
  graphdef, state = nnx.split(model)
  first_logits, carry, cache = prompt.prefill(graphdef, state, sampling, seed)
  if on_prefill is not None:
    on_prefill(np.asarray(first_logits, np.float32))
  out = [np.asarray(carry["tokens"])]
  if callback is not None:
    callback(0, out[-1])
  kernels = decode_kernels(model, fuse_projections) if max_new_tokens > 1 else None
  step = 1
  while step < max_new_tokens:
    want = min(chunk, max_new_tokens - step)
    tokens, count, carry, cache = decode_chunk(graphdef, state, kernels, cache, carry, jnp.int32(want),
                                               sampling=sampling, stop_ids=prompt.stop_ids, pad_id=prompt.pad,
                                               chunk=chunk)
    tokens, count = np.asarray(tokens), int(count)
    for j in range(count):
      out.append(tokens[:, j])
      if callback is not None:
        callback(step + j, out[-1])
    step += count
    if count < want:  # every row has stopped
      break
  return np.stack(out, axis=1).astype(np.int32)


# Prompts are left-padded to a multiple of this many tokens, so that nearby prompt lengths share one
# compiled prefill (as the KV cache's length, a multiple of 64, shares the decode loop).
PROMPT_MULTIPLE = 32


@dataclasses.dataclass
class Prompt:
  """A checked, left-padded prompt batch ready for `prefill`: its M-RoPE positions, vision layout, the
  empty KV cache and the stop and pad tokens (shared by `generate` and `beam_search`)."""
  input_ids: np.ndarray
  attention_mask: np.ndarray
  pixel_values: np.ndarray | None
  position_ids: np.ndarray
  layout: object
  cache: dict
  stop_ids: jax.Array
  eos: tuple
  pad: int

  @classmethod
  def of(cls, model, input_ids, attention_mask, pixel_values, image_grid_thw, max_new_tokens, cache_len,
         eos_token_ids, pad_token_id, mesh, rules, videos=(None, None, None)) -> "Prompt":
    """`videos`: (pixel_values_videos, video_grid_thw, second_per_grid_ts) as `generate` takes them."""
    cfg = model.cfg
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
      raise GleamError(f"generate: input_ids must be (batch, length), got shape {input_ids.shape}.")
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    if not attention_mask[:, -1].all():
      raise GleamError("generate: prompts must be LEFT padded (attention_mask[:, -1] == 1 for every row); "
                       "set the tokenizer's padding_side='left'.")
    if max_new_tokens < 1:
      raise GleamError(f"generate: max_new_tokens={max_new_tokens}; use at least 1.")
    if (pixel_values is None) != (image_grid_thw is None):
      raise GleamError("generate: pass pixel_values and image_grid_thw together.")
    if image_grid_thw is not None and len(image_grid_thw) == 0:  # the processor's text-only prompt
      check_pixel_values(pixel_values, image_grid_thw, cfg)
      pixel_values = image_grid_thw = None
    video_values, video_grid_thw, second_per_grid_ts = videos
    if (video_values is None) != (video_grid_thw is None):
      raise GleamError("generate: pass pixel_values_videos and video_grid_thw together.")
    if video_grid_thw is not None and len(video_grid_thw) == 0:  # a prompt without videos
      video_values = video_grid_thw = None
    check_image_tokens(input_ids, image_grid_thw, cfg, video_grid_thw)
    if pixel_values is not None:
      check_pixel_values(pixel_values, image_grid_thw, cfg)
    if video_values is not None:
      check_pixel_values(video_values, video_grid_thw, cfg, names=("pixel_values_videos", "video_grid_thw"))
    eos = eos_tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    b, length = input_ids.shape
    padded = -(-length // PROMPT_MULTIPLE) * PROMPT_MULTIPLE
    if cache_len is None:
      cache_len = -(-(padded + max_new_tokens) // 64) * 64
    if cache_len < length + max_new_tokens - 1:
      raise GleamError(f"generate: cache_len={cache_len} cannot hold the prompt ({length}) and "
                       f"{max_new_tokens} new tokens; raise it to at least {length + max_new_tokens - 1}.")
    extra = min(padded, cache_len - max_new_tokens + 1) - length
    if extra > 0:  # more left padding: masked, so the same tokens
      input_ids = np.pad(input_ids, ((0, 0), (extra, 0)), constant_values=pad or 0)
      attention_mask = np.pad(attention_mask, ((0, 0), (extra, 0)))
    position_ids, pixel_values, layout = position_and_vision_inputs(
        input_ids, attention_mask, cfg, pixel_values, image_grid_thw, video_values, video_grid_thw, second_per_grid_ts)
    return cls(input_ids, attention_mask, pixel_values, position_ids, layout,
               init_cache(cfg, b, cache_len, mesh, rules),
               jnp.asarray(eos if eos else (-1,), jnp.int32), eos, pad)

  def prefill(self, graphdef, state, sampling: Sampling, seed=0):
    """`prefill` of this prompt: (its next-token logits, carry, cache); `seed` as `row_seeds` reads it."""
    keys = jax.vmap(jax.random.key)(jnp.asarray(row_seeds(seed, len(self.input_ids))))
    return prefill(graphdef, state, self.cache, jnp.asarray(self.input_ids, jnp.int32), jnp.asarray(self.attention_mask),
                   jnp.asarray(self.position_ids), None if self.pixel_values is None else jnp.asarray(self.pixel_values),
                   self.layout, keys, sampling=sampling, stop_ids=self.stop_ids)
