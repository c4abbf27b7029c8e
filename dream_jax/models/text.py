"""Text paths: the CLIP text tower (contrastive) and the generation-text aligner."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dream_jax.models import layers

Dtype = Any


def eot_positions(tokens, eot_id: int):
    """Index of the first end-of-text token per row (our tokenizers always keep one)."""
    return jnp.argmax(tokens == eot_id, axis=-1)


class CLIPTextTower(nn.Module):
    """CLIP text transformer: causal mask, final LN, feature at end-of-text, projection."""

    vocab_size: int
    context_length: int
    width: int
    depth: int
    num_heads: int
    embed_dim: int
    eot_id: int
    dtype: Dtype = jnp.float32
    scan: bool = False

    @nn.compact
    def __call__(self, tokens):
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(
                f"clip_tokens must be [batch, {self.context_length}], got shape {tokens.shape}")
        embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                         embedding_init=layers.named(layers.normal02, "vocab", "embed"),
                         name="token_embed")
        x = embed(tokens)
        x = x + layers.learned_positions(self, "pos_embed", self.context_length, self.width).astype(self.dtype)
        causal = jnp.tril(jnp.ones((self.context_length, self.context_length), bool))[None, None]
        x = layers.Stack(self.depth, self.num_heads, 4 * self.width, ln_eps=1e-5, dtype=self.dtype,
                         scan=self.scan, name="blocks")(x, causal)
        x = layers.layer_norm(1e-5, self.dtype, name="final_norm")(x)
        pooled = jnp.take_along_axis(x, eot_positions(tokens, self.eot_id)[:, None, None], axis=1)[:, 0]
        return layers.dense(self.embed_dim, "embed", None, use_bias=False, dtype=self.dtype,
                            name="projection")(pooled)


class GenTextAligner(nn.Module):
    """Generation text → context for the decoder's cross-attention.

    `source='t5'`: inputs are frozen T5 features [B, L, feature_dim] computed elsewhere.
    `source='learned'`: inputs are token ids [B, L] looked up in a trainable
    embedding of width feature_dim (the CPU default; no pretrained weights).
    Either way: linear feature_dim→width, learned positions, LN, ViT blocks.
    """

    source: str
    feature_dim: int
    max_length: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    vocab_size: int = 0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    scan: bool = False

    @nn.compact
    def __call__(self, gen_text, deterministic=True):
        if self.source == "learned":
            if gen_text.ndim != 2:
                raise ValueError(f"learned gen text expects token ids [batch, length], got {gen_text.shape}")
            feats = nn.Embed(self.vocab_size, self.feature_dim, dtype=self.dtype,
                             embedding_init=layers.named(layers.normal02, "vocab", "text_feature"),
                             name="token_embed")(gen_text)
        elif self.source == "t5":
            if gen_text.ndim != 3 or gen_text.shape[-1] != self.feature_dim:
                raise ValueError(
                    f"t5 gen text expects features [batch, length, {self.feature_dim}], got {gen_text.shape}")
            feats = gen_text.astype(self.dtype)
        else:
            raise ValueError(f"unknown gen_text source {self.source!r} (expected 'learned' or 't5')")
        length = feats.shape[1]
        if length > self.max_length:
            raise ValueError(f"gen text length {length} exceeds max_length={self.max_length}")
        x = layers.dense(self.width, "text_feature", "embed", dtype=self.dtype, name="proj")(feats)
        x = x + layers.learned_positions(self, "pos_embed", self.max_length, self.width)[:, :length].astype(self.dtype)
        x = layers.layer_norm(1e-6, self.dtype, name="input_norm")(x)
        return layers.Stack(self.depth, self.num_heads, self.mlp_dim, dropout=self.dropout,
                            dtype=self.dtype, scan=self.scan, name="blocks")(x, deterministic=deterministic)
