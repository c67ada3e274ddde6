"""GLEAM-C train step: ours (jitted, `gleam_jax.train.contrastive`) against PyTorch as Sample4Geo.

  python -m gleam_jax.bench.train_step                       # configs/c_phase1.py as it is
  python -m gleam_jax.bench.train_step --config=configs/c_phase1.py:variant=tiny --config.batch_size=32 \
      --config.data.panorama_size='(128, 256)' --config.model.dtype=bfloat16 --repeats=5

Model, optimizer, batch size and image sizes (panorama -> query, satellite) come from `--config`;
`--config.grad_accum_steps=N` times our step in N micro-batches (gradient cache; PyTorch's step stays
whole).

The PyTorch step is Sample4Geo's: transformers' `ConvNextModel` of the same depths and widths
(a ViT backbone, `variant=S/16` etc.: transformers' `ViTModel` of the same sizes, no pooler, its
class token or mean patch token as ours, position embeddings interpolated to each input; a SigLIP
tower, `model.vit.class_token=False`: `SiglipVisionModel`; a CLIP tower, `model.vit.pre_norm=True,
patch_bias=False`: `CLIPVisionModel[WithProjection]`; a DINOv2 tower, `model.vit.layer_scale=1.0`:
`Dinov2[WithRegisters]Model`: `vit_params.build_hf_model`)
(+ the same Linear projection when the config has `embed_dim`), L2-normalised features, symmetric
InfoNCE (`nn.CrossEntropyLoss(label_smoothing=0.1)` both ways) with a learnable log logit scale,
AdamW, gradient clipping by global norm, one scheduler step. It runs eagerly and under
`torch.compile` (model + loss; the optimizer step eager). All three run on the same batch
(panoramas + satellite tiles) in one process; repeats are interleaved (ours, eager, compiled,
ours, ...) so load from other processes falls on all of them alike, and the median is reported.

The last line gives our step's model FLOPs (`gleam_c.contrastive_step_flops`), the FLOP/s reached
and, where the device's peak is known (`utils.mfu`, or `--peak_tflops`), the MFU. On an accelerator,
ConvNeXt-B at 384 px in bfloat16, ours alone (the PyTorch reference is the CPU step):

  python -m gleam_jax.bench.train_step --torch=false --config=configs/c_phase1.py:variant=base \
      --config.model.dtype=bfloat16 --config.data.panorama_size='(384, 384)' \
      --config.data.satellite_size='(384, 384)' --config.batch_size=64
"""
import os
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "c_phase1.py")
FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program (tests import the step classes)."""
  # No default here: ml_collections would load it, and apply any `--config.x` override, while defining
  # the flag, before `errors.parse_flags` could stop a typo on one line (`with_default_config` adds it).
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config whose model, optimizer, batch and image sizes are benchmarked "
      "(default: configs/c_phase1.py).")
  flags.DEFINE_integer("steps", 5, "Timed steps per repeat.")
  flags.DEFINE_integer("repeats", 3, "Interleaved repeats.")
  flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads.")
  flags.DEFINE_bool("torch_compile", True, "Also time the torch.compile variant.")
  flags.DEFINE_string("out", None, "Append the result table to this Markdown file.")
  flags.DEFINE_bool("torch", True, "Time the PyTorch steps too (false: ours alone, e.g. on "
                    "an accelerator where the PyTorch build is CPU-only).")
  flags.DEFINE_float("peak_tflops", None, "The device's peak dense TFLOP/s in the model's "
                     "dtype, for MFU (default: utils.mfu.PEAK_BF16_TFLOPS by device kind).")


def bench_config():
  config = FLAGS.config
  return config, tuple(config.data.panorama_size), tuple(config.data.satellite_size)


def make_batch(batch, query, sat, seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  return {"query": rng.standard_normal((batch, *query, 3), dtype=np.float32),
          "satellite": rng.standard_normal((batch, *sat, 3), dtype=np.float32)}


def load_torch_weights(model, torch_encoder):
  import jax.numpy as jnp
  from gleam_jax.models import gleam_c
  gleam_c.backbone_kind(model.encoder.config).load_weights(model.encoder, torch_encoder.backbone.state_dict())
  if model.projection is not None:
    model.projection.kernel[...] = jnp.asarray(torch_encoder.projection.weight.detach().numpy().T)
    model.projection.bias[...] = jnp.asarray(torch_encoder.projection.bias.detach().numpy())


class Ours:
  """Our jitted step on a 1-device mesh, starting from the PyTorch model's weights when given (so
  the first losses agree); `compile_s` is the trace + XLA compile time."""

  def __init__(self, config, batch, torch_encoder):
    import jax
    from gleam_jax.train import contrastive
    from gleam_jax.train import sharding as shd
    model = contrastive.build_model(config.model, config.seed)
    if torch_encoder is not None:
      load_torch_weights(model, torch_encoder)
    mesh = shd.single_device_mesh()
    self.setup, self.state = contrastive.create_train_state(
        model, config.optim, config.total_steps, mesh, config.sharding_rules,
        loss_name="infonce", label_smoothing=config.loss.label_smoothing, seed=config.seed,
        accum_steps=config.grad_accum_steps)
    self.batch = shd.shard_batch(batch, mesh)
    step = contrastive.make_train_step(self.setup)
    start = time.perf_counter()
    self.compiled = step.jitted.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    self.xla_flops = (self.compiled.cost_analysis() or {}).get("flops")
    self.state, metrics = self.compiled(self.state, self.batch)  # warm-up
    self.loss0 = float(metrics["loss"])
    jax.block_until_ready(self.state)

  def run(self, steps):
    import jax
    metrics = None
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return float(metrics["loss"])


def torch_model(config):
  """Sample4Geo's encoder on transformers' ConvNeXt (or ViT): pooled features (+ projection)."""
  import math
  import torch
  from gleam_jax.models import gleam_c

  arch = gleam_c.backbone_config(config.model)
  embed_dim = config.model.get("embed_dim")
  kind = gleam_c.backbone_kind(arch)  # the transformers model our backbone is
  backbone = kind.build_hf_model(arch)

  def pooled(x):
    return kind.hf_pooled(arch, backbone(x, **dict(kind.hf_call)))

  class Encoder(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.backbone = backbone
      self.projection = (torch.nn.Linear(arch.feature_width, embed_dim) if embed_dim
                         else torch.nn.Identity())
      self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, query, satellite):
      return self.projection(pooled(query)), self.projection(pooled(satellite))

  return Encoder()


def info_nce(q, s, logit_scale, label_smoothing):
  """Sample4Geo's InfoNCE: CE over normalised-feature logits, both directions, averaged."""
  import torch
  import torch.nn.functional as F
  q, s = F.normalize(q, dim=-1), F.normalize(s, dim=-1)
  logits = logit_scale.exp() * q @ s.T
  labels = torch.arange(len(q), device=q.device)
  ce = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
  return (ce(logits, labels) + ce(logits.T, labels)) / 2


