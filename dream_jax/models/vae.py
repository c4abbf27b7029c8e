"""Image tokenizers: images ↔ token maps [B, N, C]. Registry by name.

`patch`: pixels in [-1, 1] cut into p×p patches (the CPU default; no weights).
`sd_vae`: the paper's — Stable Diffusion's KL autoencoder (sd-vae-ft-ema), stride 8,
  latent sampled from the posterior, scaled by 0.18215, cut into 2×2 patches
  (32×32×4 → 256 tokens of dim 16 at 256 px). Frozen; weights load from a diffusers
  directory (config.json + diffusion_pytorch_model.safetensors) or a single
  safetensors file (diffusers names, or the original LDM/CompVis names).

Token channel order inside a patch follows MAR (`nchpwq → nhw(cpq)`): channel
major, then row, then column — so that checkpoints of the PyTorch MAR/DREAM
heads would read the same token layout.
"""
import dataclasses
import json
import os
import re
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dream_jax.models import pretrained
from dream_jax.models.layers import named


@dataclasses.dataclass(frozen=True)
class PatchTokenizer:
    image_size: int
    patch_size: int

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.grid ** 2

    @property
    def token_dim(self) -> int:
        return 3 * self.patch_size ** 2

    def encode(self, images):
        """uint8 [B, H, W, 3] → float32 tokens [B, N, p*p*3] in [-1, 1], raster order."""
        if images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"images of shape {images.shape[1:]} do not match image_size={self.image_size}")
        x = images.astype(jnp.float32) / 127.5 - 1.0
        b, g, p = x.shape[0], self.grid, self.patch_size
        x = x.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, g * g, p * p * 3)

    def decode(self, tokens):
        """float tokens [B, N, p*p*3] → uint8 images [B, H, W, 3] (clipped)."""
        b, g, p = tokens.shape[0], self.grid, self.patch_size
        x = tokens.reshape(b, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, 3)
        return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


# =============================================================================================
# SD-VAE (diffusers AutoencoderKL with DownEncoderBlock2D / UpDecoderBlock2D), NHWC.
# Module and parameter names mirror diffusers' so that checkpoints map mechanically.
# =============================================================================================
LOGVAR_RANGE = (-30.0, 20.0)   # diffusers' DiagonalGaussianDistribution clamps the log-variance


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The AutoencoderKL fields that change the computation (defaults: sd-vae-ft-ema)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        """From a diffusers config.json dict; refuses variants this port does not implement."""
        cls_name = d.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ValueError(f"VAE config is for {cls_name!r}; only 'AutoencoderKL' is supported")
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for field, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            kinds = d.get(field, [allowed] * n)
            if len(kinds) != n or any(k != allowed for k in kinds):
                raise ValueError(f"VAE config {field}={kinds}: only {n}× {allowed!r} is supported")
        if d.get("act_fn", "silu") != "silu":
            raise ValueError(f"VAE config act_fn={d['act_fn']!r}: only 'silu' is supported")
        if d.get("latents_mean") is not None or d.get("latents_std") is not None:
            raise ValueError("VAE configs with latents_mean/latents_std are not supported")
        defaults = cls()
        return cls(
            in_channels=d.get("in_channels", defaults.in_channels),
            out_channels=d.get("out_channels", defaults.out_channels),
            block_out_channels=tuple(d.get("block_out_channels", defaults.block_out_channels)),
            layers_per_block=d.get("layers_per_block", defaults.layers_per_block),
            latent_channels=d.get("latent_channels", defaults.latent_channels),
            norm_num_groups=d.get("norm_num_groups", defaults.norm_num_groups),
            scaling_factor=d.get("scaling_factor", defaults.scaling_factor),
            shift_factor=d.get("shift_factor") or 0.0,
            use_quant_conv=d.get("use_quant_conv", True),
            use_post_quant_conv=d.get("use_post_quant_conv", True),
            mid_block_add_attention=d.get("mid_block_add_attention", True),
        )


