"""Sampling throughput: plain MAR decoding, SAD and best-of-K, plus a profile of plain decoding.

    python benchmarks/sample_bench.py                       # tiny and B, CPU-friendly settings
    python benchmarks/sample_bench.py --sizes=tiny --profile_size=tiny
    python benchmarks/sample_bench.py --sizes=B --b_num_iter=64 --b_diffusion_steps=100 --b_images=16

Random-init weights (speed does not depend on training). For each size it prints
images/s of plain decoding, SAD (K candidates up to a threshold, then the kept one
finished) and best-of-K full decoding, the SAD / best-of-K time ratio, and the
ideal ratio (K·t + (T − t)) / (K·T) in iteration-rows. Compile time is reported
separately: the loop and the scorer are compiled first with start = stop = 0 (they take
the iteration range at run time), so the timed calls neither compile nor decode twice.
Size B defaults to T = 2, t = 1 (the same ideal ratio as the paper's t = 32 of T = 64)
with 10 diffusion steps so that it runs in about two minutes on a 2-core CPU.

Profile (size B by default): per-iteration cost of the jitted sub-functions of one
MAR iteration — encoder (once), decoder (doubled CFG batch), diffusion head
sampling of the slot — timed on their own and extrapolated to the paper setting
(--profile_num_iter, --profile_diffusion_steps), as fractions of the iteration.
"""
import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dream_jax.models.dream import DreamModel  # noqa: E402
from dream_jax.models.sizes import make_arch  # noqa: E402
from dream_jax.sampling import sad as sad_lib  # noqa: E402
from dream_jax.sampling.mar import MARSampler, masking_schedule, trajectory_keys  # noqa: E402

TEXT = dict(vocab_size=512, context_length=32, eot_id=2, gen_text="learned", gen_vocab_size=512,
            gen_max_length=32)
# tiny: the CPU default (32 px, 4-px patches → 64 tokens of 48 channels); B: paper tokens (256 × 16).
DATA = {"tiny": dict(seq_len=64, token_dim=48, gen_feature_dim=128),
        "B": dict(seq_len=256, token_dim=16, gen_feature_dim=1024)}


