"""load() and the one sampling driver: the same example is the same image from
--mode=sample, from the sweep and from load().sample(), on 1 and 8 devices; load() reads
only the EMA parameters and the run's config."""

import jax
import numpy as np
import optax
import pytest

import cfg_guidance
from cfg_guidance import api, generate, samples, sampling, toy, train
from cfg_guidance import state as state_lib
from cfg_guidance.data import toy2d
from cfg_guidance.evaluation import sweep
from cfg_guidance.runtime import checkpointing, sharding
import train_test

W = 2.0


def run_config():
  """A tiny digits run whose sample mode and sweep draw the same examples."""
  config = train_test.tiny_config(num_steps=8, checkpoint_every=8, sample_every=0,
                                  log_every=4)
  s, ev = config.sample, config.eval
  s.num_samples, s.num_steps, s.seed, s.guidance_weights, s.batch_size = 12, 6, 5, (W,), 12
  ev.num_samples, ev.num_steps, ev.seed, ev.guidance_weights, ev.batch_size = 12, 6, 5, (W,), 8
  ev.extractor, ev.classifier_steps, ev.grid_size = "classifier", 20, 1
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("api_run")
  config = run_config()
  final = train.run(config, str(workdir))
  return config, workdir, final


def _mesh(n):
  return sharding.create_mesh(jax.devices()[:n])


def _assert_same_images(a, b, what):
  """uint8 images of the same examples: equal but for round-off across device counts
  (which can move a pixel across a rounding boundary: one level, rarely)."""
  assert a.shape == b.shape and a.dtype == b.dtype == np.uint8, what
  diff = np.abs(a.astype(int) - b.astype(int))
  assert diff.max() <= 1 and np.mean(diff > 0) < 0.01, (what, diff.max(), np.mean(diff > 0))


def test_the_same_example_is_the_same_image_from_every_job(run):
  config, workdir, _ = run
  labels = np.arange(12) % 10
  by_job = {}
  for n in (1, 8):
    (path,) = samples.run(config, str(workdir), mesh=_mesh(n))
    with np.load(path, allow_pickle=False) as f:
      np.testing.assert_array_equal(f["labels"], labels)
      by_job["sample mode", n] = f["images"]
    model = cfg_guidance.load(workdir, mesh=_mesh(n))
    by_job["load().sample", n] = model.sample(labels, guidance_weight=W, num_steps=6,
                                              seed=5)
    # The sweep's images, as its extractor receives them (in batches of 8, padded).
    evaluation = sweep.Evaluation(config, str(workdir), mesh=_mesh(n))
    seen, extractor = [], evaluation.extractor

    def recording(x, extractor=extractor, seen=seen):
      seen.append(x)
      return extractor(x)

    evaluation.extractor = recording
    evaluation.weight_metrics(model.eps_fn, W)
    evaluation.close()
    by_job["sweep", n] = np.concatenate(seen)[:12]
  reference = by_job["load().sample", 1]
  assert reference.shape == (12, 8, 8, 1)
  assert np.abs(reference[0].astype(int) - reference[10].astype(int)).max() > 20
  for key, images in by_job.items():
    _assert_same_images(images, reference, key)


def test_load_takes_a_checkpoint_directory_and_the_run_config(run):
  config, workdir, final = run
  model = api.load(workdir / "checkpoints" / "8")
  assert model.step == 8 and model.path == workdir / "checkpoints" / "8"
  assert model.config.model.to_dict() == config.model.to_dict()
  assert model.config.train.optimizer == config.train.optimizer
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(final.ema_params),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileNotFoundError, match="neither a run's workdir"):
    api.load(workdir / "grids")
  with pytest.raises(checkpointing.CheckpointError, match="step 7"):
    api.load(workdir, step=7)


