"""Import ViT weights from Hugging Face, timm, SigLIP and CLIP checkpoints into `vit.ViT`, and export
ours as the transformers model directory it is (`ViTModel`, `SiglipVisionModel`, `CLIPVisionModel`).

    load_vit_weights(model, 'path/to/dir_or_file')   # or a {name: array} state dict

The layouts are detected from the key names:
  Hugging Face  embeddings.{cls_token, position_embeddings, patch_embeddings.projection},
                encoder.layer.i.{layernorm_before, attention.attention.{query, key, value},
                attention.output.dense, layernorm_after, intermediate.dense, output.dense}, layernorm
                (`ViTForImageClassification` adds the prefix `vit.` and `classifier`): the names
                of the files; transformers >= 5 names its modules layers.i.{layernorm_before,
                attention.{q,k,v,o}_proj, layernorm_after, mlp.fc1, mlp.fc2}, which a state dict
                taken from the model in memory has
  timm          cls_token, pos_embed, patch_embed.proj, blocks.i.{norm1, attn.qkv (q, k and v
                stacked), attn.proj, norm2, mlp.fc1, mlp.fc2}, norm (and the classifier head); DINOv2's
                (timm's and facebookresearch/dinov2's) add blocks.i.ls1.gamma, ls2.gamma and the
                registers (reg_token / register_tokens): a model with layer_scale and registers;
                DINOv2 giant's SwiGLU MLP is the original's mlp.{w12 (gate and up stacked), w3} and
                timm's mlp.{fc1 (stacked: twice fc2's input wide), fc2}: a model with swiglu=True
  DINOv2        (`Dinov2Model`, `Dinov2WithRegistersModel`) embeddings.{cls_token, register_tokens,
                position_embeddings, patch_embeddings.projection}, encoder.layer.i.{norm1,
                attention.attention.{query, key, value} (in memory: attention.{q,k,v,o}_proj),
                attention.output.dense, layer_scale1.lambda1, norm2, mlp.fc1, mlp.fc2 (giant's
                SwiGLU: mlp.weights_in (gate and up stacked), mlp.weights_out; in memory
                mlp.{gate,up,down}_proj), layer_scale2.lambda1}, layernorm: a model with
                layer_scale > 0, `registers` the checkpoint's, pos_antialias=True with registers
                (their position grid is resized antialiased) and swiglu=True for the SwiGLU MLP;
                config.json is checked against those
  SigLIP        (`SiglipVisionModel`, or a `SiglipModel` under `vision_model.`, its text tower ignored)
                embeddings.{patch_embedding, position_embedding (no class token)},
                encoder.layers.i.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1,
                mlp.fc2}, post_layernorm, head.{probe, attention.in_proj (q, k, v stacked),
                attention.out_proj, layernorm, mlp.fc1, mlp.fc2}: a model with class_token=False,
                pool='map' and gelu='tanh' (pool='gap' leaves the head out); a directory's config.json
                is checked against those
  CLIP          (`CLIPVisionModel`, `CLIPVisionModelWithProjection`, or a `CLIPModel` such as
                openai/clip-vit-base-patch16, its text tower ignored) embeddings.{class_embedding,
                patch_embedding (no bias), position_embedding}, pre_layrnorm, the blocks as SigLIP's,
                post_layernorm, visual_projection: a model with pre_norm=True, patch_bias=False,
                ln_eps=1e-5, gelu='quick' (OpenAI's weights; config.json's hidden_act says) and
                proj_dim the projection's size (0: the projection is left out, as transformers'
                CLIPVisionModel leaves it)
  open_clip     (OpenAI's CLIP and open_clip state dicts, e.g. open_clip_model.safetensors)
                visual.{class_embedding, positional_embedding, conv1, ln_pre, transformer.resblocks.i.
                {ln_1, attn.in_proj (q, k, v stacked), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj},
                ln_post, proj}, the text tower ignored; the same model settings, with gelu='quick'
                only for OpenAI's weights and `-quickgelu` models (a directory's
                open_clip_config.json says)
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
                           r'head\.(weight|bias)|logit_scale|logit_bias|(embeddings\.)?mask_token|embeddings\.position_ids|'
                           r'text_projection(\.weight)?)$')
# Keys of a vision tower that lie outside its wrapper (a CLIPModel's projection beside `vision_model.`).
_OUTSIDE_WRAPPER = re.compile(rf'{_NOT_BACKBONE.pattern}|^visual_projection\.weight$')

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
_TOWER_RULES = [  # what SigLIP's and CLIP's vision towers name alike
    (r'embeddings\.position_embedding\.weight', 'pos_embed', 'unbatched'),
    (r'embeddings\.patch_embedding\.(weight|bias)', 'patch_embed.{0}', 'conv'),
    (r'encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)', 'blocks.{0}.norm1.{1}', 'norm'),
    (r'encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)', 'blocks.{0}.attn.{1}.{2}', 'dense'),
    (r'encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)', 'blocks.{0}.norm2.{1}', 'norm'),
    (r'encoder\.layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)', 'blocks.{0}.fc{1}.{2}', 'dense'),
    (r'post_layernorm\.(weight|bias)', 'norm.{0}', 'norm'),
]
_SIGLIP_RULES = [
    *_TOWER_RULES,
    (r'head\.probe', 'head.probe', 'copy'),
    (r'head\.attention\.in_proj_(weight|bias)', 'head.attn.{{}}.{0}', 'qkv'),
    (r'head\.attention\.out_proj\.(weight|bias)', 'head.attn.out.{0}', 'dense'),
    (r'head\.layernorm\.(weight|bias)', 'head.norm.{0}', 'norm'),
    (r'head\.mlp\.fc([12])\.(weight|bias)', 'head.fc{0}.{1}', 'dense'),
]
# CLIP's (`CLIPVisionModel`; `vision_model.` in a CLIPModel, its projection beside it): a class token
# as a (width,) vector, a LayerNorm before the blocks, no patch bias, a bias-free projection.
_CLIP_RULES = [
    (r'embeddings\.class_embedding', 'cls_token', 'token'),
    (r'pre_layrnorm\.(weight|bias)', 'norm_pre.{0}', 'norm'),
    *_TOWER_RULES,
    (r'visual_projection\.(weight)', 'proj.{0}', 'dense'),
]
# OpenAI's CLIP and open_clip (`visual.` of the whole model; its projection is (width, out) already).
_OPEN_CLIP_RULES = [
    (r'class_embedding', 'cls_token', 'token'),
    (r'positional_embedding', 'pos_embed', 'unbatched'),
    (r'conv1\.(weight)', 'patch_embed.{0}', 'conv'),
    (r'ln_pre\.(weight|bias)', 'norm_pre.{0}', 'norm'),
    (r'transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)', 'blocks.{0}.norm1.{1}', 'norm'),
    (r'transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)', 'blocks.{0}.attn.{{}}.{1}', 'qkv'),
    (r'transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)', 'blocks.{0}.attn.out.{1}', 'dense'),
    (r'transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)', 'blocks.{0}.norm2.{1}', 'norm'),
    (r'transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)', 'blocks.{0}.fc1.{1}', 'dense'),
    (r'transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)', 'blocks.{0}.fc2.{1}', 'dense'),
    (r'ln_post\.(weight|bias)', 'norm.{0}', 'norm'),
    (r'proj', 'proj.kernel', 'copy'),
]
# DINOv2's (`Dinov2Model`, `Dinov2WithRegistersModel`): ViTModel's embeddings (+ registers), its own
# block names and layer scales; the attention's file names, and transformers 5's module names. Its
# MLP is GELU's fc1/fc2 or giant's SwiGLU (files: gate and up stacked in weights_in; in memory apart).
_DINOV2_COMMON_RULES = [
    *_HF_RULES[:3],
    (r'embeddings\.register_tokens', 'reg_tokens', 'copy'),
    (r'encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)', 'blocks.{0}.norm{1}.{2}', 'norm'),
    _HF_RULES[4], _HF_RULES[5],
    (r'encoder\.layer\.(\d+)\.attention\.(q|k|v|o)_proj\.(weight|bias)', 'blocks.{0}.attn.{1}.{2}', 'dense'),
    (r'encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1', 'blocks.{0}.ls{1}', 'copy'),
    _HF_RULES[-1],
]
_DINOV2_GELU_RULES = [
    (r'encoder\.layer\.(\d+)\.mlp\.fc([12])\.(weight|bias)', 'blocks.{0}.fc{1}.{2}', 'dense'),
]
_DINOV2_SWIGLU_RULES = [
    (r'encoder\.layer\.(\d+)\.mlp\.weights_in\.(weight|bias)', 'blocks.{0}.fc1.{{}}.{1}', 'glu'),
    (r'encoder\.layer\.(\d+)\.mlp\.weights_out\.(weight|bias)', 'blocks.{0}.fc2.{1}', 'dense'),
    (r'encoder\.layer\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)', 'blocks.{0}.fc1.{1}.{2}', 'dense'),
    (r'encoder\.layer\.(\d+)\.mlp\.down_proj\.(weight|bias)', 'blocks.{0}.fc2.{1}', 'dense'),
]
_DINOV2_RULES = _DINOV2_COMMON_RULES + _DINOV2_GELU_RULES + _DINOV2_SWIGLU_RULES
_TIMM_RULES = [
    (r'cls_token', 'cls_token', 'copy'),
    (r'pos_embed', 'pos_embed', 'copy'),
    (r'reg_token|register_tokens', 'reg_tokens', 'copy'),  # DINOv2's registers (timm's, the original's)
    (r'blocks\.(\d+)\.ls([12])\.gamma', 'blocks.{0}.ls{1}', 'copy'),  # DINOv2's layer scales
    (r'patch_embed\.proj\.(weight|bias)', 'patch_embed.{0}', 'conv'),
    (r'blocks\.(\d+)\.norm1\.(weight|bias)', 'blocks.{0}.norm1.{1}', 'norm'),
    (r'blocks\.(\d+)\.attn\.qkv\.(weight|bias)', 'blocks.{0}.attn.{{}}.{1}', 'qkv'),
    (r'blocks\.(\d+)\.attn\.proj\.(weight|bias)', 'blocks.{0}.attn.out.{1}', 'dense'),
    (r'blocks\.(\d+)\.norm2\.(weight|bias)', 'blocks.{0}.norm2.{1}', 'norm'),
    (r'blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)', 'blocks.{0}.fc{1}.{2}', 'dense'),
    (r'blocks\.(\d+)\.mlp\.w12\.(weight|bias)', 'blocks.{0}.fc1.{{}}.{1}', 'glu'),  # DINOv2 giant's SwiGLU
    (r'blocks\.(\d+)\.mlp\.w3\.(weight|bias)', 'blocks.{0}.fc2.{1}', 'dense'),
    (r'norm\.(weight|bias)', 'norm.{0}', 'norm'),
]
_LAYOUTS = {'huggingface': _HF_RULES, 'huggingface_modules': _HF_MODULE_RULES, 'timm': _TIMM_RULES,
            'siglip': _SIGLIP_RULES, 'clip': _CLIP_RULES, 'open_clip': _OPEN_CLIP_RULES, 'dinov2': _DINOV2_RULES}
_CLIP_LAYOUTS = ('clip', 'open_clip')
_PROJECTION_KEYS = {'clip': 'visual_projection.weight', 'open_clip': 'proj'}


def _strip_wrappers(sd: dict) -> dict:
  sd = torch_checkpoints.strip_wrappers(sd, _WRAPPER_PREFIXES, _OUTSIDE_WRAPPER)
  if 'visual.conv1.weight' in sd:  # a whole OpenAI / open_clip CLIP: its image tower
    sd = {k[len('visual.'):]: v for k, v in sd.items() if k.startswith('visual.')}
  return _timm_swiglu_names(sd)


def _timm_swiglu_names(sd: dict) -> dict:
  """timm's DINOv2 giant keeps its SwiGLU in mlp.fc1 (gate and up stacked: twice fc2's input wide)
  and mlp.fc2; named as the original's w12 and w3, one rule reads both."""
  fc1, fc2 = sd.get('blocks.0.mlp.fc1.weight'), sd.get('blocks.0.mlp.fc2.weight')
  if fc1 is None or fc2 is None or np.ndim(fc1) != 2 or np.shape(fc1)[0] != 2 * np.shape(fc2)[1] or not np.size(fc1):
    return sd
  names = {'fc1': 'w12', 'fc2': 'w3'}
  return {re.sub(r'^(blocks\.\d+\.mlp\.)(fc[12])\.', lambda m: m.group(1) + names[m.group(2)] + '.', k): v
          for k, v in sd.items()}


