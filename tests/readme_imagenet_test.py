"""README.md's ImageNet commands (prepare, train, evaluate), run as written on a fake download.

The fake $MANUAL_DIR has the real ILSVRC2012 layout that TFDS's imagenet2012 builder reads:
ILSVRC2012_img_train.tar holding one nXXXXXXXX.tar of JPEGs per synset, and
ILSVRC2012_img_val.tar holding ILSVRC2012_val_000000NN.JPEG (labelled by TFDS's
validation_labels.txt in sorted-name order); the test tar is optional and left out.
The README's commands run through bash with only the workdir and the Inception path
substituted and tiny overrides appended.
"""

import io
import json
import math
import os
import shlex
import subprocess
import tarfile

import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import fake_inception
import readme_commands

ROOT = readme_commands.ROOT
PREPARE = readme_commands.find('python -c "import tensorflow_datasets')
TRAIN = readme_commands.find("python -m cfg_guidance.main --config=configs/imagenet64.py "
                             "--workdir=gs://BUCKET/in64 --config.data.data_dir")
EVALUATE = readme_commands.find("python -m cfg_guidance.main --config=configs/imagenet64.py "
                                "--workdir=gs://BUCKET/in64 --mode=evaluate")
README_WORKDIR = "gs://BUCKET/in64"
README_INCEPTION = "/path/to/classify_image_graph_def.pb"

# Train images: per synset index (into TFDS's labels.txt), the (height, width) of each JPEG.
TRAIN_SIZES = {1: [(21, 34), (40, 17)], 207: [(16, 16), (33, 25)], 980: [(12, 30), (27, 19)]}
GREY = (207, 1)  # (synset index, image number) written as a one-channel JPEG.
VAL_SIZES = [(25, 18), (14, 31), (36, 36)]  # ILSVRC2012_val_00000001.JPEG, ...
NUM_STEPS, LOG_EVERY = 4, 2
EVAL_WEIGHTS = (0.0, 2.0)

# Appended to the README's commands: a 273k-parameter U-Net on 8x8 images (the config's
# bfloat16 compute kept), 4 steps of batch 4, and a 2-weight, 10-sample, T = 2 sweep.
MODEL = [
    "--config.data.image_size=8", "--config.model.image_size=8",
    "--config.model.base_channels=16", "--config.model.channel_mult=(1,2)",
    "--config.model.num_res_blocks=1", "--config.model.attention_resolutions=(4,)",
    "--config.model.num_groups=8", "--config.model.num_heads=2",
    "--config.model.num_head_channels=-1", "--config.data.num_threads=2",
]
TRAIN_TINY = MODEL + [
    f"--config.train.num_steps={NUM_STEPS}", "--config.train.batch_size=4",
    "--config.train.warmup_steps=1", f"--config.train.log_every={LOG_EVERY}",
    f"--config.train.checkpoint_every={NUM_STEPS}", "--config.train.sample_every=0",
]
EVAL_TINY = MODEL + [
    f"--config.eval.guidance_weights=({','.join(map(str, EVAL_WEIGHTS))})",
    "--config.eval.num_samples=10", "--config.eval.batch_size=10",
    "--config.eval.num_steps=2", "--config.eval.grid_size=1",
]


def _tfds_file(name):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return (tfds.core.tfds_path("datasets/imagenet2012") / name).read_text().split()


