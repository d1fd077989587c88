"""cfg_guidance: classifier-free diffusion guidance (Ho & Salimans) in JAX/Flax NNX."""

__version__ = "0.1.0"
