"""Command line: train, sample or evaluate a classifier-free guidance model.

  python -m cfg_guidance.main --config=configs/digits.py --workdir=/tmp/cfg_digits \
      [--mode=train|sample|evaluate|compare|train_classifier] \
      [--config.train.num_steps=100 ...]

or, installed, `cfg-guidance --config=... --workdir=...`. Orbax's and grain's INFO lines
show with --verbosity=1.
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train",
                  ["train", "sample", "evaluate", "compare", "train_classifier"],
                  "What to run (compare: the guidance rules on one sweep; "
                  "train_classifier: classifier guidance's noisy classifier, in "
                  "config.classifier.workdir, default WORKDIR/noisy_classifier).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs (found automatically "
                    "on Cloud TPU and under SLURM).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool("cpu_runtime", True,
                  "On CPU (Linux, glibc): run computations inline and keep XLA's scratch "
                  "memory mapped between steps (runtime/backend.py's configure_cpu).")
flags.mark_flags_as_required(["config", "workdir"])


def check_command_line(argv: list[str]) -> None:
  """Refuses what ml_collections would quietly misread: a --config.FIELD given twice (a
  tuple's second value is appended to its first) and NaN in a numeric value (not parsed
  as a number at all, so the whole value becomes one string)."""
  seen = {}
  args = iter(argv[1:])
  for arg in args:
    if arg == "--":
      break
    if not arg.startswith("--config."):
      continue
    name, eq, value = arg[2:].partition("=")
    if not eq:
      value = next(args, "")
    if name in seen:
      raise ValueError(f"--{name} is given twice ({seen[name]!r}, then {value!r}): give "
                       "it once; ml_collections would append a tuple's second value.")
    seen[name] = value
    tokens = [t for t in re.split(r"[\s,()\[\]]+", value) if t]
    if any(t.lower().lstrip("+-") == "nan" for t in tokens) and all(
        _is_number(t) for t in tokens):
      raise ValueError(f"--{name}={value}: NaN is not an allowed value of any field.")


def _is_number(token: str) -> bool:
  try:
    float(token)
  except ValueError:
    return False
  return True


def _parse_flags(argv):
  try:
    check_command_line(argv)
  except ValueError as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\n")
    sys.exit(1)
  return app.parse_flags_with_usage(argv)


# Libraries whose INFO lines (Orbax's are ~40% of a digits run's log) are shown only with
# --verbosity=1 or more.
QUIET_LIBRARIES = ("orbax", "grain", "tensorflow_datasets")


class _LibraryFilter:
  """Drops records below WARNING logged from QUIET_LIBRARIES' files."""

  def __init__(self, libraries=QUIET_LIBRARIES):
    self._parts = tuple(f"/{name}/" for name in libraries)

  def filter(self, record) -> bool:
    if record.levelno >= logging.converter.STANDARD_WARNING:
      return True
    path = record.pathname.replace("\\", "/")
    return not any(part in path for part in self._parts)


def quiet_libraries(verbosity: int) -> None:
  """At the default verbosity (0), other libraries log warnings and errors only."""
  if verbosity <= 0:
    logging.get_absl_handler().addFilter(_LibraryFilter())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_libraries(FLAGS.verbosity)
  config = FLAGS.config
  # TensorFlow (the [tf] extra) is imported only by TFDS data and the Inception
  # extractor, through runtime.backend.tensorflow(), which keeps it off the GPUs.
  import jax  # pylint: disable=g-import-not-at-top
  from cfg_guidance.runtime import backend, distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.cpu_runtime:
    backend.configure_cpu()
  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())

  # pylint: disable=g-import-not-at-top
  from cfg_guidance import samples, train
  from cfg_guidance.evaluation import compare, sweep
  # pylint: enable=g-import-not-at-top
  if FLAGS.mode == "train":
    if config.train.evaluate_at_end:  # Its fields checked now, not after training.
      sweep.check_config(config)
    state = train.run(config, FLAGS.workdir)
    finished = int(state.step) >= config.train.num_steps  # Not stopped by a preemption.
    if finished and config.train.sample_at_end:
      samples.run(config, FLAGS.workdir)
    if finished and config.train.evaluate_at_end:
      sweep.run(config, FLAGS.workdir)
  elif FLAGS.mode == "sample":
    samples.run(config, FLAGS.workdir)
  elif FLAGS.mode == "compare":
    compare.run(config, FLAGS.workdir)
  elif FLAGS.mode == "train_classifier":
    train.run_classifier(config, FLAGS.workdir)
  else:
    sweep.run(config, FLAGS.workdir)


def run_main():
  """The `cfg-guidance` console script: the same flags as `python -m cfg_guidance.main`."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run_main()
