"""Tests for cfg_guidance.models.layers.GroupNorm against a float64 NumPy reference."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from cfg_guidance.models import layers
from cfg_guidance.runtime import kernels


def _np_group_norm(x, scale, bias, groups, eps=1e-5):
  """GN over [N, positions, groups, C/groups], the textbook layout, in float64."""
  n, c = x.shape[0], x.shape[-1]
  g = x.reshape(n, -1, groups, c // groups)
  g = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(
      g.var(axis=(1, 3), keepdims=True) + eps)
  return g.reshape(x.shape) * scale + bias


def _norm(channels, groups, seed):
  norm = layers.GroupNorm(channels, groups)
  rng = np.random.default_rng(seed)
  norm.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(channels), jnp.float32)
  norm.bias[...] = jnp.asarray(0.3 * rng.standard_normal(channels), jnp.float32)
  return norm


@pytest.mark.parametrize("shape,groups", [((3, 5, 4, 16), 4), ((2, 6, 32), 32),
                                          ((4, 12), 1)])
def test_group_norm_with_conditioning_matches_float64(shape, groups):
  c = shape[-1]
  norm = _norm(c, groups, 0)
  rng = np.random.default_rng(1)
  x = 3.0 + 2.0 * rng.standard_normal(shape)
  scale, shift = rng.standard_normal((2, shape[0], c))
  cond = (slice(None),) + (None,) * (len(shape) - 2)
  want = _np_group_norm(x, np.asarray(norm.scale[...], np.float64),
                        np.asarray(norm.bias[...], np.float64), groups)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  np.testing.assert_allclose(norm(f32(x)), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(norm(f32(x), f32(scale), f32(shift)),
                             want * (1 + scale[cond]) + shift[cond], rtol=1e-5, atol=1e-5)


def test_group_norm_gradients_equal_those_of_the_textbook_form():
  norm = _norm(16, 4, 2)
  rng = np.random.default_rng(3)
  x, cot = (jnp.asarray(rng.standard_normal((3, 4, 4, 16)) * 2 + 1, jnp.float32)
            for _ in range(2))
  scale, shift = (jnp.asarray(rng.standard_normal((3, 16)), jnp.float32) for _ in range(2))

  def textbook(x, gamma, beta, scale, shift):
    g = x.reshape(3, -1, 4, 4)
    mean = g.mean(axis=(1, 3), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
                                   + 1e-5)
    y = g.reshape(x.shape) * gamma + beta
    return jnp.sum(jax.nn.silu(y * (1 + scale[:, None, None]) + shift[:, None, None]) * cot)

  graphdef, params = nnx.split(norm, nnx.Param)

  def ours(x, params, scale, shift):
    return jnp.sum(jax.nn.silu(nnx.merge(graphdef, params)(x, scale, shift)) * cot)

  want = jax.grad(textbook, argnums=range(5))(x, norm.scale[...], norm.bias[...], scale,
                                              shift)
  gx, gparams, gscale, gshift = jax.grad(ours, argnums=range(4))(x, params, scale, shift)
  gparams = gparams.to_pure_dict()
  got = (gx, gparams["scale"], gparams["bias"], gscale, gshift)
  for name, g, w in zip(["x", "gamma", "beta", "scale", "shift"], got, want):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4, err_msg=name)


def test_group_norm_keeps_float32_statistics_under_a_large_offset():
  # Folding the mean into the bias would cancel catastrophically at this offset.
  x = 1e4 + np.random.default_rng(4).standard_normal((2, 3, 3, 8))
  out = layers.GroupNorm(8, 2)(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(out, _np_group_norm(x, 1.0, 0.0, 2), atol=5e-3)


def test_group_norm_float32_statistics_in_bfloat16():
  norm = layers.GroupNorm(8, 2, dtype=jnp.bfloat16)
  # A large offset: bf16 statistics would lose the per-element deviations entirely.
  x = (1000.0 + np.random.default_rng(5).standard_normal((2, 3, 3, 8))).astype(
      np.float32)
  out = norm(jnp.asarray(x))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             _np_group_norm(x.astype(np.float64), 1.0, 0.0, 2), atol=2e-2)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_dropout_rate_and_inverted_scale(rate, backend, monkeypatch):
  """On TPU the mask's bits come from jax.random.bits, elsewhere from counter_hash_bits
  (each backend reached here by telling dropout that it is the default one)."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  shape = (257, 129)  # An odd element count: the last 32-bit word is half used.
  key = jax.random.wrap_key_data(jnp.arange(4, dtype=jnp.uint32), impl="rbg")
  out = np.asarray(layers.dropout(jnp.ones(shape, jnp.float32), rate, key), np.float64)
  threshold = round(rate * 2**16)
  # The mask is the promised generator's: its first 16-bit half-words against the
  # threshold (little-endian halves of each word), written out here in numpy.
  num_words = (out.size + 1) // 2
  words = np.asarray(kernels.counter_hash_bits(key, num_words) if backend != "tpu"
                     else jax.random.bits(key, (num_words,), jnp.uint32), np.uint32)
  halves = np.stack([words & 0xFFFF, words >> 16], axis=1).reshape(-1)[:out.size]
  np.testing.assert_array_equal(out != 0, (halves >= threshold).reshape(shape))
  p_drop = threshold / 2**16
  assert abs(p_drop - rate) <= 2**-17
  # Kept elements carry exactly 1 / P(keep); dropped ones are 0.
  kept = out[out != 0]
  np.testing.assert_allclose(kept, np.float32(1 / (1 - p_drop)), rtol=1e-7)
  # The drop fraction is Binomial(n, p_drop): within 5 standard deviations.
  n = out.size
  sd = np.sqrt(p_drop * (1 - p_drop) / n)
  assert abs(np.mean(out == 0) - p_drop) < 5 * sd
  assert abs(out.mean() - 1.0) < 5 * sd / (1 - p_drop)
  # The same key gives the same mask; another key, another.
  again = np.asarray(layers.dropout(jnp.ones(shape, jnp.float32), rate, key))
  np.testing.assert_array_equal(again, out)
  other = layers.dropout(jnp.ones(shape, jnp.float32), rate, jax.random.fold_in(key, 1))
  assert np.mean((np.asarray(other) == 0) != (out == 0)) > 0.5 * p_drop


