"""Rotary position embeddings of Qwen2.5-VL and the host-side index arithmetic behind them.

Host side (NumPy, computed once per batch from `image_grid_thw`, shapes depend only on the number of
patches):
  * `vision_layout`: the window-attention permutation of the patches (`get_window_index` in HF), the
    attention segments (one per window, one per image frame for the full-attention blocks), the
    2-D (h, w) patch positions and the inverse permutation applied after the merger.
  * `get_rope_index`: the 3-D (t, h, w) M-RoPE position ids of a prompt with images and videos (a
    video's temporal positions spaced by its seconds per temporal patch), left padding ignored; and
    the per-row `rope_deltas` (next position minus sequence length) used while decoding.
Device side (jnp): cos/sin tables for the 2-D vision rotary and for M-RoPE, and `apply_rotary`.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gleam_jax.errors import GleamError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionLayout:
  """Index arrays of the vision tower for one set of images; all in window (permuted) order.

  Variable-length attention runs on blocks: each attention segment (a window, or a whole image frame
  for the full-attention blocks) is one row of a (segments, longest segment) index table; short rows
  point at index N (a zero row appended to the sequence) and are masked out as keys.

  patch_index: (N,) patch order for window attention (merge units stay contiguous).
  positions: (N, 2) (h, w) patch coordinates, permuted.
  window_blocks, window_unblock: (W, Lw) patch indices of each window; (N,) flat slot of each patch.
  image_blocks, image_unblock: the same with one segment per image frame.
  merged_inverse: (M,) takes merged tokens from window order back to raster order (M = N / merge**2).
  A pytree: pass it straight into jitted functions.
  """
  patch_index: np.ndarray
  positions: np.ndarray
  window_blocks: np.ndarray
  window_unblock: np.ndarray
  image_blocks: np.ndarray
  image_unblock: np.ndarray
  merged_inverse: np.ndarray


def segment_blocks(segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Contiguous segment ids (N,) -> (blocks (S, longest) with N as padding, unblock (N,))."""
  n = len(segments)
  counts = np.bincount(segments)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  longest = int(counts.max())
  offsets = np.arange(longest)[None, :]
  blocks = np.where(offsets < counts[:, None], starts[:, None] + offsets, n)
  unblock = segments * longest + (np.arange(n) - starts[segments])
  return blocks.astype(np.int32), unblock.astype(np.int32)


def _grid_list(grid_thw) -> list[tuple[int, int, int]]:
  grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  return [tuple(int(v) for v in row) for row in grid]


