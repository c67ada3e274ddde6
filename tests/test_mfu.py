"""Model FLOPs and MFU as bench.train_step reports them (the timing itself is not tested)."""
import types

from config_files import load_config
from gleam_jax.models import convnext
from gleam_jax.models import gleam_c
from gleam_jax.utils import mfu


def _device(kind):
  return types.SimpleNamespace(device_kind=kind)


def test_contrastive_step_flops_counts_both_views_the_projection_and_the_logits():
  model = load_config("c_phase1").model
  backbone = gleam_c.backbone_config(model)
  embed = model.embed_dim
  assert gleam_c.encode_flops(model, 32, 64) == (convnext.forward_flops(backbone, 32, 64)
                                                 + 2 * backbone.dims[-1] * embed)
  b = 64
  expected = 3 * (b * (gleam_c.encode_flops(model, 32, 64) + gleam_c.encode_flops(model, 32, 32))
                  + 2 * b * b * embed)
  assert gleam_c.contrastive_step_flops(model, [(b, 32, 64)], [(b, 32, 32)]) == expected
  # Phase 2: query groups of different sizes, their satellites in two groups too.
  groups = [(16, 32, 64), (48, 32, 32)]
  assert gleam_c.contrastive_step_flops(model, groups, [(16, 32, 32), (48, 32, 32)]) == 3 * (
      16 * gleam_c.encode_flops(model, 32, 64) + 48 * gleam_c.encode_flops(model, 32, 32)
      + b * gleam_c.encode_flops(model, 32, 32) + 2 * b * b * embed)


def test_peak_flops_by_device_kind_and_dtype():
  assert mfu.peak_flops(_device("NVIDIA H200"), "bfloat16") == 989e12
  assert mfu.peak_flops(_device("TPU v5 lite"), "bfloat16") == 197e12  # not v5p's 459
  assert mfu.peak_flops(_device("TPU v5p"), "bfloat16") == 459e12
  assert mfu.peak_flops(_device("NVIDIA H200"), "float32") is None
  assert mfu.peak_flops(_device("cpu"), "bfloat16") is None
  assert mfu.peak_flops(_device("cpu"), "float32", given_tflops=2.0) == 2e12


def test_describe_reports_mfu_against_the_peak():
  step_flops = 10**12
  steps_per_s = 0.5 * 989  # half the H200's bfloat16 peak
  line = mfu.describe(step_flops, steps_per_s, _device("NVIDIA H200"), "bfloat16",
                      xla_step_flops=1.2e12)
  assert line == ("1000.00 GFLOP per step (XLA counts 1200.00 GFLOP in the compiled step); "
                  "494.500 TFLOP/s on NVIDIA H200; MFU 50.0% of 989 TFLOP/s.")
  assert "no peak known for cpu in float32" in mfu.describe(step_flops, 1.0, _device("cpu"),
                                                             "float32")
