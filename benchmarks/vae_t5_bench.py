"""Throughput of the frozen parts at the paper's sizes: SD-VAE encode / decode (images/s at 256 px)
and the T5-Large encoder (sentences/s at 128 tokens), random weights (no download needed).

    python benchmarks/vae_t5_bench.py                      # VAE batch 1, T5 batch 4, 2 timed reps
    python benchmarks/vae_t5_bench.py --parts=t5 --t5_variants=relu --reps=3

T5 variants: 'relu' = google-t5/t5-large (v1.0, d_ff 4096, the paper's), 'gated' = T5 v1.1-Large
(gated GELU, d_ff 2816). Each line reports compile time, seconds per call, items/s and the
achieved GFLOP/s (XLA's count), next to a large f32 matmul measured in the same run.
"""
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dream_jax.models import t5, vae

flags.DEFINE_list("parts", ["vae", "t5"], "What to time: vae, t5.")
flags.DEFINE_list("t5_variants", ["relu", "gated"], "T5-Large variants: relu (v1.0), gated (v1.1).")
flags.DEFINE_integer("image_size", 256, "Image size for the VAE.")
flags.DEFINE_integer("vae_batch", 1, "Images per VAE call.")
flags.DEFINE_integer("t5_batch", 4, "Sentences per T5 call.")
flags.DEFINE_integer("t5_length", 128, "Tokens per sentence.")
flags.DEFINE_integer("reps", 2, "Timed calls after one warm-up call.")
FLAGS = flags.FLAGS


def matmul_peak(n=2048, reps=5):
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def _flops(compiled):
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0))
    except Exception:  # noqa: BLE001 — cost analysis is best effort
        return 0.0


def random_params(model, *example_args):
    """N(0, 1/fan_in) kernels etc. drawn on the host: compiling `init` of a big conv net is slow."""
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *example_args)["params"]
    rs = np.random.default_rng(0)

    def draw(path, leaf):
        x = rs.standard_normal(leaf.shape, dtype=np.float32)
        if path[-1].key == "kernel":
            x /= np.sqrt(np.prod(leaf.shape[:-1]))
        elif path[-1].key != "embedding":
            x = (1.0 if path[-1].key == "scale" else 0.0) + 0.1 * x
        return jnp.asarray(x)

    return jax.tree_util.tree_map_with_path(draw, flax.core.meta.unbox(abstract))


def time_call(name, fn, args, items, unit):
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(*args))                      # warm-up
    t = time.perf_counter()
    for _ in range(FLAGS.reps):
        out = compiled(*args)
    jax.block_until_ready(out)
    per_call = (time.perf_counter() - t) / FLAGS.reps
    flops = _flops(compiled)
    print(f"{name:<28} compile {compile_s:6.1f}s  {per_call:7.2f} s/call  {items / per_call:7.2f} {unit}/s  "
          f"{flops / per_call / 1e9:7.1f} GFLOP/s  ({flops / items / 1e9:.1f} GFLOP per {unit[:-1]})",
          flush=True)
    return items / per_call


def bench_vae():
    cfg = vae.VAEConfig()                                    # sd-vae-ft-ema: (128, 256, 512, 512)
    model = vae.AutoencoderKL(cfg)
    s, b = FLAGS.image_size, FLAGS.vae_batch
    params = random_params(model, jnp.zeros((1, 64, 64, 3)))
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"SD-VAE: {n / 1e6:.2f} M params, {s} px, batch {b}")
    images = jax.random.uniform(jax.random.PRNGKey(1), (b, s, s, 3), minval=-1.0, maxval=1.0)
    latent = jax.random.normal(jax.random.PRNGKey(2), (b, s // 8, s // 8, cfg.latent_channels))
    enc = lambda p, x: model.apply({"params": p}, x, method=vae.AutoencoderKL.encode)  # noqa: E731
    dec = lambda p, z: model.apply({"params": p}, z, method=vae.AutoencoderKL.decode)  # noqa: E731
    time_call("VAE encode (moments)", enc, (params, images), b, "images")
    time_call("VAE decode", dec, (params, latent), b, "images")


def bench_t5(variant):
    cfg = t5.T5_LARGE if variant == "relu" else t5.T5_V1_1_LARGE
    model = t5.T5Encoder(cfg)
    params = random_params(model, jnp.zeros((1, 8), jnp.int32))
    n = sum(x.size for x in jax.tree.leaves(params))
    b, length = FLAGS.t5_batch, FLAGS.t5_length
    print(f"T5-Large encoder ({variant}, d_ff {cfg.d_ff}): {n / 1e6:.1f} M params, {length} tokens, batch {b}")
    ids = jax.random.randint(jax.random.PRNGKey(1), (b, length), 2, cfg.vocab_size)
    time_call(f"T5 encoder ({variant})", lambda p, x: model.apply({"params": p}, x), (params, ids), b, "sentences")
    del params


def main(argv):
    del argv
    print(f"devices: {jax.devices()}; f32 matmul peak here: {matmul_peak():.0f} GFLOP/s")
    if "vae" in FLAGS.parts:
        bench_vae()
    if "t5" in FLAGS.parts:
        for variant in FLAGS.t5_variants:
            bench_t5(variant)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    app.run(main)