def detect_layout(keys) -> str:
  keys = list(keys)
  if any(k.startswith('embeddings.patch_embeddings') for k in keys):
    if any('.layer_scale1.' in k for k in keys):
      return 'dinov2'
    return 'huggingface_modules' if any(k.startswith('layers.') for k in keys) else 'huggingface'
  if any(k.startswith('patch_embed.proj') for k in keys):
    return 'timm'
  if any(k.startswith('embeddings.patch_embedding.') for k in keys):
    return 'clip' if 'embeddings.class_embedding' in keys else 'siglip'
  if 'conv1.weight' in keys and any(k.startswith('transformer.resblocks.') for k in keys):
    return 'open_clip'
  raise GleamError(f'Checkpoint is neither a Hugging Face ViT, SigLIP or CLIP vision tower nor a timm or '
                   f'open_clip ViT (first keys: {keys[:5]}); expected "embeddings.patch_embeddings.*", '
                   f'"vision_model.embeddings.patch_embedding.*", "patch_embed.proj.*" or '
                   f'"visual.conv1.weight".')


def infer_architecture(sd: dict) -> str:
  """A description of a checkpoint's ViT (width, depth, MLP, patch size, grid, projection), read off
  the shapes of the parameters its keys map onto (`map_state_dict`, our layouts)."""
  shapes = {name: np.shape(value) for name, (_, value) in map_state_dict(sd)[0].items()}
  patch, _, _, width = shapes.get('patch_embed.kernel', ('?',) * 4)
  depth = 1 + max((int(m.group(1)) for name in shapes for m in [re.match(r'blocks\.(\d+)\.', name)] if m),
                  default=-1)
  swiglu = 'blocks.0.fc1.gate.kernel' in shapes
  mlp = shapes.get('blocks.0.fc1.gate.kernel' if swiglu else 'blocks.0.fc1.kernel', (None, '?'))[1]
  positions = shapes['pos_embed'][1] - ('cls_token' in shapes) if 'pos_embed' in shapes else None
  grid = int(round(np.sqrt(positions))) if positions else '?'
  projected = f', projection to {shapes["proj.kernel"][1]}' if 'proj.kernel' in shapes else ''
  return (f'width {width}, depth {depth}, {"SwiGLU " if swiglu else ""}MLP {mlp}, patch {patch}, '
          f'position grid {grid}x{grid}{projected}')


