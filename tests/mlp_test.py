"""Tests for the 2-D residual-MLP denoiser (cfg_guidance/models/mlp.py)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfg_guidance import models
from cfg_guidance.models import presets
import model_helpers

K = 3  # Classes; label K is ∅.
CONFIG = dict(name="mlp", num_classes=K, dim=2, hidden=32, num_blocks=2, dropout=0.0)
_forward, _split = model_helpers.forward, model_helpers.split


def _perturb(params, seed, scale=0.3):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: p + scale * rng.standard_normal(p.shape).astype(np.float32), params)


def _inputs(n=8, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((n, 2)).astype(np.float32)
  logsnr = np.linspace(-25.0, 25.0, n).astype(np.float32)  # ±25 exercises the clip.
  labels = np.arange(n, dtype=np.int32) % (K + 1)  # Every class and ∅.
  return z, logsnr, labels


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _dense(p, x):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _layer_norm(p, x, eps=1e-5):
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return x * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)


def _np_mlp(p, z, logsnr, labels, hidden):
  """float64 reference from the definitions: λ -> t -> sinusoid -> MLP, + class row."""
  t = np.arctan(np.exp(-np.clip(logsnr, -20, 20) / 2)) / (np.pi / 2)
  freqs = np.exp(-np.log(10_000.0) * np.arange(hidden // 2) / (hidden // 2))
  args = 1000 * t[:, None] * freqs
  s = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
  ne = p["noise_embed"]
  emb = _dense(ne["dense2"], _silu(_dense(ne["dense1"], s)))
  emb = emb + np.asarray(p["class_embed"]["embedding"], np.float64)[labels]
  h = _dense(p["dense_in"], z.astype(np.float64))
  for i in sorted(p["blocks"]):
    b = p["blocks"][i]
    r = _dense(b["dense1"], _silu(_layer_norm(b["norm1"], h)))
    scale, shift = np.split(_dense(b["emb_proj"], _silu(emb)), 2, axis=-1)
    r = _silu(_layer_norm(b["norm2"], r) * (1 + scale) + shift)
    h = h + _dense(b["dense2"], r)
  return _dense(p["dense_out"], _silu(_layer_norm(p["norm_out"], h)))


@pytest.fixture(scope="module")
def fresh():
  return _split(CONFIG)


def test_zero_init_shape_and_matches_numpy_reference(fresh):
  graphdef, params = fresh
  z, logsnr, labels = _inputs()
  key = jax.random.key(0)
  out = _forward(graphdef, params, z, logsnr, labels, key)
  assert out.shape == (8, 2) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # Zero-initialised output layers.
  params = _perturb(params, 1)
  out = np.asarray(_forward(graphdef, params, z, logsnr, labels, key))
  ref = _np_mlp(params, z, logsnr, labels, CONFIG["hidden"])
  assert np.abs(ref).max() > 0.1
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_tracks_float32(fresh):
  graphdef, params = fresh
  graphdef_bf16, _ = nnx.split(nnx.eval_shape(
      lambda: models.create(dict(CONFIG, dtype="bfloat16"), rngs=nnx.Rngs(0))),
                               nnx.Param)
  params = _perturb(params, 2)
  z, logsnr, labels = _inputs()
  out32 = np.asarray(_forward(graphdef, params, z, logsnr, labels, jax.random.key(0)))
  out16 = _forward(graphdef_bf16, params, z, logsnr, labels, jax.random.key(0))
  assert out16.dtype == jnp.float32
  rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
  assert rel < 0.05, rel


def test_scalar_logsnr_broadcasts(fresh):
  graphdef, params = fresh
  model = nnx.merge(graphdef, _perturb(params, 3))
  z, _, labels = _inputs()
  np.testing.assert_array_equal(model(z, 1.5, labels),
                                model(z, jnp.full((8,), 1.5), labels))
  with pytest.raises(ValueError, match="z must have shape"):
    model(jnp.zeros((8, 3)), 0.0, labels)


def test_class_rows_get_gradient_only_from_their_examples(fresh):
  graphdef, params = fresh
  params = _perturb(params, 4)
  z, logsnr, labels = _inputs()
  r = np.random.default_rng(5).standard_normal(z.shape).astype(np.float32)

  @jax.jit
  def table_grad(weights):
    def loss(params):
      return jnp.sum(weights * _forward(graphdef, params, z, logsnr, labels,
                                        jax.random.key(0)))
    return jax.grad(loss)(params)["class_embed"]["embedding"]

  for i in range(len(labels)):
    g = np.asarray(table_grad(np.eye(8, dtype=np.float32)[i][:, None] * r))
    np.testing.assert_array_equal(np.delete(g, labels[i], axis=0), 0.0)
    assert np.abs(g[labels[i]]).max() > 1e-4


def test_dropout_only_in_training():
  graphdef, params = _split(dict(CONFIG, dropout=0.5))
  params = _perturb(params, 6)
  z, logsnr, labels = _inputs()
  k1, k2 = jax.random.key(1), jax.random.key(2)
  eval1 = _forward(graphdef, params, z, logsnr, labels, k1)
  np.testing.assert_array_equal(eval1, _forward(graphdef, params, z, logsnr, labels, k2))
  train1 = _forward(graphdef, params, z, logsnr, labels, k1, train=True)
  np.testing.assert_array_equal(
      train1, _forward(graphdef, params, z, logsnr, labels, k1, train=True))
  assert np.abs(train1 - eval1).max() > 1e-2
  train2 = _forward(graphdef, params, z, logsnr, labels, k2, train=True)
  assert np.abs(train1 - train2).max() > 1e-2


def test_same_rngs_same_parameters(fresh):
  model_helpers.assert_seeded_init(CONFIG, fresh[1])


def test_toy_preset_parameter_count():
  # dim 2, hidden 256, 3 blocks, 3 classes + ∅: embeddings, input, blocks, output.
  h = 256
  blocks = 3 * (2 * h + (h * h + h) + (h * 2 * h + 2 * h) + 2 * h + (h * h + h))
  count = ((h * h + h) * 2 + 4 * h + (2 * h + h) + blocks + 2 * h + (h * 2 + 2))
  abstract = nnx.eval_shape(lambda: models.create(presets.toy_mlp(), rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract))) == count


@pytest.mark.parametrize("override,field", [
    (dict(dim=0), "dim"),
    (dict(hidden=1.5), "hidden"),
    (dict(dropout=-0.1), "dropout"),
    (dict(dtype="int8"), "dtype"),
    (dict(depth=3), "depth"),
])
def test_bad_config_names_the_field(override, field):
  with pytest.raises(ValueError, match=field):
    models.create(dict(CONFIG, **override), rngs=nnx.Rngs(0))
