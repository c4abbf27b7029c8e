"""Frozen T5 encoder (the paper's generation-text encoder: T5-Large, 1024-d, 128 tokens).

The architecture of HF transformers' `T5EncoderModel`, rewritten in Flax Linen:
token embedding (no scaling) → N blocks of [RMS-norm → self-attention (no 1/√d
scaling; relative-position bias computed in block 0 and shared by all blocks)
→ residual, RMS-norm → feed-forward (ReLU, or gated GELU) → residual] → final
RMS-norm. Parameter names mirror the PyTorch ones so checkpoints map
mechanically; weights load from an HF directory (config.json + model.safetensors,
from `T5EncoderModel` or `T5ForConditionalGeneration` — only the encoder is read).

Padding mask: the paper's code runs T5 WITHOUT an attention mask (padding
tokens are attended to); `T5TextEncoder(padding_mask=False)` reproduces that,
`padding_mask=True` masks padding as HF does when given `attention_mask`.

Token ids come from `dream_jax.data.tokenizers.T5Tokenizer` (the checkpoint's spiece.model:
ids + EOS, cut to the length with EOS kept, padded with 0); `padding_mask_from_ids` gives
the matching attention mask.
"""
import dataclasses
import json
import math
import os
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dream_jax.models import pretrained
from dream_jax.models.layers import named

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 1024
    d_kv: int = 64
    d_ff: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    is_gated_act: bool = False

    def __post_init__(self):
        if self.dense_act_fn not in _ACTIVATIONS:
            raise ValueError(f"T5 activation {self.dense_act_fn!r} is not supported ({sorted(_ACTIVATIONS)})")

    @classmethod
    def from_hf(cls, d: dict) -> "T5Config":
        """From an HF config.json dict (`feed_forward_proj` 'relu', 'gated-gelu', ...)."""
        proj = d.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj={proj!r}: expected 'ACT' or 'gated-ACT'")
        act = parts[-1]
        if proj == "gated-gelu":
            act = "gelu_new"   # what transformers uses for 'gated-gelu' (T5 v1.1, flan-t5)
        return cls(
            vocab_size=d["vocab_size"], d_model=d["d_model"], d_kv=d["d_kv"], d_ff=d["d_ff"],
            num_layers=d["num_layers"], num_heads=d["num_heads"],
            relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-6),
            dense_act_fn=act, is_gated_act=parts[0] == "gated" and len(parts) == 2,
        )


# Published architectures (random init is enough for benchmarks and shape checks).
T5_LARGE = T5Config()                                                       # google-t5/t5-large (v1.0)
T5_V1_1_LARGE = T5Config(d_ff=2816, dense_act_fn="gelu_new", is_gated_act=True)  # google/t5-v1_1-large


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """int32 [q_len, k_len] bidirectional buckets of (key position − query position).

    Half the buckets for each sign; within a half, distances below half of it
    get their own bucket and larger ones share log-spaced buckets up to
    max_distance. Computed on the host in float32 exactly as the reference does.
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(dist.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = max_exact + np.where(dist < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(dist < max_exact, dist, large)).astype(np.int32)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, statistics in float32."""

    eps: float
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", named(nn.initializers.ones, "embed"), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (scale * x32).astype(self.dtype)


def _dense(features, in_name, out_name, name, dtype):
    return nn.Dense(features, use_bias=False, dtype=dtype, name=name,
                    kernel_init=named(nn.initializers.normal(0.05), in_name, out_name))


class T5SelfAttention(nn.Module):
    cfg: T5Config
    has_relative_bias: bool
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        """bias: float32 [B|1, H|1, L, L] added to the logits, or None (block 0 computes it)."""
        cfg = self.cfg
        b, length, _ = x.shape
        inner = cfg.num_heads * cfg.d_kv
        split = lambda t: t.reshape(b, length, cfg.num_heads, cfg.d_kv)  # noqa: E731
        q = split(_dense(inner, "embed", "mlp", "q", self.dtype)(x))
        k = split(_dense(inner, "embed", "mlp", "k", self.dtype)(x))
        v = split(_dense(inner, "embed", "mlp", "v", self.dtype)(x))
        if self.has_relative_bias:
            table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32,
                             embedding_init=named(nn.initializers.normal(0.05), None, "heads"),
                             name="relative_attention_bias")
            buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance)
            position = table(jnp.asarray(buckets)).transpose(2, 0, 1)[None]    # [1, H, L, L]
            bias = position if bias is None else position + bias
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)   # no 1/sqrt(d) in T5
        if bias is not None:
            logits = logits + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, inner)
        return _dense(cfg.d_model, "mlp", "embed", "o", self.dtype)(out), bias


class T5FeedForward(nn.Module):
    cfg: T5Config
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, act = self.cfg, _ACTIVATIONS[self.cfg.dense_act_fn]
        if cfg.is_gated_act:
            h = act(_dense(cfg.d_ff, "embed", "mlp", "wi_0", self.dtype)(x)) * \
                _dense(cfg.d_ff, "embed", "mlp", "wi_1", self.dtype)(x)
        else:
            h = act(_dense(cfg.d_ff, "embed", "mlp", "wi", self.dtype)(x))
        return _dense(cfg.d_model, "mlp", "embed", "wo", self.dtype)(h)


