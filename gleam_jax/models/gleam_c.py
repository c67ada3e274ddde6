"""GLEAM-C: one encoder mapping query views and satellite images to a shared embedding.

    cfg = gleam_c.model_config(variant='atto')
    model = GleamC(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    q = model.encode(panoramas, tower='query')        # (B, H, W, 3) normalised -> (B, D), unit norm
    s = model.encode(satellites, tower='reference')
    q, s = model(panoramas, satellites)
    scale = jnp.exp(model.logit_scale[...])

The encoder is a ConvNeXt (`model.backbone='convnext'`, the default: global-average-pooled and
LayerNormed) or a ViT (`'vit'`, `model.variant` as big_vision names it, e.g. 'S/16'; its class token
or the mean of its patch tokens, with position embeddings resized to each input's grid), + a Linear
projection when `embed_dim` is set, so any input size works and panoramas and satellite tiles go
through the same weights.
Modules: shared towers -> `encoder` (+ `projection`); `separate_towers=True` ->
`query_encoder`/`reference_encoder` (+ `query_projection`/`reference_projection`).

`modality_towers=('uav', ...)` gives each named query modality its own tower `<m>_encoder` (+
`<m>_projection`); `encode(x, tower=m)` uses it, and any other name falls back to the query tower.
A job's `init_from` starts these towers as copies of the checkpoint's query tower
(`tower_copy_source`), so phase 2 can add a modality without moving what phase 1 learned.
"""
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from ml_collections import config_dict

from gleam_jax.data.config import IMAGENET_MEAN, IMAGENET_STD
from gleam_jax.errors import GleamError
from gleam_jax.models import convnext, convnext_params, vit, vit_params

TOWERS = ('query', 'reference')
CUSTOM = 'custom'  # model.variant when model.depths and model.dims (or model.vit's sizes) give the architecture
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
BACKBONES = ('convnext', 'vit')
VIT_SIZES = ('width', 'depth', 'mlp_dim', 'heads', 'patch_size')


# model.vit's settings, their defaults (also their values in configs written before them) and types
VIT_FIELDS = dict(image_size=224, pool='cls', ln_eps=1e-6, class_token=True, gelu='exact', pre_norm=False,
                  patch_bias=True, proj_dim=0, layer_scale=0.0, registers=0, pos_antialias=False, swiglu=False,
                  pos_offset=0.0)


# Checkpoint families of the ViT backbone: the model.vit settings their weights need and the pixel
# normalisation (data.mean, data.std) they were trained with.
_HALF = (0.5, 0.5, 0.5)
_CLIP_PIXELS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_CLIP = dict(pre_norm=True, patch_bias=False, ln_eps=1e-5)
_DINOV2, _DINOV2_REG = dict(layer_scale=1.0), dict(layer_scale=1.0, registers=4, pos_antialias=True)
_IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
VIT_FAMILIES = {
    'google': (dict(ln_eps=1e-12), (_HALF, _HALF)),  # google/vit-* (transformers' ViTModel)
    'siglip': (dict(class_token=False, pool='map', gelu='tanh'), (_HALF, _HALF)),
    'clip': (_CLIP | dict(gelu='quick'), _CLIP_PIXELS),  # OpenAI's weights, open_clip's -quickgelu models
    'open_clip': (_CLIP | dict(gelu='exact'), _CLIP_PIXELS),  # LAION's (open_clip's default GELU)
    'dinov2': (_DINOV2, _IMAGENET),  # facebook/dinov2-{small,base,large}
    'dinov2_reg': (_DINOV2_REG, _IMAGENET),  # facebook/dinov2-with-registers-{small,base,large}
    'dinov2_giant': (_DINOV2 | dict(swiglu=True), _IMAGENET),  # facebook/dinov2-giant (variant giant2/14)
    'dinov2_reg_giant': (_DINOV2_REG | dict(swiglu=True), _IMAGENET),  # facebook/dinov2-with-registers-giant
}


