"""Grain input pipelines: the training stream and the evaluation batches.

Training (`make_train_stream`): the sampler orders each epoch's records (unique locations per
batch, hard negatives); each process reads its slice of every global batch. Per epoch
(`EpochReader.epoch_examples`):

  MapDataset.source(the epoch's records, in the sampler's order)
    -> map(query into its frame)       unless the decoded-record cache keeps queries warped
    -> random_map(augment_pair)        seeded per record by (seed, epoch, position)
    -> map(resize + normalise)
    -> this process's rows of every global batch (positions stay global, so the augmentation
       does not depend on the number of processes)

and the epochs one after another as one endless source (`EpochExamples`), so grain's worker
processes, their prefetch buffers and their decoded-record caches live across epochs:

    -> batch(global_batch_size / process_count, drop_remainder=True)
    -> to_iter_dataset(ReadOptions(read_threads, read_buffer_size))
    -> mp_prefetch(worker_count workers)   when data.worker_count > 0

Each epoch's order is asked of a snapshot of the sampler, in whichever process reads the epoch. The
stream counts the epochs itself and asks its own sampler for each epoch's length; when the sampler
has changed (a DSS neighbour table set between epochs), a new dataset starts at the next epoch, so
the new table is used from the next epoch on. `get_state()` is a JSON-able dict (epoch, batches
read in the epoch, grain iterator state and where its dataset starts, sampler state) for the
checkpoint; `set_state()` makes the stream continue with exactly the batch it would have given
next, also with another `worker_count` (augmentation is seeded per record, not per worker).

Evaluation (`make_eval_batches`, `make_gallery_batches`): no augmentation, nothing dropped; the last
batch may be smaller (the evaluator pads it). On several processes each process decodes only its
devices' rows of every batch (`process_rows`) and the embeddings are gathered.
"""
import bisect
import copy
import sys
import threading

import grain
import numpy as np
from absl import flags

from gleam_jax.data import samplers
from gleam_jax.data import sources
from gleam_jax.data.augment import (AugmentPair, PreparePair, normalise, query_frame, query_in_frame, resize,
                                    warps_query)
from gleam_jax.data.config import MODALITIES, query_shape, validate
from gleam_jax.data.panorama_frame import sector_mask
from gleam_jax.errors import GleamError


class RecordsView:
  """`source` seen through a list of record indices (picklable: grain workers hold it)."""

  def __init__(self, source, records):
    self.source = source
    self.records = np.asarray(records, np.int64)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.source[int(self.records[i])]


def _ensure_absl_flags():
  """grain's worker processes read absl flags; parse them if the program did not."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["gleam_jax"], known_only=True)


def _epoch_seed(seed, epoch):
  return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def process_slice(order, global_batch_size, process_index, process_count):
  """This process's records of every global batch, in order: batch g gives rows [p*b, (p+1)*b)."""
  b = global_batch_size // process_count
  return np.asarray(order).reshape(-1, global_batch_size)[:, process_index * b:(process_index + 1) * b].reshape(-1)


def _read_options(data_cfg):
  return grain.ReadOptions(num_threads=data_cfg.read_threads, prefetch_buffer_size=data_cfg.read_buffer_size)