_conv_init = named(nn.initializers.lecun_normal(), None, None, None, None)
_dense_init = named(nn.initializers.lecun_normal(), None, None)
_vec_zeros = named(nn.initializers.zeros, None)
_vec_ones = named(nn.initializers.ones, None)


def _conv(features, kernel, name, dtype, strides=1, padding=None):
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)), dtype=dtype,
                   kernel_init=_conv_init, bias_init=_vec_zeros, name=name)


def _group_norm(cfg: VAEConfig, name):
    # Statistics in float32 with the two-pass variance, as PyTorch computes them.
    return nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=jnp.float32,
                        use_fast_variance=False, scale_init=_vec_ones, bias_init=_vec_zeros, name=name)


class ResnetBlock(nn.Module):
    cfg: VAEConfig
    features: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_group_norm(self.cfg, "norm1")(x)).astype(self.dtype)
        h = _conv(self.features, 3, "conv1", self.dtype)(h)
        h = nn.silu(_group_norm(self.cfg, "norm2")(h)).astype(self.dtype)
        h = _conv(self.features, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, "conv_shortcut", self.dtype)(x.astype(self.dtype))
        return x + h


class SpatialAttention(nn.Module):
    """Self-attention over the H·W positions (one head, as in AutoencoderKL), residual."""

    cfg: VAEConfig
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = _group_norm(self.cfg, "group_norm")(x).astype(self.dtype).reshape(b, hh * ww, c)

        def proj(name, inp):
            return nn.Dense(c, dtype=self.dtype, kernel_init=_dense_init, bias_init=_vec_zeros, name=name)(inp)

        q, k, v = proj("to_q", h), proj("to_k", h), proj("to_v", h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c ** -0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = proj("to_out_0", jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, hh, ww, c)


class MidBlock(nn.Module):
    cfg: VAEConfig
    features: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(self.cfg, self.features, self.dtype, name="resnets_0")(x)
        if self.cfg.mid_block_add_attention:
            x = SpatialAttention(self.cfg, self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.cfg, self.features, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding one pixel at the bottom and right (diffusers' padding=0)."""

    features: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.features, 3, "conv", self.dtype, strides=2, padding=0)(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    features: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.features, 3, "conv", self.dtype)(x)


class DownBlock(nn.Module):
    cfg: VAEConfig
    features: int
    num_layers: int
    downsample: bool
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.cfg, self.features, self.dtype, name=f"resnets_{j}")(x)
        if self.downsample:
            x = Downsample(self.features, self.dtype, name="downsamplers_0")(x)
        return x


class UpBlock(nn.Module):
    cfg: VAEConfig
    features: int
    num_layers: int
    upsample: bool
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.cfg, self.features, self.dtype, name=f"resnets_{j}")(x)
        if self.upsample:
            x = Upsample(self.features, self.dtype, name="upsamplers_0")(x)
        return x


class VAEEncoder(nn.Module):
    cfg: VAEConfig
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, chans = self.cfg, self.cfg.block_out_channels
        x = _conv(chans[0], 3, "conv_in", self.dtype)(x.astype(self.dtype))
        for i, ch in enumerate(chans):
            x = DownBlock(cfg, ch, cfg.layers_per_block, i < len(chans) - 1, self.dtype,
                          name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg, chans[-1], self.dtype, name="mid_block")(x)
        x = nn.silu(_group_norm(cfg, "conv_norm_out")(x)).astype(self.dtype)
        return _conv(2 * cfg.latent_channels, 3, "conv_out", self.dtype)(x)


