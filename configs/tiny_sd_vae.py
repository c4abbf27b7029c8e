"""The tiny default with the paper's image tokenizer: a frozen SD-VAE (+ 2×2 patches).

    python -m dream_jax.models.tiny_weights --vae=/tmp/tiny_vae        # random weights, no download
    python -m dream_jax.main --config=configs/tiny_sd_vae.py --workdir=workdirs/tiny_sd_vae \
        --config.tokenizer.vae_path=/tmp/tiny_vae

(or `--config=configs/tiny_sd_vae.py:vae_path=/tmp/tiny_vae`). With the real
sd-vae-ft-ema (`python -m dream_jax.models.fetch --what=vae --dest=DIR`) the
same config trains on real latents (slowly on a CPU: the VAE runs in every step).

Synthetic-world images at 64 px → 8×8×4 latents → 16 tokens of dim 16; learned
generation text. The tiny random VAE is a plumbing test: its latents carry little
of the image, so no quality target applies. Data variants:

* data.source='arrayrecord' (data.path=INGEST_DIR): images decoded on the host,
  the VAE runs inside the train step;
* data.source='cache' (data.path=CACHE from `python -m dream_jax.data.cache
  --arrayrecord=INGEST_DIR --vae_path=... --t5_path=''`): cached posterior moments,
  a fresh latent sample per step. With the same seed and records, the first step
  equals the arrayrecord run's (tests/test_cache_training.py).
"""
from configs import tiny


def get_config(arg=None):
    args = dict(a.split("=", 1) for a in arg.split(",")) if arg else {}
    c = tiny.get_config()
    c.tokenizer.kind = "sd_vae"
    c.tokenizer.patch_size = 2
    c.tokenizer.vae_path = args.get("vae_path", "")
    c.data.image_size = 64
    c.data.gen_text = "learned"
    c.data.random_flip = True        # arrayrecord / cache sources
    c.data.read_threads = 2
    c.eval.num_examples = 128
    c.eval.batch_size = 64
    return c