class EpochExamples:
  """grain source: this process's prepared training examples of every epoch from `start_epoch` on,
  one epoch after another, starting `skip` examples into the first. Each epoch's order is asked of
  `sampler` (a snapshot: the stream restarts this source when its sampler changes, e.g. a new DSS
  neighbour table) in whichever process reads the epoch, so grain's worker processes and their
  decoded-record caches live across epochs instead of restarting with each one. Within an epoch
  the examples are what they were with one dataset per epoch: the augmentation of a record is
  seeded by (seed, epoch, position in the epoch)."""

  def __init__(self, reader, sampler, start_epoch, skip):
    self.reader, self.sampler = reader, sampler
    self.start_epoch, self.skip = int(start_epoch), int(skip)
    self._ends, self._epochs = [], {}  # cumulative example counts; the datasets of recent epochs
    self._lock = threading.Lock()

  def __getstate__(self):
    return {**self.__dict__, "_ends": [], "_epochs": {}, "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def __len__(self):
    return sys.maxsize  # endless: the stream counts the epochs

  def _first(self, k):
    """Index in this source of the k-th epoch's first example (the first epoch starts `skip` in)."""
    return self._ends[k - 1] if k else -self.skip

  def _examples(self, k):
    epoch = self.start_epoch + k
    return self.reader.epoch_examples(epoch, self.reader.epoch_order(self.sampler, epoch))

  def _epoch(self, k):
    """(dataset, first example index in this source) of the k-th epoch from the start."""
    with self._lock:
      while len(self._ends) <= k:
        n = len(self._ends)
        self._epochs[n] = self._examples(n)
        self._ends.append(self._first(n) + len(self._epochs[n]))
        self._epochs.pop(n - 3, None)  # readers are at most a prefetch buffer behind
      if k not in self._epochs:  # an old epoch asked for again: rebuild it
        self._epochs[k] = self._examples(k)
      return self._epochs[k], self._first(k)

  def __getitem__(self, i):
    while not self._ends or self._ends[-1] <= i:
      self._epoch(len(self._ends))
    ds, first = self._epoch(bisect.bisect_right(self._ends, i))
    return ds[i - first]


class EpochReader:
  """What turns one epoch's order into this process's prepared examples (picklable, for grain's
  workers): the source, the query frame, the augmentation, resizing and normalisation."""

  def __init__(self, data_cfg, source, seed, global_batch_size, process_index, process_count):
    self.source, self.seed = source, int(seed)
    self.global_batch_size, self.process_index, self.process_count = global_batch_size, process_index, process_count
    frame = query_frame(data_cfg)
    self.frame = frame if frame is not None and getattr(source, "query_frame", None) is None else None  # else warped when decoded
    self.augment = AugmentPair(data_cfg) if data_cfg.augment.enabled else None
    self.prepare = PreparePair(data_cfg)

  def epoch_order(self, sampler, epoch):
    """The epoch's records in global order, whole global batches only."""
    order = sampler.epoch_order(epoch, self.global_batch_size)
    return order[:len(order) // self.global_batch_size * self.global_batch_size]

  def epoch_examples(self, epoch, order):
    # The whole epoch is one dataset, so a record's random stream follows its position in the
    # global order: every process count augments each record of a batch the same way.
    ds = grain.MapDataset.source(RecordsView(self.source, order))
    if self.frame is not None:
      ds = ds.map(self.frame)
    if self.augment is not None:
      ds = ds.random_map(self.augment, seed=_epoch_seed(self.seed, epoch))
    ds = ds.map(self.prepare)
    if self.process_count > 1:
      positions = process_slice(np.arange(len(order)), self.global_batch_size, self.process_index,
                                self.process_count)
      ds = grain.MapDataset.source(RecordsView(ds, positions))
    return ds


class TrainStream:
  """Iterator of this process's training batches: dict of NumPy arrays
  `query` float32 (b, H, W, 3), `satellite` float32 (b, Hs, Ws, 3), `modality` int32 (b,),
  `location_id` int64 (b,)."""

  def __init__(self, data_cfg, global_batch_size, sampler, seed, source=None, process_index=None,
               process_count=None):
    validate(data_cfg)
    if process_count is None or process_index is None:
      import jax
      process_count, process_index = jax.process_count(), jax.process_index()
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise GleamError(f"global batch size {global_batch_size} must be a positive multiple of the number of "
                       f"processes ({process_count}): each process reads an equal slice of every batch.")
    self.data_cfg = data_cfg
    self.global_batch_size = int(global_batch_size)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.batch_size = self.global_batch_size // self.process_count
    self.sampler = sampler
    self.seed = int(seed)
    self.source = source or sources.get_train_source(data_cfg)
    self._reader = EpochReader(data_cfg, self.source, self.seed, self.global_batch_size, self.process_index,
                               self.process_count)
    self._iter = None
    self.dataset_starts = 0  # how often the grain dataset (and its workers) started
    self._start(0)

  def _start(self, epoch, skip_batches=0):
    """A new grain dataset from batch `skip_batches` of `epoch` on, with a snapshot of the sampler."""
    self.close()
    self._enter_epoch(epoch)
    self.batches_in_epoch = skip_batches
    self._skipped, self._dataset_epoch = skip_batches, epoch
    self._dataset_sampler_state = self._epoch_sampler_state
    ds = grain.MapDataset.source(EpochExamples(self._reader, copy.deepcopy(self.sampler), epoch,
                                               skip_batches * self.batch_size))
    ds = ds.batch(self.batch_size, drop_remainder=True).to_iter_dataset(_read_options(self.data_cfg))
    if self.data_cfg.worker_count > 0:
      _ensure_absl_flags()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.data_cfg.worker_count,
                                                       per_worker_buffer_size=self.data_cfg.worker_buffer_size))
    self.dataset_starts += 1
    self._iter = iter(ds)

  def _enter_epoch(self, epoch):
    self._epoch_sampler_state = self.sampler.get_state()
    steps = len(self._reader.epoch_order(self.sampler, epoch)) // self.global_batch_size
    if steps == 0:
      raise GleamError(f"epoch {epoch} has no full batch of {self.global_batch_size}: lower the batch size.")
    self.epoch, self.steps_per_epoch, self.batches_in_epoch = epoch, steps, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.batches_in_epoch >= self.steps_per_epoch:
      self._enter_epoch(self.epoch + 1)
      if self._epoch_sampler_state != self._dataset_sampler_state:  # new neighbours: new orders from here
        self._start(self.epoch)
    batch = next(self._iter)
    self.batches_in_epoch += 1
    if self.data_cfg.worker_count > 0:  # plain arrays, not views of grain's shared memory
      batch = {k: np.array(v) for k, v in batch.items()}
    return batch

  def get_state(self):
    return {
        "epoch": self.epoch,
        "batches_in_epoch": self.batches_in_epoch,
        "grain": self._iter.get_state(),
        "grain_epoch": self._dataset_epoch,  # the epoch and batch grain's dataset starts at
        "grain_skipped": self._skipped,
        "worker_count": self.data_cfg.worker_count,
        "sampler_at_epoch_start": self._epoch_sampler_state,
        "sampler": self.sampler.get_state(),
        "seed": self.seed,
        "global_batch_size": self.global_batch_size,
        "process_count": self.process_count,
    }

  def set_state(self, state):
    """Continue where `state` was taken. With the same worker and process counts grain's own
    iterator state is restored; with others a dataset starts after the batches already read (the
    global batches do not depend on either count, so a job may resume on more or fewer processes)."""
    for key in ("seed", "global_batch_size"):
      if state[key] != getattr(self, key):
        raise GleamError(f"the saved input state has {key}={state[key]} but this job has {getattr(self, key)}: "
                         "resume with the same value, or start a new workdir.")
    self.sampler.set_state(state["sampler_at_epoch_start"])
    epoch, read = int(state["epoch"]), int(state["batches_in_epoch"])
    if state["worker_count"] == self.data_cfg.worker_count and state["process_count"] == self.process_count:
      # the sampler did not change between the dataset's first epoch and this one (else it restarted)
      self._start(int(state.get("grain_epoch", epoch)), int(state["grain_skipped"]))
      self._iter.set_state(state["grain"])
      self._enter_epoch(epoch)
      self.batches_in_epoch = read
    else:
      self._start(epoch, read)
    self.sampler.set_state(state["sampler"])

  def close(self):
    """Stops the worker processes (garbage collection does it too)."""
    if self._iter is not None and hasattr(self._iter, "close"):
      self._iter.close()
    self._iter = None


