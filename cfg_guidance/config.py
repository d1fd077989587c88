"""Every configuration field, with its meaning, and the checks that run before compute.

`configs/*.py` start from `get_config()` and override a few fields; `--config.X=V` on the
command line overrides any of them. The model section is a preset from
`cfg_guidance.models.presets`, whose fields each model declares once (`unet.UNetConfig`,
`mlp.MLPConfig`); `use_model` installs one and ties the fields it shares with `data`;
`use_classifier` installs classifier guidance's noisy classifier (`config.classifier`).
"""

import importlib.util
import math
import os
from typing import Any, Callable, NamedTuple
import uuid

from etils import epath
import jax
import ml_collections
import numpy as np

from cfg_guidance import files, guidance, models, sampling
from cfg_guidance.data import pipeline
from cfg_guidance.models import eps, presets

SAMPLERS = tuple(sampling.SOLVERS)
GRIDS = sampling.GRIDS
CLIP_MODES = ("none", "static", "dynamic")
# Rules whose networks the config names (autoguidance's and classifier guidance's second
# network is passed to generate.batches by code).
GUIDANCE_RULES = tuple(k for k, r in guidance.RULES.items()
                       if r.negative != "model" and not r.classifier)
EXTRACTORS = ("inception", "classifier")
FieldReference = ml_collections.FieldReference