class _SelfAttentionLayer(nn.Module):
    cfg: T5Config
    has_relative_bias: bool
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        h = T5LayerNorm(self.cfg.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        out, bias = T5SelfAttention(self.cfg, self.has_relative_bias, self.dtype, name="SelfAttention")(h, bias)
        return x + out, bias


class _FeedForwardLayer(nn.Module):
    cfg: T5Config
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = T5LayerNorm(self.cfg.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        return x + T5FeedForward(self.cfg, self.dtype, name="DenseReluDense")(h)


class T5Block(nn.Module):
    cfg: T5Config
    has_relative_bias: bool
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        x, bias = _SelfAttentionLayer(self.cfg, self.has_relative_bias, self.dtype, name="layer_0")(x, bias)
        x = _FeedForwardLayer(self.cfg, self.dtype, name="layer_1")(x)
        return x, bias


class T5Encoder(nn.Module):
    """input_ids int [B, L] (+ optional attention_mask [B, L], 1 = token) → float32 [B, L, d_model]."""

    cfg: T5Config
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        cfg = self.cfg
        x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, name="shared",
                     embedding_init=named(nn.initializers.normal(1.0), "vocab", "embed"))(input_ids)
        bias = None
        if attention_mask is not None:
            bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                             jnp.finfo(jnp.float32).min).astype(jnp.float32)
        for i in range(cfg.num_layers):
            x, bias = T5Block(cfg, i == 0, self.dtype, name=f"block_{i}")(x, bias)
        x = T5LayerNorm(cfg.layer_norm_epsilon, self.dtype, name="final_layer_norm")(x)
        return nn.with_logical_constraint(x.astype(jnp.float32), ("batch", "seq", "embed"))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _t5_key(key: str) -> str:
    """HF checkpoint key → our mirrored name (encoder part); embed_tokens is tied to shared."""
    if key == "encoder.embed_tokens.weight":
        return "shared.weight"
    return key[len("encoder."):] if key.startswith("encoder.") else key


def load_t5_encoder(path: str, dtype=jnp.float32) -> Tuple[T5Encoder, dict]:
    """(T5Encoder module, params) from an HF directory (config.json + model.safetensors).

    Decoder and LM-head tensors of a T5ForConditionalGeneration checkpoint are skipped;
    any other tensor that does not fit, and any missing one, is an error naming it.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory (expected an HF T5 directory with config.json)")
    with open(os.path.join(path, "config.json")) as f:
        cfg = T5Config.from_hf(json.load(f))
    ckpt = pretrained.open_checkpoint(path, "model.safetensors")
    keys = [k for k in ckpt.keys() if not k.startswith(("decoder.", "lm_head."))]
    if "shared.weight" in keys and "encoder.embed_tokens.weight" in keys:
        keys.remove("encoder.embed_tokens.weight")   # the same tied tensor stored twice
    model = T5Encoder(cfg, dtype)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    expected = lambda p: pretrained.module_path_to_torch_key(  # noqa: E731
        p, prefix="" if p[0] == "shared" else "encoder.")
    params = pretrained.load_params(abstract, ckpt, keys, _t5_key, model_name="T5 encoder",
                                    expected_key=expected)
    return model, params


class T5TextEncoder:
    """Frozen T5 encoder with its parameters: ids [B, L] (+ mask) → features [B, L, d_model].

    `padding_mask=False` (the paper's code) lets every token attend to padding;
    True masks padded keys. Jitted with the parameters as an argument.
    """

    def __init__(self, model: T5Encoder, params, padding_mask: bool = False):
        self.model, self.params, self.padding_mask = model, params, padding_mask
        self.cfg = model.cfg
        self._apply = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))

    @classmethod
    def from_pretrained(cls, path: str, padding_mask: bool = False, dtype=jnp.float32) -> "T5TextEncoder":
        model, params = load_t5_encoder(path, dtype)
        return cls(model, params, padding_mask)

    @property
    def width(self) -> int:
        return self.cfg.d_model

    def __call__(self, ids, mask=None):
        if self.padding_mask and mask is None:
            raise ValueError("padding_mask=True needs the attention mask")
        return self._apply(self.params, jnp.asarray(ids), jnp.asarray(mask) if self.padding_mask else None)


def padding_mask_from_ids(ids, eos_id: int) -> np.ndarray:
    """int32 [B, L] attention mask: 1 up to and including the first EOS, 0 on the padding after it."""
    ids = np.asarray(ids)
    is_eos = ids == eos_id
    first = np.where(is_eos.any(-1), is_eos.argmax(-1), ids.shape[-1] - 1)
    return (np.arange(ids.shape[-1])[None, :] <= first[:, None]).astype(np.int32)