def make_train_stream(data_cfg, global_batch_size, sampler, seed, **kwargs):
  """See TrainStream; kwargs: source, process_index, process_count (default: from jax)."""
  shapes = {query_shape(data_cfg, m) for m in data_cfg.modalities}
  if len(shapes) > 1:
    raise GleamError(f"data.modalities={tuple(data_cfg.modalities)} have queries of different shapes "
                     f"{sorted(shapes)}, which one batch array cannot hold: read them with "
                     "ModalityStreams (one stream per modality), as the trainer does.")
  return TrainStream(data_cfg, global_batch_size, sampler, seed, **kwargs)


def modality_batch_sizes(data_cfg, global_batch_size, multiple=1):
  """{modality: pairs per global batch}: shares of `global_batch_size` by data.modality_weights,
  each a positive multiple of `multiple` (the mesh's data shards x micro-batches, and the processes),
  summing to it. The `global_batch_size / multiple` units go by weight (largest remainders), then a
  group left with none takes one from the largest group."""
  mods = tuple(data_cfg.modalities)
  units, rest = divmod(int(global_batch_size), int(multiple))
  if rest or units < len(mods):
    raise GleamError(
        f"config.batch_size={global_batch_size} cannot hold {len(mods)} modalities {mods} in groups that "
        f"split over the mesh's data shards, micro-batches and processes ({multiple}): use a multiple of "
        f"{multiple} that is at least {len(mods) * multiple}.")
  w = np.asarray([float(data_cfg.modality_weights[m]) for m in mods])
  share = units * w / w.sum()
  counts = np.floor(share).astype(int)
  counts[np.argsort(-(share - counts), kind="stable")[:units - counts.sum()]] += 1
  while np.any(counts == 0):  # units >= len(mods), so the largest group has more than one
    counts[np.argmax(counts)] -= 1
    counts[np.flatnonzero(counts == 0)[0]] += 1
  return {m: int(c) * int(multiple) for m, c in zip(mods, counts)}


