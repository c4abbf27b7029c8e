"""The MAR encoder (DREAM's shared vision encoder) and the MAR decoder.

Static shapes (design.md decision 3): the encoder never drops tokens. It takes
image tokens *with their position ids* and a validity mask; invalid tokens
neither attend nor are attended. With all N tokens in order and `valid` =
not-masked this is MAR's masked encoder; with a gathered fixed-length subset of
visible tokens it is the same function on fewer FLOPs.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dream_jax.models import layers

Dtype = Any


def check_positions(tokens, positions, valid):
    """Shape checks with messages that name the offending values."""
    if tokens.ndim != 3:
        raise ValueError(f"image tokens must be [batch, length, channels], got shape {tokens.shape}")
    if positions.shape != tokens.shape[:2]:
        raise ValueError(
            f"positions shape {positions.shape} does not match the token count {tokens.shape[:2]}")
    if valid.shape != tokens.shape[:2]:
        raise ValueError(
            f"valid-mask shape {valid.shape} does not match the token count {tokens.shape[:2]}")


def key_mask(valid):
    """[B, K] validity → attention mask [B, 1, 1, K]: every query may attend valid keys."""
    return valid[:, None, None, :]


class MAREncoder(nn.Module):
    """Token projection, buffer (class) tokens, positions, LN, ViT blocks, final LN."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    seq_len: int          # number of image tokens N
    buffer_size: int      # prepended buffer tokens, all the learned class vector
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    scan: bool = False
    sincos_grid: int = 0      # > 0: position tables start as 2-D sin-cos (layers.learned_positions)

    @nn.compact
    def __call__(self, tokens, positions, valid, deterministic=True):
        """tokens [B, M, C], positions [B, M] in [0, N), valid [B, M] bool.

        Returns (features [B, buffer + M, width], valid_with_buffer [B, buffer + M]):
        the buffer tokens come first, then the M image tokens in the given order.
        """
        check_positions(tokens, positions, valid)
        batch = tokens.shape[0]
        x = layers.dense(self.width, "token_dim", "embed", dtype=self.dtype, name="token_proj")(tokens)
        # One learned class vector fills every buffer slot (MAR's class embedding, label 0).
        class_vec = self.param("class_vector", layers.named(layers.normal02, None, "embed"),
                               (1, self.width))
        buffer = jnp.broadcast_to(class_vec.astype(self.dtype), (batch, self.buffer_size, self.width))
        pos_table = layers.learned_positions(self, "pos_embed", self.buffer_size + self.seq_len, self.width,
                                             self.sincos_grid)
        pos_table = pos_table[0].astype(self.dtype)
        x = x + jnp.take(pos_table, self.buffer_size + positions, axis=0)
        buffer = buffer + pos_table[None, : self.buffer_size]
        x = jnp.concatenate([buffer, x], axis=1)
        valid_all = jnp.concatenate([jnp.ones((batch, self.buffer_size), bool), valid], axis=1)
        x = layers.layer_norm(1e-6, self.dtype, name="input_norm")(x)
        x = layers.Stack(self.depth, self.num_heads, self.mlp_dim, dropout=self.dropout,
                         remat=self.remat, dtype=self.dtype, scan=self.scan, name="blocks")(
            x, key_mask(valid_all), deterministic=deterministic)
        x = layers.layer_norm(1e-6, self.dtype, name="final_norm")(x)
        return x, valid_all


def masked_mean(x, valid):
    """Mean of x [B, T, D] over positions where valid [B, T] (the contrastive pool)."""
    w = valid.astype(jnp.float32)[..., None]
    return (x.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


class MARDecoder(nn.Module):
    """Fills masked slots with a mask token and predicts a condition z per image token."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    seq_len: int
    buffer_size: int
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    scan: bool = False
    sincos_grid: int = 0

    @nn.compact
    def __call__(self, encoded, positions, valid, text_ctx, deterministic=True):
        """encoded [B, buffer + M, D] (encoder output), positions/valid [B, M] as given to the
        encoder, text_ctx [B, L, width] (aligned generation text). Returns z [B, N, width]
        for all N image positions in raster order.
        """
        batch = encoded.shape[0]
        total = self.buffer_size + self.seq_len
        x = layers.dense(self.width, "embed", "mlp", dtype=self.dtype, name="embed_proj")(encoded)
        mask_token = self.param("mask_token", layers.named(layers.normal02, None, "embed"),
                                (1, self.width)).astype(self.dtype)
        # Scatter the visible tokens onto a canvas of mask tokens. Invalid entries are sent
        # out of range and dropped, so padding in a gathered layout can never overwrite.
        slots = jnp.where(valid, self.buffer_size + positions, total)
        slots = jnp.concatenate(
            [jnp.broadcast_to(jnp.arange(self.buffer_size), (batch, self.buffer_size)), slots], axis=1)
        canvas = jnp.broadcast_to(mask_token, (batch, total, self.width))
        canvas = jax.vmap(lambda c, s, v: c.at[s].set(v, mode="drop"))(canvas, slots, x)
        canvas = canvas + layers.learned_positions(self, "pos_embed", total, self.width,
                                                   self.sincos_grid).astype(self.dtype)
        canvas = layers.layer_norm(1e-6, self.dtype, name="input_norm")(canvas)
        canvas = layers.Stack(self.depth, self.num_heads, self.mlp_dim, cross_attention=True,
                              dropout=self.dropout, remat=self.remat, dtype=self.dtype, scan=self.scan, name="blocks")(
            canvas, None, text_ctx, None, deterministic=deterministic)
        canvas = layers.layer_norm(1e-6, self.dtype, name="final_norm")(canvas)
        z = canvas[:, self.buffer_size:]
        z = z + layers.learned_positions(self, "diffusion_pos_embed", self.seq_len, self.width,
                                         self.sincos_grid).astype(self.dtype)
        return z
