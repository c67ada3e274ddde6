"""AdamW with linear warmup + cosine decay, global-norm clipping and big_vision-style regex rules.

Parameters are named by their path joined with '/', e.g. `model/stages/0/blocks/1/dwconv/kernel`.
Rules in `config.optim` (all regexes are matched with `re.search` against that name):

- `frozen`: parameters that are not trained. They get no optimizer state (an `optax.set_to_zero`
  partition of `optax.multi_transform`) and do not count in the gradient norm.
- `lr_mults`: `[(regex, multiplier), ...]`; the first match sets the parameter's learning-rate
  multiplier (default 1.0). Each distinct multiplier is one AdamW partition.
- `layer_decay` (0 < d <= 1; 1: none): layer-wise learning-rate decay (BEiT's, timm's `--layer-decay`)
  for fine-tuning a pretrained encoder: a parameter of an encoder's layer k of L gets the multiplier
  d ** (L - k), where a ViT's layers are its embeddings (k = 0), its blocks (1 .. depth) and what
  follows them (norm, head, projection: L = depth + 1), and a ConvNeXt's its stem (0), its stages
  (1 .. stages) and its final norm (L), and Qwen2.5-VL's vision tower (`visual`) its patch embedding
  (0), its blocks and its merger (L). Parameters outside the encoders (the GLEAM-C projection, the
  logit scale, Qwen2.5-VL's decoder) keep 1; a LoRA adapter (`lora/<its kernel's '.'-joined name>/a`)
  gets its kernel's; an `lr_mults` rule that matches a parameter replaces its layer's multiplier.
- `no_decay`: parameters without weight decay. Parameters with fewer than two dimensions (norm scales,
  biases, the logit scale) never decay.
"""
import re

import jax
import optax

from gleam_jax.errors import GleamError


def path_name(path):
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def param_names(params):
  """The tree of '/'-joined names of a params pytree."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_name(p), params)


def _compile(patterns, what):
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise GleamError(f"config.optim.{what}: {pattern!r} is not a valid regex ({e}).") from None
  return compiled


def _matches(name, patterns):
  return any(p.search(name) for p in patterns)


def _lr_mult_rules(cfg):
  rules = []
  for rule in cfg.get("lr_mults", ()) or ():
    if len(rule) != 2:
      raise GleamError(f"config.optim.lr_mults: {rule!r} is not a (regex, multiplier) pair.")
    if not float(rule[1]) >= 0:  # a negative multiplier would climb the loss (NaN fails too)
      raise GleamError(f"config.optim.lr_mults: {rule!r} has multiplier {rule[1]}; it must be >= 0 (0 freezes).")
    rules.append((_compile([rule[0]], "lr_mults")[0], float(rule[1])))
  return rules


# An encoder's layers for `layer_decay`: its blocks (ViT, Qwen2.5-VL's vision tower) or stages
# (ConvNeXt), what comes before them.
_ENCODER_LAYER = re.compile(r"(?:^|/)(\w*encoder|visual)/(?:blocks|stages)/(\d+)/")
_ENCODER_PART = re.compile(r"(?:^|/)(\w*encoder|visual)/")
_BEFORE_LAYERS = re.compile(r"(?:^|/)(?:\w*encoder|visual)/(patch_embed|cls_token|pos_embed|reg_tokens|norm_pre|stem)"
                            r"(/|$)")


def layer_decay_mults(names, decay):
  """{parameter name: d ** (L - layer)} of the encoders' parameters among `names` (module docstring)."""
  paths = {name: name.replace(".", "/") for name in names}  # a LoRA adapter as its kernel's path
  layers = {}  # an encoder's number of blocks / stages
  for path in paths.values():
    m = _ENCODER_LAYER.search(path)
    if m:
      layers[m.group(1)] = max(layers.get(m.group(1), 0), int(m.group(2)) + 1)
  mults = {}
  for name, path in paths.items():
    encoder = _ENCODER_PART.search(path)
    if encoder is None or encoder.group(1) not in layers:
      continue
    top = layers[encoder.group(1)] + 1
    m = _ENCODER_LAYER.search(path)
    layer = int(m.group(2)) + 1 if m else 0 if _BEFORE_LAYERS.search(path) else top
    mults[name] = decay ** (top - layer)
  return mults


def partition_labels(params, cfg):
  """Tree of labels: 'frozen' or 'lr_x<mult>' per parameter."""
  frozen = _compile(cfg.get("frozen", ()) or (), "frozen")
  mults = _lr_mult_rules(cfg)
  decay = float(cfg.get("layer_decay", 1.0))
  if not 0 < decay <= 1:
    raise GleamError(f"config.optim.layer_decay={cfg.layer_decay} must be in (0, 1] (1: no layer-wise decay).")
  layered = layer_decay_mults(jax.tree.leaves(param_names(params)), decay) if decay < 1 else {}

  def label(path, _):
    name = path_name(path)
    if _matches(name, frozen):
      return "frozen"
    for pattern, mult in mults:
      if pattern.search(name):
        return f"lr_x{mult:g}"
    return f"lr_x{layered.get(name, 1.0):g}"
  return jax.tree_util.tree_map_with_path(label, params)


