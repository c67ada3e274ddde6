"""Contrastive losses over the global batch.

`query` and `reference` are (B, D) L2-normalised embeddings of the *global* batch: under jit with
the batch sharded over ('data', 'fsdp'), `query @ reference.T` makes GSPMD all-gather the
embeddings (B x D), never the images, and every query is scored against every reference.

- `infonce`: symmetric cross-entropy with label smoothing, as Sample4Geo's `InfoNCE`
  (`torch.nn.CrossEntropyLoss(label_smoothing=0.1)` on `scale * q @ r.T` and its transpose, averaged).
- `sigmoid`: the SigLIP loss, -mean over queries of sum_j log sigmoid(z_ij * (scale * q_i.r_j + bias)),
  z_ij = +1 on the diagonal, -1 elsewhere.

The logit scale is learned as a log value; its exponential is clipped at `MAX_LOGIT_SCALE` as CLIP.
"""
import jax
import jax.numpy as jnp
import optax

from gleam_jax.errors import GleamError

MAX_LOGIT_SCALE = 100.0
LOSSES = ("infonce", "sigmoid")


def logit_scale_value(log_scale):
  return jnp.minimum(jnp.exp(log_scale.astype(jnp.float32)), MAX_LOGIT_SCALE)


def similarity_logits(query, reference, log_scale, bias=None):
  """(B, B) logits in float32: scale * query @ reference.T (+ bias)."""
  sims = jnp.einsum("qd,rd->qr", query.astype(jnp.float32), reference.astype(jnp.float32))
  logits = logit_scale_value(log_scale) * sims
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  return logits


def infonce(query, reference, log_scale, label_smoothing=0.1):
  logits = similarity_logits(query, reference, log_scale)
  n = logits.shape[0]
  targets = optax.smooth_labels(jnp.eye(n, dtype=jnp.float32), label_smoothing)
  loss_q = optax.softmax_cross_entropy(logits, targets).mean()
  loss_r = optax.softmax_cross_entropy(logits.T, targets).mean()
  return 0.5 * (loss_q + loss_r)


def sigmoid(query, reference, log_scale, bias):
  logits = similarity_logits(query, reference, log_scale, bias)
  n = logits.shape[0]
  signs = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / n


def contrastive_loss(name, query, reference, log_scale, bias=None, label_smoothing=0.1):
  """The loss named in the config (`config.loss.name`)."""
  if name == "infonce":
    return infonce(query, reference, log_scale, label_smoothing)
  if name == "sigmoid":
    return sigmoid(query, reference, log_scale, bias)
  raise GleamError(f"config.loss.name={name!r} is not a loss: set it to one of {LOSSES}.")


def retrieval_accuracy(query, reference):
  """Fraction of queries whose own reference scores highest in the batch (a cheap training signal)."""
  sims = jnp.einsum("qd,rd->qr", query.astype(jnp.float32), reference.astype(jnp.float32))
  return jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(sims.shape[0]))
