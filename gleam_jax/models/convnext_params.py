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
`ConvNextModel` directory (config.json, model.safetensors; `hf_state_dict` gives the tensors).
"""
import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gleam_jax.errors import GleamError, make_dir
from gleam_jax.models import convnext
from gleam_jax.utils.model_dirs import check_export_dir, export_dtype

_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'open_clip_model.safetensors',
                 'open_clip_pytorch_model.bin')
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
  """Tensors of a local checkpoint: a directory (HF `save_pretrained` or timm/hub layout, also
  sharded safetensors) or one .safetensors / .bin / .pth / .pt file."""
  if not os.path.exists(path):
    raise GleamError(f'ConvNeXt weights not found at {path!r}; give a local directory or file '
                     f'with the checkpoint (nothing is downloaded).')
  if os.path.isdir(path):
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
      out = {}
      for name in files:
        out.update(read_state_dict(os.path.join(path, name)))
      return out
    for name in _WEIGHT_FILES:
      if os.path.exists(os.path.join(path, name)):
        return read_state_dict(os.path.join(path, name))
    raise GleamError(f'No weight file in {path!r} (looked for {", ".join(_WEIGHT_FILES)} and '
                     f'model.safetensors.index.json); point to the checkpoint file instead.')
  try:
    if path.endswith('.safetensors'):
      from safetensors.numpy import load_file
      try:
        return dict(load_file(path))
      except TypeError:  # bfloat16 tensors: numpy cannot hold them, go through torch.
        from safetensors.torch import load_file as load_torch
        return {k: _to_numpy(v) for k, v in load_torch(path).items()}
    import torch
    sd = torch.load(path, map_location='cpu', weights_only=True)
  except GleamError:
    raise
  except Exception as e:  # unreadable file: say which and why
    raise GleamError(f'Cannot read ConvNeXt checkpoint {path!r} ({type(e).__name__}: {e}); give '
                     f'a .safetensors or torch state-dict file.') from e
  for wrapper in ('state_dict', 'model', 'state_dict_ema', 'model_ema'):
    if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
      sd = sd[wrapper]
      break
  if not isinstance(sd, dict):
    raise GleamError(f'{path!r} holds a {type(sd).__name__}, not a state dict; save the model\'s '
                     f'state_dict() instead.')
  return {k: _to_numpy(v) for k, v in sd.items()}


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, 'detach'):  # torch tensor
    v = v.detach().cpu()
    if str(v.dtype) == 'torch.bfloat16':
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def _strip_wrappers(sd: dict) -> dict:
  """Drops wrapper prefixes shared by all ConvNeXt keys ('module.', 'model.', 'convnext.' ...)."""
  changed = True
  while changed:
    changed = False
    for p in _WRAPPER_PREFIXES:
      keys = [k for k in sd if not _NOT_BACKBONE.match(k)]
      if keys and all(k.startswith(p) for k in keys):
        sd = {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}
        changed = True
  return sd


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


def _convert(value: np.ndarray, kind: str, param: str | None) -> np.ndarray:
  if param != 'weight' or kind == 'norm':
    return value
  if kind == 'conv':  # torch (out, in/groups, kh, kw) -> (kh, kw, in/groups, out)
    return value.transpose(2, 3, 1, 0)
  if kind == 'dense':  # torch (out, in) -> (in, out)
    return value.T
  raise ValueError(kind)


def _unconvert(value: np.ndarray, kind: str, param: str | None) -> np.ndarray:
  """The inverse of `_convert`: our layout -> torch's."""
  if param != 'weight' or kind == 'norm':
    return value
  if kind == 'conv':  # (kh, kw, in/groups, out) -> torch (out, in/groups, kh, kw)
    return value.transpose(3, 2, 0, 1)
  if kind == 'dense':  # (in, out) -> torch (out, in)
    return value.T
  raise ValueError(kind)


def _hf_key(name: str) -> tuple[str, str, str]:
  """Our dotted parameter path -> (its `ConvNextModel` key, kind, torch parameter name), by the
  rules of `_HF_RULES` read backwards."""
  *parent, leaf = name.split('.')
  param = 'weight' if leaf in ('kernel', 'scale') else leaf
  torch_name = '.'.join([*parent, param])
  for pattern, template, kind in _HF_RULES:
    ours = r'(\w+)'.join(re.escape(part) for part in re.split(r'\{\d\}', template))
    m = re.fullmatch(ours, torch_name)
    if m:
      key = re.sub(r'\([^()]*\)', '{}', pattern).replace('\\.', '.').format(*m.groups())
      return key, kind, param
  raise ValueError(f'no Hugging Face key for ConvNeXt parameter {name}')


