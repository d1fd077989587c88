"""--mode=evaluate (evaluation/sweep.py): device-invariant samples, streamed statistics,
outputs, watch mode."""

import csv
import json
import os
import shutil
import threading

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from cfg_guidance import api, generate, images, sampling, train
from cfg_guidance.data import sources
from cfg_guidance.evaluation import classifier, manifold, metrics, reference, report, sweep
from cfg_guidance.runtime import sharding
import train_test


def eval_config(**eval_overrides):
  """tiny_config with a sweep that runs in seconds: 2 weights, 40 samples, T = 8."""
  config = train_test.tiny_config(num_steps=20, checkpoint_every=10, sample_every=0,
                                  log_every=10)
  config.sample.clip_x = "static"  # Keeps a 20-step model's samples in [-1, 1].
  ev = config.eval
  ev.guidance_weights = (0.0, 3.0)
  ev.num_samples, ev.batch_size, ev.num_steps = 40, 12, 8  # 12: rounded up to 16.
  ev.extractor, ev.classifier_steps = "classifier", 150
  ev.grid_size, ev.grid_class = 2, 7
  ev.precision_recall, ev.pr_num_samples = True, 20
  ev.update(eval_overrides)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny digits run with checkpoints at steps 10 and 20."""
  workdir = tmp_path_factory.mktemp("eval_run")
  config = eval_config()
  train.run(config, str(workdir))
  return config, workdir


@pytest.fixture(scope="module")
def evaluated(trained):
  config, workdir = trained
  return config, workdir, sweep.run(config, str(workdir))


def _draw(config, workdir, mesh, indices, w):
  """The sweep's samples of examples `indices` (labels i mod 10) at weight w."""
  model = api.load(workdir, mesh=mesh)
  settings = generate.settings_from_config(config, num_steps=config.eval.num_steps,
                                           batch_size=config.eval.batch_size)
  return generate.draw(model.eps_fn, indices % 10, w, settings=settings,
                       seed=config.eval.seed, indices=indices, mesh=mesh)


def test_samples_do_not_depend_on_devices_or_batch_size(trained):
  config, workdir = trained
  out = {}
  for num_devices, batch in ((1, 8), (8, 16)):
    mesh = sharding.create_mesh(jax.devices()[:num_devices])
    out[num_devices, batch] = np.concatenate([
        _draw(config, workdir, mesh, np.arange(s, s + batch), 2.0)
        for s in range(0, 16, batch)])
  reference = out[8, 16]
  assert reference.shape == (16, 8, 8, 1) and np.isfinite(reference).all()
  assert np.abs(reference[0] - reference[10]).max() > 0.1  # Examples differ.
  for key, x in out.items():
    # Per-device batch sizes change XLA's CPU kernels, hence round-off: 1.6e-6 in one
    # network call between 1 and 8 devices, which the sampler's T steps at w = 2 amplify
    # by an amount that depends on the trained weights (seen: 2e-7 to 4e-5). A wrong key
    # or shard order would move samples by O(0.1), as the examples differ above.
    np.testing.assert_allclose(x, reference, rtol=1e-4, atol=1e-4, err_msg=str(key))

  # A second code path: the sampler itself with example i's key fold_in(key(seed), i).
  eps_fn = api.load(workdir, mesh=sharding.create_mesh(jax.devices()[:1])).eps_fn
  picked = np.array([3, 12])
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      jax.random.key(config.eval.seed), picked)
  direct = sampling.sample(eps_fn, keys, picked % 10,
                           shape=(8, 8, 1), guidance_weight=2.0, null_label=10,
                           num_steps=config.eval.num_steps, v=config.sample.v,
                           clip_x=config.sample.clip_x)
  np.testing.assert_allclose(np.asarray(direct), reference[picked], rtol=1e-4, atol=1e-4)


