"""Build the DreamModel a config describes (shared by training, sampling and evals)."""
import ml_collections

from dream_jax.models.dream import DreamModel
from dream_jax.models.sizes import make_arch


def build_model(cfg, text_tokenizer, image_tokenizer):
    """The data decides token shapes and vocabularies; the size table the rest."""
    overrides = dict(cfg.model.get("overrides", {}) or {})
    if isinstance(overrides, ml_collections.ConfigDict):
        overrides = overrides.to_dict()
    overrides.update(
        seq_len=image_tokenizer.seq_len,
        token_dim=image_tokenizer.token_dim,
        vocab_size=text_tokenizer.vocab_size,
        context_length=cfg.data.clip_context,
        eot_id=text_tokenizer.eot_id,
        gen_text="learned",
        gen_vocab_size=text_tokenizer.vocab_size,
        gen_max_length=cfg.data.gen_context,
    )
    arch = make_arch(cfg.model.size, overrides)
    return DreamModel(arch, gen_weight=cfg.model.gen_weight, clip_weight=cfg.model.clip_weight)