class Torch:
  """The Sample4Geo train step in PyTorch, eager or with `torch.compile`d model + loss."""

  def __init__(self, config, batch, compile_):
    import torch
    torch.manual_seed(0)
    self.model = torch_model(config).train()
    opt = config.optim
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.lr,
                                       betas=(opt.b1, opt.b2), eps=opt.eps,
                                       weight_decay=opt.weight_decay)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
    self.clip = opt.clip_norm
    # Channels-first, as Sample4Geo's data loader gives them.
    self.query = torch.from_numpy(batch["query"].transpose(0, 3, 1, 2).copy())
    self.satellite = torch.from_numpy(batch["satellite"].transpose(0, 3, 1, 2).copy())
    smoothing = config.loss.label_smoothing

    def forward_loss(query, satellite):
      q, s = self.model(query, satellite)
      return info_nce(q, s, self.model.logit_scale, smoothing)
    self.forward_loss = torch.compile(forward_loss) if compile_ else forward_loss

  def warm_up(self):
    """Two steps (with torch.compile: the compilation, and any recompilation on the 2nd call)."""
    start = time.perf_counter()
    self.loss0 = self.run(1)
    self.run(1)
    self.compile_s = time.perf_counter() - start

  def run(self, steps):
    import torch
    loss = None
    for _ in range(steps):
      self.optimizer.zero_grad(set_to_none=True)
      loss = self.forward_loss(self.query, self.satellite)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
      self.optimizer.step()
      self.scheduler.step()
    return float(loss.detach())


