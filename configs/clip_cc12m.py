"""CLIP baseline on CC12M: the same encoder, no masking, contrastive loss only (weight 1).

    python -m dream_jax.main --config=configs/clip_cc12m.py:size=L --workdir=gs://BUCKET/clip_L

Expected (paper): ImageNet linear probe ≈ 71.6 %.
"""
from configs import cc12m
from dream_jax.objectives.masking import masking_config


def get_config(arg=None):
    c = cc12m.get_config(arg)
    c.model.gen_weight = 0.0
    c.model.clip_weight = 1.0
    c.masking = masking_config("none")
    c.data.gen_text = "learned"   # no generative loss: no T5 needed (the unused aligner embeds CLIP ids)
    return c
