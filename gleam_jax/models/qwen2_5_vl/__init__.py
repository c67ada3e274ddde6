"""Qwen2.5-VL (GLEAM-X) in Flax NNX: config presets, modeling, M-RoPE and KV-cache generation."""
from gleam_jax.models.qwen2_5_vl.config import QWEN_SHARDING_RULES, Qwen2_5_VLConfig, TextConfig, VisionConfig
from gleam_jax.models.qwen2_5_vl.generation import generate
from gleam_jax.models.qwen2_5_vl.modeling import Qwen2_5_VL, abstract_model, create_model, shard_model, vision_inputs
from gleam_jax.models.qwen2_5_vl.rope import VisionLayout, get_rope_index