def vit_settings(**settings) -> ml_collections.ConfigDict:
  """`model.vit`: the ViT backbone's position-embedding grid (`image_size`), pooling ('cls', 'gap' or
  'map'), LayerNorm epsilon, class token, GELU ('exact', 'tanh' or 'quick'), CLIP's LayerNorm before
  the blocks (`pre_norm`), patch bias and projection (`proj_dim`, 0: none), DINOv2's layer scales
  (`layer_scale`, their initial value; 0: none), register tokens, antialiased position resize,
  SwiGLU MLP (giant's) and the position resize's offset (facebookresearch's DINOv2 files: 0.1), and
  the sizes of a custom ViT (`VIT_SIZES`, with `model.variant='custom'`). `VIT_FAMILIES` has the
  settings of SigLIP's, CLIP's and DINOv2's checkpoints."""
  unknown = set(settings) - set(VIT_FIELDS) - set(VIT_SIZES)
  if unknown:
    raise GleamError(f'model.vit has no field {sorted(unknown)}; its fields are {", ".join(VIT_FIELDS)}, '
                     f'{", ".join(VIT_SIZES)}.')
  ph = config_dict.placeholder
  fields = {k: type(default)(settings.get(k, default)) for k, default in VIT_FIELDS.items()}
  return ml_collections.ConfigDict(dict(
      **fields, **{k: ph(int) if settings.get(k) is None else int(settings[k]) for k in VIT_SIZES}))


def model_config(variant='atto', embed_dim=None, separate_towers=False, drop_path_rate=0.0,
                 dtype='float32', remat=False, logit_scale_init=math.log(1 / 0.07),
                 pretrained=None, depths=None, dims=None, modality_towers=(), backbone='convnext',
                 vit=None) -> ml_collections.ConfigDict:
  """GLEAM-C model settings. `backbone` 'convnext': `depths`/`dims` (both) give a custom ConvNeXt
  instead of `variant`; 'vit': `variant` such as 'S/16', or `vit=dict(width=, depth=, mlp_dim=,
  heads=, patch_size=)` for a custom one, and `vit` also sets `vit_settings`' image_size, pool and
  ln_eps. `pretrained` is a local HF/timm checkpoint of the backbone (directory or file) loaded at
  construction."""
  ph = config_dict.placeholder
  vit = vit_settings(**(vit or {}))
  custom = depths is not None or dims is not None or any(vit.get(k) is not None for k in VIT_SIZES)
  return ml_collections.ConfigDict(dict(
      backbone=backbone,
      variant=CUSTOM if custom else variant,
      vit=vit,
      depths=ph(tuple) if depths is None else tuple(depths),
      dims=ph(tuple) if dims is None else tuple(dims),
      embed_dim=ph(int) if embed_dim is None else embed_dim,
      separate_towers=separate_towers,
      modality_towers=tuple(modality_towers),
      drop_path_rate=float(drop_path_rate),
      dtype=dtype,
      remat=remat,
      logit_scale_init=float(logit_scale_init),
      pretrained=ph(str) if pretrained is None else pretrained,
  ))


def backbone_config(cfg) -> convnext.ConvNeXtConfig | vit.ViTConfig:
  """The backbone of `model` settings; configs written before `model.backbone` are ConvNeXts."""
  backbone = cfg.get('backbone', 'convnext')
  if backbone not in BACKBONES:
    raise GleamError(f'model.backbone={backbone!r}; choose one of {BACKBONES}.')
  if cfg.dtype not in DTYPES:
    raise GleamError(f'model.dtype={cfg.dtype!r} is not supported; use one of {sorted(DTYPES)}.')
  if not 0.0 <= cfg.drop_path_rate < 1.0:
    raise GleamError(f'model.drop_path_rate={cfg.drop_path_rate} must be in [0, 1).')
  common = dict(drop_path_rate=cfg.drop_path_rate, dtype=DTYPES[cfg.dtype], remat=cfg.remat)
  if backbone == 'vit':
    return _vit_config(cfg, common)
  if '/' in str(cfg.variant):
    raise GleamError(f'model.variant={cfg.variant!r} names a ViT but model.backbone is convnext; set '
                     f"model.backbone='vit' (configs/c_phase1.py:variant={cfg.variant} does).")
  custom = cfg.get('depths') is not None or cfg.get('dims') is not None
  # 'atto' with depths/dims: how configs saved before 'custom' existed name a custom net.
  if custom and cfg.variant not in (CUSTOM, 'atto'):
    raise GleamError(f'model.variant={cfg.variant!r} and a custom model.depths={cfg.get("depths")} / '
                     f'dims={cfg.get("dims")} are both set, and the custom net would be built; for '
                     f'the named variant give it to the config file (configs/c_phase1.py:'
                     f'variant={cfg.variant}), which sets no depths or dims.')
  return convnext.convnext_config(cfg.variant, depths=cfg.get('depths'), dims=cfg.get('dims'), **common)


