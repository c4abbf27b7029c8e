"""Build the DreamModel a config describes (shared by training, sampling and evals)."""
from typing import Optional

import ml_collections

from dream_jax.models.dream import DreamModel
from dream_jax.models.sizes import make_arch


def data_arch_overrides(cfg, text_tokenizer, image_tokenizer, *, gen_text: str = "learned",
                        gen_vocab_size: Optional[int] = None, gen_feature_dim: Optional[int] = None,
                        gen_tokenizer=None) -> dict:
    """The architecture fields the data decides: image token shapes, CLIP-tower vocabulary and
    context, and the generation-text input ('learned' ids of `gen_tokenizer` — default the CLIP
    tokenizer — or 't5' features of width `gen_feature_dim`). For 'learned', gen_feature_dim
    (the embedding width) stays the model config's unless given."""
    out = dict(
        seq_len=image_tokenizer.seq_len,
        token_dim=image_tokenizer.token_dim,
        vocab_size=text_tokenizer.vocab_size,
        context_length=cfg.data.clip_context,
        eot_id=text_tokenizer.eot_id,
        gen_text=gen_text,
        gen_max_length=cfg.data.gen_context,
    )
    if gen_text == "learned":
        out["gen_vocab_size"] = (gen_vocab_size if gen_vocab_size is not None
                                 else (gen_tokenizer or text_tokenizer).vocab_size)
    if gen_feature_dim is not None:
        out["gen_feature_dim"] = int(gen_feature_dim)
    return out


def build_model(cfg, text_tokenizer, image_tokenizer, arch_overrides: Optional[dict] = None):
    """The data decides token shapes and vocabularies (`arch_overrides`, e.g. from
    `data.inputs.make_inputs`; default: learned generation text over `text_tokenizer`);
    the size table and `model.overrides` the rest."""
    overrides = dict(cfg.model.get("overrides", {}) or {})
    if isinstance(overrides, ml_collections.ConfigDict):
        overrides = overrides.to_dict()
    if arch_overrides is None:
        arch_overrides = data_arch_overrides(cfg, text_tokenizer, image_tokenizer)
    overrides.update(arch_overrides)
    arch = make_arch(cfg.model.size, overrides)
    return DreamModel(arch, gen_weight=cfg.model.gen_weight, clip_weight=cfg.model.clip_weight)