def describe(cfg: vit.ViTConfig) -> str:
  return (f'width {cfg.width}, depth {cfg.depth}, {"SwiGLU " if cfg.swiglu else ""}MLP {cfg.mlp_dim}, '
          f'patch {cfg.patch_size}, '
          f'position grid {cfg.grid}x{cfg.grid}' + (f', projection to {cfg.proj_dim}' if cfg.proj_dim else ''))


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
  grid = vit.resize_grid(jnp.asarray(value[0, extra:].reshape(g, g, -1), jnp.float32), cfg.grid, cfg.grid,
                         cfg.pos_antialias, cfg.pos_offset)
  return np.concatenate([value[:, :extra], np.asarray(grid).reshape(1, cfg.grid ** 2, -1)], axis=1)


def _check_hf_config(path, cfg: vit.ViTConfig):
  """A Hugging Face directory's config.json must agree with the model on what no weight shows."""
  config_file = os.path.join(path, 'config.json') if os.path.isdir(path) else None
  if not config_file or not os.path.exists(config_file):
    return
  with open(config_file) as f:
    hf = json.load(f)
  if hf.get('model_type') in ('siglip', 'clip'):  # a SiglipModel / CLIPModel: its vision tower's settings
    hf = dict(hf.get('vision_config') or {}, model_type=f"{hf['model_type']}_vision_model")
  siglip = hf.get('model_type') == 'siglip_vision_model'
  clip = hf.get('model_type') == 'clip_vision_model'
  if hf.get('model_type') not in ('vit', 'siglip_vision_model', 'clip_vision_model', 'dinov2',
                                  'dinov2_with_registers', None):
    return
  antialias = hf.get('model_type') == 'dinov2_with_registers'  # its position grid is resized antialiased
  if hf.get('model_type', '').startswith('dinov2') and antialias != cfg.pos_antialias:
    raise GleamError(f"ViT checkpoint {path} is a {hf['model_type']}, which resizes its position grid "
                     f"{'with' if antialias else 'without'} antialiasing; set "
                     f'model.vit.pos_antialias={antialias}.')
  _check_eps(path, 'config.json', 'layer_norm_eps', hf.get('layer_norm_eps', 1e-6 if siglip else 1e-5 if clip else None),
             cfg)
  act = hf.get('hidden_act', 'gelu_pytorch_tanh' if siglip else 'quick_gelu' if clip else 'gelu')
  gelu = _GELUS.get(act)
  if gelu is None:
    raise GleamError(f'ViT checkpoint {path}: hidden_act={act!r}; our ViT computes "gelu" (exact), '
                     f'"gelu_pytorch_tanh" (model.vit.gelu=tanh) or "quick_gelu" (model.vit.gelu=quick).')
  _check_gelu(path, f'hidden_act={act!r}', gelu, cfg)
  head = hf.get('vision_use_head', True)  # SigLIP pooled by its attention head, else by the patch tokens
  if siglip and cfg.class_token:
    pool = 'map' if head else 'gap'
    raise GleamError(f'ViT checkpoint {path} is a SigLIP vision tower (no class token, pooled by its '
                     f"{'attention head' if pool == 'map' else 'patch tokens'}); set "
                     f'model.vit.class_token=False and model.vit.pool={pool}.')


