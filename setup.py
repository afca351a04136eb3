"""var-jax: VAR (visual autoregressive modeling, next-scale prediction) in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="var-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of VAR: multi-scale VQ tokenizer, next-scale transformer, sampler, trainers",
    packages=find_packages(include=["var_jax", "var_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "tensorflow-datasets==4.9.10",
        "ml-collections==1.1.0",
        "chex==0.1.92",
        "grain==0.2.18",
        "pillow",
        "numpy",
        "scikit-learn",
        "tqdm",
        "tensorboardX",
    ],
    extras_require={
        # torch reads reference .pth checkpoints (weights_only=True); 2.13.0 is the CPU build on these machines.
        "convert": ["torch==2.13.0"],
        "test": ["pytest", "torch==2.13.0"],
    },
    entry_points={"console_scripts": ["var-jax=var_jax.cli:main"]},
)
