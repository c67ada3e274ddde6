"""The Qwen2.5-VL processor against transformers' Qwen2_5_VLProcessor (PIL image processor)."""
import json

import numpy as np
import pytest
import transformers
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from gleam_jax.errors import GleamError
from gleam_jax.models.qwen2_5_vl import processor as proc_lib
from gleam_jax.models.qwen2_5_vl import tiny_dir

PROMPT = "Do these two views show the same place? 这两个视角显示的是同一个地方吗？"
ANSWER = "Yes. The road layout matches. 是的。道路布局、环岛和河湾与卫星图像一致。"


class ImageOnlyQwenProcessor(transformers.Qwen2_5_VLProcessor):
  """Qwen2_5_VLProcessor without its video processor (which needs torchvision)."""

  def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
    super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tiny_dir.write_tiny_qwen_dir(str(tmp_path_factory.mktemp("qwen_tiny")))


@pytest.fixture(scope="module")
def ours(model_dir):
  return proc_lib.load_processor(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir):
  return ImageOnlyQwenProcessor(
      image_processor=Qwen2VLImageProcessorPil.from_pretrained(model_dir),
      tokenizer=transformers.AutoTokenizer.from_pretrained(model_dir),
      chat_template=tiny_dir.CHAT_TEMPLATE)


def random_image(width, height, seed=0, mode="RGB"):
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
  return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def hf_inputs(hf, images, prompt, answer=None):
  content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
  messages = [{"role": "user", "content": content}]
  if answer is not None:
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
  text = hf.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)
  return hf(text=[text], images=images or None, return_tensors="np"), text


@pytest.mark.parametrize("size", [(640, 480), (1024, 768), (333, 517), (20, 30), (9, 1700)])
def test_images_and_ids_match_transformers(ours, hf, size):
  images = [random_image(*size, seed=1), random_image(size[1], size[0], seed=2)]
  got = ours.encode_prompt(images, PROMPT)
  want, _ = hf_inputs(hf, images, PROMPT)
  np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
  np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(got["input_ids"], want["input_ids"][0])


def test_large_image_hits_max_pixels_and_tiny_image_min_pixels(ours, hf):
  for size in [(3000, 2000), (12, 12)]:
    image = random_image(*size, seed=3)
    got = ours.encode_prompt([image], "Where?")
    want, _ = hf_inputs(hf, [image], "Where?")
    np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)
    pixels = int(np.prod(got["image_grid_thw"][0, 1:])) * 14 * 14
    assert 56 * 56 <= pixels <= 28 * 28 * 1280


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_non_rgb_images_match_transformers(ours, hf, mode):
  image = random_image(300, 200, seed=4, mode=mode)
  got = ours.encode_prompt([image], "Where?")
  want, _ = hf_inputs(hf, [image], "Where?")
  np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)


def test_smart_resize_rule():
  for h, w in [(480, 640), (517, 333), (30, 20), (2000, 3000), (1, 150)]:
    rh, rw = proc_lib.smart_resize(h, w, 28, 56 * 56, 28 * 28 * 1280)
    assert rh % 28 == 0 and rw % 28 == 0
    assert 56 * 56 <= rh * rw <= 28 * 28 * 1280
  assert proc_lib.smart_resize(480, 640) == (476, 644)  # round(480/28)=17, round(640/28)=23
  assert proc_lib.smart_resize(20, 3000, 28, 3136, 6272) == (28, 952)  # as transformers: above max_pixels
  with pytest.raises(GleamError, match="aspect ratio"):
    proc_lib.smart_resize(1, 300)


def test_patch_order_is_merge_order():
  cfg = proc_lib.ImageConfig()
  h, w = 56, 84  # grid 4 x 6 patches, 2 x 3 merge groups
  pixels = np.arange(h * w * 3, dtype=np.float32).reshape(h, w, 3)
  patches = proc_lib.patchify(pixels, cfg)
  assert patches.shape == (24, 3 * 2 * 14 * 14)
  # Patch 0..3 are the 2x2 group at the top-left: (row, col) = (0,0), (0,1), (1,0), (1,1); then (0,2).
  for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (0, 2)]):
    block = pixels[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].transpose(2, 0, 1)  # (C, p, p)
    want = np.stack([block, block], axis=1).reshape(-1)  # (C, temporal, p, p)
    np.testing.assert_array_equal(patches[k], want)