_GELUS = {'gelu': 'exact', 'gelu_pytorch_tanh': 'tanh', 'quick_gelu': 'quick'}


def _check_eps(path, file, field, eps, cfg: vit.ViTConfig):
  if eps is not None and not np.isclose(eps, cfg.ln_eps, rtol=1e-3, atol=0):
    raise GleamError(f'ViT checkpoint {path}: its {file} has {field}={eps} but the model uses '
                     f'{cfg.ln_eps}; set model.vit.ln_eps={eps}.')


def _check_gelu(path, setting, gelu, cfg: vit.ViTConfig):
  if gelu != cfg.gelu:
    raise GleamError(f'ViT checkpoint {path}: {setting} but the model computes gelu={cfg.gelu!r}; '
                     f'set model.vit.gelu={gelu}.')


def _check_open_clip_config(path, cfg: vit.ViTConfig):
  """An open_clip directory's open_clip_config.json must agree with the model on the GELU (OpenAI's
  weights and `-quickgelu` models use quick_gelu), the LayerNorm epsilon and the pooling."""
  config_file = os.path.join(path, 'open_clip_config.json') if os.path.isdir(path) else None
  if not config_file or not os.path.exists(config_file):
    return
  with open(config_file) as f:
    model_cfg = json.load(f).get('model_cfg') or {}
  vision = model_cfg.get('vision_cfg') or {}
  quick = bool(model_cfg.get('quick_gelu', False))
  _check_gelu(path, f'open_clip_config.json has quick_gelu={str(quick).lower()}', 'quick' if quick else 'exact', cfg)
  _check_eps(path, 'open_clip_config.json', 'vision_cfg.norm_kwargs.eps',
             (vision.get('norm_kwargs') or {}).get('eps', 1e-5), cfg)
  unsupported = {k: vision[k] for k in ('timm_model_name', 'no_ln_pre', 'final_ln_after_pool', 'attentional_pool',
                                        'ls_init_value') if vision.get(k)}
  if unsupported:
    raise GleamError(f'ViT checkpoint {path}: its open_clip_config.json sets {unsupported}, which our ViT does '
                     f'not compute; give a plain open_clip ViT (class token, LayerNorm before the blocks).')
  pool = {'tok': 'cls', 'avg': 'gap'}.get(vision.get('pool_type', 'tok'))
  if pool != cfg.pool:
    raise GleamError(f"ViT checkpoint {path}: open_clip_config.json pools by pool_type="
                     f"{vision.get('pool_type', 'tok')!r} but the model has pool={cfg.pool!r}; set "
                     f'model.vit.pool={pool}.')


