"""Import ViT weights from Hugging Face or timm checkpoints into `vit.ViT`, and export ours as a
transformers `ViTModel` directory.

    load_vit_weights(model, 'path/to/dir_or_file')   # or a {name: array} state dict

Both layouts are detected from the key names:
  Hugging Face  embeddings.{cls_token, position_embeddings, patch_embeddings.projection},
                encoder.layer.i.{layernorm_before, attention.attention.{query, key, value},
                attention.output.dense, layernorm_after, intermediate.dense, output.dense}, layernorm
                (`ViTForImageClassification` adds the prefix `vit.` and `classifier`): the names
                of the files; transformers >= 5 names its modules layers.i.{layernorm_before,
                attention.{q,k,v,o}_proj, layernorm_after, mlp.fc1, mlp.fc2}, which a state dict
                taken from the model in memory has
  timm          cls_token, pos_embed, patch_embed.proj, blocks.i.{norm1, attn.qkv (q, k and v
                stacked), attn.proj, norm2, mlp.fc1, mlp.fc2}, norm (and the classifier head)
  SigLIP        (`SiglipVisionModel`, or a `SiglipModel` under `vision_model.`, its text tower ignored)
                embeddings.{patch_embedding, position_embedding (no class token)},
                encoder.layers.i.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1,
                mlp.fc2}, post_layernorm, head.{probe, attention.in_proj (q, k, v stacked),
                attention.out_proj, layernorm, mlp.fc1, mlp.fc2}: a model with class_token=False,
                pool='map' and gelu='tanh'; a directory's config.json is checked against those
A wrapper prefix (`module.`, `model.`, `vit.`, `backbone.`, `vision_model.`) is stripped; a pooler, a classifier, a
mask token and the `gleam_c.*` head of an exported GLEAM-C tower are ignored. A checkpoint whose
position embeddings were learned on another grid (a 224-px checkpoint for a 384-px model) has them
resized to the model's grid by the bicubic resize the model itself uses for other input sizes.
Every other key must map onto a parameter and every parameter must be given, or a GleamError
lists the keys and the fix.
"""
import json
import os
import re

import jax.numpy as jnp
import numpy as np

from gleam_jax.errors import GleamError
from gleam_jax.models import torch_checkpoints, vit

_WRAPPER_PREFIXES = ('module.', 'model.', 'vit.', 'backbone.', 'vision_model.')
_NOT_BACKBONE = re.compile(r'^((classifier|head_drop|pooler|gleam_c|text_model)\..*|'
                           r'head\.(weight|bias)|logit_scale|logit_bias|embeddings\.mask_token)$')

