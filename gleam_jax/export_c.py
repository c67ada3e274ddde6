"""Export a GLEAM-C job's encoders as Hugging Face ConvNeXt (or ViT) directories, for PyTorch users.

    python -m gleam_jax.export_c --workdir=~/gleam_runs/c_phase1 --out=~/models/gleam-c [--tower=reference] \
        [--dtype=bfloat16]

Loads the job's latest checkpoint (`retrieve.load_trained`) and writes each distinct network as a
transformers `ConvNextModel` directory (`convnext_params.save_hf_convnext`; a ViT backbone as a
`ViTModel`, `vit_params.save_hf_vit`): a job with one encoder
into --out, one with several into a folder each, named by its tower ('query', 'reference', a
modality tower such as 'uav'; 'shared' for the encoder of queries and references when modality
towers are added to it); --tower writes only the network of that tower (or query modality) into
--out; --dtype casts the backbone's weights (float32 unless given; the head stays float32). The GLEAM-C
head rides along in model.safetensors under `gleam_c.*` keys (transformers' `from_pretrained` reports
them as unexpected and leaves them out) and config.json's `gleam_c` entry says how to use it; in
PyTorch:

    hf = transformers.ConvNextModel.from_pretrained(out).eval()
    head = safetensors.torch.load_file(f'{out}/model.safetensors')
    x = hf(pixel_values).pooler_output      # LayerNorm of the global average pool, as ours
    x = F.linear(x, head['gleam_c.projection.weight'], head['gleam_c.projection.bias'])
    embedding = F.normalize(x, dim=-1, eps=1e-6)
    scores = head['gleam_c.logit_scale'].exp() * query_embedding @ reference_embedding.T
    # a job trained with the sigmoid loss: + head['gleam_c.logit_bias']; sigmoid(scores) = P(same place)

A ViT backbone: `hf = transformers.ViTModel.from_pretrained(out, add_pooling_layer=False)`, or the
class config.json's `architectures` names for a SigLIP, CLIP or DINOv2 tower (`SiglipVisionModel`,
`CLIPVisionModel[WithProjection]`, `Dinov2[WithRegisters]Model`; `vit_params.hf_architecture`), called
with `interpolate_pos_encoding=True` (inputs of other shapes than its position grid); its features are
what config.json's `gleam_c.features` says (`vit_params.hf_features`): `last_hidden_state[:, 0]`
(`pool='cls'`), the mean of the patch tokens (`'gap'`), `pooler_output` (`'map'`, a CLIP tower's class
token) or `image_embeds` (a CLIP tower's projection).

`pixel_values` are RGB images (N, 3, H, W) read as [0, 1] and normalised by config.json's
`gleam_c.pixel_mean` / `pixel_std`, at the sizes of `gleam_c.inputs` (the job's; any size works);
ground photos and UAV views of a job with `gleam_c.query_frames` are first warped into that frame as
`gleam_jax/data/augment.py`'s `query_frame` does.
A directory that already holds weights is refused.
"""
import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from gleam_jax import errors
from gleam_jax import retrieve
from gleam_jax.data.augment import warps_query
from gleam_jax.data.config import query_shape
from gleam_jax.errors import GleamError
from gleam_jax.models import gleam_c
from gleam_jax.train import checkpoint
from gleam_jax.utils import model_dirs
from gleam_jax.utils.progress import format_size

SHARED = "shared"  # the folder of the one encoder of queries and references, beside modality towers
L2_EPS = 1e-6  # GleamC.encode divides by max(|x|, 1e-6), as torch's F.normalize(eps=1e-6)

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "A GLEAM-C ('contrastive') job's workdir; its latest checkpoint is exported.")
  flags.DEFINE_string("out", None, "The directory to write (a folder per tower inside when the job has several).")
  flags.DEFINE_string("tower", None, "Export only this tower's network, into --out: 'query', 'reference', a "
                      "modality tower or a query modality of the job.")
  flags.DEFINE_enum("dtype", None, list(model_dirs.EXPORT_DTYPES), "Cast the backbone's weights (default: float32, "
                    "as trained).")


