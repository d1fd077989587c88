"""The PyTorch peer: diffusers' UNet2DModel sized like our CPU U-Net, timed on CPU.

`python -m bench.torch_peer [--quick]` prints training and guided-sampling throughput.
Needs `pip install torch==2.13.0 diffusers` (the CPU wheel); returns None without them.
"""

import argparse
import json
import statistics
import time

NUM_CLASSES = 10  # Label NUM_CLASSES is the null label ∅ (num_class_embeds = 11).
BATCH = 32
IMAGE = 32
THREADS = 2

# The CPU-sized U-Net: 32x32x3, C = 64, multipliers (1, 2, 2), 2 blocks, attention at
# 16 and 8, 32-channel heads, 32 GroupNorm groups, dropout 0.1 (diffusers' default is 0).
SPEC = dict(
    sample_size=IMAGE, in_channels=3, out_channels=3,
    block_out_channels=(64, 128, 128), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=32, norm_num_groups=32, dropout=0.1,  # as presets.cpu_unet
    class_embed_type=None, num_class_embeds=NUM_CLASSES + 1)

# Closer to our ADM U-Net: scale-shift conditioning and residual (BigGAN) up/down-sampling
# blocks instead of plain strided/upsampling convolutions; 7,995,011 parameters against
# our 7,995,267 (SPEC has 6,806,531).
ADM = dict(
    SPEC,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    downsample_type="resnet", upsample_type="resnet",
    resnet_time_scale_shift="scale_shift")

# Our U-Net's config for the same model (`cfg_guidance.models.create`).
OURS = dict(name="unet", image_size=IMAGE, channels=3, base_channels=64,
            channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(16, 8),
            num_classes=NUM_CLASSES, num_heads=-1, num_head_channels=32, num_groups=32)


def _median_time(fn, repeats):
  """(median wall s, median process CPU s, every wall s) of `repeats` calls.

  The CPU time is the steadier number when other jobs share the cores.
  """
  wall, cpu = [], []
  for _ in range(repeats):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - w0)
    cpu.append(time.process_time() - c0)
  return statistics.median(wall), statistics.median(cpu), wall


def ours_param_count():
  """Parameter count of our U-Net with OURS, or None if it cannot be built here."""
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from cfg_guidance import models  # pylint: disable=g-import-not-at-top
    model = nnx.eval_shape(lambda: models.create(OURS, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  except Exception as e:  # pylint: disable=broad-except
    print(f"our U-Net's parameter count unavailable: {e!r}")
    return None


def _measure(torch, config, *, repeats, guidance_weight=3.0):
  """Train-step and guided-step throughput of UNet2DModel(**config) on BATCH images."""
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = UNet2DModel(**config)
  params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)
  x = torch.randn(BATCH, 3, IMAGE, IMAGE)
  noise = torch.randn_like(x)
  t = torch.randint(0, 1000, (BATCH,))
  labels = torch.randint(0, NUM_CLASSES + 1, (BATCH,))

  def train_step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x, t, class_labels=labels).sample, noise)
    loss.backward()
    opt.step()

  model.train()
  for _ in range(2):  # Warm-up: allocator, Adam state.
    train_step()
  train_s, train_cpu_s, train_all = _median_time(train_step, repeats)

  # Guided ε̃ = (1 + w) ε(z, c) − w ε(z, ∅), both halves in one forward of 2N.
  null = torch.full_like(labels, NUM_CLASSES)
  z2, t2, l2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])

  def guided_step():
    with torch.inference_mode():
      eps_c, eps_u = model(z2, t2, class_labels=l2).sample.chunk(2)
      return (1 + guidance_weight) * eps_c - guidance_weight * eps_u

  model.eval()
  guided_step()
  sample_s, sample_cpu_s, sample_all = _median_time(guided_step, repeats)
  return {
      "params": params,
      "train_step_s": train_s, "train_step_cpu_s": train_cpu_s,
      "train_step_s_all": train_all,
      "train_images_per_s": BATCH / train_s,
      "guided_step_s": sample_s, "guided_step_cpu_s": sample_cpu_s,
      "guided_step_s_all": sample_all,
      # Images taken one sampler step per second: divide by the number of steps
      # (e.g. 256) for finished samples per second.
      "guided_images_per_s": BATCH / sample_s,
  }


def run(quick=False, threads=THREADS):
  """Times the peer; returns {variant: numbers} or None when torch/diffusers are absent.

  On cores other jobs share, torch's waiting threads spin and inflate its wall and CPU
  time; `taskset -c 1 ... --threads=1` (and the same pinning for ours) compares the CPU
  seconds each step costs.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import diffusers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    print(f"PyTorch peer skipped: {e}. Install with "
          "`pip install torch==2.13.0 diffusers`.")
    return None
  torch.set_num_threads(threads)
  repeats = 2 if quick else 5
  variants = {"spec": SPEC} if quick else {"spec": SPEC, "adm": ADM}
  results = {"torch": torch.__version__, "threads": threads, "batch": BATCH,
             "ours_params": ours_param_count()}
  for name, config in variants.items():
    results[name] = _measure(torch, config, repeats=repeats)
  return results


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true", help="Fewer repeats, one variant.")
  parser.add_argument("--threads", type=int, default=THREADS, help="torch threads.")
  args = parser.parse_args()
  print(json.dumps(run(quick=args.quick, threads=args.threads), indent=1))