def test_load_reads_no_optimizer_state(tmp_path):
  """A checkpoint whose optimizer state no config here could describe (SGD momentum in an
  unknown layout, extra arrays): load() restores its EMA exactly; restoring the whole
  state, as training does, needs the optimizer that wrote it."""
  config = run_config()
  mesh = _mesh(1)
  state, _ = state_lib.create(config.model, config.sharding, seed=0, mesh=mesh,
                              tx=train.make_optimizer(config.train))
  ema = jax.tree.map(lambda p: p + 0.5, state.params)
  odd_optimizer = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
  odd = state_lib.TrainState(
      step=state.step, params=state.params, ema_params=ema,
      opt_state={"sgd": odd_optimizer.init(state.params), "extra": np.arange(7.0)},
      num_nonfinite=state.num_nonfinite, consecutive_nonfinite=state.num_nonfinite)
  ckpt = checkpointing.Checkpointer(tmp_path)
  saved = config.to_dict()
  saved["train"]["optimizer"] = "sgd_with_momentum"  # Not even an optimizer we know.
  ckpt.save(3, odd, data_state={"step": 3}, config=saved)
  ckpt.wait_until_finished()

  model = cfg_guidance.load(tmp_path, mesh=mesh)
  assert model.step == 3 and model.config.train.optimizer == "sgd_with_momentum"
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(ema), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(checkpointing.CheckpointError):
    state_lib.restore(checkpointing.Checkpointer(tmp_path, create=False), state)


def test_sample_mode_refuses_a_config_that_is_not_the_runs(run):
  config, workdir, _ = run
  other = run_config()
  other.model.base_channels = 8
  with pytest.raises(ValueError, match=r"config.model.base_channels=8 \(the run has 16\)"):
    samples.run(other, str(workdir))


# --- The driver itself, on the toy problem's exact scores. ---

SETTINGS = toy.sampler_settings(num_steps=6, batch_size=4)


def test_draw_is_the_sampler_with_one_key_per_example_whatever_the_batching():
  labels = np.array([0, 1, 2, 3, 1, 2, 0])  # 3 is ∅.
  w = np.linspace(0.0, 3.0, 7)
  got = {n: generate.draw(toy2d.exact_eps, labels, w, settings=SETTINGS, seed=9,
                          mesh=_mesh(n)) for n in (1, 8)}
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(9), np.arange(7))
  direct = np.asarray(toy2d_sample(keys, labels, w))
  for n, x in got.items():
    assert x.shape == (7, 2)
    np.testing.assert_allclose(x, direct, rtol=1e-5, atol=1e-5, err_msg=str(n))
  # Any subset of indices draws the same examples; another stream, other ones.
  picked = generate.draw(toy2d.exact_eps, labels[[5, 2]], w[[5, 2]], settings=SETTINGS,
                         seed=9, indices=[5, 2], mesh=_mesh(1))
  np.testing.assert_allclose(picked, direct[[5, 2]], rtol=1e-5, atol=1e-5)
  other = generate.draw(toy2d.exact_eps, labels, w, settings=SETTINGS, seed=9, stream=1,
                        mesh=_mesh(1))
  assert np.abs(other - direct).min() > 1e-3


def toy2d_sample(keys, labels, w):
  """The sampler called directly: the driver's second code path."""
  return sampling.sample(toy2d.exact_eps, keys, labels, shape=(2,), guidance_weight=w,
                         null_label=toy2d.NULL_LABEL, num_steps=6, clip_x="none")


def test_one_compilation_for_every_weight_label_and_seed():
  traces = []

  def counting_eps(z, logsnr, labels):
    traces.append(z.shape)
    return toy2d.exact_eps(z, logsnr, labels)

  eps_fn = jax.tree_util.Partial(counting_eps)
  generate.draw(eps_fn, [0, 1, 2, 0], 1.0, settings=SETTINGS, seed=0, mesh=_mesh(1))
  first = len(traces)
  assert first > 0
  for labels, w, seed in (([2, 2, 1, 3], 4.0, 1), ([1, 0, 0, 2], [0.0, 1.0, 2.0, 3.0], 7)):
    generate.draw(eps_fn, labels, w, settings=SETTINGS.replace(v=0.2, eta=0.5), seed=seed,
                  mesh=_mesh(1))
  assert len(traces) == first


@pytest.mark.parametrize("kwargs,match", [
    (dict(guidance_weight=float("inf")), "guidance_weight must be finite"),
    (dict(guidance_weight=[1.0, 2.0]), r"guidance_weight must be a scalar or have shape \[3\]"),
    (dict(labels=[0.5, 1.0, 2.0]), "labels must be ints"),
    (dict(labels=[0, 4, 1]), r"labels must lie in \[0, 3\] \(3 is ∅"),
])
def test_bad_driver_inputs_are_named(kwargs, match):
  args = dict(labels=[0, 1, 2], guidance_weight=1.0) | kwargs
  with pytest.raises(ValueError, match=match):
    generate.draw(toy2d.exact_eps, args["labels"], args["guidance_weight"],
                  settings=SETTINGS, seed=0, mesh=_mesh(1))
