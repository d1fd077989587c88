"""The deterministic example stream: which record fills each slot of each process's batches.

The stream is global: position p >= 0 holds record perm(seed, p // N)[p % N], a fresh
permutation of all N records each epoch, and global batch k holds positions
[k G, (k + 1) G) for the global batch size G. Process i of P builds only its slice,
positions k G + i B + [0, B) with B = G / P, reading just those records. So the global
batch is a pure function of (data, seed, G, k), the same whatever the number of processes,
and a multi-host run trains on exactly what a single host would.
An unreadable record at position p is counted and replaced by the record at the next
readable position p + 1, p + 2, ..., which keeps batch shapes and the position map fixed.
"""

import functools

import numpy as np

# Give up (and raise) when this many positions in a row are unreadable.
MAX_CONSECUTIVE_UNREADABLE = 1000
# Tags that keep the shuffling and flipping streams of one seed independent.
_SHUFFLE, _FLIP = 0, 1


def shard_range(num_records: int, process_index: int, process_count: int, *,
                drop_remainder: bool) -> tuple[int, int]:
  """[start, stop) of process_index's contiguous shard.

  With drop_remainder, all shards have N // P records; otherwise the first N % P shards
  get one more, so the shards cover every record exactly once.
  """
  if drop_remainder:
    size = num_records // process_count
    return process_index * size, (process_index + 1) * size
  size, extra = divmod(num_records, process_count)
  start = process_index * size + min(process_index, extra)
  return start, start + size + (process_index < extra)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
  """The order of all `size` records in one epoch: int64 [size]."""
  rng = np.random.default_rng([seed, _SHUFFLE, epoch])
  perm = rng.permutation(size)
  perm.flags.writeable = False
  return perm


class StreamLoader:
  """Builds this process's slice of global batch k; picklable for grain workers.

  Calling it with k returns {"image": [B, ...], "label": int32 [B], "num_skipped": int},
  num_skipped counting the positions of this batch whose own record was unreadable.
  """

  def __init__(self, source, *, seed: int, process_index: int, process_count: int,
               batch_size: int, random_flip: bool):
    self.source = source
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.batch_size = batch_size
    self.random_flip = random_flip
    self.size = len(source)
    if self.size == 0:
      raise ValueError("The data set has no examples.")

  def records(self, positions: np.ndarray) -> np.ndarray:
    """Record index at each stream position: [M] -> [M]."""
    epochs, offsets = np.divmod(positions, self.size)
    records = np.empty_like(positions)
    for epoch in np.unique(epochs):
      perm = epoch_permutation(self.seed, int(epoch), self.size)
      at = epochs == epoch
      records[at] = perm[offsets[at]]
    return records

  def _slice(self) -> slice:
    return slice(self.process_index * self.batch_size,
                 (self.process_index + 1) * self.batch_size)

  def flips(self, step: int) -> np.ndarray:
    """Horizontal-flip decisions of this process's part of batch `step`: bool [B]."""
    if not self.random_flip:
      return np.zeros(self.batch_size, bool)
    rng = np.random.default_rng([self.seed, _FLIP, step])
    return (rng.random(self.batch_size * self.process_count) < 0.5)[self._slice()]

  def __call__(self, step: int) -> dict:
    global_batch = self.batch_size * self.process_count
    positions = (step * global_batch + self.process_index * self.batch_size
                 + np.arange(self.batch_size, dtype=np.int64))
    flips = self.flips(step)
    images, labels, ok = self.source.load(self.records(positions), flips)
    for slot in np.flatnonzero(~ok):
      images[slot], labels[slot] = self._replacement(int(positions[slot]), flips[slot])
    return {"image": images, "label": labels, "num_skipped": int(np.sum(~ok))}

  def _replacement(self, position: int, flip: bool):
    """The first readable example after `position`: (image, label)."""
    limit = min(self.size, MAX_CONSECUTIVE_UNREADABLE)
    for offset in range(1, limit + 1):
      records = self.records(np.array([position + offset]))
      images, labels, ok = self.source.load(records, np.array([flip]))
      if ok[0]:
        return images[0], labels[0]
    raise RuntimeError(f"No readable example in the {limit} positions after position "
                       f"{position} of process {self.process_index}'s stream.")


class ChunkLoader:
  """Reads chunk c of a shard in storage order for a single pass; picklable.

  Returns {"image", "label"} of the readable examples among records
  [start + c L, start + (c + 1) L) ∩ [start, stop), and "num_skipped" for the rest.
  """

  def __init__(self, source, *, start: int, stop: int, chunk_size: int):
    self.source = source
    self.start, self.stop = start, stop
    self.chunk_size = chunk_size

  def __len__(self) -> int:
    return -(-(self.stop - self.start) // self.chunk_size)

  def __call__(self, chunk: int) -> dict:
    first = self.start + chunk * self.chunk_size
    records = np.arange(first, min(first + self.chunk_size, self.stop), dtype=np.int64)
    images, labels, ok = self.source.load(records, np.zeros(len(records), bool))
    return {"image": images[ok], "label": labels[ok], "num_skipped": int(np.sum(~ok))}