def test_sft_example_matches_chat_template_and_masks_answer(ours, hf):
  images = [random_image(200, 150, seed=5), random_image(100, 120, seed=6)]
  ex = ours.build_sft_example(images, PROMPT, ANSWER)
  want, text = hf_inputs(hf, images, PROMPT, ANSWER)
  assert text.endswith(f"<|im_start|>assistant\n{ANSWER}<|im_end|>\n")
  np.testing.assert_array_equal(ex["input_ids"], want["input_ids"][0])
  np.testing.assert_allclose(ex["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)
  labelled = ex["labels"] != proc_lib.IGNORE_INDEX
  np.testing.assert_array_equal(ex["labels"][labelled], ex["input_ids"][labelled])
  # Exactly the answer and its <|im_end|> carry loss, and they are contiguous.
  idx = np.flatnonzero(labelled)
  assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))
  assert ex["labels"][idx[-1]] == ours.im_end_id
  assert ours.decode(ex["labels"][idx[:-1]]) == ANSWER  # Chinese round-trips
  assert ours.decode(ex["input_ids"][:idx[0]], skip_special_tokens=False).endswith(
      "<|im_start|>assistant\n")
  n_image_tokens = int(np.sum(ex["input_ids"] == ours.image_token_id))
  assert n_image_tokens == int(np.prod(ex["image_grid_thw"], axis=-1).sum()) // 4


def test_multi_turn_sft_example_matches_chat_template(ours, hf):
  """A system prompt and follow-up turns: the ids of HF's chat template for the whole conversation,
  loss on every answer and its <|im_end|>, nothing else."""
  images = [random_image(120, 90, seed=7), random_image(90, 120, seed=8)]
  system = "You compare a drone photo with a satellite image. 你比较无人机照片和卫星图像。"
  turns = [("Why?", "The river bends the same way."), ("哪条路？", "环岛北边的那条路。")]
  ex = ours.build_sft_example(images, PROMPT, ANSWER, system=system, follow_ups=turns)
  content = [{"type": "image"} for _ in images] + [{"type": "text", "text": PROMPT}]
  messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
              {"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}]
  for question, answer in turns:
    messages += [{"role": "user", "content": [{"type": "text", "text": question}]},
                 {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
  text = hf.apply_chat_template(messages, tokenize=False)
  assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>") and text.endswith("环岛北边的那条路。<|im_end|>\n")
  want = hf(text=[text], images=images, return_tensors="np")
  np.testing.assert_array_equal(ex["input_ids"], want["input_ids"][0])
  labelled = ex["labels"] != proc_lib.IGNORE_INDEX
  np.testing.assert_array_equal(ex["labels"][labelled], ex["input_ids"][labelled])
  spans = np.split(np.flatnonzero(labelled), np.flatnonzero(np.diff(np.flatnonzero(labelled)) > 1) + 1)
  assert [ours.decode(ex["labels"][span]) for span in spans] == [ANSWER] + [a for _, a in turns]
  assert all(ex["labels"][span[-1]] == ours.im_end_id for span in spans)
  single = ours.build_sft_example(images, PROMPT, ANSWER, system=system)
  np.testing.assert_array_equal(ex["input_ids"][:len(single["input_ids"])], single["input_ids"])
  # asking the last question after the turns before it: the template's generation prompt
  asked = ours.encode_prompt(images, turns[-1][0], system, history=[(PROMPT, ANSWER), turns[0]])
  text = hf.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
  np.testing.assert_array_equal(asked["input_ids"], hf(text=[text], images=images, return_tensors="np")["input_ids"][0])
  np.testing.assert_array_equal(asked["pixel_values"], ex["pixel_values"])


def test_default_system_prompt_set_in_every_template_form(tmp_path, hf):
  """`set_default_system_prompt` rewrites the default system turn of the template in chat_template.jinja,
  tokenizer_config.json (named templates) and chat_template.json; a template without one is left."""
  system = "You compare views {{ not a tag }}."
  (tmp_path / "chat_template.jinja").write_text(tiny_dir.CHAT_TEMPLATE)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(chat_template=[
      dict(name="default", template=tiny_dir.CHAT_TEMPLATE), dict(name="other", template="{{ messages }}")])))
  (tmp_path / "chat_template.json").write_text(json.dumps(dict(chat_template="{{ messages }}")))
  assert proc_lib.set_default_system_prompt(str(tmp_path), system) == ["tokenizer_config.json", "chat_template.jinja"]
  named = json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
  assert named[1] == dict(name="other", template="{{ messages }}")
  messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
  for template in (named[0]["template"], (tmp_path / "chat_template.jinja").read_text()):
    text = hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert text == proc_lib.chat_prompt(0, PROMPT, system)
  assert json.loads((tmp_path / "chat_template.json").read_text()) == dict(chat_template="{{ messages }}")


def test_text_only_prompt(ours, hf):
  got = ours.encode_prompt([], PROMPT)
  want, _ = hf_inputs(hf, [], PROMPT)
  np.testing.assert_array_equal(got["input_ids"], want["input_ids"][0])
  assert got["pixel_values"].shape == (0, 1176) and got["image_grid_thw"].shape == (0, 3)


def test_min_max_pixels_override(model_dir):
  small = proc_lib.load_processor(model_dir, max_pixels=28 * 28 * 16)
  ex = small.encode_prompt([random_image(1024, 768)], "Where?")
  assert int(np.prod(ex["image_grid_thw"][0])) * 14 * 14 <= 28 * 28 * 16


@pytest.mark.parametrize("size", [{"shortest_edge": 1000, "longest_edge": 9000},
                                  {"min_pixels": 1000, "max_pixels": 9000}])
def test_pixel_bounds_from_either_spelling_of_size(tmp_path, size):
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": size}))
  cfg = proc_lib.image_config_from_dir(str(tmp_path))
  assert (cfg.min_pixels, cfg.max_pixels) == (1000, 9000)
  # no video_preprocessor_config.json: video frames within the same bounds (transformers' video processor
  # then reads preprocessor_config.json); with one, its bounds, and overrides over both
  assert (cfg.video_min_pixels, cfg.video_max_pixels) == (1000, 9000)
  (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"size": size, "min_pixels": 2000}))
  cfg = proc_lib.image_config_from_dir(str(tmp_path), video_max_pixels=5000)
  assert (cfg.min_pixels, cfg.max_pixels, cfg.video_min_pixels, cfg.video_max_pixels) == (1000, 9000, 2000, 5000)


