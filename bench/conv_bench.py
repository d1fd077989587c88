"""Convolution forward / kernel-gradient / input-gradient timings on CPU: XLA, ours
(`conv.conv2d`) and the alternatives tried for it, on the CPU-sized U-Net's shapes.

`python -m bench.conv_bench [--quick] [--model]`. Times are medians of interleaved
repeats, wall and process CPU time (the CPU time is steadier on a shared machine).
"""

import argparse
import contextlib
import json
import random
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cfg_guidance.models import conv as conv_lib

# (name, batch, size, Cin, Cout, kernel, stride): the convolutions of the CPU-sized
# U-Net (32x32x3, C = 64, multipliers (1, 2, 2)) at batch 32; "128->128 @32" is also
# the case. The stride-2 ones appear with resblock_updown=False.
SHAPES = [
    ("in 3->64 @32", 32, 32, 3, 64, 3, 1),
    ("64->64 @32", 32, 32, 64, 64, 3, 1),
    ("128->128 @32", 32, 32, 128, 128, 3, 1),
    ("192->64 @32", 32, 32, 192, 64, 3, 1),
    ("out 64->3 @32", 32, 32, 64, 3, 3, 1),
    ("64->128 @16", 32, 16, 64, 128, 3, 1),
    ("256->128 @16", 32, 16, 256, 128, 3, 1),
    ("128->128 @8", 32, 8, 128, 128, 3, 1),
    ("down 64 s2 @32", 32, 32, 64, 64, 3, 2),
    ("down 128 s2 @16", 32, 16, 128, 128, 3, 2),
    ("skip 192->64 @32", 32, 32, 192, 64, 1, 1),
    ("skip 256->128 @16", 32, 16, 256, 128, 1, 1),
    ("skip 256->128 @8", 32, 8, 256, 128, 1, 1),
]
QUICK = ["128->128 @32", "down 64 s2 @32", "skip 192->64 @32"]
# The CPU-sized U-Net (configs/adm.py's cpu_unet without dropout), for `models.create`.
UNET = dict(name="unet", image_size=32, channels=3, base_channels=64,
            channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(16, 8),
            num_classes=10, num_heads=-1, num_head_channels=32)