def read_checkpoint(path, cfg: vit.ViTConfig) -> dict[str, np.ndarray]:
  """The tensors of a local ViT checkpoint (directory or file), after checking a Hugging Face
  directory's config.json (or open_clip's open_clip_config.json) against `cfg` on what the weights do
  not show (LayerNorm epsilon, GELU, pooling)."""
  _check_hf_config(path, cfg)
  _check_open_clip_config(path, cfg)
  return torch_checkpoints.read_state_dict(path, 'ViT')


def _fit_settings(sd: dict, cfg: vit.ViTConfig, where) -> tuple[dict, list[str]]:
  """(the unwrapped checkpoint tensors the model takes, the keys its settings leave out): a CLIP
  checkpoint's projection is left out of a model without one (proj_dim=0), as transformers'
  CLIPVisionModel leaves it, and a SigLIP tower's attention-pooling head out of a model pooled
  otherwise (pool='gap', as SigLIP's vision_use_head=False); a GleamError naming the settings where
  the checkpoint's kind of tower needs others."""
  layout = detect_layout(sd)
  scaled = any(re.search(r'(layer_scale1\.lambda1|ls1\.gamma)$', k) for k in sd)
  if scaled != bool(cfg.layer_scale):
    raise GleamError(f'ViT checkpoint {where} has {"" if scaled else "no "}layer scales (DINOv2\'s) but the model '
                     f'{"has none" if scaled else "does"}; set model.vit.layer_scale={1.0 if scaled else 0}.')
  registers = next((np.shape(v)[1] for k, v in sd.items() if re.fullmatch(
      r'(embeddings\.register_tokens|reg_token|register_tokens)', k)), 0)
  if registers != cfg.registers:
    raise GleamError(f'ViT checkpoint {where} has {registers} register tokens but the model has {cfg.registers}; '
                     f'set model.vit.registers={registers}.')
  swiglu = any(re.search(r'mlp\.(weights_in|gate_proj|w12)\.weight$', k) for k in sd)
  if swiglu != cfg.swiglu:
    raise GleamError(f'ViT checkpoint {where} has {"a SwiGLU" if swiglu else "a GELU"} MLP but the model '
                     f'{"a GELU" if swiglu else "a SwiGLU"} one; set model.vit.swiglu={swiglu}'
                     f'{" (DINOv2 giant: variant giant2/14)" if swiglu else ""}.')
  if layout not in _CLIP_LAYOUTS and (cfg.pre_norm or not cfg.patch_bias or cfg.proj_dim):
    raise GleamError(f'ViT checkpoint {where} ({layout} layout) has no LayerNorm before the blocks, a patch '
                     f'bias and no projection, but the model is set as a CLIP tower; set '
                     f'model.vit.pre_norm=False, model.vit.patch_bias=True and model.vit.proj_dim=0.')
  if layout == 'siglip':
    head = [k for k in sd if k.startswith('head.')]
    if cfg.pool == 'map' and not head:
      raise GleamError(f"ViT checkpoint {where} is a SigLIP tower without attention-pooling head but the model "
                       f"pools by one (pool='map'); set model.vit.pool=gap.")
    left_out = [] if cfg.pool == 'map' else head
    return {k: v for k, v in sd.items() if k not in left_out}, left_out
  if layout not in _CLIP_LAYOUTS:
    return sd, []
  if not cfg.pre_norm or cfg.patch_bias or not cfg.class_token:
    raise GleamError(f'ViT checkpoint {where} is a CLIP image tower (a class token, a LayerNorm before the '
                     f'blocks, no patch bias); set model.vit.pre_norm=True, model.vit.patch_bias=False and '
                     f'model.vit.class_token=True (and model.vit.ln_eps=1e-5; gelu=quick for OpenAI\'s weights).')
  key = _PROJECTION_KEYS[layout]
  if cfg.proj_dim and key not in sd:
    raise GleamError(f'ViT checkpoint {where} has no projection ({key!r}) but the model projects to '
                     f'{cfg.proj_dim}; set model.vit.proj_dim=0, or give a checkpoint with the projection '
                     f'(a CLIPModel or CLIPVisionModelWithProjection).')
  if cfg.proj_dim or key not in sd:
    return sd, []
  return {k: v for k, v in sd.items() if k != key}, [key]