def _vit_config(cfg, common) -> vit.ViTConfig:
  settings = cfg.get('vit') or vit_settings()
  sizes = {k: settings.get(k) for k in VIT_SIZES}
  options = {k: settings.get(k, default) for k, default in VIT_FIELDS.items()} | common
  if cfg.variant == CUSTOM:
    return vit.vit_config(None, **sizes, **options)
  if any(v is not None for v in sizes.values()):
    raise GleamError(f'model.variant={cfg.variant!r} and custom ViT sizes {sizes} are both set; set '
                     f"model.variant='custom' for the custom ViT, or clear model.vit's sizes.")
  return vit.vit_config(cfg.variant, **options)


@dataclasses.dataclass(frozen=True)
class BackboneKind:
  """What GLEAM-C does with one kind of backbone: build it, count its FLOPs, read, load and export its
  weights, and build and read the transformers model it is (the bench's reference, the export's
  recipe)."""
  module: type
  forward_flops: Callable
  read_checkpoint: Callable  # (path, config) -> state dict
  load_weights: Callable  # (module, path or state dict) -> checkpoint keys left out
  save_hf: Callable  # (module, directory, extra=, extra_config=, dtype=) -> bytes written
  hf_features: Callable  # config -> the transformers output our pooled features are
  hf_pooled: Callable  # (config, transformers outputs) -> those features
  build_hf_model: Callable  # config -> a random transformers model of the architecture
  hf_call: tuple = ()  # (keyword, value) pairs the transformers model takes to read any input shape


_BACKBONE_KINDS = {
    vit.ViTConfig: BackboneKind(
        vit.ViT, vit.forward_flops, vit_params.read_checkpoint, vit_params.load_vit_weights,
        vit_params.save_hf_vit, vit_params.hf_features, vit_params.hf_pooled, vit_params.build_hf_model,
        hf_call=(('interpolate_pos_encoding', True),)),
    convnext.ConvNeXtConfig: BackboneKind(
        convnext.ConvNeXt, convnext.forward_flops, convnext_params.read_checkpoint,
        convnext_params.load_convnext_weights, convnext_params.save_hf_convnext, convnext_params.hf_features,
        convnext_params.hf_pooled, convnext_params.build_hf_model),
}


def backbone_kind(bcfg) -> BackboneKind:
  """The kind of a backbone's config (`backbone_config`, or a built module's `.config`)."""
  return _BACKBONE_KINDS[type(bcfg)]


def build_backbone(bcfg, rngs):
  return backbone_kind(bcfg).module(bcfg, rngs=rngs)