def _same_pads(size, k, stride):
  out = -(-size // stride)
  total = max((out - 1) * stride + k - size, 0)
  return total // 2, total - total // 2, out


def _shifted(x, kh, kw, stride):
  """The kh*kw strided windows of SAME-padded x, each [N, H', W', C] (im2col's parts)."""
  n, h, w, c = x.shape
  top, bottom, ho = _same_pads(h, kh, stride)
  left, right, wo = _same_pads(w, kw, stride)
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  return [jax.lax.slice(xp, (0, i, j, 0),
                        (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                        (1, stride, stride, 1))
          for i in range(kh) for j in range(kw)]


# Forward candidates: (x, kernel, stride) -> y.
def fwd_im2col(x, kernel, stride):
  kh, kw, cin, cout = kernel.shape
  patches = jnp.concatenate(_shifted(x, kh, kw, stride), axis=-1)
  return jnp.einsum("nhwk,ko->nhwo", patches, kernel.reshape(kh * kw * cin, cout))


# Kernel-gradient candidates: (x, g, kernel_shape, stride) -> dkernel.
def dk_xla(x, g, kernel_shape, stride):
  kernel = jax.ShapeDtypeStruct(kernel_shape, x.dtype)
  return jax.linear_transpose(
      lambda k: conv_lib.xla_conv2d(x, k, stride=stride), kernel)(g)[0]


def dk_ours(x, g, kernel_shape, stride):
  kernel = jax.ShapeDtypeStruct(kernel_shape, x.dtype)
  return jax.linear_transpose(
      lambda k: conv_lib.conv2d(x, k, stride=stride), kernel)(g)[0]


def dk_im2col(x, g, kernel_shape, stride):
  """One matmul: patches [M, 9·Cin] contracted with g [M, Cout] over M = N·H'·W'."""
  patches = jnp.concatenate(_shifted(x, *kernel_shape[:2], stride), axis=-1)
  return jnp.einsum("nhwk,nhwo->ko", patches, g).reshape(kernel_shape)


def dk_sum9(x, g, kernel_shape, stride):
  """One [Cin, Cout] matmul per kernel tap."""
  taps = [jnp.einsum("nhwc,nhwo->co", xs, g)
          for xs in _shifted(x, *kernel_shape[:2], stride)]
  return jnp.stack(taps).reshape(kernel_shape)


def dk_swapped(x, g, kernel_shape, stride):
  """A convolution with batch and feature swapped: Cin is the batch, N the features."""
  kh, kw = kernel_shape[:2]
  top, bottom, _ = _same_pads(x.shape[1], kh, stride)
  left, right, _ = _same_pads(x.shape[2], kw, stride)
  out = jax.lax.conv_general_dilated(
      x, g, window_strides=(1, 1), padding=((top, bottom), (left, right)),
      rhs_dilation=(stride, stride), dimension_numbers=("CHWN", "IHWO", "HWNC"))
  return out[:kh, :kw]


# Input-gradient candidates: (x_shape, kernel, g, stride) -> dx.
def dx_xla(x_shape, kernel, g, stride):
  x = jax.ShapeDtypeStruct(x_shape, g.dtype)
  return jax.linear_transpose(
      lambda x: conv_lib.xla_conv2d(x, kernel, stride=stride), x)(g)[0]


def dx_ours(x_shape, kernel, g, stride):
  x = jax.ShapeDtypeStruct(x_shape, g.dtype)
  return jax.linear_transpose(
      lambda x: conv_lib.conv2d(x, kernel, stride=stride), x)(g)[0]


def dx_col2im(x_shape, kernel, g, stride):
  """g @ kernelᵀ gives every tap's contribution; each is placed (strided) and summed."""
  kh, kw, cin, cout = kernel.shape
  n, h, w, _ = x_shape
  top, bottom, ho = _same_pads(h, kh, stride)
  left, right, wo = _same_pads(w, kw, stride)
  cols = jnp.einsum("nhwo,ko->nhwk", g, kernel.reshape(kh * kw * cin, cout))
  cols = cols.reshape(n, ho, wo, kh * kw, cin)
  hp, wp = h + top + bottom, w + left + right
  zero = jnp.zeros((), g.dtype)
  dx = 0
  for t in range(kh * kw):
    i, j = divmod(t, kw)
    dx = dx + jax.lax.pad(cols[:, :, :, t], zero, (
        (0, 0, 0), (i, hp - i - (ho - 1) * stride - 1, stride - 1),
        (j, wp - j - (wo - 1) * stride - 1, stride - 1), (0, 0, 0)))
  return dx[:, top:top + h, left:left + w]


def _time(fns, args, repeats):
  """Median wall and CPU ms (and min wall) of each (jitted) fn, interleaved by round."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  wall = {name: [] for name in fns}
  cpu = {name: [] for name in fns}
  order = random.Random(0)
  for _ in range(repeats):
    for name in order.sample(list(fns), len(fns)):
      # Untimed call first: right after im2col's large buffers, one identical
      # program ("xla" and "ours" on a 3x3 kernel) timed up to 40% slower.
      jax.block_until_ready(fns[name](*args))
      w0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fns[name](*args))
      wall[name].append(1e3 * (time.perf_counter() - w0))
      cpu[name].append(1e3 * (time.process_time() - c0))
  return {name: {"wall_ms": statistics.median(wall[name]),
                 "cpu_ms": statistics.median(cpu[name]),
                 "min_wall_ms": min(wall[name])} for name in fns}


def _check_same(fns, args, reference):
  """Every candidate must agree with XLA before it is timed."""
  want = np.asarray(jax.jit(reference)(*args), np.float32)
  for name, fn in fns.items():
    got = np.asarray(jax.jit(fn)(*args), np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                               err_msg=name)


def _jit_all(fns):
  return {name: jax.jit(fn) for name, fn in fns.items()}


def bench_shape(n, size, cin, cout, k, stride, *, repeats):
  """{"fwd" | "dkernel" | "dinput": {implementation: {"wall_ms", "cpu_ms", ...}}}."""
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (n, size, size, cin))
  kernel = jax.random.normal(keys[1], (k, k, cin, cout)) / (k * cin**0.5)
  g = jax.random.normal(keys[2], conv_lib.xla_conv2d(x, kernel, stride=stride).shape)
  kshape = kernel.shape
  fwd = {"xla": lambda x, w: conv_lib.xla_conv2d(x, w, stride=stride),
         "ours": lambda x, w: conv_lib.conv2d(x, w, stride=stride),
         "im2col": lambda x, w: fwd_im2col(x, w, stride)}
  dk = {"xla": lambda x, g: dk_xla(x, g, kshape, stride),
        "ours": lambda x, g: dk_ours(x, g, kshape, stride),
        "im2col": lambda x, g: dk_im2col(x, g, kshape, stride),
        "sum9": lambda x, g: dk_sum9(x, g, kshape, stride),
        "swapped": lambda x, g: dk_swapped(x, g, kshape, stride)}
  dx = {"xla": lambda w, g: dx_xla(x.shape, w, g, stride),
        "ours": lambda w, g: dx_ours(x.shape, w, g, stride),
        "col2im": lambda w, g: dx_col2im(x.shape, w, g, stride)}
  _check_same(fwd, (x, kernel), fwd["xla"])
  _check_same(dk, (x, g), dk["xla"])
  _check_same(dx, (kernel, g), dx["xla"])
  return {"fwd": _time(_jit_all(fwd), (x, kernel), repeats),
          "dkernel": _time(_jit_all(dk), (x, g), repeats),
          "dinput": _time(_jit_all(dx), (kernel, g), repeats)}


@contextlib.contextmanager
def _conv_impl(fn):
  """Routes every model convolution through `fn` while tracing inside the block."""
  saved = conv_lib.conv2d
  conv_lib.conv2d = fn
  try:
    yield
  finally:
    conv_lib.conv2d = saved


def bench_unet_step(*, repeats, batch=32):
  """U-Net train step (forward, MSE, backward, Adam) with ours vs XLA's convolution."""
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from cfg_guidance import models  # pylint: disable=g-import-not-at-top
  graphdef, params = nnx.split(models.create(UNET, rngs=nnx.Rngs(0)))
  tx = optax.adam(1e-4)
  opt_state = jax.jit(tx.init)(params)
  keys = jax.random.split(jax.random.key(1), 2)
  z = jax.random.normal(keys[0], (batch, 32, 32, 3))
  eps = jax.random.normal(keys[1], (batch, 32, 32, 3))
  logsnr = jnp.linspace(-10.0, 10.0, batch)
  labels = jnp.arange(batch) % 11

  def step(params, opt_state):
    def loss_fn(p):
      return jnp.mean(jnp.square(nnx.merge(graphdef, p)(z, logsnr, labels) - eps))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  compiled = {}
  for name, fn in [("xla", conv_lib.xla_conv2d), ("ours", conv_lib.conv2d)]:
    with _conv_impl(fn):
      compiled[name] = jax.jit(step).lower(params, opt_state).compile()
  times = _time(compiled, (params, opt_state), repeats)
  for t in times.values():
    t["images_per_s"] = batch / (t["wall_ms"] / 1e3)
  return times


def run(quick=False, model=False):
  """Times every shape (QUICK only when quick); adds the U-Net step when `model`."""
  repeats = 5 if quick else 9
  results = {"backend": jax.default_backend(), "shapes": {}}
  for name, *shape in SHAPES:
    if quick and name not in QUICK:
      continue
    results["shapes"][name] = bench_shape(*shape, repeats=repeats)
  if model:
    results["unet_train_step"] = bench_unet_step(repeats=3 if quick else 5)
  return results


def _table(results):
  lines = []
  for name, ops in results["shapes"].items():
    for op, impls in ops.items():
      cells = "  ".join(f"{k} {v['wall_ms']:.1f}/{v['cpu_ms']:.1f}"
                        for k, v in impls.items())
      lines.append(f"{name:18s} {op:8s} {cells}")
  return "\n".join(lines)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true", help="Three shapes, fewer repeats.")
  parser.add_argument("--model", action="store_true", help="Also time the U-Net step.")
  args = parser.parse_args()
  out = run(quick=args.quick, model=args.model)
  print("median ms, wall/CPU")
  print(_table(out))
  print(json.dumps(out.get("unet_train_step"), indent=1))
