"""Qwen2.5-VL inputs: images -> patches, chat prompt -> token ids, and fine-tuning targets.

Numerically the same as `transformers.Qwen2_5_VLProcessor` with its PIL image processor:
  * `smart_resize` picks a size divisible by patch*merge (28) near min_pixels <= h*w <= max_pixels,
    the image is resized with PIL bicubic on uint8, scaled by 1/255 and normalised with the OpenAI
    CLIP mean/std;
  * a still image is one temporal patch (the frame repeated `temporal_patch_size` times), patches are
    flattened in merge order (grid_t, grid_h/m, grid_w/m, m, m) x (C, temporal, patch, patch), so the
    vision tower's patch merger sees each 2x2 group contiguously;
  * the user turn holds `<|vision_start|><|image_pad|><|vision_end|>` per image, and each
    `<|image_pad|>` is expanded to grid_t*grid_h*grid_w/merge^2 tokens.
A video is a sequence of frames of one size, taken as sampled at `fps`, or sampled down to it from
`source_fps` as transformers does (`sample_frames`): every frame resized to one `smart_resize` size
within the video pixel bounds (transformers' video processor: 128 to 768 merged tokens' worth of
pixels per frame, and an even share of a 128,000-token budget as qwen-vl-utils caps it), the last
frame repeated up to a multiple of `temporal_patch_size`, consecutive frames paired into temporal
patches, `<|video_pad|>` placeholders, and `second_per_grid_ts` = temporal_patch_size / fps for the
M-RoPE time positions (a sampled video's: its kept frames' rate, `sampled_fps`). transformers
resizes video frames with torchvision, which on a CPU runs torch's uint8 antialiased bicubic: ours is
that arithmetic in numpy (`torch_resize.py`), so the frames' pixels are torch's, not PIL's.
The tokenizer is `transformers.AutoTokenizer` of a local model directory (no network).
"""
import dataclasses
import json
import math
import os

import numpy as np
from PIL import Image

from gleam_jax.errors import GleamError
from gleam_jax.models.qwen2_5_vl import torch_resize

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SYSTEM = "You are a helpful assistant."
VIDEO_MIN_PIXELS = 128 * 28 * 28  # transformers' Qwen2-VL video processor: size shortest_edge / longest_edge
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_MAX_TOKENS = 128000  # the context a video's frames share (qwen-vl-utils' total pixel budget: 90% of it)
VIDEO_MIN_FRAMES, VIDEO_MAX_FRAMES = 4, 768
IMAGE_RESIZES = ("pil", "torchvision")
# what a GLEAM-X job did to its images beyond transformers' processor, recorded in an exported directory's
# preprocessor_config.json (transformers keeps unknown keys as attributes and ignores them)
IMAGE_RESIZE_KEY = "gleam_image_resize"  # ImageConfig.image_resize
IMAGE_SIZE_KEY = "gleam_image_size"  # [height, width] every image and frame was resized to first (examples.image_size)
IGNORE_INDEX = -100  # label of positions that carry no loss (the torch / optax convention)


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """Image preprocessing, as `preprocessor_config.json` of a Qwen2.5-VL directory."""
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD
  video_min_pixels: int = VIDEO_MIN_PIXELS  # per frame
  video_max_pixels: int = VIDEO_MAX_PIXELS
  # how still images are resized: 'pil' as transformers' PIL image processor (`backend="pil"`, and its
  # choice without torchvision), 'torchvision' as its torchvision one on a CPU (its default where
  # torchvision is installed). Video frames are always resized as its (torchvision) video processor does.
  image_resize: str = "pil"

  def __post_init__(self):
    if self.image_resize not in IMAGE_RESIZES:
      raise GleamError(f"image_resize={self.image_resize!r}: give one of {', '.join(IMAGE_RESIZES)} (the resize of "
                       "transformers' PIL or torchvision image processor).")

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
  """(height, width) divisible by `factor`, aspect kept, pixel count brought into [min_pixels, max_pixels]
  as transformers does it: the rounding to multiples of `factor` (at least one) can leave it outside for
  thin images or tight bounds (20x3000 with max 6272 gives 28x952)."""
  if max(height, width) / min(height, width) > 200:
    raise GleamError(f"Image of {height}x{width} has an aspect ratio above 200, which Qwen2.5-VL cannot "
                     "take; crop or pad it first.")
  h = round(height / factor) * factor
  w = round(width / factor) * factor
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
  return h, w


