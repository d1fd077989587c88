"""Tests for the ADM U-Net (cfg_guidance/models/unet.py) and the layers it shares."""

import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfg_guidance import models
from cfg_guidance.models import layers
from cfg_guidance.models import unet
from cfg_guidance.models import presets
from layers_test import _np_group_norm as _gn  # The float64 GroupNorm reference.
import model_helpers

K = 10  # Classes of the tiny configs; label K is ∅.
TINY = {
    # Two levels, BigGAN resampling, heads by count.
    "8x8x1": dict(name="unet", num_classes=K, image_size=8, channels=1,
                  base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=2, num_head_channels=-1,
                  num_groups=8, dropout=0.0),
    # Three levels with ADM's conv resampling, heads by width.
    "16x16x3": dict(name="unet", num_classes=K, image_size=16, channels=3,
                    base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                    attention_resolutions=(8,), num_heads=-1, num_head_channels=8,
                    num_groups=8, resblock_updown=False),
    "32x32x3": dict(name="unet", num_classes=K, image_size=32, channels=3,
                    base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                    attention_resolutions=(16,), num_heads=1, num_head_channels=-1,
                    num_groups=4),
}


_forward, _split = model_helpers.forward, model_helpers.split


def _flat(params):
  """{"a/b/kernel": numpy array} of a nested dict."""
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
          np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(params)}


def _graphdef(config):
  return nnx.split(nnx.eval_shape(lambda: models.create(config, rngs=nnx.Rngs(0))),
                   nnx.Param)[0]


