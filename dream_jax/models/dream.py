"""DREAM: one MAR encoder shared by a CLIP-style contrastive branch and a MAR/FLUID
text-to-image decoder with a per-token diffusion head.

Methods (call through `model.apply(variables, ..., method=...)`); training,
sampling, SAD and the evals all use these and nothing else:
  encode_image(tokens, positions, valid)      -> (features, valid_with_buffer)
  image_embed(features, valid_with_buffer)    -> L2-normalised [B, embed_dim]
  text_embed(clip_tokens)                     -> L2-normalised [B, embed_dim]
  align_text(gen_text)                        -> decoder context [B, L, width]
  decode(features, positions, valid, ctx)     -> z [B, N, width]
  head(x_t, t, z)                             -> diffusion head output [.., 2C]
  __call__(...)                               -> (loss, metrics) for training
"""
import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from dream_jax.diffusion.gaussian import make_diffusion
from dream_jax.models import layers
from dream_jax.models.diffloss import DiffusionHead
from dream_jax.models.mar import MARDecoder, MAREncoder, masked_mean
from dream_jax.models.sizes import DreamArch
from dream_jax.models.text import CLIPTextTower, GenTextAligner
from dream_jax.objectives.contrastive import clip_loss, l2_normalize


def draw_diffusion_noise(key, batch: int, seq_len: int, mul: int, channels: int, num_timesteps: int):
    """Timesteps [B, N·mul] and noise [B, N·mul, C] for the diffusion loss (batch-major, so they
    shard like the batch and slice into micro-batches by rows)."""
    key_t, key_noise = jax.random.split(key)
    t = jax.random.randint(key_t, (batch, seq_len * mul), 0, num_timesteps)
    noise = jax.random.normal(key_noise, (batch, seq_len * mul, channels), jnp.float32)
    return t, noise


def dummy_inputs(arch: DreamArch, batch: int):
    """Zero (image tokens, CLIP tokens, generation text) of the right shapes, for init/eval_shape."""
    tokens = jnp.zeros((batch, arch.seq_len, arch.token_dim), jnp.float32)
    clip = jnp.zeros((batch, arch.context_length), jnp.int32)
    if arch.gen_text == "t5":
        gen = jnp.zeros((batch, arch.gen_max_length, arch.gen_feature_dim), jnp.float32)
    else:
        gen = jnp.zeros((batch, arch.gen_max_length), jnp.int32)
    return tokens, clip, gen


class ContrastiveHead(nn.Module):
    """d → hidden, BN, ReLU, hidden → hidden, BN, ReLU, hidden → embed_dim.

    BatchNorm reduces over the batch axis of a global (sharded) array, so under
    jit its statistics span the global batch with no explicit collective.
    """

    hidden: int
    embed_dim: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, pooled, train: bool):
        x = pooled
        for i in range(2):
            x = layers.dense(self.hidden, "embed", "mlp", use_bias=False, dtype=self.dtype,
                             name=f"fc{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=jnp.float32,
                             scale_init=layers.named(layers.ones, "mlp"),
                             bias_init=layers.named(layers.zeros, "mlp"), name=f"bn{i}")(x)
            x = nn.relu(x)
        return layers.dense(self.embed_dim, "mlp", None, dtype=self.dtype, name="out")(x)


