"""FLUID baseline on CC12M: the same model and code, generation only.

    python -m dream_jax.main --config=configs/fluid_cc12m.py:size=L --workdir=gs://BUCKET/fluid_L

Differences from cc12m.py: no contrastive loss (clip_weight 0), MAR masking
(truncated Gaussian mean 1.0, σ 0.25 on [0.7, 1.0]), weight decay 0.02.
Expected (paper): CC12M FID ≈ 4.53, ImageNet linear probe ≈ 48.1 %.
"""
from configs import cc12m
from dream_jax.objectives.masking import masking_config


def get_config(arg=None):
    c = cc12m.get_config(arg)
    c.model.clip_weight = 0.0
    c.masking = masking_config("fluid")
    c.optim.weight_decay = 0.02
    return c