def _perturb(params, seed, scale=0.3):
  """params + scale·N(0, 1) from numpy, so zero-initialised layers carry signal."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: p + scale * rng.standard_normal(p.shape).astype(np.float32), params)


def _inputs(config, n=4, seed=0):
  rng = np.random.default_rng(seed)
  size, ch = config["image_size"], config["channels"]
  z = rng.standard_normal((n, size, size, ch)).astype(np.float32)
  logsnr = np.linspace(-20.0, 20.0, n).astype(np.float32)
  labels = np.array([0, 3, K - 1, K] * (n // 4), np.int32)  # K is ∅.
  return z, logsnr, labels


# --- float64 numpy references, written from ADM's equations ------------------------

def _np(x):
  return np.asarray(x, np.float64)


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _conv_same(x, kernel, bias):
  """Stride-1 SAME convolution, NHWC x HWIO."""
  k = kernel.shape[0]
  p = k // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  h, w = x.shape[1:3]
  out = sum(xp[:, i:i + h, j:j + w] @ kernel[i, j] for i in range(k) for j in range(k))
  return out + bias


def _resample(x, mode):
  if mode == "up":
    return x.repeat(2, axis=1).repeat(2, axis=2)
  if mode == "down":
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return x


def _np_resblock(p, x, emb, groups, mode):
  """ADM ResBlock: skip(resample(x)) + conv0(SiLU(GN(h)(1 + s) + b)), dropout off."""
  h = _silu(_gn(x, _np(p["norm1"]["scale"]), _np(p["norm1"]["bias"]), groups))
  h = _conv_same(_resample(h, mode), _np(p["conv1"]["kernel"]), _np(p["conv1"]["bias"]))
  x = _resample(x, mode)
  e = _silu(emb) @ _np(p["emb_proj"]["kernel"]) + _np(p["emb_proj"]["bias"])
  scale, shift = np.split(e, 2, axis=-1)
  h = _gn(h, _np(p["norm2"]["scale"]), _np(p["norm2"]["bias"]), groups)
  h = _silu(h * (1 + scale[:, None, None]) + shift[:, None, None])
  h = _conv_same(h, _np(p["conv2"]["kernel"]), _np(p["conv2"]["bias"]))
  if "skip" in p:
    x = _conv_same(x, _np(p["skip"]["kernel"]), _np(p["skip"]["bias"]))
  return x + h


def _np_attention(p, x, heads, groups):
  n, hgt, wid, c = x.shape
  t = _gn(x, _np(p["norm"]["scale"]), _np(p["norm"]["bias"]), groups)
  qkv = t.reshape(n, -1, c) @ _np(p["qkv"]["kernel"]) + _np(p["qkv"]["bias"])
  q, k, v = (a.reshape(n, -1, heads, c // heads) for a in np.split(qkv, 3, axis=-1))
  logits = np.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(c // heads)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum("nhqk,nkhd->nqhd", w, v).reshape(n, -1, c)
  out = out @ _np(p["proj_out"]["kernel"]) + _np(p["proj_out"]["bias"])
  return x + out.reshape(x.shape)


def _perturbed_layer(layer, seed):
  """Fills a stand-alone layer with N(0, 0.3²) noise around its declared values."""
  params = _perturb(nnx.state(layer, nnx.Param).to_pure_dict(), seed)
  nnx.update(layer, params)
  return params


# --- layers --------------------------------------------------------------------------

@pytest.mark.parametrize("resample,cin,cout", [(None, 8, 16), ("down", 8, 8),
                                               ("up", 16, 16)])
def test_resblock_matches_numpy_reference(resample, cin, cout):
  block = unet.ResBlock(cin, cout, 12, num_groups=4, resample=resample)
  p = _perturbed_layer(block, 1)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 4, 4, cin)).astype(np.float32)
  emb = rng.standard_normal((2, 12)).astype(np.float32)
  out = nnx.jit(lambda b, x, e: b(x, e))(block, x, emb)
  side = {None: 4, "down": 2, "up": 8}[resample]
  assert out.shape == (2, side, side, cout)
  np.testing.assert_allclose(out, _np_resblock(p, _np(x), _np(emb), 4, resample),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_attention_matches_numpy_reference(impl):
  """"xla" is jax.nn.dot_product_attention, the path "cudnn" shares but for the kernel."""
  block = unet.AttentionBlock(16, 4, num_groups=4, impl=impl)
  p = _perturbed_layer(block, 3)
  x = np.random.default_rng(4).standard_normal((2, 4, 4, 16)).astype(np.float32)
  out = nnx.jit(lambda b, x: b(x))(block, x)
  np.testing.assert_allclose(out, _np_attention(p, _np(x), 4, 4), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_attention_gradients_match_the_textbook_softmax(impl):
  """The einsum block normalises after the value matmul; its gradients, and those of
  jax.nn.dot_product_attention, must equal those of softmax(q kᵀ/√d) v written with
  jax.nn.softmax (a second code path)."""
  block = unet.AttentionBlock(16, 4, num_groups=4, impl=impl)
  _perturbed_layer(block, 5)
  graphdef, params = nnx.split(block, nnx.Param)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 4, 4, 16)), jnp.float32)
  g = jnp.asarray(np.random.default_rng(7).standard_normal((2, 4, 4, 16)), jnp.float32)

  def textbook(params, x):
    b = nnx.merge(graphdef, params)
    n, hgt, wid, c = x.shape
    qkv = b.qkv(b.norm(x).reshape(n, hgt * wid, c))
    q, k, v = (a.reshape(n, -1, 4, c // 4) for a in jnp.split(qkv, 3, axis=-1))
    w = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(c // 4), axis=-1)
    out = jnp.einsum("nhqk,nkhd->nqhd", w, v).reshape(n, -1, c)
    return x + b.proj_out(out).reshape(x.shape)

  def loss(fn):
    return jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x) * g), (0, 1)))(params, x)

  got = loss(lambda p, x: nnx.merge(graphdef, p)(x))
  want = loss(textbook)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_unet_attention_impls_agree():
  """The whole U-Net with jax.nn.dot_product_attention equals the einsum form."""
  config = TINY["16x16x3"]
  graphdef, params = _split(config)
  params = _perturb(params, 11)
  z, logsnr, labels = _inputs(config)
  key = jax.random.key(0)
  want = _forward(graphdef, params, z, logsnr, labels, key)
  got = _forward(_graphdef(dict(config, attention_impl="xla")), params, z, logsnr,
                 labels, key)
  assert np.linalg.norm(want) > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs on GPUs.")
def test_cudnn_attention_off_gpu_is_a_clear_error():
  config = dict(TINY["8x8x1"], dtype="bfloat16", attention_impl="cudnn")
  graphdef, params = _split(config)
  with pytest.raises(ValueError, match="attention_impl='cudnn' runs on CUDA GPUs"):
    _forward(graphdef, params, *_inputs(config), jax.random.key(0))


def test_logsnr_embedding_finite_distinct_and_exact():
  logsnr = np.linspace(-20.0, 20.0, 801)
  t = np.asarray(layers.logsnr_to_time(jnp.asarray(logsnr, jnp.float32)), np.float64)
  t_ref = np.arctan(np.exp(-logsnr / 2)) / (np.pi / 2)
  np.testing.assert_allclose(t, t_ref, rtol=1e-5, atol=1e-7)
  assert t[400] == 0.5  # λ = 0: arctan(1) = π/4.
  # Clipped beyond ±20.
  t_out = layers.logsnr_to_time(jnp.array([-50.0, 50.0]))
  np.testing.assert_array_equal(t_out, layers.logsnr_to_time(jnp.array([-20.0, 20.0])))

  dim = 64
  emb = np.asarray(layers.sinusoidal_embedding(1000 * jnp.asarray(t, jnp.float32), dim))
  freqs = np.exp(-np.log(10_000.0) * np.arange(dim // 2) / (dim // 2))
  args = 1000 * t_ref[:, None] * freqs
  np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], -1),
                             atol=2e-3)
  assert np.all(np.isfinite(emb))
  # Neighbouring λ (0.05 apart) stay apart, also at λ = 20 where t ≈ 3e-5.
  dist = np.linalg.norm(np.diff(emb, axis=0), axis=-1)
  assert dist.min() > 1e-4


def test_class_embedding_rejects_bad_labels():
  table = layers.ClassEmbedding(3, 4)
  layers.initialize(table, nnx.Rngs(0))
  with pytest.raises(ValueError, match="labels must lie in"):
    table(jnp.array([0, 4]))
  # Under jit the check is impossible; an out-of-range row is NaN, not a clamped row.
  out = jax.jit(lambda l: table(l))(jnp.array([3, 4]))
  assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1]))
  np.testing.assert_array_equal(out[0], table.embedding[3])


def test_broadcast_inputs():
  z = jnp.zeros((3, 2))
  logsnr, labels = layers.broadcast_inputs(z, 1.5, jnp.array([0, 1, 2]))
  np.testing.assert_array_equal(logsnr, [1.5, 1.5, 1.5])
  with pytest.raises(ValueError, match="logsnr"):
    layers.broadcast_inputs(z, jnp.zeros(2), jnp.array([0, 1, 2]))
  with pytest.raises(ValueError, match="labels"):
    layers.broadcast_inputs(z, 0.0, jnp.array([0.0, 1.0, 2.0]))


# --- the whole U-Net -------------------------------------------------------------

# XLA's CPU compile time (~1 s per residual block's gradient) dominates this file, so
# the compiled tests share few programs: the two-level 8x8x1 model's eval forward in
# float32 and bfloat16, and train gradients, with and without remat, of a one-level
# model (one res block, the middle block, two decoder blocks). Dropout is on in both.
DROP = dict(TINY["8x8x1"], dropout=0.5)
SMALL = dict(DROP, channel_mult=(1,), attention_resolutions=(8,))


@pytest.fixture(scope="module")
def fresh():
  return _split(DROP)


@pytest.fixture(scope="module")
def small():
  graphdef, params = _split(SMALL)
  return graphdef, _perturb(params, 8)


@functools.partial(jax.jit, static_argnames="graphdef")
def _train_grad(graphdef, params, z, logsnr, labels, key, weights):
  """Gradient of Σ weights·out, and out, at train=True."""
  def loss(params):
    out = _forward(graphdef, params, z, logsnr, labels, key, train=True)
    return jnp.sum(weights * out), out
  return jax.grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(TINY))
def test_shapes(name, dtype):
  config = dict(TINY[name], dtype=dtype)
  abstract = nnx.eval_shape(lambda: models.create(config, rngs=nnx.Rngs(0)))
  z, logsnr, labels = _inputs(config)
  out = jax.eval_shape(lambda m: m(z, logsnr, labels), abstract)
  assert out.shape == z.shape and out.dtype == jnp.float32
  out = jax.eval_shape(lambda m: m(z[:1], 0.0, K), abstract)  # Scalars broadcast.
  assert out.shape == z[:1].shape


def test_zero_init_and_bfloat16(fresh):
  graphdef, params = fresh
  graphdef_bf16 = _graphdef(dict(DROP, dtype="bfloat16"))
  z, logsnr, labels = _inputs(DROP)
  key = jax.random.key(0)
  for gd in (graphdef, graphdef_bf16):
    # Zero-initialised last convolutions: a fresh model predicts exactly ε = 0.
    np.testing.assert_array_equal(_forward(gd, params, z, logsnr, labels, key), 0.0)
  params = _perturb(params, 7)
  out32 = np.asarray(_forward(graphdef, params, z, logsnr, labels, key))
  out16 = np.asarray(_forward(graphdef_bf16, params, z, logsnr, labels, key))
  assert np.all(np.isfinite(out32)) and np.linalg.norm(out32) > 1.0
  # bfloat16 compute (8-bit mantissa) tracks float32 to about a percent.
  rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
  assert rel < 0.05, rel


def test_init_zero_layers_and_pytorch_bounds(fresh):
  flat = _flat(fresh[1])
  zero = {k for k, v in flat.items() if not v.any()}
  # ADM's zero_module layers, and GroupNorm biases.
  expected = {k for k in flat if k.split("/")[-2] in ("conv2", "proj_out", "conv_out")
              or (k.split("/")[-2].startswith("norm") and k.endswith("bias"))}
  assert zero == expected
  for k, v in flat.items():
    if k not in expected and "norm" not in k and "class_embed" not in k:
      kernel = flat[k.rsplit("/", 1)[0] + "/kernel"]
      bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))  # PyTorch's fan_in bound.
      assert np.abs(v).max() <= bound
      if v.size > 4000:  # U(−b, b) has std b/√3.
        assert abs(v.std() * math.sqrt(3) / bound - 1) < 0.05, k
  table = flat["class_embed/embedding"]
  assert table.shape == (K + 1, 64) and abs(table.std() - 1) < 0.1


def test_same_rngs_same_parameters(fresh):
  model_helpers.assert_seeded_init(DROP, fresh[1])


def test_class_rows_get_gradient_only_from_their_examples(small):
  graphdef, params = small
  z, logsnr, _ = _inputs(SMALL)
  labels = np.array([2, K, 2, 5], np.int32)
  r = np.random.default_rng(9).standard_normal(z.shape).astype(np.float32)
  key = jax.random.key(3)

  def table_grad(mask):
    weights = mask[:, None, None, None] * r
    grads, _ = _train_grad(graphdef, params, z, logsnr, labels, key, weights)
    return np.asarray(grads["class_embed"]["embedding"])

  per_example = [table_grad(np.eye(4, dtype=np.float32)[i]) for i in range(4)]
  for i, g in enumerate(per_example):
    np.testing.assert_array_equal(np.delete(g, labels[i], axis=0), 0.0)
    assert np.abs(g[labels[i]]).max() > 1e-4
  full = table_grad(np.ones(4, np.float32))
  np.testing.assert_allclose(full[K], per_example[1][K], rtol=1e-6)  # ∅: example 1.
  np.testing.assert_allclose(full[2], per_example[0][2] + per_example[2][2],
                             rtol=1e-5, atol=1e-7)


def test_dropout_only_in_training_and_remat_matches(small):
  graphdef, params = small
  graphdef_remat = _graphdef(dict(SMALL, remat=True))
  z, logsnr, labels = _inputs(SMALL)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  weights = np.random.default_rng(11).standard_normal(z.shape).astype(np.float32)

  eval1 = _forward(graphdef, params, z, logsnr, labels, k1)
  np.testing.assert_array_equal(eval1, _forward(graphdef, params, z, logsnr, labels, k2))
  g1, train1 = _train_grad(graphdef, params, z, logsnr, labels, k1, weights)
  g1_again, train1_again = _train_grad(graphdef, params, z, logsnr, labels, k1, weights)
  _, train2 = _train_grad(graphdef, params, z, logsnr, labels, k2, weights)
  np.testing.assert_array_equal(train1, train1_again)
  assert np.abs(train1 - eval1).max() > 1e-2
  assert np.abs(train1 - train2).max() > 1e-2
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g1_again)):
    np.testing.assert_array_equal(a, b)

  g_remat, train_remat = _train_grad(graphdef_remat, params, z, logsnr, labels, k1,
                                     weights)
  np.testing.assert_allclose(train_remat, train1, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g1)):
    # Float32 round-off of sums in another order: relative to each leaf's scale.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())

  with pytest.raises(ValueError, match="rngs"):
    nnx.merge(graphdef, params)(z, logsnr, labels, train=True)


# --- parameter counts of the paper models ----------------------------------------

def _conv(cin, cout, k=3):
  return k * k * cin * cout + cout


def _dense(cin, cout):
  return cin * cout + cout


def _gn_count(c):
  return 2 * c


def _res(cin, cout, emb):
  """GN, conv3x3, Dense(emb → 2·cout) for scale and shift, GN, conv3x3, 1x1 skip."""
  skip = _conv(cin, cout, 1) if cin != cout else 0
  return (_gn_count(cin) + _conv(cin, cout) + _dense(emb, 2 * cout) + _gn_count(cout)
          + _conv(cout, cout) + skip)


def _attn(c):
  return _gn_count(c) + _dense(c, 3 * c) + _dense(c, c)


def _count_imagenet64(out_channels=3, rows=1001):
  """C = 192: level widths 192, 384, 576, 768 at 64, 32, 16, 8; attention at 32-8."""
  e = 4 * 192
  r = functools.partial(_res, emb=e)
  emb = _dense(192, e) + _dense(e, e) + rows * e
  enc = (_conv(3, 192)
         + 3 * r(192, 192) + r(192, 192)                                # 64, down
         + r(192, 384) + 2 * r(384, 384) + 3 * _attn(384) + r(384, 384)  # 32, down
         + r(384, 576) + 2 * r(576, 576) + 3 * _attn(576) + r(576, 576)  # 16, down
         + r(576, 768) + 2 * r(768, 768) + 3 * _attn(768))               # 8
  mid = 2 * r(768, 768) + _attn(768)
  # Skips, popped last-first: 768 x3, 576 | 576 x3, 384 | 384 x3, 192 | 192 x4.
  dec = (3 * r(1536, 768) + r(1344, 768) + 4 * _attn(768) + r(768, 768)   # 8, up
         + r(1344, 576) + 2 * r(1152, 576) + r(960, 576) + 4 * _attn(576)
         + r(576, 576)                                                   # 16, up
         + r(960, 384) + 2 * r(768, 384) + r(576, 384) + 4 * _attn(384)
         + r(384, 384)                                                   # 32, up
         + r(576, 192) + 3 * r(384, 192))                                # 64
  out = _gn_count(192) + _conv(192, out_channels)
  return emb + enc + mid + dec + out


def _count_imagenet128(out_channels=3, rows=1001):
  """C = 256: widths 256, 256, 512, 768, 1024 at 128-8; attention at 32, 16, 8."""
  e = 4 * 256
  r = functools.partial(_res, emb=e)
  emb = _dense(256, e) + _dense(e, e) + rows * e
  enc = (_conv(3, 256)
         + 2 * r(256, 256) + r(256, 256)                                  # 128, down
         + 2 * r(256, 256) + r(256, 256)                                  # 64, down
         + r(256, 512) + r(512, 512) + 2 * _attn(512) + r(512, 512)       # 32, down
         + r(512, 768) + r(768, 768) + 2 * _attn(768) + r(768, 768)       # 16, down
         + r(768, 1024) + r(1024, 1024) + 2 * _attn(1024))                # 8
  mid = 2 * r(1024, 1024) + _attn(1024)
  # Skips: 1024 x2, 768 | 768 x2, 512 | 512 x2, 256 | 256 x3 | 256 x3.
  dec = (2 * r(2048, 1024) + r(1792, 1024) + 3 * _attn(1024) + r(1024, 1024)
         + r(1792, 768) + r(1536, 768) + r(1280, 768) + 3 * _attn(768) + r(768, 768)
         + r(1280, 512) + r(1024, 512) + r(768, 512) + 3 * _attn(512) + r(512, 512)
         + r(768, 256) + 2 * r(512, 256) + r(256, 256)
         + 3 * r(512, 256))
  out = _gn_count(256) + _conv(256, out_channels)
  return emb + enc + mid + dec + out


def _num_params(config):
  abstract = nnx.eval_shape(lambda: models.create(config, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("preset,count_fn,adm_millions,exact", [
    (presets.imagenet64, _count_imagenet64, 296, 295_900_035),
    (presets.imagenet128, _count_imagenet128, 422, 421_523_715),
])
def test_paper_model_parameter_counts(preset, count_fn, adm_millions, exact):
  assert count_fn() == exact
  # ADM's own model learns the variance (6 output channels) and has no ∅ row.
  assert round(count_fn(out_channels=6, rows=1000) / 1e6) == adm_millions
  assert _num_params(preset()) == exact


# --- configuration errors --------------------------------------------------------

@pytest.mark.parametrize("override,field", [
    (dict(attention_resolutions=(3,)), "attention_resolutions"),
    (dict(num_groups=32), "num_groups"),
    (dict(num_heads=3), "num_heads"),
    (dict(num_heads=-1, num_head_channels=12), "num_head_channels"),
    (dict(num_heads=-1, num_head_channels=-1), "num_heads"),
    (dict(image_size=10, channel_mult=(1, 2, 2)), "image_size"),
    (dict(dtype="float16"), "dtype"),
    (dict(dropout=1.0), "dropout"),
    (dict(attention_impl="flash"), "attention_impl='flash'"),
    (dict(attention_impl="cudnn"), "attention_impl='cudnn' needs dtype='bfloat16'"),
    (dict(name="resnet"), "model.name"),
    (dict(num_res_block=2), "num_res_block"),
])
def test_bad_config_names_the_field(override, field):
  with pytest.raises(ValueError, match=field):
    models.create(dict(TINY["8x8x1"], **override), rngs=nnx.Rngs(0))


def test_digits_preset_parameter_count():
  """C = 32: widths 32, 64 at 8, 4; one block per level; attention at 4; grey; 10 + ∅."""
  e = 4 * 32
  r = functools.partial(_res, emb=e)
  count = (_dense(32, e) + _dense(e, e) + 11 * e + _conv(1, 32)
           + r(32, 32) + r(32, 32) + r(32, 64) + _attn(64)  # Level 8, down, level 4.
           + 2 * r(64, 64) + _attn(64)  # Middle.
           # Skips: 64, 32 | 32, 32.
           + r(128, 64) + r(96, 64) + 2 * _attn(64) + r(64, 64)  # Level 4, up.
           + r(96, 32) + r(64, 32)  # Level 8.
           + _gn_count(32) + _conv(32, 1))
  assert _num_params(presets.digits()) == count == 827_745
  for preset in (presets.cpu_unet, presets.cifar10):
    assert _num_params(preset()) > 0