def build(size):
    """The model and random weights (N(0, 0.02) everywhere, BatchNorm statistics (0, 1)): drawn
    on the host from the abstract shapes, which is much faster than compiling model.init."""
    arch = make_arch(size, dict(TEXT, **DATA[size]))
    model = DreamModel(arch)
    b = 2
    dummy = (jnp.zeros((b, arch.seq_len, arch.token_dim)), jnp.zeros((b, arch.context_length), jnp.int32),
             jnp.zeros((b, arch.gen_max_length), jnp.int32))
    t0 = time.perf_counter()
    abstract = jax.eval_shape(lambda: nn.unbox(model.init({"params": jax.random.key(0)}, *dummy,
                                                           method=DreamModel.init_all)))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = getattr(path[-1], "key", "")
        if getattr(path[0], "key", "") == "batch_stats":
            return np.ones(leaf.shape, np.float32) if name == "var" else np.zeros(leaf.shape, np.float32)
        return (0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(leaf.dtype)

    variables = jax.device_put(jax.tree_util.tree_map_with_path(fill, abstract))
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    print(f"[{size}] built {n_params / 1e6:.1f} M params in {time.perf_counter() - t0:.1f}s", flush=True)
    return model, variables


def prompts(arch, rows, seed=0):
    rng = np.random.default_rng(seed)
    gen = rng.integers(3, arch.vocab_size, size=(rows, arch.gen_max_length)).astype(np.int32)
    clip = rng.integers(3, arch.vocab_size, size=(rows, arch.context_length)).astype(np.int32)
    clip[:, 0], clip[:, 10] = 1, arch.eot_id
    empty = np.zeros((arch.gen_max_length,), np.int32)
    empty[0], empty[1] = 1, arch.eot_id
    return jnp.asarray(gen), jnp.asarray(clip), jnp.asarray(empty)


def timed(fn, repeats=1, warm=True):
    """(seconds of a warm-up call, best seconds of `repeats` further calls)."""
    first = 0.0
    if warm:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return first, best


def compile_sampler(sampler, variables, rows, gen, clip, empty, sched):
    """Compiles the loop and the scorer for `rows` rows without decoding anything: start and
    stop are runtime values, so a call with start = stop = 0 compiles the same executable."""
    ok, nk = trajectory_keys(jax.random.key(0), rows)
    reps = -(-rows // gen.shape[0])
    g, c = jnp.tile(gen, (reps, 1))[:rows], jnp.tile(clip, (reps, 1))[:rows]
    canvas = sampler.run(variables, sampler.empty_canvas(rows), ok, nk[:, 0], g, empty, sched,
                         np.int32(0), np.int32(0), np.float32(1.0))
    text = sampler.text_embed(variables, c)
    jax.block_until_ready(sampler.score(variables, canvas, ok, np.int32(0), text))


def throughput(size, model, variables, images, num_iter, steps, k, threshold, cfg, repeats):
    arch = model.arch
    sampler = MARSampler(model, num_iter, steps, guided=cfg != 1.0)
    sched = sampler.schedule(cfg)
    gen, clip, empty = prompts(arch, images)
    ok, nk = trajectory_keys(jax.random.key(0), images, k)
    runs = {
        "plain": lambda: sad_lib.plain(sampler, variables, ok, nk, gen, empty, sched),
        f"SAD K={k} t={threshold}/{num_iter}":
            lambda: sad_lib.sad(sampler, variables, ok, nk, gen, clip, empty, sched, threshold).tokens,
        f"best-of-{k}": lambda: sad_lib.best_of_k(sampler, variables, ok, nk, gen, clip, empty, sched).tokens,
    }
    print(f"[{size}] {images} image(s), num_iter {num_iter}, diffusion {steps}, cfg {cfg}, "
          f"slot {sampler.slot_size} tokens", flush=True)
    t0 = time.perf_counter()
    for rows in (images, images * k):
        compile_sampler(sampler, variables, rows, gen, clip, empty, sched)
    print(f"[{size}]   compiled loop + scorer for {images} and {images * k} rows in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    times = {}
    for name, fn in runs.items():
        _, best = timed(fn, repeats, warm=False)
        times[name] = best
        print(f"[{size}]   {name:<22} {images / best:8.3f} images/s  ({best:.2f}s)", flush=True)
    assert sampler.traces["run"] == len({images, images * k}), sampler.traces  # nothing recompiled while timing
    names = list(runs)
    ideal = (k * threshold + num_iter - threshold) / (k * num_iter)
    print(f"[{size}]   SAD / best-of-{k} time ratio {times[names[1]] / times[names[2]]:.3f} "
          f"(ideal in iteration-rows {ideal:.3f})", flush=True)
    return times


def profile(size, model, variables, images, num_iter, steps, cfg, repeats):
    """Per-iteration cost of encoder, decoder and diffusion head for plain decoding."""
    arch = model.arch
    sampler = MARSampler(model, num_iter, steps, guided=cfg != 1.0)
    n, rows = arch.seq_len, images
    gen, _, empty = prompts(arch, rows)
    masked = masking_schedule(n, num_iter)
    k_mid = num_iter // 2
    visible = jnp.asarray(np.arange(n)[None, :].repeat(rows, 0) >= masked[k_mid])
    positions = jnp.broadcast_to(jnp.arange(n), (rows, n))
    canvas = jax.random.normal(jax.random.key(1), (rows, n, arch.token_dim))
    ctx = jax.jit(sampler._context)(variables, gen, empty)
    mult = 2 if sampler.guided else 1

    @jax.jit
    def encoder(v, c):
        return model.apply(v, c, positions, visible, method=DreamModel.encode_image)[0]

    features = encoder(variables, canvas)

    @jax.jit
    def decoder(v, f, cx):
        rep = (lambda a: jnp.concatenate([a] * mult, axis=0))
        return model.apply(v, rep(f), rep(positions), rep(visible), cx, method=DreamModel.decode)

    z = decoder(variables, features, ctx)
    s = sampler.slot_size
    zc = z[:rows, :s]
    zu = z[rows:, :s] if sampler.guided else None
    keys = jax.random.split(jax.random.key(2), rows)

    @jax.jit
    def head(v, a, b, kk):
        if b is None:
            return jax.vmap(lambda x, y: sampler._diffuse(v, x, None, y, 1.5, 1.0))(a, kk)
        return jax.vmap(lambda x, y, w: sampler._diffuse(v, x, y, w, 1.5, 1.0))(a, b, kk)

    parts = {
        "encoder": timed(lambda: encoder(variables, canvas), repeats)[1],
        f"decoder (x{mult} rows)": timed(lambda: decoder(variables, features, ctx), repeats)[1],
        f"diffusion head ({steps} steps, slot {s})": timed(lambda: head(variables, zc, zu, keys), repeats)[1],
    }
    total = sum(parts.values())
    print(f"[{size}] profile of one plain iteration ({rows} image(s), num_iter {num_iter}: slot {s} tokens "
          f"for {n / num_iter:.1f} revealed on average):", flush=True)
    for name, sec in parts.items():
        print(f"[{size}]   {name:<36} {sec * 1e3:9.1f} ms  {100 * sec / total:5.1f} %", flush=True)
    print(f"[{size}]   per iteration {total * 1e3:.1f} ms → {num_iter} iterations ≈ {total * num_iter:.1f}s "
          f"per batch ({rows / (total * num_iter):.3f} images/s)", flush=True)
    return parts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,B")
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tiny_images", type=int, default=8)
    p.add_argument("--tiny_num_iter", type=int, default=64)
    p.add_argument("--tiny_threshold", type=int, default=32)
    p.add_argument("--tiny_diffusion_steps", default="100")
    p.add_argument("--b_images", type=int, default=1)
    p.add_argument("--b_num_iter", type=int, default=2)
    p.add_argument("--b_threshold", type=int, default=1)
    p.add_argument("--b_diffusion_steps", default="ddim10")
    p.add_argument("--profile_size", default="B")
    p.add_argument("--profile_num_iter", type=int, default=64)
    p.add_argument("--profile_diffusion_steps", default="100")
    args = p.parse_args()

    def steps(text):
        return int(text) if text.isdigit() else text

    print(f"devices: {jax.devices()}", flush=True)
    for size in [s for s in args.sizes.split(",") if s]:
        pre = "tiny" if size == "tiny" else "b"
        model, variables = build(size)
        throughput(size, model, variables, getattr(args, f"{pre}_images"), getattr(args, f"{pre}_num_iter"),
                   steps(getattr(args, f"{pre}_diffusion_steps")), args.candidates,
                   getattr(args, f"{pre}_threshold"), args.cfg, args.repeats)
        if size == args.profile_size:
            profile(size, model, variables, getattr(args, f"{pre}_images"), args.profile_num_iter,
                    steps(args.profile_diffusion_steps), args.cfg, args.repeats)


if __name__ == "__main__":
    main()
