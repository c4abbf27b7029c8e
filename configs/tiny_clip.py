"""CLIP ablation of the tiny default: same data, encoder and steps; no masking, contrastive only.

    python -m dream_jax.main --config=configs/tiny_clip.py --workdir=workdirs/tiny_clip
"""
from configs import tiny
from dream_jax.objectives.masking import masking_config


def get_config(arg=None):
    c = tiny.get_config(arg)
    c.model.gen_weight = 0.0
    c.model.clip_weight = 1.0
    c.masking = masking_config("none")
    return c
