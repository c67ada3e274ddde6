"""A tiny Qwen2.5-VL model directory, generated on the spot (no network).

Laid out like a real Hugging Face Qwen2.5-VL directory: tokenizer.json, tokenizer_config.json,
chat_template.json, preprocessor_config.json, config.json (the tests add safetensors weights of a
random `Qwen2_5_VLForConditionalGeneration`). The tokenizer is a byte-level BPE with Qwen's
pre-tokenizer, trained on a few English and Chinese sentences (and on `corpus`, e.g. the GLEAM-X
answers a tiny fine-tuning job learns), followed by Qwen's special tokens. The tests' parity checks
and the `tiny` GLEAM-X job (`train/sft.py`) both use it.
"""
import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenizer split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
              r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen2.5-VL's special tokens, in their real order (ids 151643.. in the real vocabulary).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>")

# The chat template shipped with Qwen/Qwen2.5-VL-3B-Instruct (chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CORPUS = [
    "You are a helpful assistant.",
    "Do these two views show the same place? Answer yes or no, then explain.",
    "Yes. The road layout, the roundabout and the river bend match the satellite image.",
    "No. The drone image shows a stadium, but the satellite tile shows farmland and a lake.",
    "The street map and the panorama agree: two parallel streets with a park to the north.",
    "是的。道路布局、环岛和河湾与卫星图像一致。",
    "不是。无人机图像显示一个体育场，而卫星图块显示农田和湖泊。",
    "这两个视角显示的是同一个地方吗？请回答是或否，然后解释原因。",
    "Picture 1: a ground photo of a church; Picture 2: a satellite image 1024 x 768 pixels.",
]


def train_tokenizer(vocab_size=700, corpus=()):
  """Byte-level BPE with Qwen's pre-tokenizer and special tokens appended after the merges."""
  tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 4 + list(corpus), trainer=trainer)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  return tok


def tiny_model_config(tok, **overrides):
  """A `Qwen2_5_VLConfig` dict small enough for CPU tests, with the tokenizer's special ids."""
  ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
  vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, in_chans=3,
                out_hidden_size=64, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                window_size=56, fullatt_block_indexes=[1], hidden_act="silu",
                model_type="qwen2_5_vl")
  text = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=1024, rms_norm_eps=1e-6, hidden_act="silu",
              tie_word_embeddings=False, model_type="qwen2_5_vl_text",
              bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
              pad_token_id=ids["<|endoftext|>"],
              rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                   mrope_section=[2, 3, 3]))
  text.update(overrides.pop("text", {}))
  vision.update(overrides.pop("vision", {}))
  config = dict(
      architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
      text_config=text, vision_config=vision,
      bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
      pad_token_id=ids["<|endoftext|>"], image_token_id=ids["<|image_pad|>"],
      video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
      vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=text["tie_word_embeddings"])
  config.update(overrides)
  return config


def write_tiny_qwen_dir(path, min_pixels=56 * 56, max_pixels=28 * 28 * 1280, corpus=(), vocab_size=700,
                        **config_overrides):
  """Writes tokenizer, processor and model config files into `path`; returns `path`."""
  os.makedirs(path, exist_ok=True)
  tok = train_tokenizer(vocab_size, corpus)
  tok.save(os.path.join(path, "tokenizer.json"))
  added = {str(tok.token_to_id(t)): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                         single_word=False, special=True) for t in SPECIAL_TOKENS}
  files = {
      "tokenizer_config.json": dict(
          tokenizer_class="Qwen2Tokenizer", added_tokens_decoder=added, bos_token=None,
          eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, errors="replace",
          clean_up_tokenization_spaces=False, split_special_tokens=False,
          model_max_length=131072, add_prefix_space=False,
          extra_special_tokens=list(SPECIAL_TOKENS[1:])),
      "chat_template.json": dict(chat_template=CHAT_TEMPLATE),
      "preprocessor_config.json": dict(
          min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2,
          merge_size=2, image_mean=[0.48145466, 0.4578275, 0.40821073],
          image_std=[0.26862954, 0.26130258, 0.27577711],
          image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor"),
      "config.json": tiny_model_config(tok, **config_overrides),
  }
  for name, content in files.items():
    with open(os.path.join(path, name), "w", encoding="utf-8") as f:
      json.dump(content, f, ensure_ascii=False, indent=2)
  return path
