"""Import ConvNeXt weights from Hugging Face or timm checkpoints into `convnext.ConvNeXt`.

    load_convnext_weights(model, 'path/to/dir_or_file')   # or a {name: array} state dict

Both layouts are detected from the key names:
  Hugging Face  embeddings.patch_embeddings, embeddings.layernorm,
                encoder.stages.i.downsampling_layer.{0,1}, encoder.stages.i.layers.j.{dwconv,
                layernorm, pwconv1, pwconv2, layer_scale_parameter}, layernorm
                (`ConvNextForImageClassification` adds the prefix `convnext.` and `classifier`)
  timm          stem.{0,1}, stages.i.downsample.{0,1}, stages.i.blocks.j.{conv_dw, norm, mlp.fc1,
                mlp.fc2, gamma}, head.norm (and the classifier head.fc)
A wrapper prefix such as `module.` (DataParallel) or `model.` (Sample4Geo) is stripped.
Classifier weights and the `gleam_c.*` head of an exported GLEAM-C tower are ignored; every other
key must map onto a parameter and every parameter must be given, or a GleamError lists the keys
and the fix.

The other way, `save_hf_convnext(model, directory)` writes our ConvNeXt as a transformers
`ConvNextModel` directory (config.json, model.safetensors; `hf_state_dict` gives the tensors), whose
`pooler_output` is our pooled features. `read_checkpoint`, `hf_features`, `hf_pooled` and
`build_hf_model` answer as `vit_params`' do (`gleam_c.backbone_kind` picks the module).
"""
import os
import re

import numpy as np

from gleam_jax.errors import GleamError
from gleam_jax.models import convnext, torch_checkpoints

_WRAPPER_PREFIXES = ('module.', 'model.', 'convnext.', 'backbone.')
# Keys that are no ConvNeXt parameter: a classifier, a CLIP-style logit scale, a GLEAM-C head.
_NOT_BACKBONE = re.compile(r'^((classifier|head\.fc|gleam_c)\..*|logit_scale)$')

# (source regex, target path template, kind). kind says how a torch tensor becomes ours.
_HF_RULES = [
    (r'embeddings\.patch_embeddings\.(weight|bias)', 'stem.conv.{0}', 'conv'),
    (r'embeddings\.layernorm\.(weight|bias)', 'stem.norm.{0}', 'norm'),
    (r'encoder\.stages\.(\d+)\.downsampling_layer\.0\.(weight|bias)',
     'stages.{0}.downsample.norm.{1}', 'norm'),
    (r'encoder\.stages\.(\d+)\.downsampling_layer\.1\.(weight|bias)',
     'stages.{0}.downsample.conv.{1}', 'conv'),
    (r'encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.(weight|bias)',
     'stages.{0}.blocks.{1}.dwconv.{2}', 'conv'),
    (r'encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.(weight|bias)',
     'stages.{0}.blocks.{1}.norm.{2}', 'norm'),
    (r'encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv([12])\.(weight|bias)',
     'stages.{0}.blocks.{1}.pwconv{2}.{3}', 'dense'),
    (r'encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter',
     'stages.{0}.blocks.{1}.gamma', 'copy'),
    (r'layernorm\.(weight|bias)', 'head_norm.{0}', 'norm'),
]
_TIMM_RULES = [
    (r'stem\.0\.(weight|bias)', 'stem.conv.{0}', 'conv'),
    (r'stem\.1\.(weight|bias)', 'stem.norm.{0}', 'norm'),
    (r'stages\.(\d+)\.downsample\.0\.(weight|bias)', 'stages.{0}.downsample.norm.{1}', 'norm'),
    (r'stages\.(\d+)\.downsample\.1\.(weight|bias)', 'stages.{0}.downsample.conv.{1}', 'conv'),
    (r'stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(weight|bias)', 'stages.{0}.blocks.{1}.dwconv.{2}',
     'conv'),
    (r'stages\.(\d+)\.blocks\.(\d+)\.norm\.(weight|bias)', 'stages.{0}.blocks.{1}.norm.{2}',
     'norm'),
    (r'stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)',
     'stages.{0}.blocks.{1}.pwconv{2}.{3}', 'dense'),
    (r'stages\.(\d+)\.blocks\.(\d+)\.gamma', 'stages.{0}.blocks.{1}.gamma', 'copy'),
    (r'head\.norm\.(weight|bias)', 'head_norm.{0}', 'norm'),
]
_LAYOUTS = {'huggingface': _HF_RULES, 'timm': _TIMM_RULES}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a local ConvNeXt checkpoint (`torch_checkpoints.read_state_dict`)."""
  return torch_checkpoints.read_state_dict(path, 'ConvNeXt')


def _strip_wrappers(sd: dict) -> dict:
  """Drops wrapper prefixes shared by all ConvNeXt keys ('module.', 'model.', 'convnext.' ...)."""
  return torch_checkpoints.strip_wrappers(sd, _WRAPPER_PREFIXES, _NOT_BACKBONE)


def detect_layout(keys) -> str:
  keys = list(keys)
  if any(k.startswith('embeddings.patch_embeddings') for k in keys):
    return 'huggingface'
  if any(k.startswith('stem.0') for k in keys):
    return 'timm'
  raise GleamError(f'Checkpoint is neither a Hugging Face nor a timm ConvNeXt (first keys: '
                   f'{keys[:5]}); expected "embeddings.patch_embeddings.*" or "stem.0.*".')


def infer_architecture(sd: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(depths, dims) of a checkpoint, from its key names and shapes."""
  sd = _strip_wrappers(sd)
  layout = detect_layout(sd)
  block = (r'encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.weight' if layout == 'huggingface'
           else r'stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight')
  depth, dim = {}, {}
  for k, v in sd.items():
    m = re.fullmatch(block, k)
    if m:
      i, j = int(m.group(1)), int(m.group(2))
      depth[i] = max(depth.get(i, 0), j + 1)
      dim[i] = v.shape[0]
  n = max(depth) + 1 if depth else 0
  return tuple(depth.get(i, 0) for i in range(n)), tuple(dim.get(i, 0) for i in range(n))


