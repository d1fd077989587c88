"""Files every job writes, written atomically, on any path etils.epath reaches (gs:// too).

A reader never sees half a file: each write goes to a temporary sibling, renamed when
complete (atomic on POSIX; a single object on cloud storage).
"""

import io
import os
import uuid

from etils import epath
import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> epath.Path:
  """Writes `data` to `path` via a temporary sibling and a rename; returns the path."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)  # Overwrites an older file.
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise
  return path


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> epath.Path:
  """Saves arrays as an uncompressed .npz, atomically."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return atomic_write_bytes(path, buf.getvalue())


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every array of an .npz file (no pickled objects)."""
  with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def unwritable(path: str | os.PathLike) -> str:
  """"" if `path` exists or can be made and a file can be written in it (a probe, then
  deleted); else the error's text."""
  path = epath.Path(path)
  probe = path / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    return str(e) or type(e).__name__
  return ""
