"""Tests for xla_options.py: which options each backend gets, that XLA:CPU applies them
(convolutions leave the YNNPACK fusions), that the numbers stay those of a float64
convolution, and that decorated module-level functions start no backend at import."""

import re
import subprocess
import sys

import jax

import conv_test
from cfg_guidance import xla_options
from cfg_guidance.models import conv


def test_options_per_backend_and_user_flags():
  assert xla_options.options_for("cpu") == xla_options.CPU_OPTIONS
  assert xla_options.options_for("gpu") is None
  assert xla_options.options_for("tpu") is None
  # The user's own XLA_FLAGS setting wins: a jit option would override it.
  flags = "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type="
  assert xla_options.options_for("cpu", flags) is None
  assert xla_options.options_for("cpu", "--xla_force_host_platform_device_count=8") == (
      xla_options.CPU_OPTIONS)


def test_pinned_xla_accepts_the_cpu_options():
  assert jax.default_backend() == "cpu"
  assert xla_options.compiler_options() == xla_options.CPU_OPTIONS


def test_rejected_options_fall_back_to_xla_defaults(monkeypatch, caplog):
  monkeypatch.setattr(xla_options, "options_for",
                      lambda *_: {"xla_cpu_no_such_option_here": "1"})
  assert xla_options.compiler_options.__wrapped__() is None
  assert "xla_cpu_no_such_option_here" in caplog.text


def _entry(hlo: str) -> str:
  """The ENTRY computation of compiled HLO text (fusion bodies are separate)."""
  return re.search(r"^ENTRY .*?^\}", hlo, re.S | re.M).group(0)


def _conv_and_grads(x, k, g):
  y, vjp = jax.vjp(lambda x, k: conv.conv2d(x, k), x, k)
  return (y, *vjp(g))


def test_cpu_options_move_convolutions_out_of_ynnpack_with_the_same_numbers():
  x, k, g = conv_test._inputs(4, 12, 24, 16, 3, 1)
  want = (conv_test.np_conv(x, k, 1), *conv_test.np_conv_grads(x, k, g, 1))
  default = jax.jit(_conv_and_grads).lower(x, k, g).compile()
  ours = jax.jit(_conv_and_grads, compiler_options=xla_options.CPU_OPTIONS).lower(
      x, k, g).compile()
  # XLA's default puts convolutions in YNNPACK fusions (here the forward and the input
  # gradient); with our options all three are convolutions of the entry computation.
  assert _entry(default.as_text()).count("convolution(") < 3
  assert _entry(ours.as_text()).count("convolution(") == 3
  for got_default, got, want_one in zip(default(x, k, g), ours(x, k, g), want):
    conv_test._assert_close(got, want_one, 1e-5)
    conv_test._assert_close(got, got_default, 1e-5)


def test_jit_decorator_applies_the_options_lazily():
  @xla_options.jit(static_argnames=("scale",))
  def f(x, k, *, scale):
    return scale * conv.conv2d(x, k)

  x, k, _ = conv_test._inputs(2, 8, 8, 8, 3, 1)
  conv_test._assert_close(f(x, k, scale=2.0), 2 * conv_test.np_conv(x, k, 1), 1e-5)
  assert f.__name__ == "f"
  assert _entry(f.lower(x, k, scale=2.0).compile().as_text()).count("convolution(") == 1
  # Nested in an outer jit (which JAX refuses compiler options on) and under vmap.
  outer = jax.jit(lambda x, k: f(x, k, scale=2.0) + 1)
  conv_test._assert_close(outer(x, k), 2 * conv_test.np_conv(x, k, 1) + 1, 1e-5)
  batched = jax.vmap(lambda x: f(x, k, scale=2.0))(x[:, None])
  conv_test._assert_close(batched[:, 0], 2 * conv_test.np_conv(x, k, 1), 1e-5)


def test_importing_the_decorated_modules_starts_no_backend():
  # jax.distributed.initialize must run before the backend starts (it raises otherwise),
  # so the module-level `xla_options.jit` decorators must not query it at import.
  code = ("import socket\n"
          "import cfg_guidance.sampling, cfg_guidance.evaluate, cfg_guidance.train\n"
          "import jax\n"
          "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]\n"
          "s.close()\n"
          "jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',\n"
          "                           num_processes=1, process_id=0)\n"
          "jax.distributed.shutdown()\n")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_train_step_is_compiled_with_the_options(monkeypatch):
  from bench import train_bench  # pylint: disable=g-import-not-at-top
  from cfg_guidance import sharding, train  # pylint: disable=g-import-not-at-top
  seen, real_jit = [], jax.jit

  def recording_jit(*args, **kwargs):
    seen.append(kwargs.get("compiler_options"))
    return real_jit(*args, **kwargs)

  xla_options.compiler_options()  # Its first call compiles a check program; not this one.
  monkeypatch.setattr(jax, "jit", recording_jit)
  config = train_bench.preset_config("digits", 8)
  mesh = sharding.create_mesh(jax.devices()[:1])
  train.make_train_fn(config, None, train.make_optimizer(config.train), None, mesh)
  assert seen == [xla_options.CPU_OPTIONS]


def test_samplers_are_decorated_with_the_options():
  from cfg_guidance import evaluate, sampling  # pylint: disable=g-import-not-at-top
  for fn in (sampling._sample_loop, evaluate._sample_rows):
    # xla_options.jit's wrapper: the undecorated function behind it, our `lower`.
    assert fn.__wrapped__.__name__ == fn.__name__
    assert fn.lower.__qualname__.startswith("jit.<locals>")
