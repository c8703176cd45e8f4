"""Install flipout_jax: `pip install -e .` (the library), `.[experiments,test]`
(the experiments and the test suite)."""
import setuptools

setuptools.setup(
    name="flipout_jax",
    version="0.1.0",
    description=(
        "Pruning and sparse training (FlipOut, ST-3, DST-EE, UniPTS, gradient-flow"
        " measures) as pure optax gradient transformations."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["flipout_jax", "flipout_jax.*"]),
    python_requires=">=3.10",
    # The library itself: optax transformations over JAX arrays. Flax is only
    # needed by flipout_jax.models (the "models" extra); the experiments'
    # stack (configs, checkpoints, data, plots) is the "experiments" extra.
    install_requires=[
        "jax>=0.4.30",
        "optax>=0.2.4",
        "chex>=0.1.87",
        "numpy>=1.26",
    ],
    extras_require={
        "models": ["flax>=0.10.0"],
        "experiments": [
            "flax>=0.10.0",
            "ml_collections>=0.1.1",
            "absl-py>=2.0",
            "orbax-checkpoint>=0.6.0",
            "tensorflow-datasets>=4.9.6",
            "tqdm>=4.66",
            "matplotlib>=3.8",
            "mlxtend>=0.23",
            "scikit-learn>=1.3",
        ],
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "hypothesis>=6.100",
                 "equinox>=0.11"],
        "tf": ["tensorflow>=2.16"],
    },
)