class DreamModel(nn.Module):
    arch: DreamArch
    gen_weight: float = 1.0
    clip_weight: float = 0.005

    def setup(self):
        a = self.arch
        dt = jnp.dtype(a.dtype)
        grid = math.isqrt(a.seq_len) if a.pos_init == "sincos" else 0
        self.encoder = MAREncoder(a.width, a.depth, a.num_heads, a.mlp_dim, a.seq_len, a.buffer_size,
                                  a.dropout, a.remat, dt, scan=a.scan_layers, sincos_grid=grid)
        self.decoder = MARDecoder(a.width, a.depth, a.num_heads, a.mlp_dim, a.seq_len, a.buffer_size,
                                  a.dropout, a.remat, dt, scan=a.scan_layers, sincos_grid=grid)
        self.aligner = GenTextAligner(a.gen_text, a.gen_feature_dim, a.gen_max_length, a.width,
                                      a.aligner_depth, a.num_heads, a.mlp_dim, a.gen_vocab_size,
                                      a.dropout, dt, scan=a.scan_layers)
        self.text_tower = CLIPTextTower(a.vocab_size, a.context_length, a.text_width, a.text_depth,
                                        a.text_heads, a.embed_dim, a.eot_id, dt, scan=a.scan_layers)
        self.diffusion_head = DiffusionHead(in_channels=a.token_dim, width=a.head_width,
                                            depth=a.head_depth, out_channels=2 * a.token_dim, dtype=dt,
                                            remat=a.remat)
        self.contrastive_head = ContrastiveHead(a.contrastive_hidden, a.embed_dim, a.dtype)
        self.logit_scale = self.param("logit_scale", layers.named(nn.initializers.constant(jnp.log(1 / 0.07))), ())
        self.diffusion = make_diffusion(a.diffusion_steps, a.noise_schedule)

    # ---- the shared encoder and the contrastive branch ------------------------------------
    def encode_image(self, tokens, positions, valid, deterministic=True):
        return self.encoder(tokens, positions, valid, deterministic)

    def image_embed(self, features, valid_with_buffer, train=False):
        """Mean over buffer + visible tokens → BN-MLP head → unit vector."""
        return self.embed_pooled(masked_mean(features, valid_with_buffer), train)

    def embed_pooled(self, pooled, train=False):
        return l2_normalize(self.contrastive_head(pooled, train))

    def contrastive_loss(self, pooled, clip_tokens, clip_valid, train=True):
        """Gated CLIP loss of pooled encoder features [B, D] against the captions (global batch)."""
        img = self.embed_pooled(pooled, train)
        txt = self.text_embed(clip_tokens)
        return clip_loss(img, txt, self.logit_scale, clip_valid)

    def text_embed(self, clip_tokens):
        return l2_normalize(self.text_tower(clip_tokens))

    def embed_image_tokens(self, tokens, visible):
        """Image embedding of the visible tokens of full-length token maps [B, N, C] (eval mode)."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape[:2])
        features, valid_all = self.encode_image(tokens, positions, visible)
        return self.image_embed(features, valid_all, train=False)

    # ---- the generative branch ------------------------------------------------------------
    def align_text(self, gen_text, deterministic=True):
        return self.aligner(gen_text, deterministic)

    def decode(self, features, positions, valid, text_ctx, deterministic=True):
        return self.decoder(features, positions, valid, text_ctx, deterministic)

    def head(self, x_t, t, z):
        return self.diffusion_head(x_t, t, z)

    def diffusion_loss_terms(self, z, target, weights, diffusion_noise=None):
        """(Σ weight·loss, Σ weight) of the hybrid diffusion loss per token.

        z [B, N, D] conditions, target [B, N, C] clean tokens, weights [B, N] (masked and
        gen-active). Each (z, x) pair is repeated `diffusion_batch_mul` times with its own
        timestep and noise: `diffusion_noise` = (t [B, N·mul], noise [B, N·mul, C]) from
        `draw_diffusion_noise`, drawn here from the 'diffusion' rng when not given (the trainer
        draws them for the whole batch so that micro-batches see the same draws).
        """
        mul = self.arch.diffusion_batch_mul
        b, n, c = target.shape
        if diffusion_noise is None:
            diffusion_noise = draw_diffusion_noise(self.make_rng("diffusion"), b, n, mul, c,
                                                   self.diffusion.num_timesteps)
        t, noise = diffusion_noise
        # Repeat each token in place (image-major order) so the flat token axis keeps the
        # batch sharding; tiling the whole batch would put `mul` in front and replicate it.
        z_rep = nn.with_logical_constraint(jnp.repeat(z.reshape(b * n, -1), mul, axis=0), ("batch", None))
        x_rep = nn.with_logical_constraint(
            jnp.repeat(target.reshape(b * n, c), mul, axis=0).astype(jnp.float32), ("batch", None))
        per_token, _ = self.diffusion.training_losses(lambda x_t, tt: self.head(x_t, tt, z_rep),
                                                      x_rep, t.reshape(-1), noise.reshape(-1, c))
        per_token = per_token.reshape(b, n, mul).mean(-1)
        w = weights.astype(jnp.float32)
        return (per_token * w).sum(), w.sum()

    def generation_loss_terms(self, features, positions, visible, image_tokens, gen_text, weights,
                              diffusion_noise=None, deterministic=True):
        """Aligned text → decoder → (Σ weight·loss, Σ weight) on the tokens with weight > 0."""
        ctx = self.align_text(gen_text, deterministic)
        z = self.decode(features, positions, visible, ctx, deterministic)
        return self.diffusion_loss_terms(z, image_tokens, weights, diffusion_noise)

    def generation_loss(self, features, positions, visible, image_tokens, gen_text, weights,
                        deterministic=True, diffusion_noise=None):
        total, weight = self.generation_loss_terms(features, positions, visible, image_tokens, gen_text,
                                                   weights, diffusion_noise, deterministic)
        return total / jnp.maximum(weight, 1.0)

    def masked_generation_loss(self, image_tokens, gen_text, masked):
        """The generative loss of one masked view (eval mode): what held-out evaluation reports."""
        positions = jnp.broadcast_to(jnp.arange(image_tokens.shape[1]), masked.shape)
        visible = jnp.logical_not(masked)
        features, _ = self.encode_image(image_tokens, positions, visible)
        return self.generation_loss(features, positions, visible, image_tokens, gen_text, masked)

    # ---- training ------------------------------------------------------------------------
    def __call__(self, image_tokens, clip_tokens, gen_text, masked, gen_active, clip_valid,
                 train=True, diffusion_noise=None):
        """One forward pass on ONE masked view feeding both losses.

        image_tokens [B, N, C]; masked [B, N] bool (True = hidden from the encoder);
        gen_active / clip_valid [B] bool from the per-group gating.
        Returns (total_loss, metrics).
        """
        deterministic = not train
        positions = jnp.broadcast_to(jnp.arange(image_tokens.shape[1]), masked.shape)
        visible = jnp.logical_not(masked)
        features, valid_all = self.encode_image(image_tokens, positions, visible, deterministic)
        metrics = {}
        total = jnp.zeros((), jnp.float32)
        if self.gen_weight:
            gen = self.generation_loss(features, positions, visible, image_tokens, gen_text,
                                       masked & gen_active[:, None], deterministic, diffusion_noise)
            total = total + self.gen_weight * gen
            metrics["gen_loss"] = gen
        if self.clip_weight:
            clip, clip_metrics = self.contrastive_loss(masked_mean(features, valid_all), clip_tokens,
                                                       clip_valid, train)
            total = total + self.clip_weight * clip
            metrics["clip_loss"] = clip
            metrics.update({f"clip_{k}": v for k, v in clip_metrics.items()})
        metrics["logit_scale"] = jnp.exp(self.logit_scale)
        return total, metrics

    def init_all(self, image_tokens, clip_tokens, gen_text):
        """Touch every submodule once (used only by init, whatever the loss weights)."""
        positions = jnp.broadcast_to(jnp.arange(image_tokens.shape[1]), image_tokens.shape[:2])
        visible = jnp.ones(image_tokens.shape[:2], bool)
        features, valid_all = self.encode_image(image_tokens, positions, visible)
        z = self.decode(features, positions, visible, self.align_text(gen_text))
        b, n, c = image_tokens.shape
        out = self.head(image_tokens.reshape(b * n, c), jnp.zeros((b * n,), jnp.int32), z.reshape(b * n, -1))
        return out, self.image_embed(features, valid_all, train=True), self.text_embed(clip_tokens), self.logit_scale