def load_vit_weights(model: vit.ViT, source) -> list[str]:
  """Copies a ViT checkpoint of any layout above (path or {name: array}) into `model`, in place;
  returns the checkpoint keys the model's settings leave out (a CLIP projection, a SigLIP head)."""
  is_path = isinstance(source, (str, os.PathLike))
  where = source if is_path else '(a state dict)'
  sd = read_checkpoint(source, model.config) if is_path else dict(source)
  sd = {k: torch_checkpoints.to_numpy(v) for k, v in sd.items()}
  fitted, left_out = _fit_settings(_strip_wrappers(sd), model.config, where)
  mapped, unexpected = map_state_dict(fitted)
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
  return left_out


def hf_state_dict(model: vit.ViT) -> dict[str, np.ndarray]:
  """Our ViT's parameters under the file keys of its transformers model (`hf_architecture`), in torch
  layouts, float32."""
  arch = hf_architecture(model.config)
  if arch == 'ViTModel':
    return torch_checkpoints.torch_state_dict(model, _HF_RULES, 'ViT')
  if arch.startswith('Dinov2'):  # fc2 is GELU's mlp.fc2 or the SwiGLU's weights_out
    mlp_rules = _DINOV2_SWIGLU_RULES if model.config.swiglu else _DINOV2_GELU_RULES
    return torch_checkpoints.torch_state_dict(model, _DINOV2_COMMON_RULES + mlp_rules, 'ViT')
  if arch == 'SiglipVisionModel':
    return torch_checkpoints.torch_state_dict(model, _SIGLIP_RULES, 'ViT', rename=_TO_SIGLIP)
  tensors = torch_checkpoints.torch_state_dict(model, _CLIP_RULES, 'ViT', rename=_TO_SIGLIP)
  # the hub's layout (a CLIPModel's), which transformers 4 and 5 read alike
  return {(k if _OUTSIDE_WRAPPER.match(k) else f'vision_model.{k}'): v for k, v in tensors.items()}