def describe_partitions(params, cfg) -> str | None:
  """'lr multipliers x1 (30 tensors), x0.5 (12), frozen (4)', largest multiplier first; None when every
  parameter trains at the base rate."""
  counts = {}
  for label in jax.tree.leaves(partition_labels(params, cfg)):
    counts[label] = counts.get(label, 0) + 1
  if set(counts) == {"lr_x1"}:
    return None
  trained = sorted((label for label in counts if label != "frozen"), key=lambda l: float(l[len("lr_x"):]),
                   reverse=True)
  order = trained + ["frozen"] * ("frozen" in counts)
  parts = [f"{label.replace('lr_', '')} ({counts[label]}{' tensors' if i == 0 else ''})" for i, label in enumerate(order)]
  return "lr multipliers " + ", ".join(parts)


def trainable_mask(params, cfg):
  return jax.tree.map(lambda label: label != "frozen", partition_labels(params, cfg))


def decay_mask(params, cfg):
  no_decay = _compile(cfg.get("no_decay", ()) or (), "no_decay")
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x.ndim >= 2 and not _matches(path_name(p), no_decay), params)


def learning_rate_schedule(cfg, total_steps):
  """Linear warmup from 0 to `cfg.lr` over `cfg.warmup_steps`, cosine decay to `lr * min_lr_ratio`."""
  warmup = int(cfg.warmup_steps)
  if total_steps <= 0:
    raise GleamError(f"total_steps={total_steps}: set config.total_steps (or total_epochs) > 0.")
  if warmup >= total_steps:
    raise GleamError(
        f"config.optim.warmup_steps={warmup} is not below the {total_steps} total steps; lower it.")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(cfg.lr), warmup_steps=warmup, decay_steps=int(total_steps),
      end_value=float(cfg.lr) * float(cfg.get("min_lr_ratio", 0.0)))


_POSITIVE, _NOT_NEGATIVE, _BETA = ("> 0", lambda v: v > 0), (">= 0", lambda v: v >= 0), ("in [0, 1)", lambda v: 0 <= v < 1)
VALUE_RULES = {"lr": _POSITIVE, "eps": _POSITIVE, "b1": _BETA, "b2": _BETA, "weight_decay": _NOT_NEGATIVE,
               "min_lr_ratio": _NOT_NEGATIVE, "warmup_steps": _NOT_NEGATIVE,
               "clip_norm": (">= 0 (0: no clipping)", lambda v: v >= 0)}


def check_values(cfg):
  """Values AdamW cannot train with (a negative rate trains until the loss is NaN; NaN fails every
  rule) stop before anything is built."""
  for key, (rule, holds) in VALUE_RULES.items():
    if cfg.get(key) is not None and not holds(float(cfg[key])):
      raise GleamError(f"config.optim.{key}={cfg[key]} must be {rule}.")


def make_optimizer(cfg, params, total_steps):
  """(optax.GradientTransformation, schedule) for the params pytree under `cfg` (config.optim)."""
  if cfg.get("name", "adamw") != "adamw":
    raise GleamError(f"config.optim.name={cfg.name!r}: only 'adamw' is implemented.")
  check_values(cfg)
  schedule = learning_rate_schedule(cfg, total_steps)
  labels = partition_labels(params, cfg)
  names = sorted(set(jax.tree.leaves(labels)))
  if names == ["frozen"]:
    raise GleamError("config.optim.frozen matches every parameter; nothing would be trained.")

  def no_decay_fn(tree):
    return decay_mask(tree, cfg)

  transforms = {"frozen": optax.set_to_zero()}
  for name in names:
    if name == "frozen":
      continue
    mult = float(name[len("lr_x"):])
    transforms[name] = optax.adamw(
        learning_rate=lambda step, m=mult: schedule(step) * m,
        b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)), eps=float(cfg.get("eps", 1e-8)),
        weight_decay=float(cfg.weight_decay), mask=no_decay_fn)
  zero_frozen = optax.multi_transform(
      {"frozen": optax.set_to_zero(), "train": optax.identity()},
      jax.tree.map(lambda label: "frozen" if label == "frozen" else "train", labels))
  chain = [zero_frozen]
  if cfg.get("clip_norm"):
    chain.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
  chain.append(optax.multi_transform(transforms, labels))
  return optax.chain(*chain), schedule
