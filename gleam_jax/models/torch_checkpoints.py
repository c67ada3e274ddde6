"""Reading and writing PyTorch-side checkpoints (Hugging Face / timm state dicts) for the vision
backbones' `*_params.py` modules: the files, the wrapper prefixes, key rules applied both ways
(`(source regex, our dotted path template, kind)`), the copy into a model with every key accounted
for, and a transformers model directory written out.

Kinds say how a torch tensor becomes ours: 'conv' (out, in, kh, kw) -> (kh, kw, in, out), 'dense'
(out, in) -> (in, out), 'norm' and 'copy' as they are, 'unbatched' a table (N, C) -> (1, N, C)
(SigLIP's and CLIP's position embeddings), 'token' a vector (C,) -> (1, 1, C) (CLIP's class
embedding), and the stacked kinds (`STACKS`), dense weights of several projections stacked along
their outputs: 'qkv' query, key and value (timm's attn.qkv, SigLIP's head's in_proj), 'glu' a gated
MLP's gate and up projections (DINOv2 giant's SwiGLU weights_in / w12); their template has a '{{}}'
for the part's name.
"""
import json
import os
import re
import warnings
import zipfile

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gleam_jax.errors import GleamError, make_dir
from gleam_jax.utils.model_dirs import check_export_dir, export_dtype

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'open_clip_model.safetensors',
                'open_clip_pytorch_model.bin')


def read_state_dict(path: str, what: str) -> dict[str, np.ndarray]:
  """Tensors of a local `what` (e.g. 'ConvNeXt') checkpoint: a directory (HF `save_pretrained` or
  timm/hub layout, also sharded safetensors) or one .safetensors / .bin / .pth / .pt file (a state
  dict, or a TorchScript archive's tensors)."""
  if not os.path.exists(path):
    raise GleamError(f'{what} weights not found at {path!r}; give a local directory or file '
                     f'with the checkpoint (nothing is downloaded).')
  if os.path.isdir(path):
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
      out = {}
      for name in files:
        out.update(read_state_dict(os.path.join(path, name), what))
      return out
    for name in WEIGHT_FILES:
      if os.path.exists(os.path.join(path, name)):
        return read_state_dict(os.path.join(path, name), what)
    raise GleamError(f'No weight file in {path!r} (looked for {", ".join(WEIGHT_FILES)} and '
                     f'model.safetensors.index.json); point to the checkpoint file instead.')
  try:
    if path.endswith('.safetensors'):
      from safetensors.numpy import load_file
      try:
        return dict(load_file(path))
      except TypeError:  # bfloat16 tensors: numpy cannot hold them, go through torch.
        from safetensors.torch import load_file as load_torch
        return {k: to_numpy(v) for k, v in load_torch(path).items()}
    import torch
    if _is_torchscript(path):  # e.g. OpenAI's CLIP downloads: its tensors (its code compiled, never called)
      with warnings.catch_warnings():  # deprecated by torch, yet the way such files are read
        warnings.simplefilter('ignore', DeprecationWarning)
        sd = torch.jit.load(path, map_location='cpu').state_dict()
    else:
      sd = torch.load(path, map_location='cpu', weights_only=True)
  except GleamError:
    raise
  except Exception as e:  # unreadable file: say which and why
    raise GleamError(f'Cannot read {what} checkpoint {path!r} ({type(e).__name__}: {e}); give '
                     f'a .safetensors or torch state-dict file.') from e
  for wrapper in ('state_dict', 'model', 'state_dict_ema', 'model_ema'):
    if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
      sd = sd[wrapper]
      break
  if not isinstance(sd, dict):
    raise GleamError(f'{path!r} holds a {type(sd).__name__}, not a state dict; save the model\'s '
                     f'state_dict() instead.')
  return {k: to_numpy(v) for k, v in sd.items()}


