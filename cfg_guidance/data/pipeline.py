"""Input pipelines: data sets -> this process's numpy batches, deterministic in (seed, step).

Batch k of process i is a pure function of the data, the seed, i, the process count, the
batch size and k (`cfg_guidance.data.stream` defines it), so the iterator state is one step
counter, the same on every process, and a resume jumps straight to it. Random access makes
that possible, hence grain over TFDS ArrayRecord data sources (`tfds.data_source`), image
files and in-memory arrays rather than tf.data, whose exact resume needs a TF checkpoint
per process or a replay of the stream. grain only parallelises: batches are built by a pool
of threads (PIL and numpy release the GIL) and, with `data.num_workers`, worker processes;
the stream does not depend on either. Per CPU-second this decodes about half as many
ImageNet-sized JPEGs as tf.data (bench/input_bench.py, bench/BENCHMARKS.md); we accept
that for exact, cheap resumes: on TPU/GPU hosts more threads or worker processes pay it,
and imagenet_resized (64x64 PNGs) skips most of it.
"""

import dataclasses
import itertools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from cfg_guidance.data import sources, stream, toy2d


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
  tfds_name: str
  num_classes: int
  default_size: int | None  # Stored side length; None where stored sizes vary.


_TFDS = {
    "cifar10": _TfdsSpec("cifar10", 10, 32),
    "imagenet2012": _TfdsSpec("imagenet2012", 1000, None),
    "imagenet_resized": _TfdsSpec("imagenet_resized/64x64", 1000, 64),
}
DATASETS = ("digits", "toy2d", *_TFDS, "image_folder")
_DIGITS_SHAPE = (8, 8, 1)
_DEFAULT_NUM_THREADS = 8


def _field(data_config, name: str, default: Any = None) -> Any:
  value = data_config.get(name, default)
  return default if value is None else value


def _name(data_config) -> str:
  name = _field(data_config, "name")
  if name not in DATASETS:
    raise ValueError(f"data.name={name!r} is not one of {', '.join(DATASETS)}.")
  return name


def _image_size(data_config, name: str) -> int:
  """The output side length: data.image_size, or the data set's own where it has one."""
  size = data_config.get("image_size")
  if name == "digits":
    if size not in (None, _DIGITS_SHAPE[0]):
      raise ValueError(f"data.image_size={size} but digits are 8x8: set data.image_size=8.")
    return _DIGITS_SHAPE[0]
  if size is None and name in _TFDS:
    size = _TFDS[name].default_size
  if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
    raise ValueError(f"data.image_size={size!r} must be a positive int for {name}.")
  return int(size)


def _folder(data_config) -> str:
  folder = data_config.get("folder")
  if not folder:
    raise ValueError("data.folder must name the image folder (one sub-folder per class) "
                     "when data.name='image_folder'.")
  return folder


def _check_split(name: str, split: str) -> None:
  if name in _TFDS:
    return
  if split != "train":
    raise ValueError(f"split={split!r}: data set {name} has only the 'train' split"
                     + (" (point data.folder at another folder instead)."
                        if name == "image_folder" else "."))


def _num_toy_examples(data_config) -> int:
  num = data_config.get("num_toy_examples", 50_000)
  if not isinstance(num, (int, np.integer)) or num <= 0:
    raise ValueError(f"data.num_toy_examples={num!r} must be a positive int.")
  return int(num)


def open_source(data_config, split: str):
  """The random-access source behind data.name; raises ValueError naming a bad field."""
  name = _name(data_config)
  _check_split(name, split)
  if name == "digits":
    _image_size(data_config, name)
    images, labels = sources.load_digits_arrays()
    return sources.ArraySource(images, labels, flip_axis=2)
  if name == "toy2d":
    x, labels = toy2d.sample_data(int(_field(data_config, "toy_seed", 0)),
                                _num_toy_examples(data_config))
    return sources.ArraySource(x, labels, flip_axis=None)
  if name == "image_folder":
    folder = _folder(data_config)
    classes, files, labels = sources.list_image_folder(folder)
    return sources.FolderSource(folder, files, labels, _image_size(data_config, name),
                                len(classes))
  size = _image_size(data_config, name)
  data_source = sources.open_tfds(_TFDS[name].tfds_name, split, data_config.get("data_dir"))
  return sources.TfdsSource(data_source, size, _TFDS[name].num_classes)


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count}).")
  return process_index, process_count


def _parallel_map(fn: Callable[[int], dict], start: int, stop: int | None, *,
                  num_threads: int, num_workers: int) -> Iterator[dict]:
  """fn(start), fn(start + 1), ... in order; computed ahead by grain threads/processes."""
  if num_threads == 0 and num_workers == 0:
    return map(fn, range(start, stop) if stop is not None else itertools.count(start))
  import grain  # pylint: disable=g-import-not-at-top
  dataset = grain.MapDataset.range(start, stop if stop is not None else sys.maxsize).map(fn)
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(num_threads, 1)))
  if num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; outside an absl app (notebooks, tests)
      # nothing parsed them, and their defaults are what we want.
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(iter_dataset)