# (source regex, our dotted path template, kind)
_HF_RULES = [
    (r'embeddings\.cls_token', 'cls_token', 'copy'),
    (r'embeddings\.position_embeddings', 'pos_embed', 'copy'),
    (r'embeddings\.patch_embeddings\.projection\.(weight|bias)', 'patch_embed.{0}', 'conv'),
    (r'encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)', 'blocks.{0}.norm1.{1}', 'norm'),
    (r'encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)',
     'blocks.{0}.attn.{1}.{2}', 'dense'),
    (r'encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)', 'blocks.{0}.attn.out.{1}', 'dense'),
    (r'encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)', 'blocks.{0}.norm2.{1}', 'norm'),
    (r'encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)', 'blocks.{0}.fc1.{1}', 'dense'),
    (r'encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)', 'blocks.{0}.fc2.{1}', 'dense'),
    (r'layernorm\.(weight|bias)', 'norm.{0}', 'norm'),
]
# transformers >= 5 names its modules so in memory (`model.state_dict()`); its files keep the names above.
_HF_MODULE_RULES = [
    *_HF_RULES[:3],
    (r'layers\.(\d+)\.layernorm_before\.(weight|bias)', 'blocks.{0}.norm1.{1}', 'norm'),
    (r'layers\.(\d+)\.attention\.(q|k|v|o)_proj\.(weight|bias)', 'blocks.{0}.attn.{1}.{2}', 'dense'),
    (r'layers\.(\d+)\.layernorm_after\.(weight|bias)', 'blocks.{0}.norm2.{1}', 'norm'),
    (r'layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)', 'blocks.{0}.fc{1}.{2}', 'dense'),
    _HF_RULES[-1],
]
_PROJECTIONS = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}
_TO_SIGLIP = {'query': 'q', 'key': 'k', 'value': 'v'}  # SigLIP's out_proj keeps 'out'
# SigLIP's vision tower (`SiglipVisionModel`; in a `SiglipModel` file under `vision_model.`): no class
# token, position embeddings as an (N, width) table, the tanh GELU and a MAP pooling head.
_SIGLIP_RULES = [
    (r'embeddings\.position_embedding\.weight', 'pos_embed', 'unbatched'),
    (r'embeddings\.patch_embedding\.(weight|bias)', 'patch_embed.{0}', 'conv'),
    (r'encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)', 'blocks.{0}.norm1.{1}', 'norm'),
    (r'encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)', 'blocks.{0}.attn.{1}.{2}', 'dense'),
    (r'encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)', 'blocks.{0}.norm2.{1}', 'norm'),
    (r'encoder\.layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)', 'blocks.{0}.fc{1}.{2}', 'dense'),
    (r'post_layernorm\.(weight|bias)', 'norm.{0}', 'norm'),
    (r'head\.probe', 'head.probe', 'copy'),
    (r'head\.attention\.in_proj_(weight|bias)', 'head.attn.{{}}.{0}', 'qkv'),
    (r'head\.attention\.out_proj\.(weight|bias)', 'head.attn.out.{0}', 'dense'),
    (r'head\.layernorm\.(weight|bias)', 'head.norm.{0}', 'norm'),
    (r'head\.mlp\.fc([12])\.(weight|bias)', 'head.fc{0}.{1}', 'dense'),
]
_TIMM_RULES = [
    (r'cls_token', 'cls_token', 'copy'),
    (r'pos_embed', 'pos_embed', 'copy'),
    (r'patch_embed\.proj\.(weight|bias)', 'patch_embed.{0}', 'conv'),
    (r'blocks\.(\d+)\.norm1\.(weight|bias)', 'blocks.{0}.norm1.{1}', 'norm'),
    (r'blocks\.(\d+)\.attn\.qkv\.(weight|bias)', 'blocks.{0}.attn.{{}}.{1}', 'qkv'),
    (r'blocks\.(\d+)\.attn\.proj\.(weight|bias)', 'blocks.{0}.attn.out.{1}', 'dense'),
    (r'blocks\.(\d+)\.norm2\.(weight|bias)', 'blocks.{0}.norm2.{1}', 'norm'),
    (r'blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)', 'blocks.{0}.fc{1}.{2}', 'dense'),
    (r'norm\.(weight|bias)', 'norm.{0}', 'norm'),
]
_LAYOUTS = {'huggingface': _HF_RULES, 'huggingface_modules': _HF_MODULE_RULES, 'timm': _TIMM_RULES,
            'siglip': _SIGLIP_RULES}


def _strip_wrappers(sd: dict) -> dict:
  return torch_checkpoints.strip_wrappers(sd, _WRAPPER_PREFIXES, _NOT_BACKBONE)


def detect_layout(keys) -> str:
  keys = list(keys)
  if any(k.startswith('embeddings.patch_embeddings') for k in keys):
    return 'huggingface_modules' if any(k.startswith('layers.') for k in keys) else 'huggingface'
  if any(k.startswith('patch_embed.proj') for k in keys):
    return 'timm'
  if any(k.startswith('embeddings.patch_embedding.') for k in keys):
    return 'siglip'
  raise GleamError(f'Checkpoint is neither a Hugging Face ViT or SigLIP vision tower nor a timm ViT (first '
                   f'keys: {keys[:5]}); expected "embeddings.patch_embeddings.*", '
                   f'"vision_model.embeddings.patch_embedding.*" or "patch_embed.proj.*".')


def infer_architecture(sd: dict) -> str:
  """A description of a checkpoint's ViT (width, depth, patch size, grid) from its keys and shapes."""
  sd = _strip_wrappers(sd)
  layout = detect_layout(sd)
  patch_key = {'timm': 'patch_embed.proj.weight', 'siglip': 'embeddings.patch_embedding.weight'}.get(
      layout, 'embeddings.patch_embeddings.projection.weight')
  block = {'huggingface': r'encoder\.layer\.(\d+)\.', 'huggingface_modules': r'layers\.(\d+)\.',
           'timm': r'blocks\.(\d+)\.', 'siglip': r'encoder\.layers\.(\d+)\.'}[layout]
  depth = 1 + max((int(m.group(1)) for k in sd for m in [re.match(block, k)] if m), default=-1)
  width, _, patch, _ = np.shape(sd[patch_key])
  pos = sd.get({'timm': 'pos_embed', 'siglip': 'embeddings.position_embedding.weight'}.get(
      layout, 'embeddings.position_embeddings'))
  positions = np.shape(pos)[-2] - (layout != 'siglip') if pos is not None else None
  grid = int(round(np.sqrt(positions))) if positions else '?'
  fc1 = [np.shape(v)[0] for k, v in sd.items() if re.search(r'(intermediate\.dense|fc1)\.weight$', k)]
  return f'width {width}, depth {depth}, MLP {fc1[0] if fc1 else "?"}, patch {patch}, position grid {grid}x{grid}'


