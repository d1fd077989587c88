"""The sampling driver: examples by global index → per-example keys → guided sampling
sharded over every device of every process → samples.

Every job samples through here: --mode=sample, the evaluation sweep, the training grids,
the toy figure and `load().sample()`. Example i draws all its noise from
fold_in(key(seed), i), so with the same settings its sample is the same whatever the
batch, device count or process count it is drawn with, and whichever job draws it.
"""

import dataclasses
import functools
from typing import Callable, Iterator, NamedTuple, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
import numpy as np

from cfg_guidance import guidance, models, sampling
from cfg_guidance.runtime import backend, distributed, reporting, sharding


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["v", "eta", "logsnr_min", "logsnr_max", "dynamic_percentile",
                 "guidance_interval", "s_churn", "s_tmin", "s_tmax", "s_noise",
                 "guidance_params"],
    meta_fields=["shape", "null_label", "num_steps", "sampler", "clip_x", "batch_size",
                 "cond_uncond_batched", "grid", "lower_order_final", "guidance"])
@dataclasses.dataclass(frozen=True)
class Settings:
  """How to sample, apart from the labels, weights and seed. See `sampling.sample`.

  A pytree: the numbers (v, eta, the λ range, ...) are traced, so changing them does
  not recompile; the rest is static.
  """
  shape: tuple[int, ...]  # One example, e.g. (64, 64, 3).
  null_label: int  # ∅'s index: the number of classes.
  num_steps: int  # N, the grid's points (sampling.num_evaluations gives the NFE).
  sampler: str = "ancestral"  # One of sampling.SOLVERS.
  clip_x: str | bool = "static"  # none | static | dynamic.
  batch_size: int = 500  # Global examples per call (rounded up to the device count).
  cond_uncond_batched: bool = True  # Both branches in one call of 2N examples.
  v: float = 0.3  # Eq. 4's variance interpolation (ancestral).
  eta: float = 0.0  # DDIM's noise scale.
  logsnr_min: float = -20.0  # λ_1.
  logsnr_max: float = 20.0  # λ_T.
  dynamic_percentile: float = 0.995  # clip_x="dynamic"'s quantile.
  guidance_interval: tuple[float, float] | None = None  # Guide only for λ inside.
  grid: str = "u"  # One of sampling.GRIDS.
  lower_order_final: bool = True  # dpmpp_2m/unipc: first order last when N < 15.
  s_churn: float = 0.0  # heun's churn (EDM's S_churn, S_tmin, S_tmax, S_noise).
  s_tmin: float = 0.0
  s_tmax: float = float("inf")
  s_noise: float = 1.0
  guidance: str = "cfg"  # The guidance rule: one of guidance.RULES.
  # Its parameters by name (guidance.RULES[guidance].params); traced, like v.
  guidance_params: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def num_evaluations(self) -> int:
    """Network evaluations per sample (calls on the 2N batch): the cost."""
    return sampling.num_evaluations(self.sampler, self.num_steps)

  def replace(self, **changes) -> "Settings":
    return dataclasses.replace(self, **changes)


def settings_from_config(config, *, num_steps: int, batch_size: int | None = None
                         ) -> Settings:
  """The sampler of `config.sample` for the model of `config.model`, with T = num_steps.

  This is where the sampler settings are read from a config, for every job. The
  guidance rule's parameters come from the fields `sample.<rule>_<parameter>`.
  """
  _, fields = models.parse_config(config.model)
  s = config.sample
  default = Settings(shape=(), null_label=0, num_steps=1)  # For fields an older run lacks.
  newer = {k: s.get(k, getattr(default, k)) for k in (
      "grid", "lower_order_final", "s_churn", "s_tmin", "s_tmax", "s_noise", "guidance")}
  newer["guidance_params"] = rule_params(s, newer["guidance"])
  return Settings(shape=fields.example_shape(), null_label=fields.num_classes,
                  num_steps=int(num_steps), sampler=s.sampler, clip_x=s.clip_x,
                  batch_size=int(batch_size or s.batch_size), v=float(s.v),
                  eta=float(s.eta), logsnr_min=float(config.diffusion.logsnr_min),
                  logsnr_max=float(config.diffusion.logsnr_max), **newer)


def rule_params(sample_config, rule: str) -> dict[str, float]:
  """Guidance rule `rule`'s parameters from the fields `sample.<rule>_<parameter>`."""
  spec = guidance.RULES.get(rule)
  return {k: float(sample_config.get(f"{rule}_{k}", p.default))
          for k, p in (spec.params.items() if spec else ())}