def _modality_seed(seed, modality, n_modalities):
  """A single-modality job keeps `seed`; several get independent orders and augmentations."""
  if n_modalities == 1:
    return int(seed)
  return int(np.random.SeedSequence([int(seed), 7, MODALITIES.index(modality)]).generate_state(1)[0] >> 1)


class ModalityStreams:
  """The training input of any number of modalities: one TrainStream per modality, read in lockstep.

  Every global batch holds `batch_sizes[m]` pairs of each modality m (`modality_batch_sizes`), so
  training is modality-balanced step by step, and each modality keeps its own query shape
  (panoramas stay 1:2 next to square UAV views). `next()` gives
  `{'query': {m: (b_m, H_m, W_m, 3)}, 'satellite': {m: ...}, 'location_id': {m: (b_m,)}}` (this
  process's rows). Each modality has its own sampler (unique locations within its group; the loss
  masks a location that two groups happen to share) with its own seed. `epoch`,
  `batches_in_epoch` and `steps_per_epoch` are those of the first modality.
  """

  def __init__(self, data_cfg, global_batch_size, seed, index, multiple=1, source=None, **kwargs):
    validate(data_cfg)
    self.modalities = tuple(data_cfg.modalities)
    self.batch_sizes = modality_batch_sizes(data_cfg, global_batch_size, multiple)
    source = source or sources.get_train_source(data_cfg)
    self.samplers, self.streams = {}, {}
    for m in self.modalities:
      cfg = data_cfg.copy_and_resolve_references()
      with cfg.unlocked():
        cfg.modalities = (m,)
        cfg.seed = _modality_seed(data_cfg.seed, m, len(self.modalities))
      self.samplers[m] = samplers.make_sampler(cfg, index)
      self.streams[m] = TrainStream(cfg, self.batch_sizes[m], self.samplers[m],
                                    _modality_seed(seed, m, len(self.modalities)), source=source, **kwargs)

  @property
  def _first(self):
    return self.streams[self.modalities[0]]

  epoch = property(lambda self: self._first.epoch)
  batches_in_epoch = property(lambda self: self._first.batches_in_epoch)
  steps_per_epoch = property(lambda self: self._first.steps_per_epoch)

  def __iter__(self):
    return self

  def __next__(self):
    batches = {m: next(s) for m, s in self.streams.items()}
    return {k: {m: b[k] for m, b in batches.items()} for k in ("query", "satellite", "location_id")}

  def set_neighbours(self, table, location_ids=None):
    """DSS: the same satellite-neighbour table for every modality's sampler (used from its next epoch)."""
    for sampler in self.samplers.values():
      sampler.set_neighbours(table, location_ids)

  def get_state(self):
    return {"batch_sizes": self.batch_sizes, "streams": {m: s.get_state() for m, s in self.streams.items()}}

  def set_state(self, state):
    if state.get("batch_sizes") != self.batch_sizes:
      raise GleamError(f"the saved input state reads {state.get('batch_sizes')} pairs per modality but this "
                       f"job reads {self.batch_sizes}: resume with the same data.modalities, modality_weights "
                       "and batch size, or start a new workdir.")
    for m, s in self.streams.items():
      s.set_state(state["streams"][m])

  def close(self):
    for s in self.streams.values():
      s.close()