def describe(cfg: vit.ViTConfig) -> str:
  return (f'width {cfg.width}, depth {cfg.depth}, MLP {cfg.mlp_dim}, patch {cfg.patch_size}, '
          f'position grid {cfg.grid}x{cfg.grid}')


def map_state_dict(sd: dict) -> tuple[dict[str, tuple[str, np.ndarray]], list[str]]:
  """Checkpoint tensors -> {our dotted parameter path: (source key, value in our layout)}, and the
  keys that map onto nothing."""
  sd = _strip_wrappers(sd)
  return torch_checkpoints.map_state_dict(sd, _LAYOUTS[detect_layout(sd)], _NOT_BACKBONE, rename=_PROJECTIONS)


def _fit_pos_embed(value: np.ndarray, cfg: vit.ViTConfig) -> np.ndarray:
  """A checkpoint's (1, [1 +] g^2, C) position embeddings (with a class token's where the model has
  one) on the model's grid: resized (bicubic) where g differs."""
  extra = int(cfg.class_token)
  n = value.shape[1] - extra
  g = int(round(np.sqrt(max(n, 0))))
  if value.ndim != 3 or g * g != n or g == cfg.grid:
    return value
  grid = vit.resize_grid(jnp.asarray(value[0, extra:].reshape(g, g, -1), jnp.float32), cfg.grid, cfg.grid)
  return np.concatenate([value[:, :extra], np.asarray(grid).reshape(1, cfg.grid ** 2, -1)], axis=1)


def _check_hf_config(path, cfg: vit.ViTConfig):
  """A Hugging Face directory's config.json must agree with the model on what no weight shows."""
  config_file = os.path.join(path, 'config.json') if os.path.isdir(path) else None
  if not config_file or not os.path.exists(config_file):
    return
  with open(config_file) as f:
    hf = json.load(f)
  if hf.get('model_type') == 'siglip':  # a SiglipModel: its vision tower's settings
    hf = dict(hf.get('vision_config') or {}, model_type='siglip_vision_model')
  siglip = hf.get('model_type') == 'siglip_vision_model'
  if hf.get('model_type') not in ('vit', 'siglip_vision_model', None):
    return
  eps = hf.get('layer_norm_eps', 1e-6 if siglip else None)
  if eps is not None and not np.isclose(eps, cfg.ln_eps, rtol=1e-3, atol=0):
    raise GleamError(f'ViT checkpoint {path}: its config.json has layer_norm_eps={eps} but the model '
                     f'uses {cfg.ln_eps}; set model.vit.ln_eps={eps}.')
  act = hf.get('hidden_act', 'gelu_pytorch_tanh' if siglip else 'gelu')
  gelu = {'gelu': 'exact', 'gelu_pytorch_tanh': 'tanh'}.get(act)
  if gelu is None:
    raise GleamError(f'ViT checkpoint {path}: hidden_act={act!r}; our ViT computes "gelu" (exact) or '
                     f'"gelu_pytorch_tanh" (model.vit.gelu=tanh).')
  if gelu != cfg.gelu:
    raise GleamError(f'ViT checkpoint {path}: hidden_act={act!r} but the model computes gelu={cfg.gelu!r}; '
                     f'set model.vit.gelu={gelu}.')
  head = hf.get('vision_use_head', True)  # SigLIP pooled by its attention head, else by the patch tokens
  if siglip and (cfg.class_token or (head and cfg.pool != 'map')):
    pool = 'map' if head else 'gap'
    raise GleamError(f'ViT checkpoint {path} is a SigLIP vision tower (no class token, pooled by its '
                     f"{'attention head' if pool == 'map' else 'patch tokens'}); set "
                     f'model.vit.class_token=False and model.vit.pool={pool}.')


def read_checkpoint(path, cfg: vit.ViTConfig) -> dict[str, np.ndarray]:
  """The tensors of a local ViT checkpoint (directory or file), after checking a Hugging Face
  directory's config.json against `cfg` on what the weights do not show (LayerNorm epsilon, GELU)."""
  _check_hf_config(path, cfg)
  return torch_checkpoints.read_state_dict(path, 'ViT')