def hf_config(cfg: vit.ViTConfig, dtype: str = 'float32') -> dict:
  """config.json of the transformers model our ViT is (`hf_architecture`; `dtype`: the weights')."""
  common = dict(hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                intermediate_size=cfg.mlp_dim, layer_norm_eps=cfg.ln_eps, image_size=cfg.image_size,
                patch_size=cfg.patch_size, num_channels=cfg.in_channels, dtype=dtype)
  arch = hf_architecture(cfg)
  if arch == 'SiglipVisionModel':
    from transformers import SiglipVisionConfig
    return SiglipVisionConfig(**common, hidden_act=_HF_ACTS[cfg.gelu], vision_use_head=cfg.pool == 'map',
                              architectures=[arch]).to_diff_dict()
  if arch.startswith('Dinov2'):
    import transformers
    config_class = transformers.Dinov2WithRegistersConfig if cfg.registers else transformers.Dinov2Config
    common.pop('intermediate_size')
    return config_class(**common, mlp_ratio=_dinov2_mlp_ratio(cfg), use_swiglu_ffn=cfg.swiglu,
                        layerscale_value=cfg.layer_scale,
                        hidden_act='gelu', drop_path_rate=cfg.drop_path_rate, architectures=[arch],
                        **({'num_register_tokens': cfg.registers} if cfg.registers else {})).to_diff_dict()
  if arch.startswith('CLIP'):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(**common, hidden_act=_HF_ACTS[cfg.gelu], architectures=[arch],
                            **({'projection_dim': cfg.proj_dim} if cfg.proj_dim else {})).to_diff_dict()
  from transformers import ViTConfig as HFViTConfig
  return HFViTConfig(**common, hidden_act='gelu', qkv_bias=True, drop_path_rate=cfg.drop_path_rate,
                     architectures=[arch]).to_diff_dict()


_HF_ACTS = {v: k for k, v in _GELUS.items()}