def test_streamed_statistics_equal_one_shot():
  rng = np.random.default_rng(0)
  n, k, d, c, s = 47, 5, 6, 5, 4
  features = (rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d)).astype(np.float32)
  logits = rng.normal(size=(n, c)) * 3.0
  spatial = rng.normal(size=(n, s)) + 1.0
  labels = np.arange(n) % k
  stats = report.SweepStats(num_samples=n, num_classes=k, precision_recall=True,
                            with_accuracy=True, with_spatial=True)
  batch = 8
  for start in range(0, n, batch):  # The last batch has 7 real rows and 1 padding row.
    idx = np.arange(start, start + batch)
    f = np.full((batch, d), np.nan, np.float32)  # Padding rows hold garbage to drop.
    lg, sp = np.full((batch, c), np.nan), np.full((batch, s), np.nan)
    real = idx < n
    f[real], lg[real], sp[real] = features[idx[real]], logits[idx[real]], spatial[idx[real]]
    stats.add(idx, f, lg, idx % k, sp)
  real_features = rng.normal(size=(30, d))
  reference_features = rng.normal(size=(60, d))
  reference_spatial = rng.normal(size=(60, s))
  reference = metrics.FeatureStats().update(reference_features)
  got = stats.results(reference, real_features,
                      metrics.FeatureStats().update(reference_spatial))
  features = features.astype(np.float64)
  expected_fid = metrics.frechet_distance(features.mean(0), np.cov(features, rowvar=False),
                                          reference_features.mean(0),
                                          np.cov(reference_features, rowvar=False))
  np.testing.assert_allclose(got["fid"], expected_fid, rtol=1e-10)
  expected_sfid = metrics.frechet_distance(
      spatial.mean(0), np.cov(spatial, rowvar=False), reference_spatial.mean(0),
      np.cov(reference_spatial, rowvar=False))
  np.testing.assert_allclose(got["sfid"], expected_sfid, rtol=1e-10)
  np.testing.assert_allclose((got["is"], got["is_std"]), metrics.inception_score(logits),
                             rtol=1e-10)
  np.testing.assert_allclose(got["accuracy"], np.mean(logits.argmax(-1) == labels))
  diversity = np.mean([features[labels == j].std(axis=0, ddof=1).mean() for j in range(k)])
  np.testing.assert_allclose(got["diversity"], diversity, rtol=1e-10)
  np.testing.assert_allclose((got["precision"], got["recall"]),  # Every sample.
                             manifold.precision_recall(real_features, features, k=3))


