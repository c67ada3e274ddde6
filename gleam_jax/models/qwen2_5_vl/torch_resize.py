"""Video frames resized and normalised as transformers' Qwen2-VL video processor does it on a CPU.

That processor resizes with torchvision, which for uint8 frames on a CPU runs torch's own antialiased
bicubic (PIL's filter: the Keys cubic with a = -0.5, its support widened by the downscale factor),
in fixed point: each axis's weights normalised in float64, rounded to int16 at the largest precision
that holds its largest weight, the width first, then the height, each pass rounded and clamped to
uint8. PIL computes the same filter at another precision, so its pixels differ by a level or two, more
at clipped edges. This is the same arithmetic in numpy: the pixels are torch's, bit for bit (tested
against `torch.nn.functional.interpolate(..., mode="bicubic", antialias=True)`).

The frames are then scaled and normalised with the mean and std folded into one float32 subtraction
and division, as the processor's fused `rescale_and_normalize` does.
"""
import functools
import math

import numpy as np

_A = -0.5  # the Keys cubic's parameter, PIL's and torch's for antialiased bicubic


def _cubic(x: float) -> float:
  """The Keys cubic at x, in torch's order of operations (`HelperInterpCubic::aa_filter`)."""
  x = abs(x)
  if x < 1.0:
    return ((_A + 2) * x - (_A + 3)) * x * x + 1
  if x < 2.0:
    return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
  return 0.0


@functools.lru_cache(maxsize=64)
def axis_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(source index [out, taps], int16-valued weight [out, taps] as int32, precision in bits) of one
  axis resized from `in_size` to `out_size` samples. Taps past a window's end weigh 0."""
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1.0 else 2.0
  taps = int(math.ceil(support)) * 2 + 1
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  first = np.zeros(out_size, np.int64)
  weights = np.zeros((out_size, taps), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    start = max(int(center - support + 0.5), 0)
    count = min(max(min(int(center + support + 0.5), in_size) - start, 0), taps)
    window = [_cubic((j + start - center + 0.5) * invscale) for j in range(count)]
    total = sum(window)  # in order, as torch sums
    first[i] = start
    weights[i, :count] = [w / total for w in window] if total != 0.0 else window
  largest = float(weights.max())
  precision = 0
  while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
    precision += 1
  scaled = weights * (1 << precision)
  fixed = np.where(weights < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
  return np.minimum(first[:, None] + np.arange(taps), in_size - 1), fixed, precision


def _resize_rows(x: np.ndarray, out_size: int) -> np.ndarray:
  """One pass along axis 0 of [N, M, C] (whole rows gathered at once), rounded and clamped to uint8."""
  index, weights, precision = axis_taps(x.shape[0], out_size)
  total = np.full((out_size,) + x.shape[1:], 1 << (precision - 1), np.int32)
  for j in range(weights.shape[1]):
    tap = x[index[:, j]].astype(np.int32)
    tap *= weights[:, j, None, None]
    total += tap
  total >>= precision
  return np.clip(total, 0, 255).astype(np.uint8)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 frames [T, H, W, C] -> [T, height, width, C], torch's antialiased bicubic on uint8: the width
  pass first, then the height (frame by frame, so that a frame's passes stay in cache)."""
  frames = np.asarray(frames, np.uint8)
  out = np.empty((len(frames), height, width, frames.shape[-1]), np.uint8)
  for t, x in enumerate(frames):
    if width != x.shape[1]:
      x = _resize_rows(np.ascontiguousarray(x.transpose(1, 0, 2)), width).transpose(1, 0, 2)
    if height != x.shape[0]:
      x = _resize_rows(np.ascontiguousarray(x), height)
    out[t] = x
  return out


def normalise_frames(frames: np.ndarray, mean, std) -> np.ndarray:
  """uint8 frames [..., 3] -> float32 (frame - 255 mean) / (255 std), the processor's fused scaling."""
  mean255 = np.asarray(mean, np.float32) * np.float32(255.0)
  std255 = np.asarray(std, np.float32) * np.float32(255.0)
  return (frames.astype(np.float32) - mean255) / std255
