"""Masking for DREAM / MAR / FLUID training, as pure, jit-friendly JAX functions.

Pieces (see paper-notes.md §2-§3 and design.md decision 4):

* ``masking_centre``       – the Masking-Warmup schedule of the centre μ.
* ``sample_mask_ratios``   – one truncated-Gaussian masking ratio per mask group.
* ``mask_ratios_for_step`` – config-driven dispatcher (warmup / fluid / none / fixed).
* ``expand_groups``        – per-group values -> per-example values.
* ``num_masked``           – ratio -> number of masked tokens, ceil(N·r).
* ``random_orders``, ``mask_from_orders`` – MAR's per-image random order and mask.
* ``clip_active``, ``gen_active`` – per-example gating of the two losses.
* ``drop_captions``        – caption dropout on the generation text (CFG).

Conventions: masks are bool with True = masked; ratios are float32; every
shape is static (the number of masked tokens varies per example, but only the
*values* of the mask do, never its shape).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "masking_centre",
    "sample_mask_ratios",
    "mask_ratios_for_step",
    "masking_config",
    "KIND_DEFAULTS",
    "num_masked",
    "random_orders",
    "mask_from_orders",
    "expand_groups",
    "clip_active",
    "gen_active",
    "drop_captions",
    "NUM_MASKED_EPS",
]

# Tolerance (in tokens) subtracted before the ceiling in ``num_masked``.
NUM_MASKED_EPS = 1e-3

# Kind defaults for ``mask_ratios_for_step``; a config field that is missing or
# None falls back to these.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    # DREAM Masking Warmup: μ moves start -> end over warmup_fraction of
    # training, σ fixed 0.45, ratios truncated to [0, 1].
    "warmup": dict(schedule="linear", warmup_fraction=0.75, centre_start=0.0,
                   centre_end=1.0, sigma=0.45, low=0.0, high=1.0),
    # MAR / FLUID: truncated normal, mean 1.0, σ 0.25, on [0.7, 1.0].
    "fluid": dict(mean=1.0, sigma=0.25, low=0.7, high=1.0),
    # CLIP baseline: nothing masked.
    "none": dict(),
    # A constant ratio (tests, ablations).
    "fixed": dict(ratio=0.5),
}


def _is_python_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


# --------------------------------------------------------------------------
# Masking Warmup schedule
# --------------------------------------------------------------------------

def masking_centre(progress, kind: str = "linear", warmup_fraction: float = 0.75,
                   start: float = 0.0, end: float = 1.0):
    """Centre μ of the masking-ratio distribution at training ``progress``.

    Args:
      progress: step / total_steps, in [0, 1] (values outside are clipped).
        A Python number gives a Python float; a jnp scalar (also a tracer
        inside jit) gives a float32 jnp scalar.
      kind: "linear" – start + (end-start)·min(p/w, 1);
            "cosine" – start + (end-start)·(1 - cos(π·min(p/w, 1)))/2.
      warmup_fraction: w, the fraction of training over which μ moves;
        after it μ stays at ``end``. w = 0 means μ = end always.
      start, end: μ at progress 0 and from progress w on.
    """
    if kind not in ("linear", "cosine"):
        raise ValueError(f"unknown masking-centre schedule kind={kind!r}; "
                         "expected 'linear' or 'cosine'")
    if not _is_python_number(warmup_fraction) or not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"warmup_fraction={warmup_fraction!r} outside [0, 1]")

    if _is_python_number(progress):
        if warmup_fraction == 0.0:
            return float(end)
        t = min(max(float(progress) / warmup_fraction, 0.0), 1.0)
        w = t if kind == "linear" else 0.5 * (1.0 - math.cos(math.pi * t))
        return float(start + (end - start) * w)

    progress = jnp.asarray(progress, jnp.float32)
    if warmup_fraction == 0.0:
        return jnp.full(progress.shape, end, jnp.float32)
    t = jnp.clip(progress / warmup_fraction, 0.0, 1.0)
    w = t if kind == "linear" else 0.5 * (1.0 - jnp.cos(jnp.pi * t))
    return (start + (end - start) * w).astype(jnp.float32)


# --------------------------------------------------------------------------
# Ratios
# --------------------------------------------------------------------------

def _check_bounds(sigma, low, high):
    for name, v in (("sigma", sigma), ("low", low), ("high", high)):
        if not _is_python_number(v):
            raise ValueError(f"{name}={v!r} must be a Python number (static)")
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"mask ratio sigma={sigma!r} must be > 0")
    for name, v in (("low", low), ("high", high)):
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"mask ratio bound {name}={v!r} outside [0, 1]")
    if not low < high:
        raise ValueError(f"mask ratio bounds need low < high, got low={low!r}, high={high!r}")


def sample_mask_ratios(rng, num_groups: int, centre, sigma: float,
                       low: float = 0.0, high: float = 1.0):
    """One masking ratio per mask group: N(centre, sigma²) truncated to [low, high].

    ``centre`` may be a traced scalar (it follows the training step);
    ``num_groups``, ``sigma``, ``low``, ``high`` are static Python numbers and
    are validated (ValueError naming the bad value). Returns float32 [num_groups].
    """
    if not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups={num_groups!r} must be a positive int")
    _check_bounds(sigma, low, high)
    centre = jnp.asarray(centre, jnp.float32)
    lower = (low - centre) / sigma
    upper = (high - centre) / sigma
    z = jax.random.truncated_normal(rng, lower, upper, (int(num_groups),), jnp.float32)
    # Clip away float round-off at the bounds.
    return jnp.clip(centre + sigma * z, low, high).astype(jnp.float32)


def _cfg_get(cfg, key, default):
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        v = cfg.get(key, None)
    else:
        v = getattr(cfg, key, None)
    return default if v is None else v


def masking_config(kind: str = "warmup", **overrides):
    """An ``ml_collections.ConfigDict`` with every field of ``kind`` filled in."""
    import ml_collections

    if kind not in KIND_DEFAULTS:
        raise ValueError(f"unknown masking kind={kind!r}; expected one of {sorted(KIND_DEFAULTS)}")
    d = dict(kind=kind, **KIND_DEFAULTS[kind])
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def mask_ratios_for_step(rng, cfg, progress, num_groups: int):
    """Masking ratios [num_groups] (float32) for one step, chosen by ``cfg.kind``.

    ``cfg`` is an ``ml_collections.ConfigDict`` or a dict; it is static (read
    at trace time). Fields used per kind (missing or None -> KIND_DEFAULTS):

      warmup: schedule, warmup_fraction, centre_start, centre_end, sigma, low, high
              μ = masking_centre(progress, schedule, warmup_fraction,
              centre_start, centre_end); r ~ TruncNormal(μ, sigma) on [low, high].
      fluid:  mean, sigma, low, high   (MAR/FLUID: 1.0, 0.25, [0.7, 1.0]).
      none:   ratio 0 for every group (the CLIP baseline).
      fixed:  ratio (a constant for every group).

    ``progress`` (step / total_steps) may be traced; it is used by "warmup" only.
    """
    kind = _cfg_get(cfg, "kind", None)
    if kind not in KIND_DEFAULTS:
        raise ValueError(f"unknown masking kind={kind!r}; expected one of {sorted(KIND_DEFAULTS)}")
    if not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups={num_groups!r} must be a positive int")
    d = KIND_DEFAULTS[kind]
    get = lambda k: _cfg_get(cfg, k, d[k])  # noqa: E731

    if kind == "warmup":
        centre = masking_centre(
            progress if _is_python_number(progress) else jnp.asarray(progress, jnp.float32),
            kind=get("schedule"), warmup_fraction=get("warmup_fraction"),
            start=get("centre_start"), end=get("centre_end"))
        return sample_mask_ratios(rng, num_groups, centre, get("sigma"), get("low"), get("high"))
    if kind == "fluid":
        return sample_mask_ratios(rng, num_groups, get("mean"), get("sigma"), get("low"), get("high"))
    if kind == "none":
        return jnp.zeros((int(num_groups),), jnp.float32)
    # fixed
    ratio = get("ratio")
    if not _is_python_number(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"fixed mask ratio={ratio!r} outside [0, 1]")
    return jnp.full((int(num_groups),), ratio, jnp.float32)


def expand_groups(group_values, batch: int):
    """Per-group values [G, ...] -> per-example values [batch, ...].

    Groups are contiguous and equal-sized: example b belongs to group
    b // (batch // G). With the batch sharded contiguously over the data axis
    and G = number of data shards, each shard holds exactly one group.
    """
    group_values = jnp.asarray(group_values)
    g = group_values.shape[0]
    if batch % g != 0:
        raise ValueError(f"batch {batch} is not divisible by the number of mask groups {g}")
    return jnp.repeat(group_values, batch // g, axis=0, total_repeat_length=batch)


# --------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------

def num_masked(ratios, seq_len: int):
    """Number of masked tokens, ceil(seq_len · r), as int32 (same shape as ratios).

    MAR computes ``ceil(seq_len * r)`` in float64. Here r is float32 and the
    product can land a hair above an integer through round-off, so we take
    ``ceil(seq_len * r - NUM_MASKED_EPS)`` with NUM_MASKED_EPS = 1e-3 tokens:
    exact products (256·0.5 = 128) and products within 1e-3 tokens above an
    integer k give k. A ratio in that sliver is treated as k/seq_len, which
    differs from float64 MAR only on a set of probability ≈ 1e-3/seq_len per
    draw. The result is clipped to [0, seq_len].
    """
    r = jnp.asarray(ratios, jnp.float32)
    n = jnp.ceil(r * seq_len - NUM_MASKED_EPS)
    return jnp.clip(n, 0, seq_len).astype(jnp.int32)


def random_orders(rng, batch: int, seq_len: int):
    """An independent uniform random permutation of range(seq_len) per example, int32 [B, N]."""
    keys = jax.random.split(rng, batch)
    perm = jax.vmap(lambda k: jax.random.permutation(k, seq_len))(keys)
    return perm.astype(jnp.int32)


def mask_from_orders(orders, n_masked):
    """Bool mask [B, N], True = masked: the first n_masked[b] entries of orders[b].

    ``orders`` int [B, N] (a permutation per row); ``n_masked`` int [B] or a scalar.
    """
    orders = jnp.asarray(orders)
    b, n = orders.shape
    n_masked = jnp.broadcast_to(jnp.asarray(n_masked, jnp.int32), (b,))
    rank_masked = jnp.arange(n, dtype=jnp.int32)[None, :] < n_masked[:, None]   # [B, N] by rank
    rows = jnp.arange(b)[:, None]
    return jnp.zeros((b, n), bool).at[rows, orders].set(rank_masked)


# --------------------------------------------------------------------------
# Gating
# --------------------------------------------------------------------------

def clip_active(ratios, max_ratio: float = 0.75):
    """True where the contrastive loss uses the example: ratio ≤ max_ratio (≥ 25 % visible).

    Gating is on the sampled ratio r. With N = 256 this matches the token
    count: ceil(256·r) ≤ 192 ⇔ r ≤ 0.75 (up to NUM_MASKED_EPS).
    """
    return jnp.asarray(ratios) <= max_ratio


def gen_active(ratios, min_ratio: float = 0.5):
    """True where the generative loss uses the example: ratio ≥ min_ratio."""
    return jnp.asarray(ratios) >= min_ratio


# --------------------------------------------------------------------------
# Caption dropout (classifier-free guidance)
# --------------------------------------------------------------------------

def drop_captions(rng, gen_tokens, empty_tokens, prob):
    """Replace the generation text of a random ``prob`` fraction of examples.

    Args:
      gen_tokens: [B, L, ...] generation-text tokens (ids, or cached T5 features).
      empty_tokens: [L, ...] the same for the empty string.
      prob: drop probability in [0, 1] (each example independently).

    Returns (tokens [B, L, ...], dropped bool [B]). Apply this to the
    generation text only; the contrastive caption is never dropped.
    """
    if _is_python_number(prob) and not 0.0 <= prob <= 1.0:
        raise ValueError(f"caption dropout prob={prob!r} outside [0, 1]")
    gen_tokens = jnp.asarray(gen_tokens)
    empty_tokens = jnp.asarray(empty_tokens, gen_tokens.dtype)
    if empty_tokens.shape != gen_tokens.shape[1:]:
        raise ValueError(f"empty_tokens shape {empty_tokens.shape} does not match "
                         f"per-example gen_tokens shape {gen_tokens.shape[1:]}")
    b = gen_tokens.shape[0]
    dropped = jax.random.uniform(rng, (b,)) < prob
    sel = dropped.reshape((b,) + (1,) * (gen_tokens.ndim - 1))
    return jnp.where(sel, empty_tokens[None], gen_tokens), dropped