def test_pixel_bounds_default_to_transformers_video_defaults(tmp_path):
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14}))
  cfg = proc_lib.image_config_from_dir(str(tmp_path))
  assert (cfg.video_min_pixels, cfg.video_max_pixels) == (128 * 28 * 28, 768 * 28 * 28)
  assert (cfg.min_pixels, cfg.max_pixels) == (proc_lib.ImageConfig.min_pixels, proc_lib.ImageConfig.max_pixels)


def test_an_exported_jobs_image_handling_is_read_back(tmp_path):
  """The resize and image size an export records (`write_image_config`): the resize as the directory's
  default (an override wins), the size as (height, width); a malformed size stops naming the key."""
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14}))
  assert proc_lib.recorded_image_size(str(tmp_path)) is None
  assert proc_lib.image_config_from_dir(str(tmp_path)).image_resize == "pil"
  proc_lib.write_image_config(str(tmp_path), proc_lib.ImageConfig(image_resize="torchvision"), (56, 84))
  assert proc_lib.recorded_image_size(str(tmp_path)) == (56, 84)
  assert proc_lib.image_config_from_dir(str(tmp_path)).image_resize == "torchvision"
  assert proc_lib.image_config_from_dir(str(tmp_path), image_resize="pil").image_resize == "pil"
  proc_lib.write_image_config(str(tmp_path), proc_lib.ImageConfig())  # no size: the key goes
  assert proc_lib.recorded_image_size(str(tmp_path)) is None
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({proc_lib.IMAGE_SIZE_KEY: [56, "84"]}))
  with pytest.raises(GleamError, match=r"gleam_image_size=\[56, '84'\] is not \[height, width\] in pixels"):
    proc_lib.recorded_image_size(str(tmp_path))


def test_errors(tmp_path, ours):
  with pytest.raises(GleamError, match="No tokenizer"):
    proc_lib.load_processor(str(tmp_path))
  with pytest.raises(GleamError, match="2 image placeholders but 1 images"):
    ours.expand_image_pads([ours.image_token_id, 5, ours.image_token_id], np.array([[1, 4, 4]]))
  with pytest.raises(GleamError, match="uint8"):
    ours.encode_prompt([np.zeros((10, 10, 3), np.float32)], "x")


