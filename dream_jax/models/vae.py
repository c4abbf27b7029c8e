"""Image tokenizers: images ↔ token maps [B, N, C]. Registry by name.

`patch`: pixels in [-1, 1] cut into p×p patches (the CPU default; no weights).
The SD-VAE tokenizer (`sd_vae`, the paper's) lives beside it once ported.
"""
import dataclasses

import jax.numpy as jnp


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


def make_image_tokenizer(cfg):
    """cfg: the config's `tokenizer` section (kind, patch_size) plus data.image_size."""
    kind = cfg.tokenizer.kind
    if kind == "patch":
        return PatchTokenizer(cfg.data.image_size, cfg.tokenizer.patch_size)
    raise ValueError(f"unknown tokenizer.kind={kind!r} (available: 'patch')")