def get_config() -> ml_collections.ConfigDict:
  """The full field list, with the digits model and neutral defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Root PRNG seed: every key is fold_in(root, step/process/example).

  config.data = data = ml_collections.ConfigDict()
  data.name = "digits"  # One of data.pipeline.DATASETS.
  data.image_size = 8  # Square side after crop+resize; tied to model.image_size.
  data.data_dir = FieldReference(None, field_type=str)  # TFDS data_dir.
  data.folder = FieldReference(None, field_type=str)  # image_folder root.
  data.random_flip = False  # Random horizontal flips of training images.
  data.num_workers = 0  # grain worker processes (0 = in the main process).
  data.num_threads = 8  # Threads per process (or per grain worker) building batches.
  data.num_toy_examples = 50_000  # Size of the fixed toy2d training set.
  data.toy_seed = 0  # Seed of the fixed toy2d training set (config.seed only orders it).

  use_model(config, presets.digits())  # What models.create takes; see use_model.

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.logsnr_min = -20.0  # λ_min of training and sampling.
  diffusion.logsnr_max = 20.0  # λ_max of training and sampling.
  diffusion.p_uncond = 0.1  # Probability of replacing the label with ∅ (Algorithm 1).
  diffusion.parameterization = "eps"  # Network output: eps (the paper) | v.

  config.train = train = ml_collections.ConfigDict()
  train.num_steps = 1000  # Optimizer steps in total.
  train.batch_size = 128  # Global batch size (all devices and processes).
  train.optimizer = "adam"  # adam | adamw
  train.learning_rate = 3e-4  # Peak learning rate.
  train.warmup_steps = 100  # Linear warm-up steps from 0 to the peak.
  train.b1 = 0.9  # Adam β1.
  train.b2 = 0.999  # Adam β2.
  train.weight_decay = 0.0  # AdamW decoupled weight decay.
  train.grad_clip_norm = 1.0  # Clip gradients to this global norm (0 = off).
  train.ema_decay = 0.9999  # EMA decay of the parameters used for sampling.
  train.ema_warmup = False  # Decay min(ema_decay, (1+step)/(10+step)): for short runs.
  train.steps_per_dispatch = 1  # Optimizer steps per jitted call (lax.scan over batches).
  train.max_consecutive_nonfinite = 10  # Stop after this many skipped updates in a row.
  train.log_every = 50  # Steps between metric writes.
  train.checkpoint_every = 500  # Steps between checkpoints (and one at the end).
  train.keep_checkpoints = 3  # Checkpoints kept on disk.
  train.sample_every = 500  # Steps between EMA sample grids (0 = never).
  train.sample_at_end = False  # After training, run --mode=sample on the final checkpoint.
  train.evaluate_at_end = False  # After training, run --mode=evaluate on it.

  config.sharding = sharding = ml_collections.ConfigDict()
  sharding.fsdp = False  # Shard parameters and optimizer state over `data` (else replicate).
  sharding.fsdp_min_size = 2**14  # Arrays smaller than this stay replicated under FSDP.

  # Classifier guidance's noisy classifier p(c | z_λ) (ADM's; --mode=train_classifier):
  # cross-entropy on z_λ = α x + σ ε of config.data at config.diffusion's training λ, in
  # a training run of its own (checkpoints, resume, metrics) in classifier.workdir. It
  # classifies config.model's inputs, so its image_size, channels and num_classes are
  # config.model's (CLASSIFIER_SHARED_FIELDS; classifier_run builds the run's config).
  config.classifier = classifier = ml_collections.ConfigDict()
  use_classifier(config, presets.digits_classifier())  # classifier.model: encoder_unet.
  classifier.workdir = FieldReference(None, field_type=str)  # None: WORKDIR/noisy_classifier
  # config.train's fields, meaning the same, for the classifier's run (it writes no grids
  # and runs nothing at its end). ADM's classifier: AdamW, weight decay 0.05, no EMA.
  classifier.train = ml_collections.ConfigDict(
      {k: v for k, v in train.items() if k not in _NOT_FOR_CLASSIFIER})
  classifier.train.optimizer = "adamw"
  classifier.train.weight_decay = 0.05
  classifier.train.ema_decay = 0.0  # 0: the EMA is the parameters, which guidance uses.

  # The sampler of every job (--mode=sample, the sweep, the training grids): sampler, v,
  # eta and clip_x are read here only; each job sets its own number of steps.
  config.sample = sample = ml_collections.ConfigDict()  # --mode=sample
  sample.guidance_weights = (0.0, 0.5, 1.0, 2.0, 4.0)  # One npz and grid per weight.
  sample.num_samples = 100  # Samples per weight.
  sample.classes = FieldReference(None, field_type=tuple)  # None: balanced over all.
  sample.num_steps = 256  # Sampler grid points N (network evaluations; heun: 2N - 1).
  # ancestral (Algorithm 2) | ddim | dpmpp_2m (DPM-Solver++(2M)) | unipc (UniPC-bh2, order
  # 2 with corrector) | heun (EDM's Heun, 2 evaluations per step, optional churn).
  sample.sampler = "ancestral"
  sample.grid = "u"  # λ grid: u (the schedule's, Algorithm 2's) | logsnr (uniform in λ)
  sample.v = 0.3  # Variance interpolation of Eq. 4 (ancestral).
  sample.eta = 0.0  # DDIM stochasticity.
  sample.lower_order_final = True  # dpmpp_2m/unipc: first-order last step when N < 15.
  sample.s_churn = 0.0  # heun: EDM's S_churn (0: the deterministic ODE solver).
  sample.s_tmin = 0.0  # heun: churn only while σ/α lies in [s_tmin, s_tmax].
  sample.s_tmax = float("inf")
  sample.s_noise = 1.0  # heun: EDM's S_noise, the churn noise's scale.
  sample.clip_x = "static"  # none | static (x̃ to [-1, 1], as DDPM samples) | dynamic
  # The guidance rule (cfg_guidance.guidance) and its parameters, sample.<rule>_<name>.
  sample.guidance = "cfg"  # cfg (Eq. 6) | cfg_rescale (Lin et al. 2023) | apg (Sadat et al.)
  sample.cfg_rescale_phi = 0.7  # cfg_rescale: φ, the share of the std-rescaled x̂ (0: cfg).
  sample.apg_eta = 0.0  # apg: η, the weight of the update parallel to x̂(z, c) (1: cfg).
  sample.apg_threshold = float("inf")  # apg: r, the cap on the update's norm (inf: none).
  sample.apg_momentum = 0.0  # apg: β, momentum over evaluations (the paper's: < 0).
  sample.batch_size = 500  # Global examples per sampler call.
  sample.seed = 0  # Example i's noise comes from fold_in(key(seed), i).
  sample.step = FieldReference(None, field_type=int)  # Checkpoint; None: latest.

  config.grid = grid = ml_collections.ConfigDict()  # Sample grids written during training.
  grid.guidance_weights = (0.0, 1.0, 3.0)  # One grid row block per weight.
  grid.classes = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)  # Columns: one per class.
  grid.samples_per_class = 1  # Rows per weight.
  grid.num_steps = 64  # Sampler steps for the grids.
  grid.seed = 1234  # Fixed seed so grids compare across training.

  config.eval = ev = ml_collections.ConfigDict()  # --mode=evaluate, with config.sample's sampler
  ev.guidance_weights = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0, 3.0, 4.0)
  ev.num_samples = 50_000  # Samples per weight.
  ev.batch_size = 500  # Global examples per sampler call.
  ev.num_steps = 256  # Sampler steps T.
  ev.seed = 0  # Sampling seed (each example's noise comes from its global index).
  ev.step = FieldReference(None, field_type=int)  # Checkpoint; None: latest.
  ev.extractor = "inception"  # inception | classifier (a stand-in trained on the data)
  ev.inception_path = FieldReference(None, field_type=str)  # classify_image_graph_def.pb
  ev.reference_stats = FieldReference(None, field_type=str)  # Reference npz (mu, sigma).
  # Results, metrics and caches; None: WORKDIR/eval. Set it to evaluate a read-only run.
  ev.output_dir = FieldReference(None, field_type=str)
  ev.precision_recall = False  # Also compute k-NN precision/recall (keeps features).
  ev.classifier_steps = 2000  # Training steps of the stand-in classifier.
  ev.watch = False  # Keep evaluating each new checkpoint as it appears.
  ev.watch_interval = 60.0  # Seconds between checks for a new checkpoint in watch mode.
  ev.watch_timeout = 0.0  # Stop watching after this many idle seconds (0 = never).
  ev.pr_num_samples = 10_000  # Random real images for precision/recall vs all samples.
  ev.pr_seed = 0  # Draws that real subset; its indices are kept in the reference file.
  ev.grid_class = 0  # The one class on the right of each w's sample grid (Figs. 6/7).
  ev.grid_size = 6  # Each w's grid: grid_size² random-class samples, as many of grid_class.

  # --mode=compare: each guidance rule swept over its strength with config.eval's
  # samples, extractor and sampler, on one FID-vs-IS figure (Fig. 4 / Table 1's claim).
  config.compare = cmp = ml_collections.ConfigDict()
  cmp.rules = ("cfg", "classifier", "cfg_rescale", "apg", "autoguidance")
  # The strength: w for cfg, cfg_rescale, apg and autoguidance (their parameters from
  # sample.<rule>_<name>), the scale s for classifier guidance (at w = 0: ADM-G).
  cmp.strengths = (0.0, 0.5, 1.0, 2.0, 4.0)
  # Autoguidance's weak model: this run's checkpoint at this step; None: its earliest.
  cmp.autoguidance_step = FieldReference(None, field_type=int)
  cmp.autoguidance_workdir = FieldReference(None, field_type=str)  # Another run's, if set.
  # Classifier guidance's noisy classifier: config.classifier's run (--mode=train_classifier).

  # Weights & Biases beside TensorBoard (training and evaluation; process 0). Needs
  # `pip install "cfg_guidance[wandb]"`; `wandb login` or $WANDB_API_KEY for online runs.
  config.wandb = wb = ml_collections.ConfigDict()
  wb.enabled = False
  wb.project = "cfg_guidance"
  wb.entity = FieldReference(None, field_type=str)  # Team or user; None: wandb's default.
  wb.name = FieldReference(None, field_type=str)  # None: "<workdir name>/<job>".
  wb.group = FieldReference(None, field_type=str)  # E.g. a sweep's name.
  wb.tags = ()
  wb.mode = FieldReference(None, field_type=str)  # online | offline; None: $WANDB_MODE.
  return config


# The noisy classifier's run directory inside WORKDIR when classifier.workdir is None.
CLASSIFIER_WORKDIR = "noisy_classifier"
# classifier.model's fields that are config.model's: the classifier sees the same z and
# classes as the diffusion model it guides.
CLASSIFIER_SHARED_FIELDS = ("num_classes", "image_size", "channels")
# config.train's fields that the classifier's run has no use for.
_NOT_FOR_CLASSIFIER = ("sample_every", "sample_at_end", "evaluate_at_end")


def use_classifier(config: ml_collections.ConfigDict,
                   model: ml_collections.ConfigDict) -> None:
  """Makes `model` (a classifier preset) config.classifier.model, less the fields it
  takes from config.model (CLASSIFIER_SHARED_FIELDS)."""
  config.classifier.model = ml_collections.ConfigDict(
      {k: v for k, v in model.items() if k not in CLASSIFIER_SHARED_FIELDS})


def classifier_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The noisy classifier's run directory: classifier.workdir, or WORKDIR/noisy_classifier."""
  return config.classifier.workdir or str(epath.Path(workdir) / CLASSIFIER_WORKDIR)