def root_key(seed: int, stream: int | None = None) -> np.ndarray:
  """The raw data of key(seed), or of fold_in(key(seed), stream): uint32 [2]."""
  key = jax.random.key(seed)
  if stream is not None:
    key = jax.random.fold_in(key, stream)
  return np.asarray(jax.random.key_data(key))


@backend.jit(static_argnames=("out_sharding",))
def _sample_rows(eps_fn, root, indices, labels, weights, negative_labels,
                 settings: Settings, negative_eps_fn, classifier_fn, *, out_sharding):
  """[B, *shape] samples; example `indices[b]` draws its noise from fold_in(root, i)."""
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.wrap_key_data(root),
                                                        indices)
  options = dict(eta=settings.eta, dynamic_percentile=settings.dynamic_percentile,
                 cond_uncond_batched=settings.cond_uncond_batched,
                 guidance_interval=settings.guidance_interval,
                 negative_labels=negative_labels, grid=settings.grid,
                 lower_order_final=settings.lower_order_final, s_churn=settings.s_churn,
                 s_tmin=settings.s_tmin, s_tmax=settings.s_tmax, s_noise=settings.s_noise,
                 guidance=settings.guidance, guidance_params=settings.guidance_params,
                 negative_eps_fn=negative_eps_fn, classifier_fn=classifier_fn)
  x = sampling.sample(eps_fn, keys, labels, shape=settings.shape, guidance_weight=weights,
                      null_label=settings.null_label, num_steps=settings.num_steps,
                      sampler=settings.sampler, v=settings.v,
                      logsnr_min=settings.logsnr_min, logsnr_max=settings.logsnr_max,
                      clip_x=settings.clip_x, **options)
  return jax.lax.with_sharding_constraint(x, out_sharding)


class Batch(NamedTuple):
  """This process's rows of one global batch."""
  indices: np.ndarray  # int [B_local]: the examples' global indices.
  samples: np.ndarray  # float32 [B_local, *shape], in [-1, 1] for images.
  valid: np.ndarray  # bool [B_local]: False for the padding of a last batch.


def global_batch_size(settings: Settings, num_examples: int, mesh) -> int:
  """Examples per call: batch_size (at most num_examples) rounded up to the devices."""
  size = min(settings.batch_size, num_examples)
  return -(-size // mesh.size) * mesh.size


def _per_example(name: str, value, n: int, dtype) -> np.ndarray:
  value = np.asarray(value, dtype)
  if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != n):
    raise ValueError(f"{name} must be a scalar or have shape [{n}] (one per label); got "
                     f"shape {value.shape}.")
  return np.broadcast_to(value, (n,))


def _check_range(name: str, labels: np.ndarray, null_label: int) -> None:
  lo, hi = int(labels.min()), int(labels.max())
  if lo < 0 or hi > null_label:
    raise ValueError(f"{name} must lie in [0, {null_label}] ({null_label} is ∅, the "
                     f"unconditional label); got values in [{lo}, {hi}].")