def to_rgb(image) -> Image.Image:
  """A PIL RGB image from a PIL image or a uint8 (H, W[, C]) array; transparency goes on white."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and
                                                               image.shape[-1] not in (1, 3, 4)):
      raise GleamError(f"Image array of dtype {image.dtype} and shape {image.shape}: pass uint8 "
                       "(H, W), (H, W, 3) or (H, W, 4).")
    image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
  if not isinstance(image, Image.Image):
    raise GleamError(f"Expected a PIL image or a uint8 array, got {type(image).__name__}.")
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def patchify_frames(frames: np.ndarray, cfg: ImageConfig) -> np.ndarray:
  """(T, H, W, C) float32, T a multiple of temporal_patch_size -> (grid_t*grid_h*grid_w,
  C*temporal*patch*patch): temporal patches in order, each in merge order."""
  frames_n, height, width, channels = frames.shape
  p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
  gt, gh, gw = frames_n // t, height // p, width // p
  x = frames.reshape(gt, t, gh // m, m, p, gw // m, m, p, channels)
  x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # (gt, gh/m, gw/m, m, m, C, t, p, p)
  return np.ascontiguousarray(x).reshape(gt * gh * gw, channels * t * p * p)


def patchify(pixels: np.ndarray, cfg: ImageConfig) -> np.ndarray:
  """(H, W, C) float32 -> (grid_h*grid_w, C*temporal*patch*patch) in merge order, frame repeated."""
  return patchify_frames(np.broadcast_to(pixels, (cfg.temporal_patch_size, *pixels.shape)), cfg)


def _normalised(rgb: Image.Image, h: int, w: int, cfg: ImageConfig) -> np.ndarray:
  """PIL bicubic resize to (h, w) on uint8, then / 255 and the mean/std: (h, w, 3) float32."""
  resized = np.asarray(rgb.resize((w, h), resample=Image.BICUBIC))
  x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
  return (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)


def _torch_normalised(rgbs, h: int, w: int, cfg: ImageConfig) -> np.ndarray:
  """RGB images of one size -> torch's uint8 antialiased bicubic resize to (h, w), scaled and normalised
  as transformers' torchvision processors do (`torch_resize`): (n, h, w, 3) float32."""
  resized = torch_resize.resize_frames(np.stack([np.asarray(rgb) for rgb in rgbs]), h, w)
  return torch_resize.normalise_frames(resized, cfg.image_mean, cfg.image_std)