def main(argv):
  del argv
  import jax
  config, query, sat = bench_config()
  b = config.batch_size
  batch = make_batch(b, query, sat)
  from gleam_jax.models import gleam_c
  from gleam_jax.utils import mfu
  arch = gleam_c.backbone_config(config.model)
  if config.model.get("backbone", "convnext") == "vit":
    shape = (f"ViT {config.model.variant} width={arch.width} depth={arch.depth} heads={arch.heads} "
             f"mlp={arch.mlp_dim} patch={arch.patch_size} pool={arch.pool}")
  else:
    shape = f"ConvNeXt {config.model.variant} depths={arch.depths} dims={arch.dims}"
  desc = (f"{shape} embed_dim={config.model.get('embed_dim')}, batch {b}, query {query[0]}x{query[1]}, "
          f"satellite {sat[0]}x{sat[1]}, our dtype {config.model.dtype}, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores, "
          f"load avg {os.getloadavg()[0]:.1f}")
  if config.grad_accum_steps > 1:  # the memory-for-time trade of `contrastive._cached_grads`
    desc += f", ours in {config.grad_accum_steps} micro-batches (gradient cache)"
  eager = None
  if FLAGS.torch:
    import torch
    torch.set_num_threads(FLAGS.torch_threads)
    desc += f", torch {torch.__version__} with {torch.get_num_threads()} threads"
    eager = Torch(config, batch, compile_=False)  # same seed: same initial weights for all
  print(desc, flush=True)

  runners = {"ours (jax.jit)": Ours(config, batch, eager.model if eager else None)}
  print(f"ours: compile {runners['ours (jax.jit)'].compile_s:.1f} s", flush=True)
  if eager is not None:
    runners["torch eager"] = eager
    eager.warm_up()
  if FLAGS.torch and FLAGS.torch_compile:
    runners["torch.compile"] = Torch(config, batch, compile_=True)
    runners["torch.compile"].warm_up()
    print(f"torch.compile: first two steps (compile) {runners['torch.compile'].compile_s:.1f} s",
          flush=True)
  for name, r in runners.items():
    print(f"{name}: first loss {r.loss0:.4f}", flush=True)

  rates = {name: [] for name in runners}
  for rep in range(FLAGS.repeats):
    for name, runner in runners.items():
      start = time.perf_counter()
      runner.run(FLAGS.steps)
      rates[name].append(FLAGS.steps / (time.perf_counter() - start))
    print(f"repeat {rep + 1}: " + ", ".join(f"{n} {v[-1]:.3f} steps/s" for n, v in rates.items()),
          flush=True)

  median = {n: statistics.median(v) for n, v in rates.items()}
  ours = median["ours (jax.jit)"]
  lines = [f"Setting: {desc}.", "",
           "| step | steps/s (median) | pairs/s | ours / this |", "| --- | --- | --- | --- |"]
  for name, v in median.items():
    lines.append(f"| {name} | {v:.3f} | {v * b:.1f} | {ours / v:.2f}x |")
  lines += ["", f"Our compile time: {runners['ours (jax.jit)'].compile_s:.1f} s."]
  if FLAGS.torch:
    best_torch = max((v, n) for n, v in median.items() if n != "ours (jax.jit)")
    lines[-1] += (f" Ours vs the faster PyTorch variant ({best_torch[1]}): "
                  f"{ours / best_torch[0]:.2f}x.")
  step_flops = gleam_c.contrastive_step_flops(config.model, [(b, *query)], [(b, *sat)])
  lines += ["", "Ours, in model FLOPs (convs, linears and attention products; backward = 2x forward): "
            + mfu.describe(step_flops, ours, jax.devices()[0], config.model.dtype, FLAGS.peak_tflops,
                           runners["ours (jax.jit)"].xla_flops)]
  text = "\n".join(lines)
  print(text)
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write(text + "\n\n")


def with_default_config(argv):
  """`argv` with `--config=configs/c_phase1.py` added when it names no config."""
  named = any(a == "--config" or a.startswith("--config=") for a in argv[1:])
  return argv if named else [argv[0], f"--config={_DEFAULT_CONFIG}", *argv[1:]]


if __name__ == "__main__":
  from gleam_jax import errors
  define_flags()
  app.run(main, flags_parser=lambda argv: errors.parse_flags(with_default_config(argv)))
