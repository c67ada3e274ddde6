"""Contrastive losses over the global batch.

`query` and `reference` are (B, D) L2-normalised embeddings of the *global* batch: under jit with
the batch sharded over ('data', 'fsdp'), `query @ reference.T` makes GSPMD all-gather the
embeddings (B x D), never the images, and every query is scored against every reference.

- `infonce`: symmetric cross-entropy with label smoothing, as Sample4Geo's `InfoNCE`
  (`torch.nn.CrossEntropyLoss(label_smoothing=0.1)` on `scale * q @ r.T` and its transpose, averaged).
- `sigmoid`: the SigLIP loss, -mean over queries of sum_j log sigmoid(z_ij * (scale * q_i.r_j + bias)),
  z_ij = +1 on the diagonal, -1 elsewhere.

`exclude` (optional, (B, B) bool) drops off-diagonal pairs that are not negatives: in a batch
that joins several modality groups, two groups may hold the same location, whose satellite is then
a true match for both queries. Excluded logits leave the softmax and the label smoothing, so with
nothing excluded the loss is Sample4Geo's exactly.

The logit scale is learned as a log value and used as exp(log scale), as Sample4Geo (which bounds
it nowhere). For InfoNCE the train step clamps that parameter at log `MAX_LOGIT_SCALE` after each
update (`clamp_log_scale`), as CLIP; the sigmoid loss leaves it free, as big_vision's SigLIP.
"""
import math

import jax
import jax.numpy as jnp
import optax

from gleam_jax.errors import GleamError

MAX_LOGIT_SCALE = 100.0
LOSSES = ("infonce", "sigmoid")


def logit_scale_value(log_scale):
  """The scale the logits are multiplied by: exp of the learned log scale, in float32."""
  return jnp.exp(log_scale.astype(jnp.float32))


def clamp_log_scale(log_scale):
  """CLIP's bound, on the parameter after an update: clamped in the forward pass instead, the scale
  would get no gradient above the bound, and the optimizer's momentum could leave it there for good."""
  return jnp.minimum(log_scale, jnp.asarray(math.log(MAX_LOGIT_SCALE), log_scale.dtype))


def similarity_logits(query, reference, log_scale, bias=None):
  """(B, B) logits in float32: scale * query @ reference.T (+ bias)."""
  sims = jnp.einsum("qd,rd->qr", query.astype(jnp.float32), reference.astype(jnp.float32))
  logits = logit_scale_value(log_scale) * sims
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  return logits


def _smoothed_targets(valid, label_smoothing):
  """Row-wise smoothed one-hot on the diagonal, the smoothing spread over the row's valid entries."""
  n = valid.shape[0]
  spread = valid / jnp.sum(valid, axis=1, keepdims=True)
  return (1.0 - label_smoothing) * jnp.eye(n, dtype=jnp.float32) + label_smoothing * spread


def infonce(query, reference, log_scale, label_smoothing=0.1, exclude=None):
  logits = similarity_logits(query, reference, log_scale)
  n = logits.shape[0]
  if exclude is None:
    targets = optax.smooth_labels(jnp.eye(n, dtype=jnp.float32), label_smoothing)
    targets_t = targets
  else:
    valid = jnp.logical_not(exclude).astype(jnp.float32)
    logits = jnp.where(exclude, jnp.finfo(jnp.float32).min / 4, logits)
    targets, targets_t = _smoothed_targets(valid, label_smoothing), _smoothed_targets(valid.T, label_smoothing)
  loss_q = optax.softmax_cross_entropy(logits, targets).mean()
  loss_r = optax.softmax_cross_entropy(logits.T, targets_t).mean()
  return 0.5 * (loss_q + loss_r)


def sigmoid(query, reference, log_scale, bias, exclude=None):
  logits = similarity_logits(query, reference, log_scale, bias)
  n = logits.shape[0]
  signs = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  terms = jax.nn.log_sigmoid(signs * logits)
  if exclude is not None:
    terms = jnp.where(exclude, 0.0, terms)
  return -jnp.sum(terms) / n


def same_location_pairs(query_location_ids, reference_location_ids):
  """(B, B) bool: off-diagonal pairs whose query and reference show the same location."""
  same = query_location_ids[:, None] == reference_location_ids[None, :]
  return jnp.logical_and(same, jnp.logical_not(jnp.eye(same.shape[0], dtype=bool)))


def contrastive_loss(name, query, reference, log_scale, bias=None, label_smoothing=0.1, exclude=None):
  """The loss named in the config (`config.loss.name`)."""
  if name == "infonce":
    return infonce(query, reference, log_scale, label_smoothing, exclude)
  if name == "sigmoid":
    return sigmoid(query, reference, log_scale, bias, exclude)
  raise GleamError(f"config.loss.name={name!r} is not a loss: set it to one of {LOSSES}.")


def retrieval_hits(query, reference):
  """(B,) float: 1 where a query's own reference scores highest in the batch."""
  sims = jnp.einsum("qd,rd->qr", query.astype(jnp.float32), reference.astype(jnp.float32))
  return (jnp.argmax(sims, axis=1) == jnp.arange(sims.shape[0])).astype(jnp.float32)


def retrieval_accuracy(query, reference):
  """Fraction of queries whose own reference scores highest in the batch (a cheap training signal)."""
  return jnp.mean(retrieval_hits(query, reference))