class VAEDecoder(nn.Module):
    cfg: VAEConfig
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, chans = self.cfg, self.cfg.block_out_channels
        x = _conv(chans[-1], 3, "conv_in", self.dtype)(z.astype(self.dtype))
        x = MidBlock(cfg, chans[-1], self.dtype, name="mid_block")(x)
        for i, ch in enumerate(reversed(chans)):
            x = UpBlock(cfg, ch, cfg.layers_per_block + 1, i < len(chans) - 1, self.dtype,
                        name=f"up_blocks_{i}")(x)
        x = nn.silu(_group_norm(cfg, "conv_norm_out")(x)).astype(self.dtype)
        return _conv(cfg.out_channels, 3, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
    """images in [-1, 1] NHWC ↔ latents [B, H/8, W/8, C] (unscaled).

    `encode` returns the posterior moments [B, h, w, 2C] = concat(mean, logvar),
    log-variance clamped to [-30, 20] as diffusers does.
    """

    cfg: VAEConfig
    dtype: object = jnp.float32

    def setup(self):
        c = self.cfg.latent_channels
        self.encoder = VAEEncoder(self.cfg, self.dtype)
        self.decoder = VAEDecoder(self.cfg, self.dtype)
        if self.cfg.use_quant_conv:
            self.quant_conv = _conv(2 * c, 1, "quant_conv", self.dtype)
        if self.cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(c, 1, "post_quant_conv", self.dtype)

    def encode(self, x):
        moments = self.encoder(x)
        if self.cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return jnp.concatenate([mean, jnp.clip(logvar, *LOGVAR_RANGE)], axis=-1)

    def decode(self, z):
        if self.cfg.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x):
        mean, _ = jnp.split(self.encode(x), 2, axis=-1)
        return self.decode(mean)


def sample_latent(moments, rng=None):
    """Posterior sample mean + exp(logvar / 2)·ε from moments [..., 2C]; the mean if rng is None.

    `rng` may be a JAX key (traceable) or a `numpy.random.Generator` (host side,
    e.g. in a grain transform; returns numpy).
    """
    if isinstance(rng, np.random.Generator):
        moments = np.asarray(moments, np.float32)
        mean, logvar = np.split(moments, 2, axis=-1)
        std = np.exp(0.5 * np.clip(logvar, *LOGVAR_RANGE))
        return (mean + std * rng.standard_normal(mean.shape, dtype=np.float32)).astype(np.float32)
    mean, logvar = jnp.split(jnp.asarray(moments, jnp.float32), 2, axis=-1)
    if rng is None:
        return mean
    std = jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_RANGE))
    return mean + std * jax.random.normal(rng, mean.shape, jnp.float32)