def _dinov2_mlp_ratio(cfg: vit.ViTConfig) -> int | None:
  """transformers' Dinov2Config.mlp_ratio (a whole number) that gives our MLP's width: width * ratio,
  or for the SwiGLU two thirds of it rounded up to a multiple of 8; None when no ratio does."""
  def mlp_width(ratio):
    hidden = int(cfg.width * ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if cfg.swiglu else hidden
  return next((r for r in range(1, 4 * cfg.mlp_dim // cfg.width + 2) if mlp_width(r) == cfg.mlp_dim), None)


def _clip_like(cfg: vit.ViTConfig) -> bool:
  return cfg.pre_norm or not cfg.patch_bias or bool(cfg.proj_dim)


def hf_architecture(cfg: vit.ViTConfig) -> str:
  """'ViTModel' (a class token, pooled by it or the mean patch token, the exact GELU),
  'SiglipVisionModel' (no class token: the mean patch token or the MAP head), 'CLIPVisionModel' (a
  class token, a LayerNorm before the blocks, no patch bias, pooled by the class token),
  'CLIPVisionModelWithProjection' (that with `proj_dim`), 'Dinov2Model' (ViTModel's with layer scales)
  or 'Dinov2WithRegistersModel' (with registers, its position grid resized antialiased); a GleamError
  for a ViT that is none."""
  dinov2 = cfg.layer_scale > 0 or cfg.registers > 0 or cfg.pos_antialias or cfg.swiglu
  if dinov2:
    if (cfg.layer_scale > 0 and cfg.class_token and cfg.pool != 'map' and cfg.gelu == 'exact'
        and not _clip_like(cfg) and cfg.pos_antialias == bool(cfg.registers) and _dinov2_mlp_ratio(cfg)):
      return 'Dinov2WithRegistersModel' if cfg.registers else 'Dinov2Model'
  elif _clip_like(cfg):
    if cfg.class_token and cfg.pre_norm and not cfg.patch_bias and cfg.pool == 'cls':
      return 'CLIPVisionModelWithProjection' if cfg.proj_dim else 'CLIPVisionModel'
  elif cfg.class_token and cfg.pool != 'map' and cfg.gelu == 'exact':
    return 'ViTModel'
  elif not cfg.class_token:
    return 'SiglipVisionModel'
  raise GleamError(
      f'A ViT with class_token={cfg.class_token}, pool={cfg.pool!r}, gelu={cfg.gelu!r}, pre_norm={cfg.pre_norm}, '
      f'patch_bias={cfg.patch_bias}, proj_dim={cfg.proj_dim}, layer_scale={cfg.layer_scale}, '
      f'registers={cfg.registers}, pos_antialias={cfg.pos_antialias}, swiglu={cfg.swiglu} is none of transformers\' ViTModel (a class '
      f"token pooled by 'cls' or 'gap', exact GELU), SiglipVisionModel (no class token), "
      f"CLIPVisionModel[WithProjection] (a class token pooled by 'cls', pre_norm=True, patch_bias=False) or "
      f"Dinov2[WithRegisters]Model (ViTModel's with layer_scale > 0, an MLP width a whole mlp_ratio gives; "
      f"pos_antialias=True exactly with registers), "
      f"so it cannot be exported or benchmarked against transformers; its parameters are in the job's checkpoints.")


def hf_features(cfg: vit.ViTConfig) -> str:
  """Which output of the transformers model (`hf_architecture`) our ViT's pooled features are."""
  arch = hf_architecture(cfg)
  if arch == 'CLIPVisionModelWithProjection':
    return 'image_embeds'
  if cfg.pool == 'map' or arch == 'CLIPVisionModel':  # CLIP's last_hidden_state is not normed; its pooler is
    return 'pooler_output'
  if cfg.pool == 'cls':
    return 'last_hidden_state[:, 0]'
  return f'last_hidden_state[:, {cfg.class_token + cfg.registers}:].mean(1)'


def hf_pooled(cfg: vit.ViTConfig, outputs):
  """`hf_features` read off the transformers model's `outputs`."""
  name = hf_features(cfg)
  if not name.startswith('last_hidden_state'):
    return getattr(outputs, name)
  tokens = outputs.last_hidden_state
  return tokens[:, 0] if cfg.pool == 'cls' else tokens[:, cfg.class_token + cfg.registers:].mean(1)


def build_hf_model(cfg: vit.ViTConfig):
  """A randomly initialised transformers model of our ViT's architecture (`hf_architecture`)."""
  import transformers
  arch = hf_architecture(cfg)
  model_class = getattr(transformers, arch)
  config = model_class.config_class.from_dict(hf_config(cfg))
  return model_class(config, add_pooling_layer=False) if arch == 'ViTModel' else model_class(config)


def save_hf_vit(model: vit.ViT, directory: str, extra: dict | None = None,
                extra_config: dict | None = None, dtype: str | None = None) -> int:
  """Writes `model` as the transformers model directory it is (`hf_architecture`: a `ViTModel`, a
  `SiglipVisionModel` for a ViT without class token, a `CLIPVisionModel[WithProjection]` for a CLIP
  tower) (config.json + model.safetensors, with the `extra` tensors in float32 and `extra_config`'s
  entries), as `convnext_params.save_hf_convnext` does for ConvNeXt. A ViTModel has no pooler: load it
  with `ViTModel.from_pretrained(d, add_pooling_layer=False)`. Returns the bytes written."""
  config = hf_config(model.config, dtype or 'float32') | (extra_config or {})
  tensors = hf_state_dict(model)
  if hf_architecture(model.config).startswith('Dinov2'):  # masked-image modelling's token, zeros as transformers inits it
    tensors['embeddings.mask_token'] = np.zeros((1, model.config.width), np.float32)
  return torch_checkpoints.save_hf_directory(directory, tensors, config, extra, dtype)