def preprocess_image(image, cfg: ImageConfig) -> tuple[np.ndarray, np.ndarray]:
  """One image -> (patches float32 [grid_t*grid_h*grid_w, patch_dim], grid_thw int64 [3])."""
  rgb = to_rgb(image)
  h, w = smart_resize(rgb.height, rgb.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
  if cfg.image_resize == "torchvision":
    x = _torch_normalised([rgb], h, w, cfg)[0]
  else:
    x = _normalised(rgb, h, w, cfg)
  return patchify(x, cfg), np.array([1, h // cfg.patch_size, w // cfg.patch_size], np.int64)


def sample_frames(total: int, source_fps: float, fps: float, temporal_patch_size: int = 2,
                  min_frames: int = VIDEO_MIN_FRAMES, max_frames: int = VIDEO_MAX_FRAMES) -> np.ndarray:
  """Indices of the frames to keep of `total` recorded at `source_fps`, to sample the video at `fps`, as
  transformers' Qwen2-VL video processor picks them: about duration x fps frames, at least `min_frames`,
  at most `max_frames` and `total`, rounded down to whole temporal patches, evenly spaced from the first
  (float32 positions, truncated)."""
  if not (source_fps > 0 and fps > 0):
    raise GleamError(f"source fps {source_fps} and fps {fps} must both be > 0.")
  most = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
  wanted = min(max(total / source_fps * fps, min_frames), most, total)
  count = math.floor(wanted / temporal_patch_size) * temporal_patch_size
  if count < 1:
    raise GleamError(f"A video of {total} frames is too short to sample in temporal patches of "
                     f"{temporal_patch_size} frames; give at least {temporal_patch_size}.")
  step = total / count
  positions = np.arange(math.ceil(total / step), dtype=np.float64) * step
  return positions.astype(np.float32).astype(np.int64)


def sampled_fps(kept: int, total: int, source_fps: float) -> float:
  """The rate `kept` of `total` frames recorded at `source_fps` stand for (transformers'
  `VideoMetadata.sampled_fps`): what the time positions of a sampled video are computed from, which
  differs from the asked rate where `sample_frames` floors or caps the count."""
  return kept / total * source_fps


def sample_video(frames, source_fps: float, fps: float, temporal_patch_size: int = 2) -> tuple[list, float]:
  """(the frames kept, the rate they stand for) of every frame of a clip recorded at `source_fps`,
  sampled down to `fps` (`sample_frames`, `sampled_fps`)."""
  frames = list(frames)
  kept = sample_frames(len(frames), source_fps, fps, temporal_patch_size)
  return [frames[i] for i in kept], sampled_fps(len(kept), len(frames), source_fps)


def video_max_pixels(cfg: ImageConfig, num_frames: int) -> int:
  """A frame's pixel cap: cfg.video_max_pixels, and an even share of VIDEO_MAX_TOKENS' worth of pixels
  over the frames (qwen-vl-utils' total budget; transformers' `cap_pixels_per_frame`), not below
  1.05 x cfg.video_min_pixels."""
  total = int(VIDEO_MAX_TOKENS * cfg.factor * cfg.factor * 0.9)
  return max(min(cfg.video_max_pixels, total * cfg.temporal_patch_size // num_frames), int(cfg.video_min_pixels * 1.05))


def check_frame_sizes(sizes, where="A video", fix=""):
  """Stops unless a video's frames, of these (width, height) sizes, share one size; `where` names the video,
  `fix` adds what the caller can do about it."""
  shapes = sorted(set(sizes))
  if len(shapes) > 1:
    raise GleamError(f"{where}: the video's frames differ in size ({', '.join(f'{w}x{h}' for w, h in shapes)}, "
                     f"width x height); give frames of one size{fix}.")


def preprocess_video(frames, cfg: ImageConfig, fps: float = 2.0,
                     source_fps: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
  """Frames of one video (PIL images or uint8 arrays of one size) -> (patches [grid_t*grid_h*grid_w,
  patch_dim], grid_thw [3], seconds per temporal patch). The frames are taken as sampled at `fps`, or,
  with `source_fps` (every frame of a clip, as ffmpeg writes them), sampled down to `fps` first
  (`sample_frames`; the seconds per temporal patch then follow the rate the kept frames stand for,
  `sampled_fps`, as transformers computes them). Each frame is resized within cfg.video_min_pixels ..
  `video_max_pixels`."""
  if not fps > 0:
    raise GleamError(f"fps={fps}: give the frame rate the frames were sampled at (> 0).")
  frames = list(frames)
  if source_fps is not None:
    frames, fps = sample_video(frames, source_fps, fps, cfg.temporal_patch_size)
  rgbs = [to_rgb(frame) for frame in frames]
  if not rgbs:
    raise GleamError("A video needs at least one frame.")
  check_frame_sizes([rgb.size for rgb in rgbs])
  h, w = smart_resize(rgbs[0].height, rgbs[0].width, cfg.factor, cfg.video_min_pixels,
                      video_max_pixels(cfg, len(rgbs)))
  rgbs += [rgbs[-1]] * (-len(rgbs) % cfg.temporal_patch_size)  # whole temporal patches
  x = _torch_normalised(rgbs, h, w, cfg)
  grid = np.array([len(rgbs) // cfg.temporal_patch_size, h // cfg.patch_size, w // cfg.patch_size], np.int64)
  return patchify_frames(x, cfg), grid, cfg.temporal_patch_size / fps


def preprocess_videos(videos, cfg: ImageConfig, fps: float = 2.0,
                      source_fps: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Videos -> (pixel_values_videos [sum of patches, patch_dim], video_grid_thw [n, 3],
  second_per_grid_ts [n] float32), as transformers' processor names them. `fps`: one rate for every
  video, or a sequence of one per video (clips sampled from files each keep their own)."""
  videos = list(videos)
  rates = list(fps) if isinstance(fps, (list, tuple, np.ndarray)) else [fps] * len(videos)
  if len(rates) != len(videos):
    raise GleamError(f"{len(rates)} frame rates were given for {len(videos)} videos; give one rate, or one a video.")
  out = [preprocess_video(video, cfg, rate, source_fps) for video, rate in zip(videos, rates)]
  if not out:
    return (np.zeros((0, 3 * cfg.temporal_patch_size * cfg.patch_size**2), np.float32),
            np.zeros((0, 3), np.int64), np.zeros((0,), np.float32))
  patches, grids, seconds = zip(*out)
  return np.concatenate(patches), np.stack(grids), np.asarray(seconds, np.float32)


def preprocess_images(images, cfg: ImageConfig) -> tuple[np.ndarray, np.ndarray]:
  """Images -> (pixel_values [sum of patches, patch_dim], image_grid_thw [n_images, 3])."""
  if not images:
    return (np.zeros((0, 3 * cfg.temporal_patch_size * cfg.patch_size**2), np.float32),
            np.zeros((0, 3), np.int64))
  patches, grids = zip(*(preprocess_image(im, cfg) for im in images))
  return np.concatenate(patches), np.stack(grids)


def user_turn(content: str) -> str:
  """A user turn of the Qwen2.5-VL chat template, ready for the assistant's answer."""
  return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def chat_prompt(num_images: int, prompt: str, system: str | None = None, num_videos: int = 0,
                videos_first: bool = False) -> str:
  """The Qwen2.5-VL chat template for one user turn (images, then videos, or videos first with
  `videos_first`, then text), ready for the answer; `system` None: the template's default system prompt."""
  images = "<|vision_start|><|image_pad|><|vision_end|>" * num_images
  videos = "<|vision_start|><|video_pad|><|vision_end|>" * num_videos
  vision = videos + images if videos_first else images + videos
  system = DEFAULT_SYSTEM if system is None else system
  return f"<|im_start|>system\n{system}<|im_end|>\n" + user_turn(vision + prompt)


def set_default_system_prompt(directory: str, system: str) -> list[str]:
  """Makes `system` the default system prompt of the chat templates in `directory` (chat_template.json,
  chat_template.jinja, tokenizer_config.json), so that transformers' `apply_chat_template` without a
  system message asks as a model fine-tuned with it expects; returns the files changed (none where the
  template has no default system turn of Qwen2.5-VL's form)."""
  default = f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>"
  replace = lambda t: t.replace(default, f"<|im_start|>system\n{{% raw %}}{system}{{% endraw %}}<|im_end|>")
  changed = []
  for name in ("chat_template.json", "tokenizer_config.json", "chat_template.jinja"):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if name.endswith(".jinja"):
      if default not in text:
        continue
      text = replace(text)
    else:
      data = json.loads(text)
      template = data.get("chat_template")
      if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        if not any(default in t.get("template", "") for t in template):
          continue
        data["chat_template"] = [dict(t, template=replace(t["template"])) for t in template]
      elif isinstance(template, str) and default in template:
        data["chat_template"] = replace(template)
      else:
        continue
      text = json.dumps(data, ensure_ascii=False, indent=2)
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    changed.append(name)
  return changed


def _pixel_bounds(d, min_pixels, max_pixels):
  """(min, max) pixels of a preprocessor config: min_pixels/max_pixels, or size (shortest_edge/longest_edge,
  or min_pixels/max_pixels inside it, as some exports write); the defaults where it gives none."""
  size = d.get("size") or {}
  return (d.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", min_pixels))),
          d.get("max_pixels", size.get("longest_edge", size.get("max_pixels", max_pixels))))


def _set_bounds(d, min_pixels, max_pixels):
  d.update(min_pixels=int(min_pixels), max_pixels=int(max_pixels))
  if isinstance(d.get("size"), dict):  # transformers 5 writes the bounds as size too
    d["size"] = dict(d["size"], shortest_edge=int(min_pixels), longest_edge=int(max_pixels))
  return d


def write_image_config(directory: str, image_config: ImageConfig, image_size=None) -> list[str]:
  """Writes the image and video-frame pixel bounds of `image_config` into a model directory's
  preprocessor_config.json and video_preprocessor_config.json (made from the image one, as a Qwen2-VL
  video processor's, where the directory has none), so that the directory's processor, ours or
  transformers', sizes images and frames as `image_config` does; and records its `image_resize` and the
  `image_size` (height, width) images and frames are resized to first, or none (IMAGE_RESIZE_KEY,
  IMAGE_SIZE_KEY: read back by `image_config_from_dir` and `recorded_image_size`). Returns the files
  written."""
  with open(os.path.join(directory, "preprocessor_config.json")) as f:
    image = json.load(f)
  image[IMAGE_RESIZE_KEY] = image_config.image_resize
  image.pop(IMAGE_SIZE_KEY, None)
  if image_size:
    image[IMAGE_SIZE_KEY] = [int(n) for n in image_size]
  video_file = os.path.join(directory, "video_preprocessor_config.json")
  if os.path.isfile(video_file):
    with open(video_file) as f:
      video = json.load(f)
  else:
    video = {k: v for k, v in image.items() if k not in ("image_processor_type", IMAGE_RESIZE_KEY, IMAGE_SIZE_KEY)}
    video["video_processor_type"] = "Qwen2VLVideoProcessor"
  written = {"preprocessor_config.json": _set_bounds(image, image_config.min_pixels, image_config.max_pixels),
             "video_preprocessor_config.json": _set_bounds(video, image_config.video_min_pixels,
                                                           image_config.video_max_pixels)}
  for name, d in written.items():
    with open(os.path.join(directory, name), "w") as f:
      json.dump(d, f, indent=2)
  return list(written)


def image_config_from_dir(directory: str, **overrides) -> ImageConfig:
  """`ImageConfig` from `<directory>/preprocessor_config.json` (`_pixel_bounds`, patch sizes, mean and std,
  the image resize an exported GLEAM-X job recorded) and the video frames' pixel bounds from
  video_preprocessor_config.json; a directory without one has them from preprocessor_config.json, as
  transformers' video processor then reads that file (the video defaults only where it gives no bounds
  either). `overrides` that are not None win."""
  d = _preprocessor_config(directory)
  video = d
  if os.path.isfile(os.path.join(directory, "video_preprocessor_config.json")):
    with open(os.path.join(directory, "video_preprocessor_config.json")) as f:
      video = json.load(f)
  min_pixels, max_pixels = _pixel_bounds(d, ImageConfig.min_pixels, ImageConfig.max_pixels)
  video_min_pixels, video_max_pixels = _pixel_bounds(video, ImageConfig.video_min_pixels, ImageConfig.video_max_pixels)
  fields = dict(
      min_pixels=min_pixels, max_pixels=max_pixels, video_min_pixels=video_min_pixels,
      video_max_pixels=video_max_pixels,
      patch_size=d.get("patch_size", 14), temporal_patch_size=d.get("temporal_patch_size", 2),
      merge_size=d.get("merge_size", 2),
      image_mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
      image_std=tuple(d.get("image_std", OPENAI_CLIP_STD)),
      image_resize=d.get(IMAGE_RESIZE_KEY, ImageConfig.image_resize))
  fields.update({k: v for k, v in overrides.items() if v is not None})
  return ImageConfig(**fields)


def _preprocessor_config(directory: str) -> dict:
  file = os.path.join(directory, "preprocessor_config.json")
  if not os.path.isfile(file):
    raise GleamError(f"No preprocessor_config.json in {directory!r}; give the path of a local "
                     "Qwen2.5-VL model directory.")
  with open(file) as f:
    return json.load(f)


def recorded_image_size(directory: str) -> tuple[int, int] | None:
  """The (height, width) an exported GLEAM-X job resized every image and video frame to before the
  processor (its `examples.image_size`, IMAGE_SIZE_KEY), or None: a model to be asked as it was trained."""
  size = _preprocessor_config(directory).get(IMAGE_SIZE_KEY)
  if size is None:
    return None
  if not (isinstance(size, list) and len(size) == 2 and all(isinstance(n, int) and n > 0 for n in size)):
    raise GleamError(f"{os.path.join(directory, 'preprocessor_config.json')}: {IMAGE_SIZE_KEY}={size!r} is not "
                     "[height, width] in pixels; correct it, or remove the key to use images at their own size.")
  return tuple(size)


# the visual inputs `Processor.encode_prompt` returns, by the names `generation.generate` takes them
VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def join_visuals(rows) -> dict:
  """The visual inputs of several encoded prompts (or fine-tuning examples) as one batch's: each of
  VISUAL_KEYS that any row has, concatenated over the rows that have it, in row order."""
  return {k: np.concatenate([row[k] for row in rows if k in row]) for k in VISUAL_KEYS if any(k in row for row in rows)}


class Processor:
  """Tokenizer + image preprocessing of a local Qwen2.5-VL directory.

  `encode_prompt` builds model inputs for generation, `build_sft_example` for fine-tuning.
  """

  def __init__(self, tokenizer, image_config: ImageConfig):
    self.tokenizer = tokenizer
    self.image_config = image_config
    self.image_token_id = self._special_id("<|image_pad|>")
    self.video_token_id = self._special_id("<|video_pad|>")
    self.vision_start_id = self._special_id("<|vision_start|>")
    self.vision_end_id = self._special_id("<|vision_end|>")
    self.im_end_id = self._special_id("<|im_end|>")

  def _special_id(self, token: str) -> int:
    ids = self.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
      raise GleamError(f"The tokenizer does not know the special token {token}; use the tokenizer of a "
                       "Qwen2.5-VL model directory.")
    return ids[0]

  def _tokens(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False)

  def expand_image_pads(self, ids: list[int], image_grid_thw: np.ndarray, video_grid_thw=None) -> np.ndarray:
    """Each `<|image_pad|>` (`<|video_pad|>`) id -> grid_t*grid_h*grid_w/merge^2 copies, images (videos)
    in order."""
    counts = np.ones(len(ids), np.int64)
    for kind, token, grid in (("image", self.image_token_id, image_grid_thw),
                              ("video", self.video_token_id, np.zeros((0, 3)) if video_grid_thw is None
                               else video_grid_thw)):
      pads = [i for i, t in enumerate(ids) if t == token]
      if len(pads) != len(grid):
        raise GleamError(f"The prompt has {len(pads)} {kind} placeholders but {len(grid)} {kind}s "
                         f"were given; pass one {kind} per placeholder.")
      counts[pads] = np.prod(grid, axis=-1) // self.image_config.merge_size**2
    return np.repeat(np.asarray(ids, np.int64), counts)

  def encode_prompt(self, images, prompt: str, system: str | None = None, history=(), videos=(),
                    fps: float = 2.0, source_fps: float | None = None, videos_first: bool = False) -> dict:
    """Model inputs up to `<|im_start|>assistant\\n`: input_ids [L], pixel_values, image_grid_thw, and
    with `videos` (each a sequence of frames sampled at `fps`: one rate, or one a video)
    pixel_values_videos, video_grid_thw and second_per_grid_ts, the keyword arguments
    `generation.generate` takes (`source_fps`: the videos hold every frame recorded at that rate,
    sampled down to `fps`; see `preprocess_video`). The videos follow the images in the prompt, or
    come first with `videos_first` (a drone flight asked about before its satellite image).
    `history`: the (question, answer) turns before `prompt`, the visuals with the first question."""
    visual_args = dict(videos=videos, fps=fps, source_fps=source_fps, videos_first=videos_first)
    if history:
      (question, answer), *later = history
      asked = self.build_sft_example(images, question, answer, system, follow_ups=later, **visual_args)
      input_ids = np.concatenate([asked["input_ids"], np.asarray(self._tokens(user_turn(prompt)), np.int64)])
      return {**{k: v for k, v in asked.items() if k != "labels"}, "input_ids": input_ids}
    pixel_values, grid_thw = preprocess_images(images, self.image_config)
    visuals, video_grid = dict(pixel_values=pixel_values, image_grid_thw=grid_thw), None
    if videos:
      video_values, video_grid, seconds = preprocess_videos(videos, self.image_config, fps, source_fps)
      visuals.update(pixel_values_videos=video_values, video_grid_thw=video_grid, second_per_grid_ts=seconds)
    ids = self._tokens(chat_prompt(len(images), prompt, system, num_videos=len(videos), videos_first=videos_first))
    return dict(input_ids=self.expand_image_pads(ids, grid_thw, video_grid), **visuals)

  def build_sft_example(self, images, prompt: str, answer: str, system: str | None = None,
                        follow_ups=(), **visual_args) -> dict:
    """One fine-tuning example: the prompt turn, then `answer<|im_end|>\\n`, then each later
    (question, answer) turn of `follow_ups` the same way (a multi-turn conversation about the images).

    labels equal input_ids on every answer's tokens and its closing `<|im_end|>` (so the model learns
    to stop) and are IGNORE_INDEX (-100) elsewhere; they are *not* shifted (the loss predicts
    labels[i+1] from position i, as Hugging Face causal LMs). Each answer is tokenized on its own, so
    the ids equal those of the whole conversation text (HF's chat template) unless an answer starts
    with whitespace, which the template's "\\n" would otherwise absorb. `visual_args`: `encode_prompt`'s
    videos, fps, source_fps and videos_first.
    """
    example = self.encode_prompt(images, prompt, system, **visual_args)
    newline = self._tokens("\n")
    pieces, answers = [example["input_ids"]], [answer]
    for question, later_answer in follow_ups:
      pieces.append(self._tokens(user_turn(question)))
      answers.append(later_answer)
    input_ids, labels = [], []
    for asked, answered in zip(pieces, answers):
      answer_ids = self._tokens(answered) + [self.im_end_id]
      input_ids += [*asked, *answer_ids, *newline]
      labels += [IGNORE_INDEX] * len(asked) + answer_ids + [IGNORE_INDEX] * len(newline)
    return dict(example, input_ids=np.asarray(input_ids, np.int64), labels=np.asarray(labels, np.int64))

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=skip_special_tokens)


def load_processor(directory: str, min_pixels: int | None = None, max_pixels: int | None = None,
                   video_min_pixels: int | None = None, video_max_pixels: int | None = None,
                   image_resize: str | None = None) -> Processor:
  """The processor of a local Qwen2.5-VL directory; min/max_pixels override preprocessor_config.json's
  image bounds, video_min/max_pixels video_preprocessor_config.json's bounds of a video's frames;
  `image_resize`: 'pil' (default) or 'torchvision' (`ImageConfig.image_resize`)."""
  if not os.path.isfile(os.path.join(directory, "tokenizer.json")) and not os.path.isfile(
      os.path.join(directory, "vocab.json")):
    raise GleamError(f"No tokenizer (tokenizer.json or vocab.json) in {directory!r}; give the path of "
                     "a local Qwen2.5-VL model directory.")
  import transformers  # pylint: disable=g-import-not-at-top
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
  image_config = image_config_from_dir(directory, min_pixels=min_pixels, max_pixels=max_pixels,
                                      video_min_pixels=video_min_pixels, video_max_pixels=video_max_pixels,
                                      image_resize=image_resize)
  return Processor(tokenizer, image_config)
