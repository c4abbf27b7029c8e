from setuptools import find_packages, setup

setup(
    name="dream_jax",
    version="0.1.0",
    description="DREAM (visual understanding meets text-to-image generation) in JAX/Flax",
    packages=find_packages(include=["dream_jax", "dream_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax", "flax", "optax", "orbax-checkpoint", "grain", "ml_collections", "clu", "einops",
        "pillow", "numpy", "sentencepiece", "tokenizers", "array-record", "tensorboardX", "pyarrow",
        "regex", "ftfy", "tensorflow-datasets",
    ],
    extras_require={"tpu": ["jax[tpu]==0.10.2"]},
)