def _is_torchscript(path: str) -> bool:
  """A TorchScript archive: a zip with the module's compiled code beside its tensors."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any('/code/__torch__' in name for name in archive.namelist())


def to_numpy(v) -> np.ndarray:
  if hasattr(v, 'detach'):  # torch tensor
    v = v.detach().cpu()
    if str(v.dtype) == 'torch.bfloat16':
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def strip_wrappers(sd: dict, prefixes, ignored: re.Pattern) -> dict:
  """Drops wrapper prefixes ('module.', 'model.' ...) shared by every key that `ignored` does not
  match (a classifier or head may sit outside the wrapper)."""
  changed = True
  while changed:
    changed = False
    for p in prefixes:
      keys = [k for k in sd if not ignored.match(k)]
      if keys and all(k.startswith(p) for k in keys):
        sd = {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}
        changed = True
  return sd


STACKS = {'qkv': ('query', 'key', 'value'), 'glu': ('gate', 'up')}  # kind -> its parts, in stacking order
_PARTS = {part for parts in STACKS.values() for part in parts}


def to_ours(value: np.ndarray, kind: str, param: str | None) -> np.ndarray:
  if kind == 'unbatched':
    return value[None]
  if kind == 'token':
    return value.reshape(1, 1, -1)
  if param != 'weight' or kind in ('norm', 'copy'):
    return value
  if kind == 'conv':  # torch (out, in/groups, kh, kw) -> (kh, kw, in/groups, out)
    return value.transpose(2, 3, 1, 0)
  if kind == 'dense' or kind in STACKS:  # torch (out, in) -> (in, out)
    return value.T
  raise ValueError(kind)


def to_torch(value: np.ndarray, kind: str, param: str | None) -> np.ndarray:
  """The inverse of `to_ours`."""
  if kind == 'unbatched':
    return value[0]
  if kind == 'token':
    return value.reshape(-1)
  if param != 'weight' or kind in ('norm', 'copy'):
    return value
  if kind == 'conv':
    return value.transpose(3, 2, 0, 1)
  if kind == 'dense' or kind in STACKS:
    return value.T
  raise ValueError(kind)


def map_state_dict(sd: dict, rules, ignored: re.Pattern, rename=None):
  """{our dotted parameter path: (checkpoint key, value in our layout)} of the keys `rules` map, and
  the keys that map onto nothing (`ignored` keys are neither). `rename` maps a matched group to the
  name our template wants (e.g. 'q' -> 'query')."""
  mapped, unexpected = {}, []
  for key, value in sd.items():
    if ignored.match(key):
      continue
    for pattern, template, kind in rules:
      m = re.fullmatch(pattern, key)
      if not m:
        continue
      groups = m.groups()
      param = groups[-1] if groups and groups[-1] in ('weight', 'bias') else None
      target = template.format(*((rename or {}).get(g, g) for g in groups))
      if param == 'weight':  # torch 'weight' is a norm's 'scale', a conv/dense's 'kernel'
        target = target[:-len('weight')] + ('scale' if kind == 'norm' else 'kernel')
      value = to_ours(np.asarray(value), kind, param)
      if kind in STACKS:
        for name, part in zip(STACKS[kind], np.split(value, len(STACKS[kind]), axis=-1)):
          mapped[target.format(name)] = (key, part)
      else:
        mapped[target] = (key, value)
      break
    else:
      unexpected.append(key)
  return mapped, unexpected


def copy_into(model, mapped: dict, unexpected: list, misfit, bad_shape) -> None:
  """Sets every parameter of `model` from `mapped` (`map_state_dict`), in place, after checking that
  every parameter is given, no key is left over and every shape fits; else a GleamError with
  `misfit(missing, unexpected)` or `bad_shape(key, name, shape, expected)`."""
  params = flat_params(model)
  missing = sorted(set(params) - set(mapped))
  unexpected = unexpected + sorted(mapped[k][0] for k in set(mapped) - set(params))
  if missing or unexpected:
    raise GleamError(misfit(missing, unexpected))
  for name, var in params.items():
    key, value = mapped[name]
    if tuple(value.shape) != tuple(var.shape):
      raise GleamError(bad_shape(key, name, tuple(value.shape), tuple(var.shape)))
  for name, var in params.items():
    var.set_value(jnp.asarray(mapped[name][1], dtype=var.dtype))


def listed(names, limit=20) -> str:
  """The first `limit` names, and ' ...' when there are more."""
  return f'{names[:limit]}{" ..." if len(names) > limit else ""}'


def flat_params(model) -> dict:
  """{dotted path ('blocks.0.fc1.kernel'): the nnx.Param} of `model`."""
  return {'.'.join(str(p) for p in path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def torch_state_dict(model, rules, what: str, rename=None) -> dict[str, np.ndarray]:
  """`model`'s parameters under the checkpoint keys of `rules` (read backwards, `rename` as in
  `source_key`), in torch layouts, float32. A part of a stacked rule ('qkv', 'glu') goes back into its
  stacked tensor, the files' form, before any rule that names it alone (an in-memory name)."""
  out, stacks = {}, {}
  for name, var in flat_params(model).items():
    *parent, leaf = name.split('.')
    path = [*parent, {'kernel': 'weight', 'scale': 'weight'}.get(leaf, leaf)]
    value = np.asarray(var.get_value(), np.float32)
    part = next((p for p in parent if p in _PARTS), None)
    if part is not None:  # a stacked tensor's part where a rule stacks it: its template reads '{{}}' there
      stacked = source_key('.'.join('{{}}' if p == part else p for p in path), rules, rename)
      if stacked is not None and stacked[1] in STACKS:
        stacks.setdefault(stacked, {})[part] = to_torch(value, stacked[1], path[-1])
        continue
    found = source_key('.'.join(path), rules, rename)
    if found is None:
      raise ValueError(f'no checkpoint key for {what} parameter {name}')
    key, kind = found
    out[key] = np.ascontiguousarray(to_torch(value, kind, path[-1]))
  for (key, kind), parts in stacks.items():
    out[key] = np.ascontiguousarray(np.concatenate([parts[n] for n in STACKS[kind]], axis=0))
  return out