def hf_state_dict(model: convnext.ConvNeXt) -> dict[str, np.ndarray]:
  """Our ConvNeXt's parameters under transformers' `ConvNextModel` keys, in torch layouts, float32."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key, kind, param = _hf_key('.'.join(str(p) for p in path))
    value = np.asarray(var.get_value(), np.float32)
    out[key] = np.ascontiguousarray(_unconvert(value, kind, param))
  return out


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
  cast = export_dtype(dtype)
  check_export_dir(directory)
  from safetensors.numpy import save_file
  tensors = hf_state_dict(model)
  if cast is not None:
    tensors = {k: v.astype(cast) for k, v in tensors.items()}
  extra = {k: np.array(v, np.float32, order='C') for k, v in (extra or {}).items()}  # 0-d stays 0-d
  if set(extra) & set(tensors):
    raise ValueError(f'extra tensors overwrite ConvNeXt keys: {sorted(set(extra) & set(tensors))}')
  config = hf_config(model.config, dtype or 'float32') | (extra_config or {})
  make_dir(directory, 'the export directory')
  weights = os.path.join(directory, 'model.safetensors')
  save_file(tensors | extra, weights, metadata={'format': 'pt'})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')
  return os.path.getsize(weights) + os.path.getsize(os.path.join(directory, 'config.json'))


def map_state_dict(sd: dict) -> tuple[dict[str, np.ndarray], list[str]]:
  """Maps checkpoint tensors to our dotted parameter paths. Returns (mapped, unexpected keys)."""
  sd = _strip_wrappers(sd)
  rules = _LAYOUTS[detect_layout(sd)]
  mapped, unexpected = {}, []
  for key, value in sd.items():
    if _NOT_BACKBONE.match(key):
      continue
    for pattern, template, kind in rules:
      m = re.fullmatch(pattern, key)
      if m:
        groups = m.groups()
        target = template.format(*groups)
        param = groups[-1] if groups and groups[-1] in ('weight', 'bias') else None
        value = _convert(np.asarray(value), kind, param)
        if param == 'weight':  # torch 'weight' is a norm's 'scale', a conv/dense's 'kernel'
          target = target[:-len('weight')] + ('scale' if kind == 'norm' else 'kernel')
        mapped[target] = (key, value)
        break
    else:
      unexpected.append(key)
  return mapped, unexpected


def load_convnext_weights(model: convnext.ConvNeXt, source) -> None:
  """Copies a HF or timm ConvNeXt checkpoint (path or {name: array}) into `model`, in place."""
  sd = read_state_dict(source) if isinstance(source, (str, os.PathLike)) else dict(source)
  where = source if isinstance(source, (str, os.PathLike)) else '(a state dict)'
  sd = {k: _to_numpy(v) for k, v in sd.items()}
  mapped, unexpected = map_state_dict(sd)
  params = {'.'.join(str(p) for p in path): var
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  missing = sorted(set(params) - set(mapped))
  unexpected += sorted(mapped[k][0] for k in set(mapped) - set(params))
  cfg = model.config
  ours = variant_name(cfg.depths, cfg.dims)
  if missing or unexpected:
    depths, dims = infer_architecture(sd)
    raise GleamError(
        f'ConvNeXt checkpoint {where} does not fit the model ({ours}): checkpoint looks like '
        f'{variant_name(depths, dims)}; missing parameters: {missing[:20]}'
        f'{" ..." if len(missing) > 20 else ""}; unexpected keys: {unexpected[:20]}'
        f'{" ..." if len(unexpected) > 20 else ""}. Set the model variant (or depths/dims) to '
        f'the checkpoint\'s architecture.')
  for name, var in params.items():
    key, value = mapped[name]
    if tuple(value.shape) != tuple(var.shape):
      depths, dims = infer_architecture(sd)
      raise GleamError(
          f'ConvNeXt checkpoint {where}: {key!r} has shape {tuple(value.shape)} (as {name}) but '
          f'the model expects {tuple(var.shape)}; the checkpoint looks like '
          f'{variant_name(depths, dims)} while the model is {ours}. Set the model variant to '
          f'match the checkpoint.')
  for name, var in params.items():
    var.set_value(jnp.asarray(mapped[name][1], dtype=var.dtype))
