"""Model FLOP utilisation: achieved model FLOP/s against the device's peak."""

# Dense bfloat16 peak TFLOP/s per chip, by `jax.Device.device_kind` prefix (vendor datasheets).
PEAK_BF16_TFLOPS = {'NVIDIA H200': 989.0, 'NVIDIA H100': 989.0, 'NVIDIA A100': 312.0,
                    'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5p': 459.0, 'TPU v5': 459.0,
                    'TPU v6 lite': 918.0}


def peak_flops(device, dtype: str, given_tflops: float | None = None) -> float | None:
  """The device's peak FLOP/s: `given_tflops` if set, else the bfloat16 table's entry for its kind
  (the longest matching prefix); None when unknown (CPUs, float32 compute)."""
  if given_tflops:
    return given_tflops * 1e12
  if dtype != 'bfloat16':
    return None
  for prefix, tflops in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if device.device_kind.startswith(prefix):
      return tflops * 1e12
  return None


def describe(step_flops: int, steps_per_s: float, device, dtype: str,
             given_tflops: float | None = None, xla_step_flops: float | None = None) -> str:
  """'<GFLOP> per step; <TFLOP/s> on <device>; MFU <%> of <peak>' (or why there is no MFU)."""
  achieved = step_flops * steps_per_s
  line = f'{step_flops / 1e9:.2f} GFLOP per step'
  if xla_step_flops:
    line += f' (XLA counts {xla_step_flops / 1e9:.2f} GFLOP in the compiled step)'
  line += f'; {achieved / 1e12:.3f} TFLOP/s on {device.device_kind}'
  peak = peak_flops(device, dtype, given_tflops)
  if peak:
    return line + f'; MFU {achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s.'
  return line + f'; MFU: no peak known for {device.device_kind} in {dtype} (give --peak_tflops).'
