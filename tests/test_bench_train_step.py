"""bench.train_step's two sides compute the same step: our model starts from the PyTorch
reference's weights (transformers' ConvNeXt or ViT) and the first losses agree."""
import pytest

from config_files import load_config
from gleam_jax.bench import train_step


SIGLIP = {"class_token": False, "pool": "map", "gelu": "tanh"}
CLIP = {"pre_norm": True, "patch_bias": False, "gelu": "quick", "ln_eps": 1e-5, "proj_dim": 24}
DINOV2 = {"layer_scale": 1.0, "registers": 2, "pos_antialias": True}


@pytest.mark.parametrize("arg,vit", [("tiny", {}), ("tiny,variant=mu/4", {}), ("tiny,variant=mu/8", {}),
                                     ("tiny,variant=mu/8", SIGLIP), ("tiny,variant=mu/8", CLIP),
                                     ("tiny,variant=mu/8", DINOV2)])
def test_ours_and_the_pytorch_step_start_from_the_same_loss(arg, vit):
  """mu/8 reads 32 x 64 panoramas as 4 x 8 patches against a 4 x 4 position grid: both sides
  interpolate the embeddings; the last are a SigLIP tower against transformers' SiglipVisionModel and
  a CLIP tower (its projection included) against CLIPVisionModelWithProjection and a DINOv2 tower with
  registers against Dinov2WithRegistersModel (both sides resize the positions antialiased)."""
  config = load_config("c_phase1", arg)
  for key, value in vit.items():
    config.model.vit[key] = value
  batch = train_step.make_batch(config.batch_size, tuple(config.data.panorama_size), tuple(config.data.satellite_size))
  torch_step = train_step.Torch(config, batch, compile_=False)
  ours = train_step.Ours(config, batch, torch_step.model)
  torch_step.warm_up()
  assert ours.loss0 == pytest.approx(torch_step.loss0, abs=1e-5)