def patchify(latent, p: int):
    """[B, h, w, C] → [B, (h/p)(w/p), C·p·p], channel-major inside a patch (MAR's order)."""
    xp = np if isinstance(latent, np.ndarray) else jnp
    b, h, w, c = latent.shape
    if h % p or w % p:
        raise ValueError(f"latent of size {h}x{w} is not divisible by patch_size={p}")
    x = latent.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return xp.reshape(x, (b, (h // p) * (w // p), c * p * p))


def unpatchify(tokens, p: int, channels: int):
    """Inverse of `patchify` for a square grid."""
    xp = np if isinstance(tokens, np.ndarray) else jnp
    b, n, _ = tokens.shape
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    x = xp.reshape(tokens, (b, g, g, channels, p, p)).transpose(0, 1, 4, 2, 5, 3)
    return xp.reshape(x, (b, g * p, g * p, channels))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _ldm_to_diffusers(key: str, num_levels: int) -> str:
    """Original LDM/CompVis VAE names (`encoder.down.0.block.1.nin_shortcut`, ...) → diffusers'."""
    k = key
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.block_([12])\.",
               lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.block\.",
               lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.resnets.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
               lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.", k)
    return k.replace(".nin_shortcut.", ".conv_shortcut.")


def _canonical_vae_key(key: str, num_levels: int) -> str:
    if ".down." in key or ".up." in key or ".mid." in key or ".norm_out." in key:
        key = _ldm_to_diffusers(key, num_levels)
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION and "attentions" in parts:
        parts[-2:-1] = _LEGACY_ATTENTION[parts[-2]].split(".")
    return ".".join(parts)


def _vae_keys(ckpt):
    keys = ckpt.keys()
    if any(k.startswith("first_stage_model.") for k in keys):   # a whole SD checkpoint
        return [k for k in keys if k.startswith("first_stage_model.")], "first_stage_model."
    return keys, ""


def infer_vae_config(ckpt, **overrides) -> VAEConfig:
    """A VAEConfig from tensor shapes (single files carry no config.json).

    Inferred: channels per level, layers per block, latent and image channels,
    quant convs, mid-block attention. Not inferable (pass as overrides if they
    differ from SD's): norm_num_groups (32), scaling_factor (0.18215).
    """
    keys, prefix = _vae_keys(ckpt)
    canon = {}
    levels = 1 + max((int(m.group(1)) for k in keys
                      for m in [re.match(r"encoder\.down(?:_blocks)?\.(\d+)\.", k[len(prefix):])] if m),
                     default=-1)
    if levels == 0:
        raise pretrained.CheckpointMismatch(
            f"{getattr(ckpt, 'path', 'checkpoint')}: no encoder down-block tensors; not an SD-VAE checkpoint")
    for k in keys:
        canon[_canonical_vae_key(k[len(prefix):], levels)] = k

    def shape(name):
        if name not in canon:
            raise pretrained.CheckpointMismatch(f"cannot infer the VAE config: checkpoint lacks {name!r}")
        return ckpt.shape(canon[name])

    chans = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels))
    layers = len({k.split(".")[4] for k in canon if k.startswith("encoder.down_blocks.0.resnets.")})
    fields = dict(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=chans,
        layers_per_block=layers,
        latent_channels=shape("decoder.conv_in.weight")[1],
        use_quant_conv="quant_conv.weight" in canon,
        use_post_quant_conv="post_quant_conv.weight" in canon,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in canon,
    )
    fields.update(overrides)
    return VAEConfig(**fields)


def load_sd_vae(path: str, dtype=jnp.float32, **config_overrides):
    """(AutoencoderKL module, params) from a diffusers directory or a single safetensors file.

    A directory needs config.json and diffusion_pytorch_model.safetensors (or its
    sharded index). A single file may use diffusers or LDM names (a whole SD
    checkpoint works too: its `first_stage_model.*` tensors are used); its config
    is inferred from shapes.
    """
    ckpt = pretrained.open_checkpoint(path, "diffusion_pytorch_model.safetensors")
    config_file = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if config_file and os.path.exists(config_file):
        with open(config_file) as f:
            cfg = VAEConfig.from_diffusers(json.load(f))
        cfg = dataclasses.replace(cfg, **config_overrides)
    else:
        cfg = infer_vae_config(ckpt, **config_overrides)
    model = AutoencoderKL(cfg, dtype)
    probe = jnp.zeros((1, 2 * cfg.downsample_factor, 2 * cfg.downsample_factor, cfg.in_channels))
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), probe))["params"]
    keys, prefix = _vae_keys(ckpt)
    levels = len(cfg.block_out_channels)
    params = pretrained.load_params(
        abstract, ckpt, keys, lambda k: _canonical_vae_key(k[len(prefix):], levels),
        model_name="SD-VAE", expected_key=pretrained.module_path_to_torch_key)
    return model, params


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------
def images_to_unit(images):
    """uint8 [B, H, W, 3] → float32 in [-1, 1]."""
    return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0


