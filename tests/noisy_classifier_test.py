"""Classifier guidance's noisy classifier: ADM's encoder half with attention pooling
(models/encoder.py), its training run (--mode=train_classifier) and its loader."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from cfg_guidance import api, diffusion, models, train
from cfg_guidance import config as config_lib
from cfg_guidance.data import sources
from cfg_guidance.models import encoder, eps, layers, presets
from cfg_guidance.runtime import checkpointing, sharding
from configs import digits

NUM_TRAIN = 1500  # Digits the classifier trains on; the other 297 are held out.
# Held-out accuracy at each λ after TINY_STEPS steps (4 noise draws of the 297 held-out
# digits), measured on CPU: 0.095, 0.106, 0.678, 0.955 at λ = -10, -5, 0, 5; chance is
# 0.1. The bounds leave room for other seeds and backends.
ACCURACY_BOUNDS = {-10.0: (0.0, 0.2), -5.0: (0.0, 0.3), 0.0: (0.5, 1.0), 5.0: (0.8, 1.0)}
TINY_STEPS = 300


def tiny_model() -> dict:
  model = presets.digits_classifier().to_dict()
  model.update(base_channels=16, num_head_channels=16)
  return model


def perturbed_logits_fn():
  """A jitted `fn(z, logsnr)` of the tiny model with noise on every parameter, so the
  zero-initialised ResBlock outputs (the λ embedding's only path at init) are live."""
  graphdef, params = nnx.split(models.create(tiny_model(), rngs=nnx.Rngs(0)), nnx.Param)
  rng = np.random.default_rng(7)
  params = jax.tree.map(lambda p: p + np.float32(0.1) * rng.standard_normal(
      p.shape, np.float32), params)
  return jax.jit(jax.tree_util.Partial(eps.make_logits_fn(graphdef), params))


def test_logits_shape_and_logsnr_conditioning():
  fn = perturbed_logits_fn()
  z = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  logsnr = jnp.array([-5.0, 0.0, 5.0])
  logits = fn(z, logsnr)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  # Examples are classified independently (∇_z log p(c | z) of the batch's sum is then
  # each example's own, as classifier guidance assumes).
  one = jax.vmap(lambda zi, li: fn(zi[None], li[None])[0])(z, logsnr)
  np.testing.assert_allclose(logits, one, rtol=1e-5, atol=1e-6)
  # The logits depend on λ: the same z at two noise levels.
  low, high = fn(z, jnp.full((3,), -5.0)), fn(z, jnp.full((3,), 5.0))
  assert np.abs(np.asarray(low - high)).max() > 1e-2
  with pytest.raises(ValueError, match="z must have shape"):
    fn(z[..., :1, :], 0.0)


def attention_pool_np(x, pos, w_qkv, b_qkv, w_out, b_out, num_heads):
  """CLIP's attention pooling in float64: every token attends, the mean token's out."""
  n, h, w, c = x.shape
  tokens = x.reshape(n, h * w, c)
  tokens = np.concatenate([tokens.mean(1, keepdims=True), tokens], axis=1) + pos
  q, k, v = np.split(tokens @ w_qkv + b_qkv, 3, axis=-1)
  d = c // num_heads
  heads = []
  for i in range(num_heads):
    part = slice(i * d, (i + 1) * d)
    logits = q[..., part] @ k[..., part].transpose(0, 2, 1) / np.sqrt(d)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    heads.append((weights / weights.sum(-1, keepdims=True)) @ v[..., part])
  return np.concatenate(heads, axis=-1)[:, 0] @ w_out + b_out


def test_attention_pool_matches_float64_reference():
  pool = encoder.AttentionPool2d(4, 16, 2, 5)
  layers.initialize(pool, nnx.Rngs(3))
  x = 2.0 * jax.random.normal(jax.random.key(4), (3, 4, 4, 16))
  f64 = lambda a: np.asarray(a[...], np.float64)
  want = attention_pool_np(f64(x), f64(pool.positional_embedding), f64(pool.qkv.kernel),
                           f64(pool.qkv.bias), f64(pool.proj_out.kernel),
                           f64(pool.proj_out.bias), 2)
  np.testing.assert_allclose(pool(x), want, rtol=1e-5, atol=1e-5)


def tiny_config(**train_overrides):
  config = digits.get_config()
  config.classifier.model.update(base_channels=16, num_head_channels=16)
  config.classifier.train.update(num_steps=TINY_STEPS, batch_size=64, learning_rate=2e-3,
                                 warmup_steps=20, log_every=50,
                                 checkpoint_every=TINY_STEPS // 2)
  config.classifier.train.update(train_overrides)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny classifier trained in two runs (the second resumes), on NUM_TRAIN digits."""
  workdir = tmp_path_factory.mktemp("classifier_run")
  images, labels = sources.load_digits_arrays()
  mesh = sharding.create_mesh(jax.devices()[:1])
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sources, "load_digits_arrays",
                  lambda: (images[:NUM_TRAIN], labels[:NUM_TRAIN]))
    half = train.run_classifier(tiny_config(num_steps=TINY_STEPS // 2), str(workdir), mesh)
    full = train.run_classifier(tiny_config(), str(workdir), mesh)
  return workdir / config_lib.CLASSIFIER_WORKDIR, (half, full), (images, labels)


def test_training_run_checkpoints_resumes_and_logs(trained):
  where, (half, full), _ = trained
  assert (int(half.step), int(full.step)) == (TINY_STEPS // 2, TINY_STEPS)
  assert checkpointing.Checkpointer(where, create=False).all_steps() == [
      TINY_STEPS // 2, TINY_STEPS]
  acc = event_accumulator.EventAccumulator(
      str(where), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  # One record per logging step over both runs: the second began where the first ended.
  steps = [e.step for e in acc.Tensors("accuracy")]
  assert steps == list(range(50, TINY_STEPS + 1, 50)), steps
  assert [e.step for e in acc.Tensors("loss")] == steps


def test_held_out_accuracy_at_several_logsnr(trained):
  where, _, (images, labels) = trained
  classifier = api.load_classifier(where)
  assert classifier.config.model.name == "encoder_unet" and classifier.step == TINY_STEPS
  x, y = images[NUM_TRAIN:], labels[NUM_TRAIN:]
  logits_fn = jax.jit(lambda fn, z, logsnr: fn(z, logsnr))
  for logsnr, (lo, hi) in ACCURACY_BOUNDS.items():
    hits = [np.argmax(logits_fn(classifier.classifier_fn, diffusion.diffuse(
        x, jax.random.normal(jax.random.key(100 + s), x.shape), logsnr), logsnr), -1) == y
            for s in range(4)]
    accuracy = float(np.mean(hits))
    print(f"held-out accuracy at logsnr {logsnr}: {accuracy:.3f}")
    assert lo <= accuracy <= hi, (logsnr, accuracy)
  # The parameters are the Partial's leaves: another checkpoint reuses the program.
  earlier = api.load_classifier(where, step=TINY_STEPS // 2).classifier_fn
  logits_fn(earlier, jnp.asarray(x), 0.0)
  assert logits_fn._cache_size() == 1


def test_diffusion_loader_refuses_a_classifier_run(trained):
  where, _, _ = trained
  with pytest.raises(ValueError, match="load_classifier"):
    api.load(where)


@pytest.mark.parametrize("field,value,match", [
    ("model.num_groups", 7, r"config\.classifier\.model\.num_groups=7"),
    ("model.name", "unet", r"config\.classifier\.model\.name='unet'"),
    ("train.learning_rate", -1.0, r"config\.classifier\.train\.learning_rate=-1"),
    ("train.batch_size", 12, r"config\.classifier\.train\.batch_size=12 .*devices"),
])
def test_bad_classifier_fields_are_named_before_compute(tmp_path, field, value, match):
  config = tiny_config()
  section, name = field.split(".")
  config.classifier[section][name] = value
  with pytest.raises(ValueError, match=match):
    train.run_classifier(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