def source_key(torch_name: str, rules, rename=None) -> tuple[str, str] | None:
  """Our parameter path in torch naming ('stem.conv.weight') -> (the checkpoint key, kind) by a
  (source regex, target template, kind) rule read backwards; None when no rule makes it. `rename`
  maps our names back to the checkpoint's (e.g. 'query' -> 'q')."""
  for pattern, template, kind in rules:
    ours = r'(\w+)'.join(re.escape(part) for part in re.split(r'\{\d\}', template))
    m = re.fullmatch(ours, torch_name)
    if m:
      groups = ((rename or {}).get(g, g) for g in m.groups())
      key = re.sub(r'\([^()]*\)', '{}', pattern).replace('\\.', '.').format(*groups)
      if re.fullmatch(pattern, key):  # the rule's own groups accept these values
        return key, kind
  return None


def save_hf_directory(directory: str, tensors: dict, config: dict, extra: dict | None = None,
                      dtype: str | None = None) -> int:
  """Writes a transformers model directory: config.json and model.safetensors holding `tensors`
  (cast to `dtype` when given) and the `extra` tensors (keys of no model parameter, float32).
  Refuses a directory that holds weights. Returns the bytes written."""
  cast = export_dtype(dtype)
  check_export_dir(directory)
  from safetensors.numpy import save_file
  # C order: safetensors writes an array's buffer as it lies in memory
  tensors = {k: np.ascontiguousarray(v if cast is None else v.astype(cast)) for k, v in tensors.items()}
  extra = {k: np.array(v, np.float32, order='C') for k, v in (extra or {}).items()}  # 0-d stays 0-d
  if set(extra) & set(tensors):
    raise ValueError(f'extra tensors overwrite model keys: {sorted(set(extra) & set(tensors))}')
  make_dir(directory, 'the export directory')
  weights = os.path.join(directory, 'model.safetensors')
  save_file(tensors | extra, weights, metadata={'format': 'pt'})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')
  return os.path.getsize(weights) + os.path.getsize(os.path.join(directory, 'config.json'))