class GleamC(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs, read_pretrained: bool = True):
    """`read_pretrained=False` leaves `cfg.pretrained` unread (`load_pretrained` reads it later, or a
    checkpoint gives the parameters)."""
    bcfg = backbone_config(cfg)
    self.separate_towers = bool(cfg.separate_towers)
    embed_dim = cfg.get('embed_dim')
    if embed_dim is not None and embed_dim <= 0:
      raise GleamError(f'model.embed_dim={embed_dim} must be positive (or None for no projection).')
    self.modality_towers = tuple(cfg.get('modality_towers', ()) or ())
    for name in self.modality_towers:
      if name in TOWERS or not str(name).isidentifier():
        raise GleamError(f'model.modality_towers={self.modality_towers!r}: {name!r} cannot name a tower; '
                         "give query modality names such as 'uav'.")
    names = ('query_', 'reference_') if self.separate_towers else ('',)
    names += tuple(f'{m}_' for m in self.modality_towers)
    for prefix in names:
      encoder = build_backbone(bcfg, rngs)
      setattr(self, prefix + 'encoder', encoder)
      projection = None
      if embed_dim is not None:
        projection = nnx.Linear(
            encoder.feature_width, embed_dim, param_dtype=jnp.float32,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ('embed', None)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)), rngs=rngs)
      setattr(self, prefix + 'projection', projection)
    self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32), out_sharding=())
    self.embed_dim = embed_dim or bcfg.feature_width
    if read_pretrained and cfg.get('pretrained'):
      self.load_pretrained(cfg.pretrained)

  def load_pretrained(self, path: str) -> list[str]:
    """Loads a HF/timm checkpoint of the backbone into every tower (projections stay as initialised);
    returns the checkpoint keys the backbone's settings leave out (a CLIP projection, a SigLIP head)."""
    encoders = self._encoders()
    kind = backbone_kind(encoders[0].config)
    sd = kind.read_checkpoint(path, encoders[0].config)
    return [kind.load_weights(encoder, sd) for encoder in encoders][0]  # the same for every tower

  def _encoders(self):
    names = ['query_encoder', 'reference_encoder'] if self.separate_towers else ['encoder']
    return [getattr(self, n) for n in names + [f'{m}_encoder' for m in self.modality_towers]]

  def tower_key(self, tower: str) -> str:
    """Which modules encode `tower`: towers with the same key are the same network."""
    if not isinstance(tower, str):
      raise ValueError(f'tower must be a string, got {tower!r}')
    return tower_prefix(tower, self.separate_towers, self.modality_towers)

  def _tower(self, tower):
    prefix = self.tower_key(tower)
    return getattr(self, f'{prefix}encoder'), getattr(self, f'{prefix}projection')

  def encode(self, images: jax.Array, tower: str = 'query') -> jax.Array:
    """(B, H, W, 3) normalised images -> (B, D) float32 unit-norm embeddings. `tower`: 'query',
    'reference' or a query modality's name (its own tower if it has one, else the query tower)."""
    encoder, projection = self._tower(tower)
    x = encoder(images)
    if projection is not None:
      x = projection(x)
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))

  def __call__(self, query_images, reference_images):
    return self.encode(query_images, 'query'), self.encode(reference_images, 'reference')


def encode_flops(cfg, height: int, width: int) -> int:
  """Model FLOPs of embedding one (height, width) image: the backbone's (`convnext.forward_flops`,
  `vit.forward_flops`) and the projection's, 2 per multiply-add."""
  bcfg = backbone_config(cfg)
  embed_dim = cfg.get('embed_dim')
  projection = 2 * bcfg.feature_width * embed_dim if embed_dim else 0
  return backbone_kind(bcfg).forward_flops(bcfg, height, width) + projection


def contrastive_step_flops(cfg, query_shapes, reference_shapes) -> int:
  """Model FLOPs of one contrastive train step: forward + backward (3x the forward) of every query
  and reference embedding and of the similarity matrix of the global batch. Shapes are
  (count, height, width), one per group of images (a modality's queries, their satellites). Towers
  frozen by the optimizer are counted as trained: a fixed model cost per step, whatever is frozen."""
  embed = cfg.get('embed_dim') or backbone_config(cfg).feature_width
  encode = sum(n * encode_flops(cfg, h, w) for n, h, w in [*query_shapes, *reference_shapes])
  n_query = sum(n for n, _, _ in query_shapes)
  n_reference = sum(n for n, _, _ in reference_shapes)
  return 3 * (encode + 2 * n_query * n_reference * embed)


def tower_prefix(tower, separate_towers, modality_towers):
  """The attribute prefix of the modules that encode `tower` ('' for the shared tower)."""
  if tower in modality_towers:
    return f'{tower}_'
  if not separate_towers:
    return ''
  return 'reference_' if tower == 'reference' else 'query_'


def tower_copy_source(name, separate_towers, modality_towers):
  """For a parameter name below the model's root ('uav_encoder/stem/conv/kernel') of a modality
  tower: the same parameter of the query tower, which it starts as a copy of; else None."""
  head, _, rest = name.partition('/')
  for m in modality_towers:
    for part in ('encoder', 'projection'):
      if head == f'{m}_{part}':
        return f"{tower_prefix('query', separate_towers, ())}{part}/{rest}"
  return None