def num_image_tokens(grid_thw, spatial_merge_size: int) -> list[int]:
  """Merged tokens (LLM placeholders) per image."""
  return [t * h * w // spatial_merge_size**2 for t, h, w in _grid_list(grid_thw)]


def vision_layout(grid_thw, spatial_merge_size: int, window_size: int, patch_size: int) -> VisionLayout:
  """Window permutation, segments and positions for images of sizes `grid_thw` (patch units)."""
  m = spatial_merge_size
  unit = m * m
  win = window_size // m // patch_size  # window side in merged units
  window_index, window_ids, positions, frame_ids = [], [], [], []
  merged_offset, window_offset, frame_offset = 0, 0, 0
  for t, h, w in _grid_list(grid_thw):
    if h % m or w % m:
      raise GleamError(f"image grid {(t, h, w)} is not a multiple of spatial_merge_size {m}; "
                       "resize images to multiples of patch_size * spatial_merge_size.")
    gh, gw = h // m, w // m
    # (h, w) of every patch, in raster order of merge blocks (block-major, as HF's rot_pos_emb).
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = lambda a: a.reshape(gh, m, gw, m).transpose(0, 2, 1, 3).reshape(-1)
    pos = np.stack([block(hh), block(ww)], -1)
    positions.append(np.tile(pos, (t, 1)))
    frame_ids.append(np.repeat(np.arange(t) + frame_offset, h * w))
    frame_offset += t
    # Windows of win x win merged units, scanned row-major, clipped at the image border.
    merged = np.arange(t * gh * gw).reshape(t, gh, gw)
    for f in range(t):
      for r0 in range(0, gh, win):
        for c0 in range(0, gw, win):
          idx = merged[f, r0:r0 + win, c0:c0 + win].reshape(-1)
          window_index.append(idx + merged_offset)
          window_ids.append(np.full(idx.size, window_offset))
          window_offset += 1
    merged_offset += t * gh * gw
  window_index = np.concatenate(window_index)
  patch_index = (window_index[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
  positions = np.concatenate(positions)
  frame_ids = np.concatenate(frame_ids)
  window_blocks, window_unblock = segment_blocks(np.repeat(np.concatenate(window_ids), unit))
  image_blocks, image_unblock = segment_blocks(frame_ids[patch_index])
  return VisionLayout(
      patch_index=patch_index.astype(np.int32),
      positions=positions[patch_index].astype(np.int32),
      window_blocks=window_blocks, window_unblock=window_unblock,
      image_blocks=image_blocks, image_unblock=image_unblock,
      merged_inverse=np.argsort(window_index).astype(np.int32))


def get_rope_index(input_ids, image_grid_thw, attention_mask, *, image_token_id: int,
                   spatial_merge_size: int, video_grid_thw=None, second_per_grid_ts=None,
                   video_token_id: int | None = None, tokens_per_second: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """M-RoPE position ids (3, B, L) and rope deltas (B, 1), as HF `get_rope_index`.

  Each run of image tokens takes the next grid of `image_grid_thw`, each run of video tokens
  (`video_token_id`) the next of `video_grid_thw` (in order across the batch): a visual's tokens get
  (t, h, w) = (start + time, start + row, start + col), text continues at start + max(rows, cols) of
  the merged grid. `time` is the frame index for images (0) and, for video k, the temporal patch index
  times `tokens_per_second * second_per_grid_ts[k]` (seconds per temporal patch; 1 when not given),
  truncated to an integer after a float32 product, as HF computes it.
  Padding (attention_mask == 0) gets position 0 and is skipped.
  """
  input_ids = np.asarray(input_ids)
  b, length = input_ids.shape
  mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  kinds = {"image": (image_token_id, _grid_list(image_grid_thw) if image_grid_thw is not None else [])}
  if video_grid_thw is not None:
    if video_token_id is None:
      raise GleamError("get_rope_index: video_grid_thw needs video_token_id.")
    kinds["video"] = (video_token_id, _grid_list(video_grid_thw))
    videos = len(kinds["video"][1])
    seconds = [1.0] * videos if second_per_grid_ts is None else \
        [float(x) for x in np.asarray(second_per_grid_ts, np.float64).reshape(-1)]
    if len(seconds) != videos:
      raise GleamError(f"second_per_grid_ts has {len(seconds)} values for {videos} videos; "
                       "pass one per video (the processor's second_per_grid_ts).")
  tokens_of = {kind: num_image_tokens(grids, spatial_merge_size) for kind, (_, grids) in kinds.items()}
  token_kind = {token: kind for kind, (token, _) in kinds.items()}
  used = dict.fromkeys(kinds, 0)
  position_ids = np.zeros((3, b, length), np.int32)
  deltas = np.zeros((b, 1), np.int32)
  for row in range(b):
    ids = input_ids[row][mask[row]]
    visual = np.isin(ids, list(token_kind))
    pieces, current, i = [], 0, 0
    while i < len(ids):
      if not visual[i]:
        j = i
        while j < len(ids) and not visual[j]:
          j += 1
        pieces.append(np.broadcast_to(np.arange(j - i) + current, (3, j - i)))
        current += j - i
        i = j
        continue
      kind = token_kind[int(ids[i])]
      token, grids = kinds[kind]
      k = used[kind]
      if k >= len(grids):
        raise GleamError(f"prompt row {row} has more {kind} placeholder runs than {kind}_grid_thw has {kind}s "
                         f"({len(grids)}); pass one grid per {kind}.")
      t, h, w = grids[k]
      n = tokens_of[kind][k]
      if len(ids[i:i + n]) != n or not (ids[i:i + n] == token).all():
        raise GleamError(f"prompt row {row}: {kind} {k} with grid {(t, h, w)} needs {n} consecutive "
                         f"{kind} tokens ({token}); fix the prompt or {kind}_grid_thw.")
      gh, gw = h // spatial_merge_size, w // spatial_merge_size
      tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
      if kind == "video":
        interval = np.float32(tokens_per_second * seconds[k])
        tt = (tt.astype(np.float32) * interval).astype(np.int64)
      pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
      current += max(gh, gw)
      used[kind] += 1
      i += n
    pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int32)
    position_ids[:, row, mask[row]] = pos
    deltas[row, 0] = (pos.max() + 1 if pos.size else 0) - len(ids)
  for kind, (_, grids) in kinds.items():
    if used[kind] != len(grids):
      raise GleamError(f"{kind}_grid_thw has {len(grids)} {kind}s but the prompts hold {used[kind]} {kind} "
                       f"placeholder runs; pass one grid per {kind}.")
  return position_ids, deltas


def rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
  """x: (..., L, heads, head_dim); cos/sin: (..., L, head_dim). Computed in float32."""
  x32 = x.astype(jnp.float32)
  cos, sin = cos[..., None, :], sin[..., None, :]
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def vision_cos_sin(positions, head_dim: int, theta: float):
  """2-D rotary of the vision tower: positions (N, 2) -> cos, sin (N, head_dim)."""
  spatial = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (N, 2, head_dim / 4)
  freqs = freqs.reshape(freqs.shape[0], -1)  # [h freqs, w freqs]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def mrope_cos_sin(position_ids, head_dim: int, theta: float, mrope_section):
  """M-RoPE: position_ids (3, B, L) -> cos, sin (B, L, head_dim).

  Frequency band k of the head uses the temporal, height or width position according to which of
  the `mrope_section` chunks (t, h, w) it falls in.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # (3, B, L, head_dim / 2)
  axis = np.concatenate([np.full(n, i % 3) for i, n in enumerate(mrope_section)])
  freqs = freqs[axis, :, :, np.arange(len(axis))]  # (head_dim / 2, B, L): band k from row axis[k]
  freqs = jnp.moveaxis(freqs, 0, -1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)