def load_vit_weights(model: vit.ViT, source) -> None:
  """Copies a HF or timm ViT checkpoint (path or {name: array}) into `model`, in place."""
  is_path = isinstance(source, (str, os.PathLike))
  where = source if is_path else '(a state dict)'
  sd = read_checkpoint(source, model.config) if is_path else dict(source)
  sd = {k: torch_checkpoints.to_numpy(v) for k, v in sd.items()}
  mapped, unexpected = map_state_dict(sd)
  if 'pos_embed' in mapped:
    key, value = mapped['pos_embed']
    mapped['pos_embed'] = (key, _fit_pos_embed(value, model.config))
  ours = describe(model.config)
  torch_checkpoints.copy_into(
      model, mapped, unexpected,
      misfit=lambda missing, unexpected: (
          f'ViT checkpoint {where} does not fit the model ({ours}); the checkpoint has '
          f'{infer_architecture(sd)}. Missing parameters: {torch_checkpoints.listed(missing)}; unexpected '
          f'keys: {torch_checkpoints.listed(unexpected)}. Set the model variant (or the custom ViT sizes) '
          f'to the checkpoint\'s architecture.'),
      bad_shape=lambda key, name, shape, expected: (
          f'ViT checkpoint {where}: {key!r} has shape {shape} (as {name}) but the model expects '
          f'{expected}; the checkpoint has {infer_architecture(sd)} while the model has {ours}. Set '
          f'the model variant to match the checkpoint.'))


def hf_state_dict(model: vit.ViT) -> dict[str, np.ndarray]:
  """Our ViT's parameters under transformers' `ViTModel` file keys, in torch layouts, float32."""
  return torch_checkpoints.torch_state_dict(model, _HF_RULES, 'ViT')


def hf_config(cfg: vit.ViTConfig, dtype: str = 'float32') -> dict:
  """config.json of the transformers model our ViT is (`hf_architecture`; `dtype`: the weights')."""
  common = dict(hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                intermediate_size=cfg.mlp_dim, layer_norm_eps=cfg.ln_eps, image_size=cfg.image_size,
                patch_size=cfg.patch_size, num_channels=cfg.in_channels, dtype=dtype)
  if hf_architecture(cfg) == 'SiglipVisionModel':
    from transformers import SiglipVisionConfig
    return SiglipVisionConfig(**common, hidden_act=_HF_ACTS[cfg.gelu], vision_use_head=cfg.pool == 'map',
                              architectures=['SiglipVisionModel']).to_diff_dict()
  from transformers import ViTConfig as HFViTConfig
  return HFViTConfig(**common, hidden_act='gelu', qkv_bias=True, drop_path_rate=cfg.drop_path_rate,
                     architectures=['ViTModel']).to_diff_dict()


_HF_ACTS = {'exact': 'gelu', 'tanh': 'gelu_pytorch_tanh'}


def hf_architecture(cfg: vit.ViTConfig) -> str:
  """'ViTModel' (a class token, pooled by it or the mean patch token, the exact GELU) or
  'SiglipVisionModel' (no class token: the mean patch token or the MAP head); a GleamError for a ViT
  that is neither."""
  if cfg.class_token and cfg.pool != 'map' and cfg.gelu == 'exact':
    return 'ViTModel'
  if not cfg.class_token:
    return 'SiglipVisionModel'
  raise GleamError(f'A ViT with a class token and pool={cfg.pool!r}, gelu={cfg.gelu!r} is neither a transformers '
                   f"ViTModel (pool 'cls' or 'gap', exact GELU) nor a SiglipVisionModel (no class token), so it "
                   f"cannot be exported or benchmarked against transformers; its parameters are in the job's "
                   f"checkpoints.")


def save_hf_vit(model: vit.ViT, directory: str, extra: dict | None = None,
                extra_config: dict | None = None, dtype: str | None = None) -> int:
  """Writes `model` as a transformers `ViTModel` directory (config.json + model.safetensors, with
  the `extra` tensors in float32 and `extra_config`'s entries), as `convnext_params.save_hf_convnext`
  does for ConvNeXt. It has no pooler: load it with `ViTModel.from_pretrained(d, add_pooling_layer=False)`.
  A ViT without class token (a SigLIP tower) is written as a `SiglipVisionModel` directory instead
  (`hf_architecture`). Returns the bytes written."""
  cfg = model.config
  tensors = (hf_state_dict(model) if hf_architecture(cfg) == 'ViTModel' else
             torch_checkpoints.torch_state_dict(model, _SIGLIP_RULES, 'ViT', rename=_TO_SIGLIP))
  config = hf_config(cfg, dtype or 'float32') | (extra_config or {})
  return torch_checkpoints.save_hf_directory(directory, tensors, config, extra, dtype)
