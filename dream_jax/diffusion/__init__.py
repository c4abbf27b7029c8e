"""Gaussian diffusion (IDDPM, as in MAR's DiffLoss)."""
from dream_jax.diffusion.gaussian import (
    GaussianDiffusion,
    cfg_model_fn,
    guided_output,
    make_diffusion,
    respace,
    space_timesteps,
)

__all__ = [
    "GaussianDiffusion",
    "cfg_model_fn",
    "guided_output",
    "make_diffusion",
    "respace",
    "space_timesteps",
]