def batches(eps_fn: Callable, labels: Sequence[int], guidance_weight, *,
            settings: Settings, seed: int, indices: Sequence[int] | None = None,
            stream: int | None = None, negative_labels=None, negative_eps_fn=None,
            classifier_fn=None, mesh=None, progress: str | None = None
            ) -> Iterator[Batch]:
  """Samples `labels` at `guidance_weight`, one global batch at a time.

  Every process passes the same arguments and gets its own rows of each batch; the next
  batch is dispatched before this one is handed over, so the host's work on a batch
  overlaps the devices' on the next.

  Args:
    eps_fn: `eps_fn(z, logsnr, labels) -> eps`; a `jax.tree_util.Partial` binding the
      parameters, so that new parameters reuse the compiled sampler.
    labels: [N] ints in [0, null_label].
    guidance_weight: w, a scalar or [N] (one per example); finite.
    settings: the sampler (`settings_from_config`).
    seed: example i's noise comes from fold_in(key(seed), indices[i]).
    indices: [N] global example indices (default 0, ..., N − 1).
    stream: if given, the root key is fold_in(key(seed), stream) instead: a second,
      independent set of samples for the same indices.
    negative_labels: the negative branch's labels, scalar or [N] (default ∅).
    negative_eps_fn, classifier_fn: the second network of settings.guidance
      "autoguidance" (an eps_fn) or "classifier" (`classifier_fn(z, logsnr) -> logits`);
      `jax.tree_util.Partial`s, as eps_fn.
    mesh: default: every device of every process on one `data` axis.
    progress: if given, process 0 logs a line per batch naming it, with the samples done,
      their rate and the time left.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be ints of shape [N]; got {labels.dtype} "
                     f"{labels.shape}.")
  n = len(labels)
  if n == 0:
    return
  _check_range("labels", labels, settings.null_label)
  weights = _per_example("guidance_weight", guidance_weight, n, np.float32)
  if not np.isfinite(weights).all():
    raise ValueError(f"guidance_weight must be finite; got {np.unique(weights)}.")
  indices = np.arange(n) if indices is None else _per_example("indices", indices, n,
                                                              np.int64)
  negative = None if negative_labels is None else _per_example(
      "negative_labels", negative_labels, n, np.int32)
  if negative is not None:
    _check_range("negative_labels", negative, settings.null_label)
  # Plain callables are keyed by identity: pass the same ones.
  as_partial = lambda fn: (fn if fn is None or isinstance(fn, jax.tree_util.Partial)
                          else jax.tree_util.Partial(fn))
  eps_fn, negative_eps_fn, classifier_fn = map(as_partial, (eps_fn, negative_eps_fn,
                                                            classifier_fn))
  mesh = mesh or sharding.create_mesh()
  size = global_batch_size(settings, n, mesh)
  rows = _process_rows(size)
  root = root_key(seed, stream)
  out_sharding = sharding.data_sharding(mesh)

  def launch(start):
    picked = np.arange(start, start + size)
    valid = picked < n
    picked = np.minimum(picked, n - 1)  # Padding repeats the last example.
    local = {"indices": indices[picked][rows].astype(np.int32),
             "labels": labels[picked][rows].astype(np.int32),
             "weights": weights[picked][rows]}
    if negative is not None:
      local["negative"] = negative[picked][rows]
    batch = sharding.host_to_global(local, mesh)
    x = _sample_rows(eps_fn, root, batch["indices"], batch["labels"], batch["weights"],
                     batch.get("negative"), settings, negative_eps_fn, classifier_fn,
                     out_sharding=out_sharding)
    return picked[rows], x, valid[rows]

  report = reporting.Progress(progress, n) if progress and jax.process_index() == 0 else None
  pending = launch(0)
  for following in list(range(size, n, size)) + [None]:
    position, x, valid = pending
    if following is not None:
      pending = launch(following)
    samples = _local_rows(x, mesh)
    if not np.isfinite(samples).all():
      bad = position[valid & ~np.isfinite(samples).reshape(len(samples), -1).all(axis=1)]
      raise FloatingPointError(
          f"samples {indices[bad][:5].tolist()}{'...' if len(bad) > 5 else ''} came out "
          "NaN or inf "
          f"(labels {np.unique(labels[bad]).tolist()}, guidance weights "
          f"{np.unique(weights[bad]).tolist()}): the network's ε is not finite there. "
          "Nothing was written for them.")
    if report:
      report(min(n, (following or n)))
    yield Batch(indices[position], samples, valid)


def draw(eps_fn: Callable, labels: Sequence[int], guidance_weight, **kwargs
         ) -> np.ndarray:
  """Every sample of `batches(eps_fn, labels, guidance_weight, **kwargs)`, on every
  process: float32 [N, *shape], in the order of `labels`."""
  out = []
  for batch in batches(eps_fn, labels, guidance_weight, **kwargs):
    samples, valid = distributed.gather(batch.samples, batch.valid)
    out.append(samples[valid])
  if not out:
    return np.zeros((0, *kwargs["settings"].shape), np.float32)
  return np.concatenate(out)


def _process_rows(batch_size: int) -> slice:
  """This process's rows of a global batch (host_to_global's process order)."""
  per_process = batch_size // jax.process_count()
  return slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


def _local_rows(x: jax.Array, mesh) -> np.ndarray:
  """This process's rows of a global batch, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, P(sharding.DATA_AXIS)))


def balanced_labels(num: int, num_classes: int, classes: Sequence[int] | None = None,
                    field: str = "config.sample.classes") -> np.ndarray:
  """[num] labels cycling through `classes` (default: every class): class-balanced."""
  classes = np.arange(num_classes) if classes is None else np.asarray(classes)
  bad = classes[(classes < 0) | (classes >= num_classes)]
  if bad.size:
    raise ValueError(f"{field} has {bad.tolist()}, outside [0, {num_classes - 1}].")
  return np.resize(classes, num).astype(np.int32)


def grid_layout(classes: Sequence[int], weights: Sequence[float], per_class: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """(labels [n], weights [n]) for rows = weight × per_class, columns = classes."""
  classes = np.asarray(classes, np.int32)
  labels = np.tile(classes, len(weights) * per_class)
  w = np.repeat(np.asarray(weights, np.float32), per_class * len(classes))
  return labels, w

