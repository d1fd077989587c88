"""Every configuration field, with its meaning. Other configs import this and override.

Not run directly: pick a data set config, e.g.
  python -m cfg_guidance.main --config=configs/digits.py --workdir=/tmp/cfg_digits
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The full field list with neutral defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Root PRNG seed: every key is fold_in(root, step/process/example).

  config.data = data = ml_collections.ConfigDict()
  data.name = "digits"  # digits | toy2d | cifar10 | imagenet2012 | imagenet_resized | image_folder
  data.image_size = 8  # Square side after crop+resize (ImageNet/image_folder: 64 or 128).
  data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir.
  data.folder = ml_collections.FieldReference(None, field_type=str)  # image_folder root.
  data.random_flip = False  # Random horizontal flips of training images.
  data.num_workers = 0  # grain worker processes (0 = in the main process).
  data.num_threads = 8  # Threads per process (or per grain worker) building batches.
  data.num_toy_examples = 50_000  # Size of the fixed toy2d training set.
  data.toy_seed = 0  # Seed of the fixed toy2d training set (config.seed only orders it).

  config.model = model = ml_collections.ConfigDict()  # What models.create takes.
  model.name = "unet"  # unet | mlp
  model.num_classes = 10  # Number of real classes; label num_classes is the null token.
  model.image_size = 8  # Input side (must match data.image_size).
  model.channels = 1  # Input/output channels.
  model.base_channels = 64  # C of the ADM U-Net.
  model.channel_mult = (1, 2)  # Channel multiplier of each resolution level.
  model.num_res_blocks = 2  # Residual blocks per level.
  model.attention_resolutions = (4,)  # Resolutions with self-attention.
  model.num_heads = -1  # Attention heads (-1: use num_head_channels).
  model.num_head_channels = 32  # Channels per head (-1: use num_heads).
  model.num_groups = 32  # GroupNorm groups.
  model.dropout = 0.0  # Dropout rate in residual blocks.
  model.resblock_updown = True  # BigGAN-style residual up/down-sampling.
  model.dtype = "float32"  # Compute dtype (bfloat16 on TPU/GPU); parameters stay float32.
  model.remat = False  # Rematerialise each block to save activation memory.
  model.attention_impl = "einsum"  # einsum | cudnn (CUDA GPU, bfloat16) | xla.

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.logsnr_min = -20.0  # λ_min of training and sampling.
  diffusion.logsnr_max = 20.0  # λ_max of training and sampling.
  diffusion.p_uncond = 0.1  # Probability of replacing the label with ∅ (Algorithm 1).
  diffusion.parameterization = "eps"  # Network output: eps (the paper) | v.

  config.train = train = ml_collections.ConfigDict()
  train.num_steps = 1000  # Optimizer steps in total.
  train.batch_size = 128  # Global batch size (all devices and processes).
  train.optimizer = "adam"  # adam | adamw
  train.learning_rate = 3e-4  # Peak learning rate.
  train.warmup_steps = 100  # Linear warm-up steps from 0 to the peak.
  train.b1 = 0.9  # Adam β1.
  train.b2 = 0.999  # Adam β2.
  train.weight_decay = 0.0  # AdamW decoupled weight decay.
  train.grad_clip_norm = 1.0  # Clip gradients to this global norm (0 = off).
  train.ema_decay = 0.9999  # EMA decay of the parameters used for sampling.
  train.ema_warmup = False  # Decay min(ema_decay, (1+step)/(10+step)): for short runs.
  train.steps_per_dispatch = 1  # Optimizer steps per jitted call (lax.scan over batches).
  train.max_consecutive_nonfinite = 10  # Stop after this many skipped updates in a row.
  train.log_every = 50  # Steps between metric writes.
  train.checkpoint_every = 500  # Steps between checkpoints (and one at the end).
  train.keep_checkpoints = 3  # Checkpoints kept on disk.
  train.sample_every = 500  # Steps between EMA sample grids (0 = never).
  train.sample_at_end = False  # After training, run --mode=sample on the final checkpoint.
  train.evaluate_at_end = False  # After training, run --mode=evaluate on it.

  config.sharding = sharding = ml_collections.ConfigDict()
  sharding.fsdp = False  # Shard parameters and optimizer state over `data` (else replicate).
  sharding.fsdp_min_size = 2**14  # Arrays smaller than this stay replicated under FSDP.

  config.grid = grid = ml_collections.ConfigDict()  # Sample grids written during training.
  grid.guidance_weights = (0.0, 1.0, 3.0)  # One grid row block per weight.
  grid.classes = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)  # Columns: one per class.
  grid.samples_per_class = 1  # Rows per weight.
  grid.num_steps = 64  # Sampler steps for the grids.
  grid.seed = 1234  # Fixed seed so grids compare across training.

  config.sample = sample = ml_collections.ConfigDict()  # --mode=sample
  sample.guidance_weights = (0.0, 0.5, 1.0, 2.0, 4.0)  # One npz and grid per weight.
  sample.num_samples = 100  # Samples per weight.
  sample.classes = ml_collections.FieldReference(None, field_type=tuple)  # None: balanced.
  sample.num_steps = 256  # Sampler steps T.
  sample.sampler = "ancestral"  # ancestral | ddim
  sample.v = 0.3  # Variance interpolation of Eq. 4 (ancestral).
  sample.eta = 0.0  # DDIM stochasticity.
  sample.clip_x = "static"  # none | static (x̃ to [-1, 1], as DDPM samples) | dynamic
  sample.batch_size = 500  # Examples per sampler call.
  sample.seed = 0  # Sampling seed.
  sample.step = ml_collections.FieldReference(None, field_type=int)  # Checkpoint; None: latest.

  config.eval = ev = ml_collections.ConfigDict()  # --mode=evaluate (sampler, v, eta, clip_x:
  # config.sample's, with eval.num_steps)
  ev.guidance_weights = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0, 3.0, 4.0)
  ev.num_samples = 50_000  # Samples per weight.
  ev.batch_size = 500  # Global examples per sampler call.
  ev.num_steps = 256  # Sampler steps T.
  ev.seed = 0  # Sampling seed (each example's noise comes from its global index).
  ev.step = ml_collections.FieldReference(None, field_type=int)  # Checkpoint; None: latest.
  ev.extractor = "inception"  # inception | classifier (a stand-in trained on the data)
  ev.inception_path = ml_collections.FieldReference(None, field_type=str)  # classify_image_graph_def.pb
  ev.reference_stats = ml_collections.FieldReference(None, field_type=str)  # Reference npz (mu, sigma).
  ev.precision_recall = False  # Also compute k-NN precision/recall (keeps features).
  ev.classifier_steps = 2000  # Training steps of the stand-in classifier.
  ev.watch = False  # Keep evaluating each new checkpoint as it appears.
  ev.watch_interval = 60.0  # Seconds between checks for a new checkpoint in watch mode.
  ev.watch_timeout = 0.0  # Stop watching after this many idle seconds (0 = never).
  ev.pr_num_samples = 10_000  # Real and fake features kept for precision/recall (k = 3).
  ev.grid_class = 0  # The one class on the right of each w's sample grid (Figs. 6/7).
  ev.grid_size = 6  # Each w's grid: grid_size² random-class samples, as many of grid_class.
  return config