def classifier_run(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The noisy classifier's training run as a config of its own (what its checkpoints
  save): `config` with model = classifier.model plus config.model's shared fields, and
  train = config.train updated by classifier.train, with no grids or end-of-run jobs."""
  run = ml_collections.ConfigDict(config.to_dict())
  run.model = ml_collections.ConfigDict(
      {**config.classifier.model.to_dict(),
       **{k: config.model[k] for k in CLASSIFIER_SHARED_FIELDS}})
  run.train.update(config.classifier.train.to_dict())
  run.train.sample_every, run.train.sample_at_end, run.train.evaluate_at_end = 0, False, False
  return run


def use_model(config: ml_collections.ConfigDict, model: ml_collections.ConfigDict) -> None:
  """Makes `model` (a preset) config.model; an image model's size becomes data's too.

  The two `image_size` fields are one FieldReference afterwards: setting either (in a
  config file or on the command line) sets both.
  """
  if "image_size" in model:
    if "data" in config:
      config.data.image_size = model.image_size
      model.image_size = config.data.get_ref("image_size")
  config.model = model


def load_file(path: str, argument: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(argument)` of a config file, as `--config=path[:argument]` loads it."""
  spec = importlib.util.spec_from_file_location(f"_config_{uuid.uuid4().hex}", path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"No config file at {path!r}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if argument is None else module.get_config(argument)


def from_dict(saved: dict) -> ml_collections.ConfigDict:
  """The config a run saved with its checkpoints (`config.to_dict()` through JSON).

  Fields it lacks keep get_config()'s defaults; JSON's lists become tuples again.
  """
  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    return tuple(tuples(v) for v in value) if isinstance(value, list) else value

  config = get_config()
  for section, fields in tuples(saved).items():
    if isinstance(fields, dict) and section in config and section != "model":
      config[section].update(fields)
    else:  # The model section whole: which fields it has depends on the model.
      config[section] = ml_collections.ConfigDict(fields) if isinstance(fields, dict) \
          else fields
  return config


# --- Checks that run before any compute, each error naming the field, the value and
# what is allowed. A field's rule lives in RULES; rules across fields in the check_*s.

def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
  return (isinstance(v, (int, float, np.integer, np.floating))
          and not isinstance(v, (bool, np.bool_)) and math.isfinite(v))


class Rule(NamedTuple):
  test: Callable[[Any], bool]
  allowed: str  # Completes "must be ...".


def ints(lo: int | None = None, *, none: bool = False, note: str = "") -> Rule:
  return Rule(lambda v: (none and v is None) or (_is_int(v) and (lo is None or v >= lo)),
              ("an int" if lo is None else f"an int >= {lo}")
              + (" or None" if none else "") + note)


def numbers(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False) -> Rule:
  def test(v):
    return (_is_number(v) and (lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))
  bounds = ("" if lo is None and hi is None else
            f" in {'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
            f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}")
  return Rule(test, "a finite number" + bounds)


def one_of(*choices) -> Rule:
  return Rule(lambda v: v in choices, f"one of {choices}")


BOOL = Rule(lambda v: isinstance(v, bool), "True or False")
WEIGHTS = Rule(lambda v: isinstance(v, (tuple, list)) and len(v) > 0
               and all(_is_number(w) for w in v),
               "a non-empty tuple of finite guidance weights")

RULES = {
    "seed": ints(0),
    "data.name": one_of(*pipeline.DATASETS),
    "data.image_size": ints(0, note=" (0: points, as toy2d)"),
    "data.random_flip": BOOL,
    "data.num_workers": ints(0),
    "data.num_threads": ints(0),
    "data.num_toy_examples": ints(1),
    "data.toy_seed": ints(0),
    "diffusion.logsnr_min": numbers(),
    "diffusion.logsnr_max": numbers(),
    "diffusion.p_uncond": numbers(0.0, 1.0),
    "diffusion.parameterization": one_of(*eps.PARAMETERIZATIONS),
    "train.num_steps": ints(0),
    "train.batch_size": ints(1),
    "train.optimizer": one_of("adam", "adamw"),
    "train.learning_rate": numbers(0.0, lo_open=True),
    "train.warmup_steps": ints(0),
    "train.b1": numbers(0.0, 1.0, hi_open=True),
    "train.b2": numbers(0.0, 1.0, hi_open=True),
    "train.weight_decay": numbers(0.0),
    "train.grad_clip_norm": numbers(0.0),
    "train.ema_decay": numbers(0.0, 1.0, hi_open=True),
    "train.ema_warmup": BOOL,
    "train.steps_per_dispatch": ints(1),
    "train.max_consecutive_nonfinite": ints(1),
    "train.log_every": ints(1),
    "train.checkpoint_every": ints(0, note=" (0: only at the end and on preemption)"),
    "train.keep_checkpoints": ints(1),
    "train.sample_every": ints(0, note=" (0: never)"),
    "train.sample_at_end": BOOL,
    "train.evaluate_at_end": BOOL,
    "sharding.fsdp": BOOL,
    "sharding.fsdp_min_size": ints(0),
    "sample.guidance_weights": WEIGHTS,
    "sample.num_samples": ints(1),
    "sample.num_steps": ints(1),
    "sample.sampler": one_of(*SAMPLERS),
    "sample.v": numbers(0.0, 1.0),
    "sample.eta": numbers(0.0, 1.0),
    "sample.grid": one_of(*GRIDS),
    "sample.lower_order_final": BOOL,
    "sample.s_churn": numbers(0.0),
    "sample.s_tmin": numbers(0.0),
    "sample.s_tmax": Rule(lambda v: v == float("inf") or _is_number(v) and v >= 0,
                          "a number >= 0 or inf"),
    "sample.s_noise": numbers(0.0),
    "sample.clip_x": one_of(*CLIP_MODES),
    "sample.guidance": one_of(*GUIDANCE_RULES),
    **{f"sample.{name}_{key}": Rule(lambda v, p=p: (_is_number(v) or v == float("inf"))
                                    and p.ok(v), p.describe())
       for name in GUIDANCE_RULES for key, p in guidance.RULES[name].params.items()},
    "sample.batch_size": ints(1),
    "sample.seed": ints(0),
    "sample.step": ints(0, none=True),
    "grid.guidance_weights": WEIGHTS,
    "grid.samples_per_class": ints(1),
    "grid.num_steps": ints(1),
    "grid.seed": ints(0),
    "eval.guidance_weights": WEIGHTS,
    "eval.batch_size": ints(1),
    "eval.num_steps": ints(1),
    "eval.seed": ints(0),
    "eval.step": ints(0, none=True),
    "compare.rules": Rule(lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                          and all(r in guidance.RULES for r in v) and len(set(v)) == len(v),
                          f"a non-empty tuple of distinct rules from {tuple(guidance.RULES)}"),
    "compare.strengths": WEIGHTS,
    "compare.autoguidance_step": ints(0, none=True),
    "wandb.enabled": BOOL,
    "wandb.project": Rule(lambda v: isinstance(v, str) and bool(v), "a project name"),
    "wandb.mode": Rule(lambda v: v in (None, "online", "offline"),
                       "None, 'online' or 'offline'"),
}
RULES.update({f"classifier.{k}": r for k, r in RULES.items() if k.startswith("train.")
              and k.removeprefix("train.") not in _NOT_FOR_CLASSIFIER})
RULES["classifier.workdir"] = Rule(lambda v: v is None or (isinstance(v, str) and bool(v)),
                                   "None or a directory")
_SAMPLER_FIELDS = ("sample.sampler", "sample.grid", "sample.v", "sample.eta",
                   "sample.clip_x", "sample.lower_order_final", "sample.s_churn",
                   "sample.s_tmin", "sample.s_tmax", "sample.s_noise", "sample.guidance",
                   *(f"sample.{name}_{key}" for name in GUIDANCE_RULES
                     for key in guidance.RULES[name].params))


def check_fields(config: ml_collections.ConfigDict, *names: str) -> None:
  """RULES of the named fields (a section name checks every rule under it)."""
  for name in names:
    rules = {k: r for k, r in RULES.items() if k == name or k.startswith(name + ".")}
    _require(bool(rules), f"no rule for config.{name}")  # A typo in the caller.
    for field, rule in rules.items():
      section, _, key = field.rpartition(".")
      holder = config[section] if section else config
      if key not in holder:
        continue  # Absent from an older run's saved config: its default applies.
      value = holder[key]
      _require(rule.test(value),
               f"config.{field}={value!r} must be {rule.allowed}.")


def _check_classes(field: str, classes, num_classes: int, *, none: bool) -> None:
  if none and classes is None:
    return
  _require(isinstance(classes, (tuple, list)) and len(classes) > 0
           and all(_is_int(c) and 0 <= c < num_classes for c in classes),
           f"config.{field}={classes!r} must be a non-empty tuple of class labels in "
           f"[0, {num_classes - 1}] (config.model.num_classes={num_classes}; "
           f"{num_classes} is ∅){' or None' if none else ''}.")


def check_common(config: ml_collections.ConfigDict) -> None:
  """Fields every mode reads: data, model, diffusion."""
  check_fields(config, "seed", "data", "diffusion")
  models.parse_config(config.model)  # Names config.model.<field>.
  d = config.diffusion
  _require(d.logsnr_min < d.logsnr_max,
           f"config.diffusion.logsnr_min={d.logsnr_min} must be below "
           f"config.diffusion.logsnr_max={d.logsnr_max}.")


def check_tracking(config: ml_collections.ConfigDict) -> None:
  """config.wandb, and that wandb is installed when it is enabled."""
  if "wandb" not in config:
    return  # A run saved before W&B support: its default (off) applies.
  check_fields(config, "wandb")
  if config.wandb.enabled and importlib.util.find_spec("wandb") is None:
    raise ValueError("config.wandb.enabled=True, but wandb is not installed: pip install "
                     "'cfg_guidance[wandb]' (or leave config.wandb.enabled=False).")


def check_sampler(config: ml_collections.ConfigDict, num_steps_field: str) -> None:
  """config.sample's sampler settings, and the job's step count (e.g. "eval.num_steps")."""
  check_fields(config, *_SAMPLER_FIELDS, num_steps_field)


def check_workdir(workdir: str) -> None:
  """The workdir exists or can be made, a file can be written in it, and its
  `checkpoints` is a directory (or absent)."""
  path = epath.Path(workdir)
  error = files.unwritable(path)
  _require(not error, f"--workdir={workdir} is not writable: {error}")
  checkpoints = path / "checkpoints"
  _require(not checkpoints.exists() or checkpoints.is_dir(),
           f"{checkpoints} is not a directory: checkpoints cannot be written there. Move "
           "it aside or choose another --workdir.")


def check_train(config: ml_collections.ConfigDict, workdir: str,
                num_devices: int | None = None) -> None:
  """Everything training reads (and the end-of-training jobs' own fields), checked
  before any compute; the workdir last."""
  num_devices = num_devices or jax.device_count()
  check_common(config)
  check_fields(config, "train", "sharding")
  check_tracking(config)
  t = config.train
  _require(t.batch_size % num_devices == 0,
           f"config.train.batch_size={t.batch_size} must be divisible by the number of "
           f"devices ({num_devices}).")
  _require(t.batch_size % jax.process_count() == 0,
           f"config.train.batch_size={t.batch_size} must be divisible by the number of "
           f"processes ({jax.process_count()}).")
  _require(t.num_steps % t.steps_per_dispatch == 0,
           f"config.train.num_steps={t.num_steps} must be a multiple of "
           f"config.train.steps_per_dispatch={t.steps_per_dispatch} (each dispatch runs "
           "that many steps; logging, grids and checkpoints happen at the first dispatch "
           "boundary at or after their multiple).")
  if config.model.name == "unet":  # Only image models write grids.
    check_sampler(config, "grid.num_steps")
    check_fields(config, "grid")
    _check_classes("grid.classes", config.grid.classes, config.model.num_classes,
                   none=False)
  if t.sample_at_end:
    check_sample(config)
  check_workdir(workdir)


def check_classifier(config: ml_collections.ConfigDict, workdir: str,
                     num_devices: int | None = None) -> None:
  """Everything --mode=train_classifier reads (check_train of classifier_run), before any
  compute, naming config.classifier's fields. workdir: the classifier's run directory."""
  check_common(config)
  _require(config.model.name == "unet",
           f"config.model.name={config.model.name!r}: the noisy classifier takes its input "
           "shape and classes from an image model ('unet').")
  name = config.classifier.model.get("name")
  _require(name in models.CLASSIFIERS,
           f"config.classifier.model.name={name!r} must be one of {models.CLASSIFIERS}.")
  check_fields(config, "classifier")
  try:
    check_train(classifier_run(config), workdir, num_devices)
  except ValueError as e:  # The run's config.model/train are config.classifier's.
    message = str(e).replace("config.model", "config.classifier.model")
    raise ValueError(message.replace("config.train", "config.classifier.train")) from None


def check_sample(config: ml_collections.ConfigDict) -> None:
  """Everything --mode=sample reads."""
  check_common(config)
  check_sampler(config, "sample.num_steps")
  check_fields(config, "sample")
  _check_classes("sample.classes", config.sample.classes, config.model.num_classes,
                 none=True)


def check_data(config: ml_collections.ConfigDict, *, num_classes: int,
               example_shape: tuple[int, ...], source: str) -> None:
  """The model fits the data: every label is a real class and the shapes agree.

  num_classes: labels in the data are 0..num_classes-1; example_shape: one example's.
  """
  m = config.model
  _require(num_classes <= m.num_classes,
           f"config.model.num_classes={m.num_classes} but {source} has labels up to "
           f"{num_classes - 1} ({num_classes} classes): label {m.num_classes} is ∅, the "
           f"unconditional token, so set config.model.num_classes={num_classes} (or more).")
  want = tuple(models.parse_config(m)[1].example_shape())
  _require(want == tuple(example_shape),
           f"config.model ({m.name}) takes examples of shape {want} but {source} gives "
           f"{tuple(example_shape)}"
           + (f": set config.model.channels={example_shape[-1]}."
              if len(want) == 3 and want[:2] == tuple(example_shape[:2]) else "."))


def check_eval(config: ml_collections.ConfigDict, *, min_samples: int, pr_k: int) -> None:
  """Every field the evaluation reads; `min_samples` (IS splits) and `pr_k` from it."""
  check_common(config)
  check_sampler(config, "eval.num_steps")
  check_tracking(config)
  ev, num_classes = config.eval, config.model.num_classes
  _require(config.model.name == "unet",
           f"config.model.name={config.model.name!r}: --mode=evaluate measures image "
           "samples, so it needs an image model ('unet').")
  _require(len(ev.guidance_weights) > 0
           and all(isinstance(w, (int, float)) and abs(float(w)) < float("inf")
                   for w in ev.guidance_weights),
           f"config.eval.guidance_weights={ev.guidance_weights} must be finite numbers.")
  _require(ev.num_samples >= min_samples,
           f"config.eval.num_samples={ev.num_samples} must be at least {min_samples} (the "
           "Inception Score's splits).")
  _require(ev.batch_size >= 1, f"config.eval.batch_size={ev.batch_size} must be >= 1.")
  _require(ev.extractor in EXTRACTORS,
           f"config.eval.extractor={ev.extractor!r} must be one of {EXTRACTORS}.")
  _require(ev.classifier_steps >= 1,
           f"config.eval.classifier_steps={ev.classifier_steps} must be >= 1.")
  _require(0 <= ev.grid_class < num_classes,
           f"config.eval.grid_class={ev.grid_class} must lie in [0, {num_classes}).")
  _require(ev.grid_size >= 1, f"config.eval.grid_size={ev.grid_size} must be >= 1.")
  _require(not ev.precision_recall or ev.pr_num_samples > pr_k,
           f"config.eval.pr_num_samples={ev.pr_num_samples} must exceed k={pr_k}.")
  _require(isinstance(ev.pr_seed, int) and ev.pr_seed >= 0,
           f"config.eval.pr_seed={ev.pr_seed!r} must be a non-negative int.")
  _require(ev.watch_interval > 0,
           f"config.eval.watch_interval={ev.watch_interval} must be positive.")
  _require(ev.watch_timeout >= 0,
           f"config.eval.watch_timeout={ev.watch_timeout} must be >= 0 (0 = never).")


def check_same_model(config: ml_collections.ConfigDict,
                     saved: ml_collections.ConfigDict, where: str) -> None:
  """The config's model is the one the run at `where` trained, field by field."""
  ours = models.parse_config(config.model)[1]
  theirs = models.parse_config(saved.model)[1]
  differ = [f"config.model.{k}={getattr(ours, k)!r} (the run has {getattr(theirs, k)!r})"
            for k in vars(ours) if type(ours) is type(theirs)
            and getattr(ours, k) != getattr(theirs, k)]
  if type(ours) is not type(theirs):
    differ = [f"config.model.name={config.model.name!r} (the run has "
              f"{saved.model.name!r})"]
  p, q = config.diffusion.parameterization, saved.diffusion.parameterization
  if p != q:
    differ.append(f"config.diffusion.parameterization={p!r} (the run has {q!r})")
  _require(not differ, f"The config does not match the run at {where}: "
           + "; ".join(differ) + ". Use the run's config file and settings.")