def variant_name(depths, dims) -> str:
  for name, (d, w) in convnext.VARIANTS.items():
    if tuple(d) == tuple(depths) and tuple(w) == tuple(dims):
      return name
  return f'custom depths={tuple(depths)} dims={tuple(dims)}'


def hf_state_dict(model: convnext.ConvNeXt) -> dict[str, np.ndarray]:
  """Our ConvNeXt's parameters under transformers' `ConvNextModel` keys, in torch layouts, float32."""
  return torch_checkpoints.torch_state_dict(model, _HF_RULES, 'ConvNeXt')


def hf_config(cfg: convnext.ConvNeXtConfig, dtype: str = 'float32') -> dict:
  """config.json of a transformers `ConvNextModel` with our architecture. Its stem, downsampling and
  block norms have eps 1e-6 as ours; the final norm reads `layer_norm_eps` (transformers' default is
  1e-12). transformers makes no layer scale parameter for `layer_scale_init_value` <= 0, and ours
  always has one, so that value (only an initialisation) is kept positive. `drop_path_rate` acts only
  in training, as ours. `dtype`: the weights' (what `from_pretrained(..., dtype='auto')` loads as)."""
  from transformers import ConvNextConfig
  return ConvNextConfig(
      num_channels=cfg.in_channels, patch_size=4, num_stages=len(cfg.depths),
      depths=list(cfg.depths), hidden_sizes=list(cfg.dims), hidden_act='gelu',
      layer_norm_eps=convnext.LN_EPS, drop_path_rate=cfg.drop_path_rate,
      layer_scale_init_value=cfg.layer_scale_init if cfg.layer_scale_init > 0 else 1e-6,
      architectures=['ConvNextModel'], dtype=dtype).to_diff_dict()


def save_hf_convnext(model: convnext.ConvNeXt, directory: str, extra: dict | None = None,
                     extra_config: dict | None = None, dtype: str | None = None) -> int:
  """Writes `model` as a transformers `ConvNextModel` directory: config.json (+ `extra_config`'s
  entries) and model.safetensors (+ the `extra` tensors, keys that are no ConvNeXt parameter, in
  float32). `dtype` ('float32', 'bfloat16', 'float16'; default float32) casts the ConvNeXt weights.
  Refuses a directory that holds weights. Returns the bytes written."""
  config = hf_config(model.config, dtype or 'float32') | (extra_config or {})
  return torch_checkpoints.save_hf_directory(directory, hf_state_dict(model), config, extra, dtype)


def read_checkpoint(path, cfg: convnext.ConvNeXtConfig) -> dict[str, np.ndarray]:
  """The tensors of a local ConvNeXt checkpoint; no setting of ours is missing from its weights."""
  del cfg
  return read_state_dict(path)


def hf_features(cfg: convnext.ConvNeXtConfig) -> str:
  """ConvNextModel's output that our pooled features are: the LayerNorm of the global average pool."""
  del cfg
  return 'pooler_output'


def hf_pooled(cfg: convnext.ConvNeXtConfig, outputs):
  """`hf_features` read off the transformers model's `outputs`."""
  return getattr(outputs, hf_features(cfg))


def build_hf_model(cfg: convnext.ConvNeXtConfig):
  """A randomly initialised transformers `ConvNextModel` of our ConvNeXt's architecture."""
  from transformers import ConvNextConfig, ConvNextModel
  return ConvNextModel(ConvNextConfig.from_dict(hf_config(cfg)))


def map_state_dict(sd: dict) -> tuple[dict[str, tuple[str, np.ndarray]], list[str]]:
  """Maps checkpoint tensors to our dotted parameter paths. Returns (mapped, unexpected keys)."""
  sd = _strip_wrappers(sd)
  return torch_checkpoints.map_state_dict(sd, _LAYOUTS[detect_layout(sd)], _NOT_BACKBONE)


def load_convnext_weights(model: convnext.ConvNeXt, source) -> list[str]:
  """Copies a HF or timm ConvNeXt checkpoint (path or {name: array}) into `model`, in place; returns
  the keys its settings leave out (none: a ConvNeXt takes every backbone key)."""
  sd = read_state_dict(source) if isinstance(source, (str, os.PathLike)) else dict(source)
  where = source if isinstance(source, (str, os.PathLike)) else '(a state dict)'
  sd = {k: torch_checkpoints.to_numpy(v) for k, v in sd.items()}
  mapped, unexpected = map_state_dict(sd)
  ours = variant_name(model.config.depths, model.config.dims)
  theirs = lambda: variant_name(*infer_architecture(sd))
  torch_checkpoints.copy_into(
      model, mapped, unexpected,
      misfit=lambda missing, unexpected: (
          f'ConvNeXt checkpoint {where} does not fit the model ({ours}): checkpoint looks like '
          f'{theirs()}; missing parameters: {torch_checkpoints.listed(missing)}; unexpected keys: '
          f'{torch_checkpoints.listed(unexpected)}. Set the model variant (or depths/dims) to the '
          f'checkpoint\'s architecture.'),
      bad_shape=lambda key, name, shape, expected: (
          f'ConvNeXt checkpoint {where}: {key!r} has shape {shape} (as {name}) but the model expects '
          f'{expected}; the checkpoint looks like {theirs()} while the model is {ours}. Set the model '
          f'variant to match the checkpoint.'))
  return []
