"""Transformer building blocks shared by the encoder, decoder, aligner and text tower.

Every parameter carries logical axis names (see dream_jax/parallel/rules.py for
how they map onto the ('data', 'fsdp', 'tensor') mesh):
  embed  - model width        heads - attention heads     kv   - head dim
  mlp    - MLP hidden width   vocab - token vocabulary    pos  - sequence positions
  token_dim - input token channels
  layers - the stacked depth axis of scanned blocks (Stack(scan=True))
"""
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones
normal02 = nn.initializers.normal(stddev=0.02)

# Name of the scanned-blocks scope; its params carry a leading "layers" (depth) axis.
SCANNED = "scanned"


def named(init: Callable, *names: Optional[str]) -> Callable:
    """Shorthand for a parameter initializer with logical axis names."""
    return nn.with_logical_partitioning(init, names)


def dense(features, in_name, out_name, *, use_bias=True, dtype=jnp.float32, name=None,
          kernel_init=xavier):
    """A Dense layer whose kernel is named (in_name, out_name)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=named(kernel_init, in_name, out_name),
        bias_init=named(zeros, out_name),
        name=name,
    )


def layer_norm(eps: float, dtype=jnp.float32, name=None, affine=True):
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        use_bias=affine,
        use_scale=affine,
        scale_init=named(ones, "embed"),
        bias_init=named(zeros, "embed"),
        name=name,
    )


def learned_positions(module: nn.Module, name: str, length: int, width: int, sincos_grid: int = 0):
    """A learned [1, length, width] position table, N(0, 0.02) as in MAE/MAR.

    ``sincos_grid`` > 0: initialise the last grid² rows with 2-D sin-cos positions of a
    grid × grid raster instead (the first rows, buffer slots, start at zero); still learned.
    """
    init = normal02 if not sincos_grid else _sincos_init(sincos_grid)
    return module.param(name, named(init, None, "pos", "embed"), (1, length, width))


def sincos_2d(grid: int, width: int) -> np.ndarray:
    """[grid², width] 2-D sin-cos positions (row half, column half), raster order."""
    if width % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {width}")
    q = width // 4
    omega = 1.0 / 10000 ** (np.arange(q) / q)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def enc(p):
        a = p.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    return np.concatenate([enc(rows), enc(cols)], axis=1).astype(np.float32)


def _sincos_init(grid: int):
    def init(key, shape, dtype=jnp.float32):
        del key
        length, width = shape[1], shape[2]
        table = np.zeros((length, width), np.float32)
        table[length - grid * grid:] = sincos_2d(grid, width)
        return jnp.asarray(table, dtype)[None]
    return init


def _xavier_heads(key, shape, dtype=jnp.float32):
    """Xavier-uniform for a [in, heads, head_dim] kernel seen as [in, heads*head_dim].

    This equals PyTorch's init of the fused Linear that the reference uses, so the
    split-heads layout changes nothing about the initial distribution.
    """
    fan_in, fan_out = shape[0], shape[1] * shape[2]
    limit = jnp.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


def _xavier_out(key, shape, dtype=jnp.float32):
    """Xavier-uniform for a [heads, head_dim, out] kernel seen as [heads*head_dim, out]."""
    fan_in, fan_out = shape[0] * shape[1], shape[2]
    limit = jnp.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


class Dropout(nn.Module):
    """Inverted dropout that draws 16 random bits per element instead of nn.Dropout's 32.

    Each 32-bit draw gives two neighbours on the last axis their 16 bits, so the random-bit
    generator (threefry: a few dozen integer ops per 32 bits) runs for half the elements. The
    paper sizes drop 0.1 of the attention probabilities and MLP activations in every block;
    on CPU this cut the element-wise time of a size-B train step by 15 % (README). The rate is
    rounded to a multiple of 2^-16 (0.1 → 0.100006).
    """

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if deterministic or self.rate == 0.0:
            return x
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"dropout rate {self.rate} outside [0, 1]")
        drop = int(round(self.rate * 65536))
        if drop >= 65536:
            return jnp.zeros_like(x)
        last = x.shape[-1]
        bits = jax.random.bits(self.make_rng("dropout"), x.shape[:-1] + (-(-last // 2),), jnp.uint32)
        # Interleaved (element 2j takes draw j's low half, 2j + 1 its high half), not
        # concatenated, so a last axis sharded over devices keeps each shard's bits local.
        halves = jnp.stack([bits & 0xFFFF, bits >> 16], axis=-1).reshape(
            x.shape[:-1] + (2 * bits.shape[-1],))[..., :last]
        keep = halves >= drop
        scale = jnp.asarray(65536.0 / (65536 - drop), x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


class Attention(nn.Module):
    """Multi-head attention with a boolean mask [B, 1|H, Q, K] (True = may attend).

    Softmax runs in float32 whatever the compute dtype. Masked logits are
    replaced (not added to), so a fully masked row cannot produce NaN.
    """

    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, mask=None, deterministic=True):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads={self.num_heads}")
        head_dim = width // self.num_heads
        context = x if context is None else context

        def proj(name, inp):
            kernel = self.param(f"{name}_kernel", named(_xavier_heads, "embed", "heads", "kv"),
                                (width, self.num_heads, head_dim))
            bias = self.param(f"{name}_bias", named(zeros, "heads", "kv"), (self.num_heads, head_dim))
            return jnp.einsum("bld,dhk->blhk", inp.astype(self.dtype), kernel.astype(self.dtype)) + \
                bias.astype(self.dtype)

        q = proj("query", x)
        k = proj("key", context)
        v = proj("value", context)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        logits = logits * (head_dim ** -0.5)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = Dropout(self.dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        out_kernel = self.param("out_kernel", named(_xavier_out, "heads", "kv", "embed"),
                                (self.num_heads, head_dim, width))
        out_bias = self.param("out_bias", named(zeros, "embed"), (width,))
        out = jnp.einsum("bqhk,hkd->bqd", out, out_kernel.astype(self.dtype)) + out_bias.astype(self.dtype)
        return Dropout(self.dropout)(out, deterministic=deterministic)


class Mlp(nn.Module):
    hidden: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        width = x.shape[-1]
        h = dense(self.hidden, "embed", "mlp", dtype=self.dtype, name="fc1")(x)
        h = nn.gelu(h, approximate=False)
        h = Dropout(self.dropout)(h, deterministic=deterministic)
        h = dense(width, "mlp", "embed", dtype=self.dtype, name="fc2")(h)
        return Dropout(self.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, MLP."""

    num_heads: int
    mlp_dim: int
    cross_attention: bool = False
    dropout: float = 0.0
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, context=None, context_mask=None, deterministic=True):
        x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))
        h = layer_norm(self.ln_eps, self.dtype, name="norm1")(x)
        x = x + Attention(self.num_heads, self.dropout, self.dtype, name="attn")(
            h, mask=mask, deterministic=deterministic)
        if self.cross_attention:
            h = layer_norm(self.ln_eps, self.dtype, name="norm_cross")(x)
            x = x + Attention(self.num_heads, self.dropout, self.dtype, name="cross_attn")(
                h, context=context, mask=context_mask, deterministic=deterministic)
        h = layer_norm(self.ln_eps, self.dtype, name="norm2")(x)
        x = x + Mlp(self.mlp_dim, self.dropout, self.dtype, name="mlp")(h, deterministic)
        return nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))


