"""Reading and writing PyTorch-side checkpoints (Hugging Face / timm state dicts) for the vision
backbones' `*_params.py` modules: the files, the wrapper prefixes, the key rules read backwards, and a
transformers model directory written out."""
import json
import os
import re

import numpy as np

from gleam_jax.errors import GleamError, make_dir
from gleam_jax.utils.model_dirs import check_export_dir, export_dtype

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'open_clip_model.safetensors',
                'open_clip_pytorch_model.bin')


def read_state_dict(path: str, what: str) -> dict[str, np.ndarray]:
  """Tensors of a local `what` (e.g. 'ConvNeXt') checkpoint: a directory (HF `save_pretrained` or
  timm/hub layout, also sharded safetensors) or one .safetensors / .bin / .pth / .pt file."""
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


def source_key(torch_name: str, rules) -> tuple[str, str] | None:
  """Our parameter path in torch naming ('stem.conv.weight') -> (the checkpoint key, kind) by a
  (source regex, target template, kind) rule read backwards; None when no rule makes it."""
  for pattern, template, kind in rules:
    ours = r'(\w+)'.join(re.escape(part) for part in re.split(r'\{\d\}', template))
    m = re.fullmatch(ours, torch_name)
    if m:
      key = re.sub(r'\([^()]*\)', '{}', pattern).replace('\\.', '.').format(*m.groups())
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
  if cast is not None:
    tensors = {k: v.astype(cast) for k, v in tensors.items()}
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
