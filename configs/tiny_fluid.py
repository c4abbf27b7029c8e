"""FLUID ablation of the tiny default: same data, model and steps; generation only, MAR masking.

    python -m dream_jax.main --config=configs/tiny_fluid.py --workdir=workdirs/tiny_fluid
"""
from configs import tiny
from dream_jax.objectives.masking import masking_config


def get_config(arg=None):
    c = tiny.get_config(arg)
    c.model.clip_weight = 0.0
    c.masking = masking_config("fluid")
    c.optim.weight_decay = 0.02
    return c