def _jpeg(rng, height, width, grey=False):
  pixels = rng.integers(0, 256, (height, width) if grey else (height, width, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _decode(data):
  """The same decoder for what we wrote and what TFDS stored: PIL, in the file's own mode."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image)


def _run(command, **env):
  return subprocess.run(
      command, shell=True, executable="/bin/bash", cwd=ROOT, capture_output=True, text=True,
      timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **env))


def _adapted(command, replacements, overrides):
  """`command` with each {README text: our path} replaced (once) and `overrides` appended."""
  for old, new in replacements.items():
    assert command.count(old) == 1, (old, command)
    command = command.replace(old, shlex.quote(str(new)))
  return " ".join([command, *map(shlex.quote, overrides)])


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  """A fake ILSVRC2012 download: (dir, {split: {file_name: (label index, JPEG bytes)}})."""
  synsets = _tfds_file("labels.txt")
  val_synsets = _tfds_file("validation_labels.txt")
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("manual")
  expected = {"train": {}, "validation": {}}
  with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
    for index, sizes in TRAIN_SIZES.items():
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
        for k, (h, w) in enumerate(sizes):
          name, data = f"{synsets[index]}_{k}.JPEG", _jpeg(rng, h, w, (index, k) == GREY)
          _add(inner, name, data)
          expected["train"][name] = (index, data)
      _add(outer, f"{synsets[index]}.tar", inner_bytes.getvalue())
  with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
    for k, (h, w) in enumerate(VAL_SIZES):
      name, data = f"ILSVRC2012_val_{k + 1:08d}.JPEG", _jpeg(rng, h, w)
      _add(tar, name, data)
      expected["validation"][name] = (synsets.index(val_synsets[k]), data)
  return root, expected


@pytest.fixture(scope="module")
def prepared(manual_dir, tmp_path_factory):
  """The README's data-preparation command, verbatim: (TFDS_DATA_DIR, expected records)."""
  root, expected = manual_dir
  data_dir = tmp_path_factory.mktemp("tfds")
  proc = _run(PREPARE, TFDS_DATA_DIR=str(data_dir), MANUAL_DIR=str(root))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return data_dir, expected


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
  """The README's train command on the prepared data: (workdir, process)."""
  data_dir, _ = prepared
  workdir = tmp_path_factory.mktemp("in64")
  command = _adapted(TRAIN, {README_WORKDIR: workdir}, TRAIN_TINY)
  return workdir, _run(command, TFDS_DATA_DIR=str(data_dir))


@pytest.fixture(scope="module")
def evaluated(prepared, trained, tmp_path_factory):
  """The README's evaluate command with a stand-in Inception graph: (workdir, process)."""
  data_dir, _ = prepared
  workdir, proc = trained
  assert proc.returncode == 0, proc.stderr[-3000:]
  graph, _, _ = fake_inception.write_graph(tmp_path_factory.mktemp("inception"),
                                           active_dims=3)
  command = _adapted(EVALUATE, {README_WORKDIR: workdir, README_INCEPTION: graph}, EVAL_TINY)
  return workdir, _run(command, TFDS_DATA_DIR=str(data_dir))


def test_prepare_builds_both_splits_from_the_manual_tars(prepared):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir, expected = prepared
  synsets = _tfds_file("labels.txt")
  for split, records in expected.items():
    # Read as the input pipeline reads it: ArrayRecord, random access, bytes undecoded.
    source = tfds.data_source("imagenet2012", split=split, data_dir=str(data_dir),
                              download=False, builder_kwargs={"file_format": "array_record"},
                              decoders={"image": tfds.decode.SkipDecoding()})
    assert len(source) == len(records), split
    seen = set()
    for i in range(len(source)):
      example = source[i]
      name = example["file_name"].decode()
      label, data = records[name]
      seen.add(name)
      assert int(example["label"]) == label, (split, name)
      np.testing.assert_array_equal(_decode(example["image"]), _decode(data), err_msg=name)
      if name.startswith("n"):  # Train files are named after their synset.
        assert name.split("_")[0] == synsets[label]
    assert seen == set(records), split
  assert not list(data_dir.glob("imagenet2012/*/imagenet2012-test.*"))  # No test tar given.


def test_train_reads_the_prepared_data_and_checkpoints(trained):
  workdir, proc = trained
  assert proc.returncode == 0, proc.stderr[-3000:]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [NUM_STEPS]
  assert (workdir / "checkpoints" / str(NUM_STEPS) / "state").is_dir()
  acc = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  events = acc.Tensors("loss")
  assert [e.step for e in events] == list(range(LOG_EVERY, NUM_STEPS + 1, LOG_EVERY))
  losses = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events]
  # The U-Net's output conv starts at zero, so 4 small steps in, eps_pred is still ~0 and
  # the loss ~E[eps^2] = 1 (mean of 2 x 4 x 192 squared normals: std ~0.04).
  assert all(math.isfinite(x) and 0.7 < x < 1.3 for x in losses), losses


def test_train_fails_without_the_prepared_data(trained, tmp_path):
  """The same command on an empty TFDS_DATA_DIR fails naming it: the run above read ours."""
  empty, workdir = tmp_path / "empty_tfds", tmp_path / "in64"
  empty.mkdir()
  proc = _run(_adapted(TRAIN, {README_WORKDIR: workdir}, TRAIN_TINY),
              TFDS_DATA_DIR=str(empty))
  assert proc.returncode != 0
  assert f"data.data_dir={str(empty)!r}" in proc.stderr, proc.stderr[-3000:]
  assert not (workdir / "checkpoints" / str(NUM_STEPS)).exists()


def test_evaluate_writes_one_finite_record_per_weight(evaluated, prepared):
  workdir, proc = evaluated
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "eval" / str(NUM_STEPS) / "results.json").read_text())
  assert results["step"] == NUM_STEPS and results["num_samples"] == 10
  assert results["extractor"] == "inception-2015-12-05" and results["num_steps"] == 2
  # Reference statistics over the prepared train split (data.data_dir unset: the
  # README's command finds it through $TFDS_DATA_DIR).
  assert results["reference_count"] == len(prepared[1]["train"])
  records = results["records"]
  assert [r["w"] for r in records] == list(EVAL_WEIGHTS)
  for record in records:
    assert {"fid", "is", "is_std", "diversity"} <= set(record), record
    # Example i has label i mod 1000, so no class has the 2 samples an intra-class std
    # needs: NaN, written as null. Every other number is finite.
    assert record.pop("diversity") is None
    for key, value in record.items():
      assert isinstance(value, (int, float)) and math.isfinite(value), (key, record)
    assert record["fid"] >= 0
    # 10 samples in IS's 10 splits: one per split, so each split's score is exp(KL(p||p)) = 1.
    assert record["is"] == pytest.approx(1.0) and record["is_std"] == pytest.approx(0.0)
  for w in EVAL_WEIGHTS:
    assert (workdir / "eval" / str(NUM_STEPS) / f"samples_w{w:g}.png").is_file()
