"""The metric writer: TensorBoard files without TensorFlow, as tf.summary writes them; W&B
offline; progress lines."""

import glob
import io
import json
import struct
import time

from absl import logging
import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from cfg_guidance import config as config_lib
from cfg_guidance.runtime import reporting


def _accumulator(logdir):
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
  return acc.Reload()


def _write_example(writer, picture):
  writer.write_hparams({"train.batch_size": 16, "model.name": "unet", "ema": True})
  writer.write_scalars(4, {"loss": 1.25, "steps_per_sec": np.float32(3.5)})
  writer.write_scalars(8, {"loss": 0.5})
  writer.write_images(8, {"ema_samples": picture[None]})
  writer.close()


@pytest.fixture
def picture():
  return np.random.default_rng(0).integers(0, 256, (12, 20, 1), dtype=np.uint8)


def test_tensorboard_reads_back_scalars_images_and_hparams(tmp_path, picture):
  _write_example(reporting.Writer(tmp_path), picture)
  acc = _accumulator(tmp_path)
  loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
          for e in acc.Tensors("loss")]
  assert loss == [(4, 1.25), (8, 0.5)]
  assert acc.SummaryMetadata("loss").plugin_data.plugin_name == "scalars"
  (image,) = acc.Tensors("ema_samples")
  width, height, png = tensor_util.make_ndarray(image.tensor_proto)
  assert (int(width), int(height)) == (20, 12)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), picture[..., 0])
  assert acc.SummaryMetadata("ema_samples").plugin_data.plugin_name == "images"
  assert _session_hparams(acc) == {"train.batch_size": 16, "model.name": "unet",
                                   "ema": True}


def _session_hparams(acc):
  """The hparams plugin's session start, as TensorBoard's HParams tab reads it."""
  content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
  start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
  return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def test_same_summaries_as_tf_summary(tmp_path, picture):
  """A second code path: TensorFlow's own tf.summary writes the same tensors and plugins."""
  tf = pytest.importorskip("tensorflow")
  from tensorboard.plugins.hparams import api as hparams_api  # pylint: disable=g-import-not-at-top
  with tf.summary.create_file_writer(str(tmp_path / "tf")).as_default():
    tf.summary.scalar("loss", 1.25, step=4)
    tf.summary.scalar("steps_per_sec", 3.5, step=4)
    tf.summary.scalar("loss", 0.5, step=8)
    tf.summary.image("ema_samples", picture[None], step=8)
    hparams_api.hparams({"train.batch_size": 16, "model.name": "unet", "ema": True})
  _write_example(reporting.Writer(tmp_path / "ours"), picture)
  ours, theirs = _accumulator(tmp_path / "ours"), _accumulator(tmp_path / "tf")
  assert set(ours.Tags()["tensors"]) == set(theirs.Tags()["tensors"])
  assert _session_hparams(ours) == _session_hparams(theirs)
  for tag in set(theirs.Tags()["tensors"]) - {"_hparams_/session_start_info"}:
    assert (ours.SummaryMetadata(tag).plugin_data.plugin_name
            == theirs.SummaryMetadata(tag).plugin_data.plugin_name)
    for a, b in zip(ours.Tensors(tag), theirs.Tensors(tag), strict=True):
      assert a.step == b.step
      x, y = (tensor_util.make_ndarray(e.tensor_proto) for e in (a, b))
      assert x.dtype == y.dtype and x.shape == y.shape, tag
      if tag == "ema_samples":  # The PNG bytes may differ; the pixels may not.
        assert list(x[:2]) == list(y[:2])
        np.testing.assert_array_equal(*(np.asarray(Image.open(io.BytesIO(v[2])))
                                        for v in (x, y)))
      else:
        np.testing.assert_array_equal(x, y)


def test_only_the_chief_writes_files(tmp_path, picture):
  _write_example(reporting.Writer(tmp_path, is_chief=False), picture)
  assert not list(tmp_path.iterdir())


def test_bad_images_name_the_image(tmp_path):
  writer = reporting.Writer(tmp_path)
  with pytest.raises(ValueError, match="'grid'.*uint8 \\[N, H, W, 1 or 3\\].*float32"):
    writer.write_images(0, {"grid": np.zeros((1, 4, 4, 1), np.float32)})


def _wandb_records(run_dir):
  """The records of the offline run's .wandb file, parsed with wandb's own protobuf.

  The file is a 7-byte W&B header, then LevelDB's log format: 32 KiB blocks of records
  (crc32c: 4 bytes, length: 2, type: 1 FULL / 2 FIRST / 3 MIDDLE / 4 LAST, then data).
  """
  (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))
  return _wandb_file_records(path)


def _finished(records):
  return any(r.WhichOneof("record_type") == "exit" for r in records)


