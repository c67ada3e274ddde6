"""The `vit=` config knob: each family of ViT checkpoints (`gleam_c.VIT_FAMILIES`: google/vit-*,
SigLIP, CLIP, open_clip, DINOv2 with and without registers, and their giants) gets the model settings and pixel
normalisation its weights need, and a transformers checkpoint of the family loads through
`model.pretrained` into the GleamC the config builds."""
import numpy as np
import pytest
import transformers
from flax import nnx

from gleam_jax.errors import GleamError
from gleam_jax.models import gleam_c, vit_params


@pytest.mark.parametrize("family", list(gleam_c.VIT_FAMILIES))
def test_vit_family_knob_sets_the_checkpoints_settings_and_pixels(family, tmp_path):
  """`configs/c_phase1.py:variant=mu/4,vit=<family>`: model.vit and data.mean/std as the family's
  checkpoints need; a transformers checkpoint of that family (mu's sizes) then loads through
  `model.pretrained` into the configured GleamC."""
  from config_files import load_config
  config = load_config("c_phase1", f"tiny,variant=mu/4,vit={family}")
  settings, (mean, std) = gleam_c.VIT_FAMILIES[family]
  assert all(config.model.vit[k] == v for k, v in settings.items())
  assert (tuple(config.data.mean), tuple(config.data.std)) == (mean, std)
  sizes = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=32,
               patch_size=4, layer_norm_eps=config.model.vit.ln_eps)
  if family == "google":
    hf = transformers.ViTModel(transformers.ViTConfig(**sizes), add_pooling_layer=False)
  elif family.startswith("dinov2"):
    giant = family.endswith("giant")  # mu's MLP (128) is giant's SwiGLU at mlp_ratio 6
    sizes = {k: v for k, v in sizes.items() if k != "intermediate_size"} | dict(mlp_ratio=6 if giant else 4,
                                                                                 use_swiglu_ffn=giant)
    hf = (transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**sizes, num_register_tokens=4))
          if family.startswith("dinov2_reg") else transformers.Dinov2Model(transformers.Dinov2Config(**sizes)))
  elif family == "siglip":
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**sizes))
  else:
    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        **sizes, projection_dim=12, hidden_act="quick_gelu" if family == "clip" else "gelu"))
    config.model.vit.proj_dim = 12
  hf.save_pretrained(str(tmp_path / family))
  config.model.pretrained = str(tmp_path / family)
  model = gleam_c.GleamC(config.model, rngs=nnx.Rngs(params=0, dropout=1))
  from safetensors.numpy import load_file
  want = {k.removeprefix("vision_model."): v for k, v in load_file(str(tmp_path / family / "model.safetensors")).items()}
  got = {k.removeprefix("vision_model."): v for k, v in vit_params.hf_state_dict(model.encoder).items()}
  assert set(got) == set(want) - {"embeddings.mask_token"}
  for key, value in got.items():
    np.testing.assert_array_equal(value, want[key], err_msg=key)


def test_vit_family_knob_errors():
  from config_files import load_config
  with pytest.raises(GleamError, match=r"vit='openai': choose one of google, siglip, clip, open_clip"):
    load_config("c_phase1", "tiny,variant=mu/4,vit=openai")
  with pytest.raises(GleamError, match=r"sets a ViT's settings; name the ViT too \(variant=B/16,vit=clip\)"):
    load_config("c_phase1", "tiny,vit=clip")