def random_frames(n, width, height, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def test_video_frames_pair_into_temporal_patches():
  """Three 56x84 frames at 4 fps: two temporal patches (the last frame repeated), each in merge order,
  frame 2g in temporal slot 0 and frame 2g+1 in slot 1; 0.5 s per temporal patch."""
  cfg = proc_lib.ImageConfig(video_min_pixels=28 * 28)
  frames = random_frames(3, 84, 56)
  patches, grid, seconds = proc_lib.preprocess_video(frames, cfg, fps=4)
  np.testing.assert_array_equal(grid, [2, 4, 6])
  assert seconds == 0.5 and patches.shape == (48, 3 * 2 * 14 * 14)
  normalised = [(f / 255 - np.float32(cfg.image_mean)) / np.float32(cfg.image_std) for f in frames + frames[-1:]]
  for g in range(2):
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (0, 2)]):
      blocks = [normalised[2 * g + j][r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].transpose(2, 0, 1) for j in range(2)]
      np.testing.assert_allclose(patches[g * 24 + k], np.stack(blocks, axis=1).reshape(-1), atol=1e-5)


def test_a_still_video_equals_the_image_path():
  """Two identical frames make the patches of the image (a still image is its frame repeated): the same
  grid, and for a frame that needs no resizing the same values up to float32 rounding (a video's
  scaling is folded into its normalisation, as transformers' video processor folds it). Frames that
  are resized differ from the image by the resize: torch's for a video, PIL's for an image, as in
  transformers."""
  cfg = proc_lib.ImageConfig(video_min_pixels=56 * 56, video_max_pixels=28 * 28 * 1280)
  for height, width in ((333, 517), (336, 504)):
    frame = random_frames(1, width, height, seed=3)[0]
    video, grid, _ = proc_lib.preprocess_video([frame, frame], cfg)
    image, image_grid = proc_lib.preprocess_image(frame, cfg)
    np.testing.assert_array_equal(grid, image_grid)
  np.testing.assert_allclose(video, image, rtol=0, atol=2e-6)
  # Default video bounds: at least 128 merged tokens' worth of pixels per frame, at most 768.
  small, grid, _ = proc_lib.preprocess_video(random_frames(2, 40, 30), proc_lib.ImageConfig())
  assert grid[1] * grid[2] * 14 * 14 >= proc_lib.VIDEO_MIN_PIXELS
  _, grid, _ = proc_lib.preprocess_video(random_frames(2, 1920, 1080), proc_lib.ImageConfig())
  assert grid[1] * grid[2] * 14 * 14 <= proc_lib.VIDEO_MAX_PIXELS