def _wandb_file_records(path, timeout=60.0):
  """wandb-core (a separate process) may still be writing when `finish()` returns: reads
  until the run's exit record is there."""
  deadline = time.monotonic() + timeout
  while True:
    records = _parse_wandb_file(path)
    if _finished(records) or time.monotonic() > deadline:
      return records
    time.sleep(0.2)


def _parse_wandb_file(path):
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < 7:
    return []
  assert data[1:4] == b"W&B"
  pos, block, records, parts = 7, 32768, [], []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # Too little left in the block for a header: padding.
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0 or pos + 7 + length > len(data):  # The end, or a record half written.
      break
    parts.append(data[pos + 7:pos + 7 + length])
    pos += 7 + length
    if kind in (1, 4):  # FULL or LAST: a whole record.
      records.append(wandb_internal_pb2.Record.FromString(b"".join(parts)))
      parts = []
  return records


def _key(item):
  return item.key or "/".join(item.nested_key)


def test_wandb_offline_gets_the_same_scalars_images_and_config(tmp_path, picture,
                                                               monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = {"enabled": True, "project": "cfg-test", "mode": "offline", "tags": ("t",)}
  _write_example(reporting.Writer(tmp_path, wandb_config=config, job="train"), picture)
  records = _wandb_records(tmp_path)
  (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  assert run.project == "cfg-test" and run.job_type == "train"
  assert run.run_id == (tmp_path / "wandb_train_id.txt").read_text()
  history = [(r.history.step.num, {_key(i): json.loads(i.value_json) for i in r.history.item})
             for r in records if r.WhichOneof("record_type") == "history"]
  assert [(step, h["loss"]) for step, h in history if "loss" in h] == [(4, 1.25), (8, 0.5)]
  assert [h["steps_per_sec"] for _, h in history if "steps_per_sec" in h] == [3.5]
  assert [step for step, h in history if "ema_samples/_type" in h] == [8]
  config_items = {_key(i): json.loads(i.value_json) for r in records
                  if r.WhichOneof("record_type") == "config" for i in r.config.update}
  assert config_items["train.batch_size"] == 16
  # The image as W&B stored it: the PNG its history row names, in the run's files.
  ((_, row),) = [(step, h) for step, h in history if "ema_samples/filenames" in h]
  (name,) = row["ema_samples/filenames"]
  (files_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files"))
  with Image.open(f"{files_dir}/{name}") as png:
    np.testing.assert_array_equal(np.asarray(png.convert("L")), picture[..., 0])


def test_a_second_run_in_the_same_directory_resumes_its_wandb_run(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = {"enabled": True, "mode": "offline"}
  reporting.Writer(tmp_path, wandb_config=config, job="train").close()
  first = (tmp_path / "wandb_train_id.txt").read_text()
  reporting.Writer(tmp_path, wandb_config=config, job="train").close()
  assert (tmp_path / "wandb_train_id.txt").read_text() == first
  ids = [r.run.run_id for path in glob.glob(str(tmp_path / "wandb" / "offline-run-*" /
                                                "*.wandb"))
         for r in _wandb_file_records(path) if r.WhichOneof("record_type") == "run"]
  assert ids == [first, first]


def test_enabled_wandb_without_the_package_fails_naming_the_field(monkeypatch):
  config = config_lib.get_config()
  config.wandb.enabled = True
  real = config_lib.importlib.util.find_spec
  monkeypatch.setattr(config_lib.importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else real(name, *a))
  with pytest.raises(ValueError, match=r"config.wandb.enabled=True.*cfg_guidance\[wandb\]"):
    config_lib.check_tracking(config)
  config.wandb.enabled, config.wandb.mode = False, "sometimes"
  with pytest.raises(ValueError, match="config.wandb.mode"):
    config_lib.check_tracking(config)


def test_progress_lines_count_rate_and_eta(monkeypatch):
  clock = iter([100.0, 110.0, 130.0])
  monkeypatch.setattr(reporting.time, "monotonic", lambda: next(clock))
  lines = []
  monkeypatch.setattr(logging, "info", lambda fmt, *args: lines.append(fmt % args))
  progress = reporting.Progress("training", 1000, unit="steps", start=200)
  progress(300)  # 100 steps in 10 s: 10 steps/s, 700 left.
  progress(500)  # 300 steps in 30 s.
  assert lines == ["training: 300/1000 steps (30%), 10.0 steps/s, ETA 1m10s",
                   "training: 500/1000 steps (50%), 10.0 steps/s, ETA 50s"]


@pytest.mark.parametrize("value,text", [(0.4, "0s"), (59, "59s"), (61, "1m01s"),
                                          (3600 * 2 + 7 * 60 + 20, "2h07m"),
                                          (float("inf"), "?")])
def test_clock_text(value, text):
  assert reporting.clock_text(value) == text