def _parallelism(data_config, source) -> dict[str, int]:
  """Threads and worker processes for `source`; in-memory batches are built in place."""
  if isinstance(source, sources.ArraySource):
    return {"num_threads": 0, "num_workers": 0}
  counts = {"num_threads": _field(data_config, "num_threads", _DEFAULT_NUM_THREADS),
            "num_workers": _field(data_config, "num_workers", 0)}
  for key, value in counts.items():
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"data.{key}={value!r} must be a non-negative int.")
  return {k: int(v) for k, v in counts.items()}


class DataIterator:
  """This process's infinite stream of batches {"image": [B, ...], "label": int32 [B]}.

  `get_state()` is small, JSON-serialisable and identical on every process; `set_state`
  continues the exact stream from it. `num_skipped` counts unreadable examples replaced.
  """

  def __init__(self, loader: stream.StreamLoader, *, identity: dict, parallelism: dict,
               description: str = "the data"):
    self._loader = loader
    self._identity = identity  # What a saved state must match to continue this stream.
    self._parallelism = parallelism
    self._step = 0
    self._batches = None
    self.num_skipped = 0
    self.num_classes = loader.source.num_classes  # Labels are 0..num_classes-1.
    self.example_shape = loader.source.example_shape
    self.description = description  # For messages: which data this is.

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batches is None:
      self._batches = _parallel_map(self._loader, self._step, None, **self._parallelism)
    batch = next(self._batches)
    self._step += 1
    self.num_skipped += batch["num_skipped"]
    return {"image": batch["image"], "label": batch["label"]}

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step, **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state` (from get_state); raises ValueError if it is another stream."""
    mismatched = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
    if mismatched or not isinstance(state.get("step"), (int, np.integer)) or state["step"] < 0:
      raise ValueError(
          f"Data iterator state {state} cannot continue this stream; mismatched (saved, "
          f"now): {mismatched or {'step': state.get('step')}}. The stream depends on "
          "seed, data.name, split, train.batch_size and the number of processes.")
    self.close()
    self._step = int(state["step"])

  def close(self) -> None:
    """Stops prefetching (and worker processes); the next batch restarts them."""
    if self._batches is not None and hasattr(self._batches, "close"):
      self._batches.close()
    self._batches = None


def create_dataset(data_config, *, global_batch_size: int, seed: int, split: str = "train",
                   process_index: int | None = None,
                   process_count: int | None = None) -> DataIterator:
  """The infinite training stream of this process: batches of global_batch_size // P.

  Every epoch is reshuffled from (seed, epoch); process i reads only its own shard.
  """
  process_index, process_count = _processes(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"train.batch_size={global_batch_size} must be a positive multiple of "
                     f"the number of processes ({process_count}).")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed={seed!r} must be a non-negative int.")
  name = _name(data_config)
  source = open_source(data_config, split)
  random_flip = bool(data_config.get("random_flip", False)) and name != "toy2d"
  loader = stream.StreamLoader(
      source, seed=int(seed), process_index=process_index, process_count=process_count,
      batch_size=global_batch_size // process_count, random_flip=random_flip)
  identity = {"seed": int(seed), "dataset": name, "split": split,
              "global_batch_size": int(global_batch_size)}
  where = f" at {data_config.get('folder')}" if name == "image_folder" else ""
  return DataIterator(loader, identity=identity,
                      parallelism=_parallelism(data_config, source),
                      description=f"data set {name}{where}")


class OnePassIterator:
  """Every example of this process's shard once, in storage order, no augmentation.

  Batches hold batch_size examples (the last may be short); unreadable examples are left
  out and counted in `num_skipped`.
  """

  def __init__(self, loader: stream.ChunkLoader, batch_size: int, parallelism: dict):
    self._chunks = _parallel_map(loader, 0, len(loader), **parallelism)
    self._batch_size = batch_size
    self._pending: list[dict] = []
    self.num_skipped = 0

  def __iter__(self) -> "OnePassIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while sum(len(c["label"]) for c in self._pending) < self._batch_size:
      chunk = next(self._chunks, None)
      if chunk is None:
        break
      self.num_skipped += chunk.pop("num_skipped")
      self._pending.append(chunk)
    if not self._pending:
      raise StopIteration
    merged = {k: np.concatenate([c[k] for c in self._pending]) for k in ("image", "label")}
    batch = {k: v[:self._batch_size] for k, v in merged.items()}
    rest = {k: v[self._batch_size:] for k, v in merged.items()}
    self._pending = [rest] if len(rest["label"]) else []
    return batch


def iterate_once(data_config, *, batch_size: int, split: str = "train",
                 process_index: int | None = None,
                 process_count: int | None = None) -> OnePassIterator:
  """One pass over this process's part of `split` (the parts of all processes cover it)."""
  process_index, process_count = _processes(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be positive.")
  source = open_source(data_config, split)
  start, stop = stream.shard_range(len(source), process_index, process_count,
                                   drop_remainder=False)
  loader = stream.ChunkLoader(source, start=start, stop=stop, chunk_size=batch_size)
  return OnePassIterator(loader, batch_size, _parallelism(data_config, source))