def unit_to_images(x):
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class SDVAETokenizer:
    """The paper's image tokenizer: frozen SD-VAE → sampled latent × scaling → 2×2 patches.

    Same interface as PatchTokenizer (`seq_len`, `token_dim`, `encode`, `decode`)
    plus `encode_moments` (for the latent cache) and `tokens_from_moments`.
    `encode(images, rng)` samples the posterior as the paper does; without
    `rng` it uses the posterior mean (deterministic; for evaluation).
    The methods are jitted with the parameters as an argument. Inside another
    jit (a train step) pass `params=` explicitly — e.g. the VAE params as an
    argument of the step — or the 84 M weights get baked into that program as
    constants.
    """

    def __init__(self, model: AutoencoderKL, params, image_size: int = 256, patch_size: int = 2):
        cfg = model.cfg
        f = cfg.downsample_factor
        if image_size % (f * patch_size):
            raise ValueError(f"image_size={image_size} is not divisible by the VAE stride {f} × "
                             f"patch_size={patch_size}")
        self.model, self.params, self.cfg = model, params, cfg
        self.image_size, self.patch_size = image_size, patch_size
        self.latent_size = image_size // f
        self._moments = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))
        self._decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))

    @classmethod
    def from_pretrained(cls, path: str, image_size: int = 256, patch_size: int = 2, dtype=jnp.float32,
                        **config_overrides) -> "SDVAETokenizer":
        model, params = load_sd_vae(path, dtype, **config_overrides)
        return cls(model, params, image_size, patch_size)

    @property
    def grid(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.grid ** 2

    @property
    def token_dim(self) -> int:
        return self.cfg.latent_channels * self.patch_size ** 2

    def _check(self, images):
        if tuple(images.shape[1:]) != (self.image_size, self.image_size, 3):
            raise ValueError(f"images of shape {tuple(images.shape[1:])} do not match "
                             f"image_size={self.image_size}")

    def encode_moments(self, images, params=None):
        """uint8 [B, H, W, 3] → float32 moments [B, h, w, 2C] = concat(mean, logvar)."""
        self._check(images)
        return self._moments(self.params if params is None else params, images_to_unit(images))

    def latent_to_tokens(self, latent):
        z = (latent - self.cfg.shift_factor) * self.cfg.scaling_factor
        return patchify(z, self.patch_size)

    def tokens_to_latent(self, tokens):
        z = unpatchify(jnp.asarray(tokens, jnp.float32), self.patch_size, self.cfg.latent_channels)
        return z / self.cfg.scaling_factor + self.cfg.shift_factor

    def tokens_from_moments(self, moments, rng=None):
        """Cached moments [B, h, w, 2C] → tokens [B, N, C·p²] (sampled with rng, else the mean)."""
        return self.latent_to_tokens(sample_latent(moments, rng))

    def encode(self, images, rng=None, params=None):
        """uint8 [B, H, W, 3] → float32 tokens [B, N, C·p²] (sampled latent × scaling, patchified)."""
        return self.tokens_from_moments(self.encode_moments(images, params), rng)

    def decode(self, tokens, params=None):
        """tokens [B, N, C·p²] → uint8 images [B, H, W, 3]."""
        latent = self.tokens_to_latent(tokens)
        return unit_to_images(self._decode(self.params if params is None else params, latent))


def make_image_tokenizer(cfg):
    """cfg: the config's `tokenizer` section plus data.image_size.

    kind 'patch': tokenizer.patch_size. kind 'sd_vae': tokenizer.vae_path (diffusers
    directory or safetensors file; `python -m dream_jax.models.fetch` downloads
    one), tokenizer.patch_size (2).
    """
    kind = cfg.tokenizer.kind
    if kind == "patch":
        return PatchTokenizer(cfg.data.image_size, cfg.tokenizer.patch_size)
    if kind == "sd_vae":
        path = cfg.tokenizer.get("vae_path", "")
        if not path:
            raise ValueError("tokenizer.kind='sd_vae' needs tokenizer.vae_path: a diffusers SD-VAE directory "
                             "(config.json + diffusion_pytorch_model.safetensors) or a safetensors file; "
                             "`python -m dream_jax.models.fetch --what=vae --dest=DIR` downloads sd-vae-ft-ema")
        return SDVAETokenizer.from_pretrained(path, cfg.data.image_size, cfg.tokenizer.get("patch_size", 2))
    raise ValueError(f"unknown tokenizer.kind={kind!r} (available: 'patch', 'sd_vae')")
