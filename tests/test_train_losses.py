"""Losses against a PyTorch reference (Sample4Geo's InfoNCE) and a NumPy SigLIP loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gleam_jax.errors import GleamError
from gleam_jax.train import losses


def _embeddings(n, d, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _torch_infonce(q, r, log_scale, smoothing):
  """Sample4Geo's InfoNCE: CrossEntropyLoss(label_smoothing) on both directions, averaged."""
  q, r = torch.tensor(q), torch.tensor(r)
  scale = torch.tensor(log_scale).exp()  # Sample4Geo: logit_scale.exp(), no bound
  logits = scale * q @ r.T
  labels = torch.arange(len(q))
  ce = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
  return ((ce(logits, labels) + ce(logits.T, labels)) / 2).item()


@pytest.mark.parametrize("log_scale", [np.log(1 / 0.07), 0.0, 6.0])
def test_infonce_matches_torch(log_scale):
  q, r = _embeddings(24, 16, 0), _embeddings(24, 16, 1)
  q[:8] = r[:8] + 0.1 * q[:8]  # some easy positives
  ours = losses.infonce(jnp.asarray(q), jnp.asarray(r), jnp.float32(log_scale), 0.1)
  ref = _torch_infonce(q, r, np.float32(log_scale), 0.1)
  np.testing.assert_allclose(float(ours), ref, rtol=1e-5)


def test_infonce_gradients_match_torch():
  q, r = _embeddings(12, 8, 2), _embeddings(12, 8, 3)
  log_scale = np.float32(2.5)
  grads = jax.grad(lambda a, b, s: losses.infonce(a, b, s, 0.1), argnums=(0, 1, 2))(
      jnp.asarray(q), jnp.asarray(r), jnp.float32(log_scale))
  tq, tr = torch.tensor(q, requires_grad=True), torch.tensor(r, requires_grad=True)
  ts = torch.tensor(log_scale, requires_grad=True)
  logits = ts.exp() * tq @ tr.T
  labels = torch.arange(12)
  ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
  ((ce(logits, labels) + ce(logits.T, labels)) / 2).backward()
  for ours, ref in zip(grads, (tq.grad, tr.grad, ts.grad)):
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-4, atol=1e-6)


def test_logit_scale_is_bounded_on_the_parameter_not_in_the_loss():
  """CLIP's bound at 100 applies to the parameter after an update (`clamp_log_scale`); the loss uses
  exp(log scale) as it is, so a scale above the bound still has a gradient that can bring it down."""
  np.testing.assert_allclose(float(losses.clamp_log_scale(jnp.float32(10.0))), np.log(100.0), rtol=1e-7)
  assert float(losses.clamp_log_scale(jnp.float32(2.0))) == 2.0
  q = _embeddings(6, 4, 4)
  r = _embeddings(6, 4, 5)
  g = jax.grad(lambda s: losses.infonce(jnp.asarray(q), jnp.asarray(r), s, 0.1))(jnp.float32(np.log(150.0)))
  assert float(g) != 0.0


def test_sigmoid_matches_numpy():
  q, r = _embeddings(10, 8, 5), _embeddings(10, 8, 6)
  log_scale, bias = np.log(10.0), -10.0
  logits = np.exp(log_scale) * q @ r.T + bias
  signs = 2 * np.eye(10) - 1
  ref = np.sum(np.log1p(np.exp(-signs * logits))) / 10
  ours = losses.sigmoid(jnp.asarray(q), jnp.asarray(r), jnp.float32(log_scale), jnp.float32(bias))
  np.testing.assert_allclose(float(ours), ref, rtol=1e-5)


def test_matching_pairs_give_lower_loss():
  q = _embeddings(16, 8, 7)
  for name, bias in (("infonce", None), ("sigmoid", jnp.float32(-5.0))):
    good = losses.contrastive_loss(name, jnp.asarray(q), jnp.asarray(q), jnp.float32(3.0), bias)
    bad = losses.contrastive_loss(name, jnp.asarray(q), jnp.asarray(q[::-1]), jnp.float32(3.0), bias)
    assert float(good) < float(bad)


def test_unknown_loss_is_a_config_error():
  q = jnp.asarray(_embeddings(4, 4, 8))
  with pytest.raises(GleamError, match="config.loss.name"):
    losses.contrastive_loss("triplet", q, q, jnp.float32(1.0))


def _numpy_infonce_excluding(q, r, log_scale, smoothing, exclude):
  """Per row: cross-entropy over the row's valid entries only (the excluded ones removed), with
  the smoothing spread over those valid entries; both directions averaged."""
  logits = min(np.exp(log_scale), 100.0) * q.astype(np.float64) @ r.T.astype(np.float64)

  def one_side(lg, ex):
    total = 0.0
    for i in range(len(lg)):
      keep = ~ex[i]
      row = lg[i, keep]
      logp = row - np.log(np.exp(row - row.max()).sum()) - row.max()
      target = np.full(keep.sum(), smoothing / keep.sum())
      target[np.flatnonzero(keep) == i] += 1 - smoothing
      total -= (target * logp).sum()
    return total / len(lg)
  return 0.5 * (one_side(logits, exclude) + one_side(logits.T, exclude.T))


def test_infonce_excludes_pairs_of_the_same_location():
  q, r = _embeddings(12, 8, 0), _embeddings(12, 8, 1)
  location_ids = np.array([0, 1, 2, 3, 4, 5, 2, 7, 8, 0, 10, 11])  # two groups share locations 0 and 2
  exclude = np.asarray(losses.same_location_pairs(jnp.asarray(location_ids), jnp.asarray(location_ids)))
  assert exclude.sum() == 4 and exclude[0, 9] and exclude[9, 0] and exclude[2, 6] and not exclude.diagonal().any()
  ours = losses.infonce(jnp.asarray(q), jnp.asarray(r), jnp.float32(2.5), 0.1, jnp.asarray(exclude))
  np.testing.assert_allclose(float(ours), _numpy_infonce_excluding(q, r, 2.5, 0.1, exclude), rtol=1e-5)
  # nothing excluded: exactly the plain loss
  none = losses.infonce(jnp.asarray(q), jnp.asarray(r), jnp.float32(2.5), 0.1, jnp.zeros((12, 12), bool))
  np.testing.assert_allclose(float(none), float(losses.infonce(jnp.asarray(q), jnp.asarray(r), jnp.float32(2.5), 0.1)),
                             rtol=1e-6)
  # an excluded pair gets no gradient however similar it is
  grads = jax.grad(lambda x: losses.infonce(x, jnp.asarray(r), jnp.float32(2.5), 0.1, jnp.asarray(exclude)))(jnp.asarray(q))
  moved = jax.grad(lambda x: losses.infonce(x, jnp.asarray(r).at[9].set(jnp.asarray(q)[0]), jnp.float32(2.5), 0.1,
                                            jnp.asarray(exclude)))(jnp.asarray(q))
  np.testing.assert_allclose(np.asarray(moved[0]), np.asarray(grads[0]), rtol=1e-5, atol=1e-7)