def _np_hash32(v):
  """lowbias32 in numpy's wrapping uint32 arithmetic, from its published definition."""
  v = np.asarray(v, np.uint32)
  v ^= v >> np.uint32(16)
  v *= np.uint32(0x7FEB352D)
  v ^= v >> np.uint32(15)
  v *= np.uint32(0x846CA68B)
  return v ^ (v >> np.uint32(16))


def test_counter_hash_bits_match_numpy_and_look_uniform():
  key = jax.random.wrap_key_data(
      jnp.asarray([0xDEADBEEF, 7, 1, 2], jnp.uint32), impl="rbg")
  n = 1 << 20
  words = np.asarray(jax.jit(kernels.counter_hash_bits, static_argnums=1)(key, n))
  seed = np.uint32(0x9E3779B9)
  for word in (0xDEADBEEF, 7, 1, 2):
    seed = _np_hash32(seed ^ np.uint32(word))
  i = np.arange(n, dtype=np.uint32)
  np.testing.assert_array_equal(words, _np_hash32(
      _np_hash32(i + seed) ^ _np_hash32(seed ^ np.uint32(0x85EBCA6B))))
  assert len(np.unique(words)) == n  # A permutation for a fixed key.
  # Every bit is set with probability 1/2: within 5 standard deviations.
  bits = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1
  assert np.abs(bits.mean(axis=0) - 0.5).max() < 5 * 0.5 / np.sqrt(n)
  # The 16-bit halves dropout thresholds: top bytes uniform over 256 bins (chi-square),
  # and neighbours uncorrelated.
  halves = words.view(np.uint16).astype(np.float64)
  counts = np.bincount((halves // 256).astype(np.int64), minlength=256)
  assert scipy.stats.chisquare(counts).pvalue > 1e-4
  r = np.corrcoef(halves[:-1], halves[1:])[0, 1]
  assert abs(r) < 5 / np.sqrt(halves.size), r


@pytest.mark.parametrize("second", [
    lambda k: jax.random.fold_in(k, 1),  # The U-Net's per-block keys.
    lambda k: jax.random.wrap_key_data(  # One bit away.
        jax.random.key_data(k) ^ jnp.asarray([0, 1, 0, 0], jnp.uint32), impl="rbg"),
    lambda k: jax.random.wrap_key_data(  # One apart.
        jax.random.key_data(k) + jnp.asarray([1, 0, 0, 0], jnp.uint32), impl="rbg"),
    lambda k: jax.random.key(1),  # Raw threefry keys: [0, 0] against [0, 1].
])
def test_counter_hash_bits_of_nearby_keys_are_uncorrelated(second):
  key = jax.random.wrap_key_data(jnp.arange(4, dtype=jnp.uint32), impl="rbg")
  if second(key).dtype != key.dtype:  # The threefry pair.
    key = jax.random.key(0)
  n = 1 << 18
  a, b = (np.asarray(kernels.counter_hash_bits(k, n)).view(np.uint16).astype(np.float64)
          for k in (key, second(key)))
  # Same halves, or the second shifted by one word, as a shifted first stage would be.
  for x, y in [(a, b), (a[2:], b[:-2])]:
    r = np.corrcoef(x, y)[0, 1]
    assert abs(r) < 5 / np.sqrt(x.size), r
  drop_a, drop_b = a < 6554, b < 6554  # Rate 0.1 masks.
  assert abs(np.mean(drop_a & drop_b) - 0.01) < 5 * np.sqrt(0.01 / a.size)


def test_counter_hash_bits_refuses_more_than_2_to_the_32_words():
  with pytest.raises(ValueError, match="at most 2\\^32 - 1 words"):
    kernels.counter_hash_bits(jax.random.key(0), 2**32)


def test_dropout_is_identity_without_key_or_rate():
  x = jnp.arange(6.0)
  np.testing.assert_array_equal(layers.dropout(x, 0.5, None), x)
  np.testing.assert_array_equal(layers.dropout(x, 0.0, jax.random.key(0)), x)
