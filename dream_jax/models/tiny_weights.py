"""Tiny random-weight SD-VAE and T5 directories in the public formats (for tests and CPU demos).

    python -m dream_jax.models.tiny_weights --vae=/tmp/tiny_vae [--t5=/tmp/tiny_t5]

writes a diffusers-format AutoencoderKL directory (config.json +
diffusion_pytorch_model.safetensors) and/or an HF-format T5 encoder directory
(config.json + model.safetensors + a spiece.model trained on synthetic-world
captions). The loaders (`vae.load_sd_vae`, `t5.load_t5_encoder`) read them
exactly like the real sd-vae-ft-ema / t5-v1_1-large downloads; nothing here
needs torch or the network. The weights are random (kernels ~ N(0, 1/fan_in)),
so they only exercise shapes, plumbing and determinism.
"""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dream_jax.models import pretrained, t5, vae

TINY_VAE = vae.VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
TINY_T5 = t5.T5Config(vocab_size=300, d_model=16, d_kv=6, d_ff=32, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20)


def random_params(model, seed, *example_args):
    """Random parameters of the right shapes without compiling `init` (slow for conv nets):
    kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm scales 1 + N(0, 0.1²), biases N(0, 0.1²)."""
    abstract = flax.core.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *example_args)["params"])
    rs = np.random.RandomState(seed)

    def draw(path, leaf):
        name = path[-1].key
        x = rs.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            return jnp.asarray(x / np.sqrt(np.prod(leaf.shape[:-1])))
        if name == "embedding":
            return jnp.asarray(x)
        return jnp.asarray((1.0 if name == "scale" else 0.0) + 0.1 * x)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def write_random_vae(path: str, cfg: vae.VAEConfig = TINY_VAE, seed: int = 0) -> str:
    """A diffusers AutoencoderKL directory with random weights; returns `path`."""
    model = vae.AutoencoderKL(cfg)
    params = random_params(model, seed, jnp.zeros((1, 2 * cfg.downsample_factor, 2 * cfg.downsample_factor,
                                                   cfg.in_channels)))
    return write_vae_dir(path, params, cfg)


def write_vae_dir(path: str, params, cfg: vae.VAEConfig = TINY_VAE) -> str:
    """`params` of an AutoencoderKL(cfg) saved as a diffusers directory; returns `path`."""
    os.makedirs(path, exist_ok=True)
    n = len(cfg.block_out_channels)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", "block_out_channels": list(cfg.block_out_channels),
                   "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                   "layers_per_block": cfg.layers_per_block, "norm_num_groups": cfg.norm_num_groups,
                   "latent_channels": cfg.latent_channels, "scaling_factor": cfg.scaling_factor}, f)
    pretrained.write_safetensors(os.path.join(path, "diffusion_pytorch_model.safetensors"),
                                 pretrained.export_state_dict(params, pretrained.module_path_to_torch_key))
    return path


def write_random_t5(path: str, cfg: t5.T5Config = TINY_T5, seed: int = 0, captions=None) -> str:
    """An HF T5 encoder directory with random weights and a spiece.model trained on
    `captions` (default: synthetic-world captions); returns `path`."""
    from dream_jax.data import synthetic, tokenizers

    if captions is None:
        world = synthetic.SyntheticWorld(32, "train", 0, num_examples=2000)
        captions = [world[i]["caption"] for i in range(2000)]
    tok = tokenizers.train_sentencepiece(captions, os.path.join(path, "spiece.model"),
                                         vocab_size=min(cfg.vocab_size, 200))
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"spiece vocabulary {tok.vocab_size} exceeds the T5 vocab_size {cfg.vocab_size}")
    model = t5.T5Encoder(cfg)
    params = random_params(model, seed, jnp.zeros((1, 4), jnp.int32))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
                   "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                   "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
                   "relative_attention_max_distance": cfg.relative_attention_max_distance,
                   "feed_forward_proj": "relu"}, f)
    sd = pretrained.export_state_dict(
        params, lambda p: pretrained.module_path_to_torch_key(p, "" if p[0] == "shared" else "encoder."))
    pretrained.write_safetensors(os.path.join(path, "model.safetensors"), sd)
    return path


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dream_jax.models.tiny_weights")
    ap.add_argument("--vae", default="", help="write a tiny random SD-VAE directory here")
    ap.add_argument("--t5", default="", help="write a tiny random T5 encoder directory here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.vae and not args.t5:
        ap.error("pass --vae=DIR and/or --t5=DIR")
    if args.vae:
        print("wrote", write_random_vae(args.vae, seed=args.seed))
    if args.t5:
        print("wrote", write_random_t5(args.t5, seed=args.seed))


if __name__ == "__main__":
    main()