def test_run_writes_every_output_and_the_numbers_recompute(evaluated):
  config, workdir, records = evaluated
  out = workdir / "eval" / "20"
  for name in ("results.json", "results.csv", "results.md", "fid_vs_is.png",
               "metrics_vs_w.png", "samples_w0.png", "samples_w3.png"):
    assert (out / name).stat().st_size > 0, name
  with np.load(workdir / "eval" / "reference_digits_digits-cnn.npz") as saved:
    real_indices = saved["pr_indices"]
  np.testing.assert_array_equal(real_indices, reference.draw_subset(1797, 20, 0))

  saved = json.loads((out / "results.json").read_text())
  assert saved["step"] == 20 and saved["extractor"] == "digits-cnn"
  assert saved["num_samples"] == 40 and saved["num_steps"] == 8
  assert saved["metric_labels"]["fid"] == "FID (digits-cnn)"
  assert saved["metric_labels"]["sfid"] == "sFID (digits-cnn)"
  assert (saved["pr_num_real"], saved["pr_num_fake"], saved["pr_seed"]) == (20, 40, 0)
  assert [r["w"] for r in saved["records"]] == [0.0, 3.0]
  keys = ("fid", "sfid", "is", "is_std", "precision", "recall", "accuracy", "diversity")
  for record, written in zip(records, saved["records"], strict=True):
    for key in keys:
      assert np.isfinite(record[key]) and record[key] == written[key], key
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  for row, written in zip(rows, saved["records"], strict=True):
    for key in ("w", *keys):
      assert float(row[key]) == written[key], key
  table = (out / "results.md").read_text()
  assert "| w = 3 |" in table and "FID (digits-cnn) ↓" in table
  assert "sFID (digits-cnn) ↓" in table and "sFID from its last convolution" in table
  assert "| FID ↓" not in table  # A stand-in's figures never pass as FID.

  # TensorBoard holds the same numbers.
  acc = event_accumulator.EventAccumulator(
      str(workdir / "eval"), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  tb = {tag: train_test._scalar(acc.Tensors(tag)[-1]) for tag in acc.Tags()["tensors"]
        if "/w=" in tag and not tag.startswith("samples")}
  np.testing.assert_allclose(tb["FID (digits-cnn)/w=3"], records[1]["fid"], rtol=1e-6)
  np.testing.assert_allclose(tb["IS (digits-cnn)/w=0"], records[0]["is"], rtol=1e-6)
  assert "samples/w=3" in acc.Tags()["tensors"]

  # Recomputed in one shot: all samples at once, the reference from sklearn's digits.
  mesh = sharding.create_mesh(jax.devices()[:8])
  extractor = classifier.restore_classifier(workdir / "classifier")
  real, _, real_spatial = extractor(images.to_uint8(sources.load_digits_arrays()[0]),
                                    spatial=True)
  labels = np.arange(40) % 10
  for record in records:
    x = _draw(config, workdir, mesh, np.arange(40), record["w"])
    features, logits, spatial = extractor(images.to_uint8(x), spatial=True)
    fid = metrics.frechet_distance(features.mean(0), np.cov(features, rowvar=False),
                                   real.mean(0), np.cov(real, rowvar=False))
    np.testing.assert_allclose(record["fid"], fid, rtol=1e-6)
    sfid = metrics.frechet_distance(spatial.mean(0), np.cov(spatial, rowvar=False),
                                    real_spatial.mean(0), np.cov(real_spatial, rowvar=False))
    np.testing.assert_allclose(record["sfid"], sfid, rtol=1e-6)
    np.testing.assert_allclose((record["is"], record["is_std"]),
                               metrics.inception_score(logits), rtol=1e-6)
    assert record["accuracy"] == np.mean(logits.argmax(-1) == labels)
    np.testing.assert_allclose((record["precision"], record["recall"]),
                               manifold.precision_recall(real[real_indices], features))


def test_evaluating_again_overwrites_with_the_same_numbers(evaluated):
  config, workdir, records = evaluated
  (workdir / "eval" / "20" / "results.md").write_text("stale")
  again = sweep.run(config, str(workdir))
  for got, want in zip(again, records, strict=True):
    got, want = dict(got), dict(want)
    del got["seconds"], want["seconds"]  # Wall time differs; every metric must not.
    assert got == want
  assert "FID (digits-cnn)" in (workdir / "eval" / "20" / "results.md").read_text()


def _tree(root):
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*"))}


def test_a_run_is_evaluated_into_another_directory_leaving_it_untouched(evaluated, tmp_path):
  config, source, records = evaluated
  run = tmp_path / "run"  # Checkpoints and classifier only: as a read-only bucket holds.
  shutil.copytree(source / "checkpoints", run / "checkpoints")
  shutil.copytree(source / "classifier", run / "classifier")
  before = _tree(run)
  out = tmp_path / "elsewhere" / "eval"
  got = sweep.run(eval_config(output_dir=str(out), step=20), str(run))
  assert _tree(run) == before  # Nothing written, created or touched in the run.
  saved = json.loads((out / "20" / "results.json").read_text())["records"]
  assert (out / "reference_digits_digits-cnn.npz").is_file()
  for g, s, want in zip(got, saved, records, strict=True):  # Same checkpoint, same seed.
    for key in ("fid", "is", "precision", "accuracy"):
      np.testing.assert_allclose((g[key], s[key]), want[key], rtol=1e-9, err_msg=key)

  # A destination that cannot be written fails before any sampling, naming the field.
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(PermissionError, match="config.eval.output_dir"):
    sweep.Evaluation(eval_config(output_dir=str(blocker / "eval")), str(run))


def test_watch_evaluates_a_checkpoint_that_appears_later(evaluated, tmp_path):
  config, source, records = evaluated
  workdir = tmp_path / "watched"
  (workdir / "checkpoints").mkdir(parents=True)
  # The classifier and reference from the first run, so only the sweep runs again.
  shutil.copytree(source / "classifier", workdir / "classifier")
  (workdir / "eval").mkdir()
  for f in (source / "eval").glob("reference_*.npz"):
    shutil.copy(f, workdir / "eval" / f.name)
  shutil.copytree(source / "checkpoints" / "10", workdir / "checkpoints" / "10")
  (workdir / "eval" / "10").mkdir()
  (workdir / "eval" / "10" / "results.json").write_text("{}")  # Done already: skipped.

  config = eval_config(watch=True, watch_interval=0.1, watch_timeout=120.0)
  found, errors = {}, []

  def watch():
    try:
      found.update(sweep.watch(config, str(workdir)))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  thread = threading.Thread(target=watch)
  thread.start()
  staged = tmp_path / "staged"
  shutil.copytree(source / "checkpoints" / "20", staged)
  os.rename(staged, workdir / "checkpoints" / "20")  # Appears whole, as Orbax's do.
  thread.join(timeout=300)
  assert not thread.is_alive() and not errors, errors
  assert list(found) == [20]  # Stopped after the final step (train.num_steps = 20).
  assert (workdir / "eval" / "10" / "results.json").read_text() == "{}"
  saved = json.loads((workdir / "eval" / "20" / "results.json").read_text())["records"]
  for got, want in zip(saved, records, strict=True):  # Same checkpoint, same seed.
    for key in ("fid", "sfid", "is", "precision", "recall", "accuracy", "diversity"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-9, err_msg=key)


def test_missing_inception_file_names_the_field(tmp_path):
  for path, error in ((None, ValueError), (str(tmp_path / "missing.pb"), FileNotFoundError)):
    config = eval_config(extractor="inception", inception_path=path)
    with pytest.raises(error, match="eval.inception_path"):
      sweep.run(config, str(tmp_path / "w"))
    with pytest.raises(error, match="eval.inception_path"):  # The loader itself, too.
      reference.make_extractor(config.eval, config.data, str(tmp_path / "w"),
                               num_classes=10, seed=0)
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("field,value", [
    ("batch_size", 0), ("num_samples", 5), ("extractor", "vgg"), ("grid_class", 10),
    ("guidance_weights", ()), ("pr_seed", -1),
])
def test_bad_eval_fields_are_named(tmp_path, field, value):
  config = eval_config(**{field: value})
  with pytest.raises(ValueError, match=f"config.eval.{field}"):
    sweep.run(config, str(tmp_path))