def scan_param_tree(tree):
    """A tree in the unrolled layout (.../block_0, block_1, ...) → the scanned layout
    (.../scanned/block with every leaf stacked on a leading depth axis). Converts
    checkpoints, gradients or masks between `scan_layers=False` and `True`.
    """
    if not isinstance(tree, dict):
        return tree
    names = [f"block_{i}" for i in range(len(tree))]
    if tree and sorted(tree) == sorted(names):
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[n] for n in names])
        return {SCANNED: {"block": stacked}}
    return {k: scan_param_tree(v) for k, v in tree.items()}


class _ScannedBlock(nn.Module):
    """One Block in the (carry, output) form that nn.scan expects."""

    num_heads: int
    mlp_dim: int
    cross_attention: bool
    dropout: float
    ln_eps: float
    remat: bool
    deterministic: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, context, context_mask):
        block_cls = nn.remat(Block, static_argnums=(5,)) if self.remat else Block
        x = block_cls(self.num_heads, self.mlp_dim, self.cross_attention, self.dropout,
                      self.ln_eps, self.dtype, name="block")(x, mask, context, context_mask, self.deterministic)
        return x, None


class Stack(nn.Module):
    """`depth` Blocks; `remat` recomputes each block's activations in the backward pass.

    `scan=True` runs the blocks as one `nn.scan` over weights stacked on a leading
    "layers" axis: XLA compiles one block instead of `depth` copies, which is what
    makes compiling the large sizes (and AOT for TPU slices) take minutes, not hours.
    The maths is the same; the parameter tree is not (blocks/scanned/block/... with a
    leading depth axis instead of blocks/block_0, block_1, ...).
    """

    depth: int
    num_heads: int
    mlp_dim: int
    cross_attention: bool = False
    dropout: float = 0.0
    ln_eps: float = 1e-6
    remat: bool = False
    dtype: Dtype = jnp.float32
    scan: bool = False

    @nn.compact
    def __call__(self, x, mask=None, context=None, context_mask=None, deterministic=True):
        if self.scan:
            scanned = nn.scan(_ScannedBlock, variable_axes={"params": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.depth,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(self.num_heads, self.mlp_dim, self.cross_attention, self.dropout, self.ln_eps,
                           self.remat, deterministic, self.dtype, name=SCANNED)(x, mask, context, context_mask)
            return x
        block_cls = nn.remat(Block, static_argnums=(5,)) if self.remat else Block
        for i in range(self.depth):
            x = block_cls(self.num_heads, self.mlp_dim, self.cross_attention, self.dropout,
                          self.ln_eps, self.dtype, name=f"block_{i}")(
                x, mask, context, context_mask, deterministic)
        return x
