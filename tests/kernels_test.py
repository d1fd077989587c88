"""Tests for runtime/kernels.py and the fast paths the layers get: values and both gradients
against a float64 numpy convolution written from the definition, XLA's own, remat, sharding."""

import itertools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from cfg_guidance.runtime import backend, kernels


def conv2d(x, kernel, *, stride=1):
  """What the layers call: the default backend's convolution."""
  return backend.fast_paths().conv2d(x, kernel, stride=stride)


def matmul(x, w):
  """What the layers call: the default backend's matmul."""
  return backend.fast_paths().matmul(x, w)


def _windows(h, k, s):
  """SAME padding (before, after) and output size along one axis."""
  out = -(-h // s)
  total = max((out - 1) * s + k - h, 0)
  return total // 2, total - total // 2, out


def _taps(shape, kernel_shape, stride):
  """For each kernel tap (i, j): the slices of padded x that meet it."""
  _, h, w, _ = shape
  kh, kw = kernel_shape[:2]
  top, bottom, ho = _windows(h, kh, stride)
  left, right, wo = _windows(w, kw, stride)
  pads = ((0, 0), (top, bottom), (left, right), (0, 0))
  for i, j in itertools.product(range(kh), range(kw)):
    yield i, j, pads, (slice(None), slice(i, i + (ho - 1) * stride + 1, stride),
                       slice(j, j + (wo - 1) * stride + 1, stride))


def np_conv(x, k, stride):
  """y[n, a, b, o] = Σ_{i, j, c} xpad[n, a·s + i, b·s + j, c] k[i, j, c, o], float64."""
  x, k = np.asarray(x, np.float64), np.asarray(k, np.float64)
  y = 0.0
  for i, j, pads, window in _taps(x.shape, k.shape, stride):
    y = y + np.pad(x, pads)[window] @ k[i, j]
  return y


def np_conv_grads(x, k, g, stride):
  """(dL/dx, dL/dk) for L = Σ y·g, the adjoint of np_conv tap by tap, float64."""
  x, k, g = (np.asarray(a, np.float64) for a in (x, k, g))
  dk = np.zeros(k.shape)
  dxpad = None
  for i, j, pads, window in _taps(x.shape, k.shape, stride):
    xpad = np.pad(x, pads)
    if dxpad is None:
      dxpad = np.zeros(xpad.shape)
    dk[i, j] = np.einsum("nhwc,nhwo->co", xpad[window], g)
    dxpad[window] += g @ k[i, j].T
  (_, _), (top, _), (left, _), _ = pads
  return dxpad[:, top:top + x.shape[1], left:left + x.shape[2]], dk


def _inputs(n, size, cin, cout, ksize, stride, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (n, size, size, cin), dtype)
  k = jax.random.normal(keys[1], (ksize, ksize, cin, cout), dtype)
  out = -(-size // stride)
  g = jax.random.normal(keys[2], (n, out, out, cout), dtype)
  return x, k, g


def _assert_close(got, want, rtol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


CASES = list(itertools.product([1, 3], [1, 2], [8, 7]))  # kernel, stride, odd/even H


@pytest.mark.parametrize("ksize,stride,size", CASES)
def test_values_and_grads_match_float64_and_xla(ksize, stride, size):
  x, k, g = _inputs(3, size, 5, 7, ksize, stride)
  want_y = np_conv(x, k, stride)
  want_dx, want_dk = np_conv_grads(x, k, g, stride)
  for fn in (conv2d, kernels.xla_conv2d):
    y, vjp = jax.vjp(jax.jit(lambda x, k, fn=fn: fn(x, k, stride=stride)), x, k)
    dx, dk = vjp(g)
    assert y.dtype == jnp.float32
    _assert_close(y, want_y, 1e-5)
    _assert_close(dx, want_dx, 1e-5)
    _assert_close(dk, want_dk, 1e-5)


@pytest.mark.parametrize("ksize,stride", [(1, 1), (3, 1), (3, 2), (1, 2)])
def test_bfloat16(ksize, stride):
  x, k, g = _inputs(2, 8, 16, 8, ksize, stride, jnp.bfloat16, seed=1)
  y, vjp = jax.vjp(jax.jit(lambda x, k: conv2d(x, k, stride=stride)), x, k)
  dx, dk = vjp(g)
  assert y.dtype == dx.dtype == dk.dtype == jnp.bfloat16
  want_dx, want_dk = np_conv_grads(x, k, g, stride)
  # bfloat16 keeps 8 bits of mantissa: outputs round at ~0.4% of their size.
  _assert_close(y, np_conv(x, k, stride), 2e-2)
  _assert_close(dx, want_dx, 2e-2)
  _assert_close(dk, want_dk, 2e-2)


def _primitives(fn, *args):
  """Every primitive of fn's jaxpr, inside custom_vjp calls and other sub-jaxprs too."""
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn.primitive.name
      for sub in jax.core.jaxprs_in_params(eqn.params):
        yield from walk(sub)
  # A fresh lambda each time: traces are cached per function, not per backend.
  return set(walk(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr))


def test_cpu_runs_1x1_as_a_matmul_and_3x3_as_xla_conv(monkeypatch):
  x, k1, _ = _inputs(2, 8, 4, 6, 1, 1)
  _, k3, _ = _inputs(2, 8, 4, 6, 3, 1)
  assert jax.default_backend() == "cpu"
  assert "dot_general" in _primitives(conv2d, x, k1)
  assert "conv_general_dilated" not in _primitives(conv2d, x, k1)
  assert "conv_general_dilated" in _primitives(conv2d, x, k3)
  # Elsewhere every kernel goes to XLA's convolution.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert "conv_general_dilated" in _primitives(conv2d, x, k1)
  assert "dot_general" not in _primitives(conv2d, x, k1)


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("x_shape", [(7, 6), (2, 5, 6), (2, 3, 4, 6)])
def test_matmul_values_and_grads_match_float64(x_shape, dtype, rtol):
  keys = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(keys[0], x_shape, dtype)
  w = jax.random.normal(keys[1], (6, 4), dtype)
  g = jax.random.normal(keys[2], (*x_shape[:-1], 4), dtype)
  y, vjp = jax.vjp(jax.jit(matmul), x, w)
  dx, dw = vjp(g)
  assert y.dtype == dx.dtype == dw.dtype == dtype
  x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
  _assert_close(y, x64 @ w64, rtol)
  _assert_close(dx, g64 @ w64.T, rtol)
  _assert_close(dw, x64.reshape(-1, 6).T @ g64.reshape(-1, 4), rtol)


def test_cpu_matmul_weight_gradient_is_one_dot_over_rows(monkeypatch):
  """Autodiff's weight gradient of jnp.dot is a dot then a transpose, which XLA:CPU runs
  at a third of the matmul rate (bench/BENCHMARKS.md); ours is one dot."""
  x, w, g = jnp.ones((2, 5, 6)), jnp.ones((6, 4)), jnp.ones((2, 5, 4))

  def weight_grad_hlo(fn):
    return jax.jit(jax.grad(lambda w: jnp.sum(fn(x, w) * g))).lower(w).as_text()
  ours, autodiff = weight_grad_hlo(matmul), weight_grad_hlo(jnp.dot)
  assert "contracting_dims = [0] x [0]" in ours and "stablehlo.transpose" not in ours
  assert "stablehlo.transpose" in autodiff
  # Elsewhere it is jnp.dot, autodiff and all.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert "custom_vjp_call" not in _primitives(matmul, x, w)


def _two_layer_loss(conv_fn, remat=False):
  """L = Σ conv₂(silu(conv₁(x)), stride 2)·g: a 3x3 then a strided 1x1."""
  def layer(x, k1, k2):
    h = jax.nn.silu(conv_fn(x, k1))
    return conv_fn(h, k2, stride=2)
  layer = jax.checkpoint(layer) if remat else layer

  def loss(x, k1, k2, g):
    return jnp.sum(layer(x, k1, k2) * g)
  return loss


def test_composes_with_checkpoint():
  x, k1, _ = _inputs(2, 8, 3, 6, 3, 1, seed=2)
  _, k2, g = _inputs(2, 8, 6, 5, 1, 2, seed=3)
  want = jax.jit(jax.grad(_two_layer_loss(kernels.xla_conv2d), (0, 1, 2)))(x, k1, k2, g)
  got = jax.jit(jax.grad(_two_layer_loss(conv2d, remat=True), (0, 1, 2)))(
      x, k1, k2, g)
  for a, b in zip(got, want):
    _assert_close(a, b, 1e-5)


def test_data_parallel_sharded_batch():
  devices = jax.devices()
  assert len(devices) == 8  # tests/conftest.py
  mesh = jax.make_mesh((8,), ("data",), devices=devices)
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  x, k1, _ = _inputs(16, 8, 3, 6, 3, 1, seed=4)
  _, k2, g = _inputs(16, 8, 6, 5, 1, 2, seed=5)
  want = jax.jit(jax.grad(_two_layer_loss(kernels.xla_conv2d), (0, 1, 2)))(x, k1, k2, g)
  args = (jax.device_put(x, batch), jax.device_put(k1, replicated),
          jax.device_put(k2, replicated), jax.device_put(g, batch))
  grad_fn = jax.jit(jax.grad(_two_layer_loss(conv2d), (0, 1, 2)),
                    out_shardings=(batch, replicated, replicated))
  got = grad_fn(*args)
  assert got[0].sharding.is_equivalent_to(batch, 4)
  for a, b in zip(got, want):
    _assert_close(a, b, 1e-5)


@pytest.mark.parametrize("x_shape,k_shape,dtypes,stride,match", [
    ((2, 8, 8), (3, 3, 4, 6), ("float32", "float32"), 1, "x must be"),
    ((2, 8, 8, 4), (3, 3, 5, 6), ("float32", "float32"), 1, "Cin=4"),
    ((2, 8, 8, 4), (3, 4, 6), ("float32", "float32"), 1, "kernel must be"),
    ((2, 8, 8, 4), (3, 3, 4, 6), ("float32", "bfloat16"), 1, "dtypes differ"),
    ((2, 8, 8, 4), (3, 3, 4, 6), ("float32", "float32"), 0, "stride=0"),
    ((2, 8, 8, 4), (3, 3, 4, 6), ("float32", "float32"), 1.5, "stride=1.5"),
])
def test_bad_input_raises(x_shape, k_shape, dtypes, stride, match):
  x = jnp.zeros(x_shape, dtypes[0])
  k = jnp.zeros(k_shape, dtypes[1])
  with pytest.raises(ValueError, match=match):
    conv2d(x, k, stride=stride)
