"""The diffusion head: MAR's SimpleMLPAdaLN, a small adaLN MLP shared by all tokens.

``DiffusionHead()(x [N, C], t [N] int, c [N, D]) -> [N, 2C]`` (epsilon, then the
learned-range variance), always returned in float32. Loss and sampling live in
``dream_jax.diffusion``; this module only predicts.

Parameter layout mirrors the PyTorch release (Dense kernels are the transposed
``nn.Linear`` weights; adaLN outputs split in the order shift, scale, gate), so
released weights can be mapped one to one.

Logical axis names: 'embed' = width W on the residual stream, 'mlp' = the
output side of hidden / modulation layers, 'cond' = condition dim D,
'token_dim' = token channels C (input and output), None = the 256 sinusoidal
frequencies.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()


def _dense(features: int, names: tuple, dtype: Dtype, param_dtype: Dtype, *,
           kernel_init=_xavier, name: Optional[str] = None) -> nn.Dense:
    """Dense with logically partitioned kernel and bias (bias named like the output)."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, names),
        bias_init=nn.with_logical_partitioning(_zeros, (names[-1],)),
        name=name,
    )


def _modulate(x, shift, scale):
    return x * (1.0 + scale) + shift


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [N, dim]: cos half first, then sin (as MAR/DiT)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    width: int
    frequency_dim: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        # Small-normal init on this MLP, as in MAR/DiT (not xavier).
        init = nn.initializers.normal(stddev=0.02)
        h = timestep_embedding(t, self.frequency_dim)
        h = _dense(self.width, (None, "mlp"), self.dtype, self.param_dtype,
                   kernel_init=init, name="mlp_in")(h)
        h = nn.silu(h)
        return _dense(self.width, ("mlp", "embed"), self.dtype, self.param_dtype,
                      kernel_init=init, name="mlp_out")(h)


class ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)), with (shift, scale, gate) from y."""
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        w = self.width
        # Zero-init modulation: every block starts as the identity.
        mod = _dense(3 * w, ("embed", "mlp"), self.dtype, self.param_dtype,
                     kernel_init=_zeros, name="adaLN_modulation")(nn.silu(y))
        shift, scale, gate = jnp.split(mod, 3, axis=-1)
        h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                         scale_init=nn.with_logical_partitioning(_ones, ("embed",)),
                         bias_init=nn.with_logical_partitioning(_zeros, ("embed",)),
                         name="in_ln")(x)
        h = _modulate(h, shift, scale)
        h = _dense(w, ("embed", "mlp"), self.dtype, self.param_dtype, name="mlp_in")(h)
        h = nn.silu(h)
        h = _dense(w, ("mlp", "embed"), self.dtype, self.param_dtype, name="mlp_out")(h)
        return x + gate * h


class FinalLayer(nn.Module):
    width: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        mod = _dense(2 * self.width, ("embed", "mlp"), self.dtype, self.param_dtype,
                     kernel_init=_zeros, name="adaLN_modulation")(nn.silu(y))
        shift, scale = jnp.split(mod, 2, axis=-1)
        # Non-affine LN: the adaLN shift/scale replace its parameters.
        h = nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False,
                         dtype=self.dtype, name="norm_final")(x)
        h = _modulate(h, shift, scale)
        # Zero-init output: the untrained head predicts eps = 0, v = 0.
        return _dense(self.out_channels, ("embed", "token_dim"), self.dtype, self.param_dtype,
                      kernel_init=_zeros, name="linear")(h)


class DiffusionHead(nn.Module):
    """SimpleMLP with adaLN conditioning on (timestep, z).

    Attributes:
      in_channels: token channels C.
      width: hidden width W (1024 in the paper).
      depth: number of residual blocks (3 in the paper).
      out_channels: defaults to 2C (epsilon and learned-range variance).
      dtype: computation dtype; param_dtype: storage dtype of the weights.
      remat: rematerialise each residual block in the backward pass (saves
        activation memory: the head runs on N = 4 x masked tokens rows).
    """
    in_channels: int
    width: int
    depth: int = 3
    out_channels: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, t, c):
        out_channels = self.out_channels or 2 * self.in_channels
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _dense(self.width, ("token_dim", "embed"), name="input_proj", **kw)(x)
        t_emb = TimestepEmbedder(self.width, name="time_embed", **kw)(t)
        c_emb = _dense(self.width, ("cond", "embed"), name="cond_embed", **kw)(c)
        y = t_emb + c_emb

        block_cls = nn.remat(ResBlock) if self.remat else ResBlock
        for i in range(self.depth):
            h = block_cls(self.width, name=f"res_blocks_{i}", **kw)(h, y)
        out = FinalLayer(self.width, out_channels, name="final_layer", **kw)(h, y)
        # The diffusion math runs in float32 whatever the compute dtype.
        return out.astype(jnp.float32)