SECTOR_SEED = 90  # the headings of limited-field-of-view panoramas: fixed, one per record


def sector_heading_deg(record):
  """The heading a panorama record is cut at in the limited-field-of-view evaluation (seeded by record)."""
  return float(np.random.default_rng([SECTOR_SEED, int(record)]).uniform(0.0, 360.0))


class _ViewImage:
  """grain map: record index -> {image, location_id, index} resized + normalised, no augmentation;
  with `fov_deg` (panoramas) cut to that field of view at `sector_heading_deg(record)`."""

  def __init__(self, data_cfg, source, key, size, modality=None, fov_deg=None):
    self.source, self.key, self.size = source, key, tuple(size)
    self.mean, self.std = tuple(data_cfg.mean), tuple(data_cfg.std)
    self.data_cfg, self.modality, self.fov_deg = data_cfg, modality, fov_deg
    self.warps = key == "query" and warps_query(data_cfg, modality)

  def __call__(self, record):
    image = self.source.image(int(record), self.key)
    if self.warps:  # the only case that reads the record's camera
      image = query_in_frame(image, self.modality, sources.query_camera(self.source.raw(int(record))),
                             self.data_cfg)
    image = normalise(resize(image, self.size), self.mean, self.std)
    if self.fov_deg is not None:  # the fill colour (the mean) is 0 after normalisation
      image = image * sector_mask(*self.size, sector_heading_deg(record), self.fov_deg)
    return {"image": image, "index": np.int64(record)}


