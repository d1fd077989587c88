"""Two JAX processes on localhost (gloo CPU collectives) train like one process."""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from cfg_guidance import sharding, train
import train_test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", {devices})
    sys.path[:0] = [{root!r}, {tests!r}]
    import numpy as np
    from cfg_guidance import cpu_runtime, distributed, train
    import train_test

    distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
    cpu_runtime.configure()  # As main.py does: with one local device, steps run inline.
    for num_steps in (4, 8):  # Save at 4; the second call restores and goes on to 8.
      config = train_test.tiny_config(num_steps=num_steps, checkpoint_every=4,
                                      sample_every=0, log_every=4)
      state = train.train_and_evaluate(config, {workdir!r})
    assert int(state.step) == 8
    if jax.process_index() == 0:
      leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
      np.savez({out!r}, *leaves)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("devices", [2, 1])
def test_two_processes_match_one_process(tmp_path, devices):
  script = tmp_path / "worker.py"
  out = tmp_path / "params.npz"
  script.write_text(WORKER.format(devices=devices, root=ROOT,
                                  tests=os.path.join(ROOT, "tests"), port=_free_port(),
                                  workdir=str(tmp_path / "work"), out=str(out)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  procs = [subprocess.Popen([sys.executable, str(script), str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]

  config = train_test.tiny_config(num_steps=8, checkpoint_every=8, sample_every=0,
                                  log_every=4)
  state = train.train_and_evaluate(config, str(tmp_path / "single"),
                                   mesh=sharding.create_mesh(jax.devices()[:2 * devices]))
  with np.load(out, allow_pickle=False) as f:
    multi = [f[f"arr_{i}"] for i in range(len(f.files))]
  single = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  assert len(multi) == len(single)
  for a, b in zip(multi, single):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