def tower_folders(separate_towers, modality_towers) -> dict[str, list[str]]:
  """{folder name: the tower names (`GleamC.encode`'s `tower`) of one network}, a folder per distinct
  network."""
  groups = {}
  for tower in gleam_c.TOWERS + tuple(modality_towers):
    groups.setdefault(gleam_c.tower_prefix(tower, separate_towers, modality_towers), []).append(tower)
  return {prefix.rstrip("_") or SHARED: towers for prefix, towers in groups.items()}


def select_folders(folders, tower, modalities, separate_towers, modality_towers) -> dict[str, list[str]]:
  """`folders` (`tower_folders`), or the one of `tower`: a folder name, a tower or a query modality."""
  if tower is None:
    return folders
  names = list(dict.fromkeys([*folders, *gleam_c.TOWERS, *modalities]))
  if tower not in names:
    raise GleamError(f"--tower={tower}: the job's towers and query modalities are {', '.join(names)}; give one "
                     "of them, or no --tower to export every network.")
  name = tower if tower in folders else (
      gleam_c.tower_prefix(tower, separate_towers, modality_towers).rstrip("_") or SHARED)
  return {name: folders[name]}


def head_tensors(model, tower, loss_bias=None) -> dict[str, np.ndarray]:
  """The GLEAM-C head of `tower`'s network in torch layouts: `gleam_c.projection.weight` (embed_dim,
  width) and `.bias` when the model projects, `gleam_c.logit_scale` (log of the score scale), and
  `gleam_c.logit_bias` (the sigmoid loss's learned bias) when given."""
  projection = getattr(model, f"{model.tower_key(tower)}projection")
  out = {"gleam_c.logit_scale": np.asarray(model.logit_scale[...], np.float32)}
  if loss_bias is not None:
    out["gleam_c.logit_bias"] = np.asarray(loss_bias, np.float32)
  if projection is not None:
    out["gleam_c.projection.weight"] = np.asarray(projection.kernel[...], np.float32).T
    out["gleam_c.projection.bias"] = np.asarray(projection.bias[...], np.float32)
  return out


def head_config(model, tower, loss_bias=None) -> dict:
  """config.json's `gleam_c` entry: the towers the network encodes, how their embedding is made from
  transformers' outputs (`backbone_features`: what our encoder gives the projection) and how two embeddings score (with the sigmoid loss's bias, whose
  sigmoid is the probability of the same place, where the job learned one)."""
  key = model.tower_key(tower)
  projected = getattr(model, f"{key}projection") is not None
  pooled = backbone_features(getattr(model, f"{key}encoder"))
  features = (f"F.linear({pooled}, gleam_c.projection.weight, gleam_c.projection.bias)" if projected
              else pooled)
  return {
      "towers": [t for t in (*gleam_c.TOWERS, *model.modality_towers) if model.tower_key(t) == key],
      "embed_dim": int(model.embed_dim),
      "features": pooled,
      "projection": projected,
      "normalize": "l2",
      "embedding": f"F.normalize({features}, dim=-1, eps={L2_EPS})",
      "similarity": "exp(gleam_c.logit_scale) * query_embedding @ reference_embedding.T"
                    + (" + gleam_c.logit_bias" if loss_bias is not None else ""),
      **({"match_probability": "sigmoid(similarity)"} if loss_bias is not None else {}),
      "compute_dtype": getattr(model, f"{key}encoder").config.dtype.__name__,
  }


def backbone_features(encoder) -> str:
  """Which output of the exported transformers model (ConvNextModel, ViTModel, SiglipVisionModel,
  CLIPVisionModel[...] or Dinov2[...]Model) our encoder's pooled features are."""
  return gleam_c.backbone_kind(encoder.config).hf_features(encoder.config)