def test_video_prompt_matches_the_chat_template_and_generates(ours, hf, model_dir):
  from gleam_jax.models.qwen2_5_vl import config as config_lib, generation, modeling
  content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": PROMPT}]
  text = hf.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
  assert proc_lib.chat_prompt(1, PROMPT, num_videos=1) == text
  got = ours.encode_prompt([random_image(64, 48)], PROMPT, videos=[random_frames(4, 64, 48)], fps=1.0)
  grid = got["video_grid_thw"]
  assert grid[0, 0] == 2 and got["second_per_grid_ts"].tolist() == [2.0]
  assert (got["input_ids"] == ours.video_token_id).sum() == np.prod(grid) // 4
  assert got["pixel_values_videos"].shape == (np.prod(grid), 1176)
  cfg = config_lib.from_pretrained_dir(model_dir)
  model = modeling.create_model(cfg)
  tokens = generation.generate(model, got["input_ids"][None], None, got["pixel_values"], got["image_grid_thw"],
                               max_new_tokens=3, **{k: got[k] for k in ("pixel_values_videos", "video_grid_thw",
                                                                         "second_per_grid_ts")})
  assert tokens.shape == (1, 3)
  # a drone flight before its satellite image (GLEAM-X's video pairs), as the template writes that order
  content = [{"type": "video"}, {"type": "image"}, {"type": "text", "text": PROMPT}]
  text = hf.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
  assert proc_lib.chat_prompt(1, PROMPT, num_videos=1, videos_first=True) == text
  frames = random_frames(4, 64, 48)
  first = ours.encode_prompt([random_image(64, 48)], PROMPT, videos=[frames], fps=1.0, videos_first=True)
  np.testing.assert_array_equal(first["pixel_values_videos"], got["pixel_values_videos"])
  runs = np.flatnonzero(np.isin(first["input_ids"], [ours.video_token_id, ours.image_token_id]))
  assert first["input_ids"][runs[0]] == ours.video_token_id and first["input_ids"][runs[-1]] == ours.image_token_id
  # asked after an earlier turn about the flight: that turn's ids and visuals, then the question
  sft = ours.build_sft_example([random_image(64, 48)], PROMPT, "Yes.", videos=[frames], fps=1.0, videos_first=True)
  later = ours.encode_prompt([random_image(64, 48)], "Which road?", history=[(PROMPT, "Yes.")], videos=[frames],
                             fps=1.0, videos_first=True)
  np.testing.assert_array_equal(later["input_ids"][:len(sft["input_ids"])], sft["input_ids"])
  assert ours.decode(later["input_ids"][len(sft["input_ids"]):], skip_special_tokens=False) == (
      "<|im_start|>user\nWhich road?<|im_end|>\n<|im_start|>assistant\n")
  for key in ("pixel_values", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
    np.testing.assert_array_equal(later[key], sft[key])
  assert "labels" not in later
  with pytest.raises(GleamError, match="one size"):
    proc_lib.preprocess_video(random_frames(1, 64, 48) + random_frames(1, 48, 64), proc_lib.ImageConfig())
  with pytest.raises(GleamError, match="fps=0: give the frame rate"):
    proc_lib.preprocess_video(random_frames(2, 64, 48), proc_lib.ImageConfig(), fps=0)


def test_frames_are_sampled_down_as_transformers_samples_them():
  """sample_frames, hand-checked: about duration x fps frames, at least 4, whole temporal patches,
  evenly spaced from the first frame (truncated positions)."""
  np.testing.assert_array_equal(proc_lib.sample_frames(90, 30, 2), [0, 15, 30, 45, 60, 75])  # 3 s at 2 fps
  np.testing.assert_array_equal(proc_lib.sample_frames(10, 30, 2), [0, 2, 5, 7])  # 1/3 s: the 4-frame floor
  np.testing.assert_array_equal(proc_lib.sample_frames(100, 25, 2), [0, 12, 25, 37, 50, 62, 75, 87])  # 8 frames
  np.testing.assert_array_equal(proc_lib.sample_frames(3, 30, 2), [0, 1])  # at most the frames there are
  assert len(proc_lib.sample_frames(30 * 3600, 30, 2)) == 768  # an hour: the 768-frame cap
  with pytest.raises(GleamError, match="too short"):
    proc_lib.sample_frames(1, 30, 2)
  cfg = proc_lib.ImageConfig(video_min_pixels=28 * 28)
  frames = random_frames(12, 84, 56, seed=5)
  sampled, grid, seconds = proc_lib.preprocess_video(frames, cfg, fps=1.0, source_fps=3.0)  # 4 s: 4 frames
  np.testing.assert_array_equal(grid, [2, 4, 6])
  assert seconds == 2.0
  direct, _, _ = proc_lib.preprocess_video([frames[i] for i in (0, 3, 6, 9)], cfg, fps=1.0)
  np.testing.assert_array_equal(sampled, direct)


def test_many_frames_share_the_video_token_budget():
  """Each frame's pixel cap is an even share of 90% of 128,000 tokens' worth (qwen-vl-utils), at least
  1.05 x the per-frame minimum: 768 frames of 1080p get at most 235,200 pixels each, 8 frames 602,112."""
  cfg = proc_lib.ImageConfig()
  assert proc_lib.video_max_pixels(cfg, 768) == 128000 * 784 * 9 // 10 * 2 // 768 == 235200
  assert proc_lib.video_max_pixels(cfg, 8) == proc_lib.VIDEO_MAX_PIXELS
  assert proc_lib.video_max_pixels(cfg, 100000) == int(proc_lib.VIDEO_MIN_PIXELS * 1.05)
  h, w = proc_lib.smart_resize(1080, 1920, 28, proc_lib.VIDEO_MIN_PIXELS, 235200)
  assert h * w <= 235200 and (h, w) == (336, 644)


@pytest.mark.parametrize("height,width", [(720, 1280), (1080, 1920), (480, 640), (100, 37), (64, 64)])
@pytest.mark.parametrize("content", ["smooth", "noise"])
def test_video_frames_are_resized_and_normalised_as_transformers_does_on_a_cpu(height, width, content):
  """transformers' video processor resizes frames with torchvision, which on a CPU runs torch's native
  uint8 antialiased bicubic (`interpolate(uint8, mode="bicubic", antialias=True)`; torchvision itself is
  not installable here, the call it makes is), then scales and normalises them with the mean and std
  folded together in float32. Our pixel_values_videos are exactly that, for downscaled, upscaled and
  both-ways frames, smooth or pure noise (where PIL's bicubic differs by up to 26 levels)."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(height + width)
  if content == "smooth":
    ramp = np.add.outer(np.linspace(0, 150, height), np.linspace(0, 70, width))[..., None]
    frames = (ramp + rng.integers(0, 30, (3, height, width, 3))).astype(np.uint8)
  else:
    frames = rng.integers(0, 256, (3, height, width, 3), np.uint8)
  cfg = proc_lib.ImageConfig(video_min_pixels=56 * 56)
  values, grid, _ = proc_lib.preprocess_video(list(frames), cfg)
  h, w = int(grid[1]) * cfg.patch_size, int(grid[2]) * cfg.patch_size
  resized = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2), size=(h, w),
                                            mode="bicubic", align_corners=False, antialias=True)
  mean = torch.tensor(cfg.image_mean) * (1.0 / (1 / 255))  # transformers' _fuse_mean_std_and_rescale_factor
  std = torch.tensor(cfg.image_std) * (1.0 / (1 / 255))
  normalised = (resized.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
  x = normalised.permute(0, 2, 3, 1).numpy()
  reference = proc_lib.patchify_frames(np.concatenate([x, x[-1:]]), cfg)  # the last frame repeated: 2 patches
  np.testing.assert_array_equal(values, reference)


@pytest.mark.parametrize("height,width", [(333, 517), (1080, 1920), (40, 30)])
def test_images_resized_as_transformers_torchvision_processor_on_a_cpu(height, width):
  """`image_resize='torchvision'`: an image's pixel_values are those of transformers' torchvision image
  processor on a CPU (its default where torchvision is installed): torch's uint8 antialiased bicubic,
  the fused scaling and normalisation, the same patch order. The default ('pil') stays the PIL
  processor's (tested above); other values stop with the choices."""
  import torch  # pylint: disable=g-import-not-at-top
  image = random_frames(1, width, height, seed=height)[0]
  cfg = proc_lib.ImageConfig(image_resize="torchvision")
  values, grid = proc_lib.preprocess_image(image, cfg)
  h, w = int(grid[1]) * cfg.patch_size, int(grid[2]) * cfg.patch_size
  resized = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=(h, w),
                                            mode="bicubic", align_corners=False, antialias=True)
  mean = torch.tensor(cfg.image_mean) * (1.0 / (1 / 255))
  std = torch.tensor(cfg.image_std) * (1.0 / (1 / 255))
  x = ((resized.to(torch.float32) - mean[:, None, None]) / std[:, None, None]).permute(0, 2, 3, 1).numpy()
  np.testing.assert_array_equal(values, proc_lib.patchify(x[0], cfg))
  pil, _ = proc_lib.preprocess_image(image, proc_lib.ImageConfig())
  assert not np.array_equal(values, pil)  # the two processors' resizes differ on noise
  with pytest.raises(GleamError, match="image_resize='bilinear': give one of pil, torchvision"):
    proc_lib.ImageConfig(image_resize="bilinear")



def test_a_job_chooses_the_image_resize(tmp_path):
  """`model.image_resize` of a GLEAM-X job reaches its processor ('pil' unless set)."""
  from config_files import tiny_config  # pylint: disable=g-import-not-at-top
  from gleam_jax.train import sft  # pylint: disable=g-import-not-at-top
  directory = tiny_dir.write_tiny_qwen_dir(str(tmp_path / "qwen"))
  def processor_of(**fields):
    return sft._processor(tiny_config("x_sft", str(tmp_path), **fields), directory)  # pylint: disable=protected-access
  assert processor_of(**{"model.image_resize": "torchvision"}).image_config.image_resize == "torchvision"
  assert processor_of().image_config.image_resize == "pil"