class EvalBatches:
  """Re-iterable batches over fixed records, in order; `len()` is the number of batches.

  A batch holds `image`, `index` (the records) and `location_id` (+ `labels`) of up to `batch_size`
  records; the last one may be shorter. With `process_rows` (in a job of several processes: the
  rows of a batch that this process's devices hold, `sharding.process_rows`), each process decodes
  only those rows of every batch, so no image is read twice: `image` then holds them (zeros past the
  last record), `rows` their positions and `padded_size` the batch size, while the labels cover every
  record of the batch.
  `display_images(positions)` reads single items again (the evaluator's PNGs)."""

  def __init__(self, data_cfg, source, records, location_ids, key, size, batch_size, modality=None,
               process_rows=None, fov_deg=None):
    if batch_size <= 0:
      raise GleamError(f"eval batch size {batch_size} must be positive.")
    self.records = np.asarray(records, np.int64)
    self.location_ids = np.asarray(location_ids, np.int64)
    self.batch_size = int(batch_size)
    self._view = _ViewImage(data_cfg, source, key, size, modality, fov_deg)
    self.rows = None if process_rows is None else np.asarray(process_rows, np.int64)
    if self.rows is not None:
      if not len(self.rows) or self.rows.min() < 0 or self.rows.max() >= self.batch_size:
        raise GleamError(f"process_rows {self.rows.tolist()} must be positions in a batch of {self.batch_size}.")
      positions = (np.arange(len(self))[:, None] * self.batch_size + self.rows[None]).reshape(-1)
      ds = grain.MapDataset.source(positions).map(_PaddedView(self._view, self.records, tuple(size)))
      self._ds = ds.batch(len(self.rows))
    else:
      self._ds = grain.MapDataset.source(self.records).map(self._view).batch(self.batch_size, drop_remainder=False)
    self._read_options = _read_options(data_cfg)
    self.labels = {}  # further label arrays aligned with `records`, added to every batch

  def __len__(self):
    return -(-len(self.records) // self.batch_size)

  def __iter__(self):
    for k, batch in enumerate(self._ds.to_iter_dataset(self._read_options)):
      batch_rows = slice(k * self.batch_size, (k + 1) * self.batch_size)
      batch["index"] = self.records[batch_rows]
      batch["location_id"] = self.location_ids[batch_rows]
      for key, values in self.labels.items():
        batch[key] = values[batch_rows]
      if self.rows is not None:
        batch["rows"], batch["padded_size"] = self.rows, self.batch_size
      yield batch

  def display_images(self, positions):
    """{position: image} of the items at `positions` (in batch order), read on this process."""
    return {int(p): self._view(self.records[int(p)])["image"] for p in positions}


class _PaddedView:
  """grain map: position in the batch order -> `_ViewImage` of its record, zeros past the last record."""

  def __init__(self, view, records, size):
    self.view, self.records, self.size = view, records, size

  def __call__(self, position):
    if position < len(self.records):
      return self.view(self.records[int(position)])
    return {"image": np.zeros(self.size + (3,), np.float32), "index": np.int64(-1)}


def _query_rows(index, modality):
  """Records holding a `modality` query (not the gallery-only records of builders/pairs.py)."""
  return np.flatnonzero((index["modality"] == MODALITIES.index(modality)) & index.get("is_query", True))


def check_panorama_fov(fov_deg, modality="panorama"):
  """A limited field of view (`eval.panorama_fov_deg`) cuts panoramas, to (0, 360) deg."""
  if modality != "panorama" or not 0 < float(fov_deg) < 360:
    raise GleamError(f"a limited field of view ({fov_deg} deg) applies to panoramas, in (0, 360) deg; "
                     f"got modality {modality!r}: fix eval.panorama_fov_deg.")


def make_eval_batches(data_cfg, split, modality, batch_size, process_rows=None, fov_deg=None):
  """Batches of every `modality` query of `split` (ordered by location id, then view):
  `image` float32 (b, H, W, 3), `location_id` int64, `index` int64 (record index in the split),
  and `semi_positive_ids` (b, 3) where the dataset has them (VIGOR's hit rate). With `fov_deg`
  (panoramas only), each panorama is cut to that horizontal field of view at a heading fixed per
  record (`sector_heading_deg`), the rest filled: limited-field-of-view queries of known heading."""
  if modality not in MODALITIES:
    raise GleamError(f"unknown modality {modality!r}: use one of {MODALITIES}.")
  if fov_deg is not None:
    check_panorama_fov(fov_deg, modality)
  source = sources.get_source(data_cfg, split)
  index = sources.get_index(data_cfg, split, source)
  rows = _query_rows(index, modality)
  rows = rows[np.lexsort((index["view_index"][rows], index["location_id"][rows]))]
  batches = EvalBatches(data_cfg, source, rows, index["location_id"][rows], "query",
                        query_shape(data_cfg, modality), batch_size, modality, process_rows,
                        None if fov_deg is None else float(fov_deg))
  if "semi_positive_ids" in index:
    batches.labels["semi_positive_ids"] = index["semi_positive_ids"][rows]
  return batches


def make_gallery_batches(data_cfg, split, batch_size, process_rows=None):
  """The split's satellites, one per location, ordered by location id: `image`, `location_id`,
  `index` (the record the satellite was read from)."""
  source = sources.get_source(data_cfg, split)
  index = sources.get_index(data_cfg, split, source)
  location_ids, first = np.unique(index["location_id"], return_index=True)
  return EvalBatches(data_cfg, source, first, location_ids, "satellite", data_cfg.satellite_size, batch_size,
                     process_rows=process_rows)


def make_satellite_query_batches(data_cfg, split, modality, batch_size, process_rows=None):
  """Satellite -> `modality` retrieval (University-1652 / SUES-200 satellite -> drone): the
  satellite of every location with a `modality` query, one per location, ordered by location id,
  as queries. Their gallery is `make_view_gallery_batches` (protocol 'university')."""
  source = sources.get_source(data_cfg, split)
  index = sources.get_index(data_cfg, split, source)
  rows = _query_rows(index, modality)
  location_ids, first = np.unique(index["location_id"][rows], return_index=True)
  return EvalBatches(data_cfg, source, rows[first], location_ids, "satellite", data_cfg.satellite_size,
                     batch_size, process_rows=process_rows)


def make_view_gallery_batches(data_cfg, split, modality, batch_size, process_rows=None):
  """Every `modality` view of `split`, queried or not (University-1652's gallery_drone keeps the
  distractor buildings' views), as a gallery with several items per location, ordered by location
  id, then view."""
  source = sources.get_source(data_cfg, split)
  index = sources.get_index(data_cfg, split, source)
  rows = np.flatnonzero((index["modality"] == MODALITIES.index(modality)) & (index["view_index"] >= 0))
  rows = rows[np.lexsort((index["view_index"][rows], index["location_id"][rows]))]
  return EvalBatches(data_cfg, source, rows, index["location_id"][rows], "query", query_shape(data_cfg, modality),
                     batch_size, modality, process_rows)