def save_tower(model, tower, directory, info=None, loss_bias=None, dtype=None) -> int:
  """Writes the network that encodes `tower` into `directory` (`convnext_params.save_hf_convnext` or
  `vit_params.save_hf_vit`, its weights cast to `dtype` when given) with its head; `info`: more
  entries of config.json's `gleam_c`. Returns the bytes written."""
  encoder = getattr(model, f"{model.tower_key(tower)}encoder")
  return gleam_c.backbone_kind(encoder.config).save_hf(
      encoder, directory, extra=head_tensors(model, tower, loss_bias),
      extra_config={"gleam_c": head_config(model, tower, loss_bias) | (info or {})}, dtype=dtype)


def _job_info(config, towers, step) -> dict:
  """What a PyTorch user needs of the job to feed a network: its inputs' sizes and normalisation, and
  the frames its ground photos / UAV views were warped into ('panorama', 'satellite'), which a
  PyTorch pipeline has to reproduce before the network sees them."""
  data, model = config.data, config.model
  prefix = lambda t: gleam_c.tower_prefix(t, model.separate_towers, tuple(model.get("modality_towers") or ()))
  inputs = {m: list(query_shape(data, m)) for m in retrieve.job_modalities(config)
            if prefix(m) == prefix(towers[0])}
  if "reference" in towers:
    inputs["satellite"] = list(data.satellite_size)
  info = {"inputs": inputs, "pixel_mean": list(data.mean), "pixel_std": list(data.std), "step": step}
  # queries the job warped into another frame before encoding (gleam_jax/data/augment.py `query_frame`)
  frames = {m: data[f"{m}_frame"] for m in inputs if warps_query(data, m)}
  if frames:
    info["query_frames"] = frames
  return info


def export(workdir, out, tower=None, dtype=None) -> str:
  """Writes the latest checkpoint of the GLEAM-C job in `workdir` as Hugging Face ConvNeXt directories
  (`out`, or a folder per network in it; the weights cast to `dtype` when given); returns the line
  that reports it."""
  start = time.perf_counter()
  model_dirs.export_dtype(dtype)  # a bad dtype stops before anything is read
  workdir, out = os.path.expanduser(workdir), os.path.expanduser(out)
  config = retrieve.load_config(workdir)
  if config.get("trainer") != "contrastive":
    raise GleamError(f"{workdir} holds a {config.get('trainer')!r} job; give the workdir of a GLEAM-C "
                     "('contrastive') training job (GLEAM-X jobs: python -m gleam_jax.export).")
  separate, modality_towers = bool(config.model.separate_towers), tuple(config.model.get("modality_towers") or ())
  folders = select_folders(tower_folders(separate, modality_towers), tower, retrieve.job_modalities(config),
                           separate, modality_towers)
  dirs = {name: out if len(folders) == 1 else os.path.join(out, name) for name in folders}
  for directory in dict.fromkeys([out, *dirs.values()]):  # before the model is loaded
    model_dirs.check_export_dir(directory)
  with checkpoint.at_most_verbose(logging.WARNING):  # Orbax logs every read at INFO
    model, config, where, loss_bias = retrieve.load_trained(workdir, config)
  step = checkpoint.step_of(where)
  total = sum(save_tower(model, towers[0], dirs[name], _job_info(config, towers, step), loss_bias, dtype)
              for name, towers in folders.items())
  names = ", ".join(name if towers == [name] else f"{name} ({'/'.join(towers)})" for name, towers in folders.items())
  return (f"exported step {step} of {workdir} to {out}: towers {names}, {format_size(total)} of {dtype or 'float32'}, "
          f"{time.perf_counter() - start:.1f} s")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with errors.stop_on_bad_input():
    print(export(FLAGS.workdir, FLAGS.out, FLAGS.tower, FLAGS.dtype))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main, flags_parser=errors.parse_flags)
