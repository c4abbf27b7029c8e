"""Symmetric CLIP (softmax InfoNCE) loss with DREAM's per-example gating.

DREAM computes the contrastive loss on the SAME masked view that feeds the
generator, so images whose mask group hides more than 75 % of the tokens are
gated out (paper-notes.md §2). See ``clip_loss`` for the exact definition.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["clip_loss", "l2_normalize", "NEG_LOGIT"]

# Logit given to removed candidates. Finite (not -inf) so that no inf - inf or
# 0 * inf can appear in the forward or backward pass; far below any real logit
# (|logit| ≤ exp(logit_scale), i.e. 100 at the usual clamp, ~14 at init).
NEG_LOGIT = -1e9


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """x / ||x|| with an eps inside the root, so a zero vector gives 0 and finite gradients."""
    x = jnp.asarray(x, jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def clip_loss(image_emb, text_emb, logit_scale, image_valid=None, normalize: bool = True):
    """Gated symmetric CLIP loss over the whole (global) batch.

    Args:
      image_emb: [B, D] image embeddings (any float dtype; computed in float32).
      text_emb:  [B, D] text embeddings; pair i is (image_emb[i], text_emb[i]).
      logit_scale: scalar LOG scale; logits[i, j] = exp(logit_scale) · cos(img_i, txt_j).
      image_valid: bool [B], False where the image's mask group has ratio > 0.75
        (``masking.clip_active``). None = all valid.
      normalize: L2-normalise both embeddings here (default). With False the
        inputs are used as given and must already be unit-norm.

    Gating (the definition implemented, V = {i : image_valid[i]}):
      * image→text rows: only queries i ∈ V. Row i is a softmax over ALL B
        texts (texts do not depend on masking, so every text stays a
        candidate), target text i.
      * text→image rows: only queries j ∈ V (the text of an invalid pair has
        no positive image left). Row j is a softmax over the valid images
        i ∈ V only (invalid images are not negatives), target image j.
      * loss = 0.5 · (mean over V of the i→t CE + mean over V of the t→i CE).
      * If V is empty the loss is exactly 0, with zero (finite) gradients.
    An invalid image therefore receives exactly zero gradient and the loss
    does not depend on its embedding. Removal is done with jnp.where and a
    finite NEG_LOGIT, never -inf arithmetic.

    Returns:
      (loss float32 scalar, metrics) with metrics = {
        "i2t_acc": fraction of valid i→t rows whose argmax is the pair,
        "t2i_acc": same for valid t→i rows (argmax over valid images),
        "num_valid": int32 count of valid examples }.
    """
    img = jnp.asarray(image_emb, jnp.float32)
    txt = jnp.asarray(text_emb, jnp.float32)
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"image_emb {img.shape} and text_emb {txt.shape} must both be [B, D]")
    b = img.shape[0]
    if image_valid is None:
        valid = jnp.ones((b,), bool)
    else:
        valid = jnp.asarray(image_valid, bool)
        if valid.shape != (b,):
            raise ValueError(f"image_valid shape {valid.shape} must be ({b},)")
    if normalize:
        img = l2_normalize(img)
        txt = l2_normalize(txt)

    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    logits = scale * jnp.einsum("id,jd->ij", img, txt,
                                precision=jax.lax.Precision.HIGHEST)   # [image, text]
    n_valid = jnp.sum(valid.astype(jnp.int32))
    denom = jnp.maximum(n_valid, 1).astype(jnp.float32)

    # image -> text: rows = images, every text is a candidate.
    lse_i2t = jax.nn.logsumexp(logits, axis=1)
    pos = jnp.diagonal(logits)
    ce_i2t = jnp.where(valid, lse_i2t - pos, 0.0)
    loss_i2t = jnp.sum(ce_i2t) / denom

    # text -> image: rows = texts, candidates = valid images only.
    t2i = jnp.where(valid[None, :], logits.T, NEG_LOGIT)              # [text, image]
    lse_t2i = jax.nn.logsumexp(t2i, axis=1)
    pos_t2i = jnp.diagonal(t2i)
    ce_t2i = jnp.where(valid, lse_t2i - pos_t2i, 0.0)
    loss_t2i = jnp.sum(ce_t2i) / denom

    loss = jnp.where(n_valid > 0, 0.5 * (loss_i2t + loss_t2i), 0.0)

    # Metrics (no gradient needed).
    i2t_hit = jnp.argmax(jax.lax.stop_gradient(logits), axis=1) == jnp.arange(b)
    t2i_hit = jnp.argmax(jax.lax.stop_gradient(t2i), axis=1) == jnp.arange(b)
    metrics = {
        "i2t_acc": jnp.sum(jnp.where(valid, i2t_hit, False)) / denom,
        "t2i_acc": jnp.sum(jnp.where(valid, t2i_hit, False)) / denom,
        "num_valid": n_valid,
    }
    return loss, metrics
