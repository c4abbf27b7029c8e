"""Train-step benchmark: step time, images/s, XLA FLOPs per step, fraction of measured matmul peak.

    python benchmarks/train_bench.py                       # tiny (default batch) and B (batch 8)
    python benchmarks/train_bench.py --sizes=tiny --steps=20
    python benchmarks/train_bench.py --sizes=B --steps=2 --profile   # + where the step's time goes

The peak is measured in the same run (a large f32 matmul), so the ratio is
robust to how fast or busy the machine is.
"""
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import tiny
from dream_jax import train
from dream_jax.data import pipeline
from dream_jax.data.tokenizers import train_caption_bpe
from dream_jax.data.synthetic import SyntheticWorld
from dream_jax.models.build import build_model
from dream_jax.models.vae import make_image_tokenizer
from dream_jax.parallel import mesh as mesh_lib

flags.DEFINE_list("sizes", ["tiny", "B"], "Model sizes to time.")
flags.DEFINE_integer("steps", 10, "Timed steps per size (after one warm-up step).")
flags.DEFINE_integer("b_batch", 8, "Batch size for the paper sizes.")
flags.DEFINE_integer("b_image_size", 64, "Image size for paper sizes (patch 4 → (size/4)^2 tokens).")
flags.DEFINE_bool("profile", False, "Trace one more step and print its time per kind of XLA op.")
FLAGS = flags.FLAGS


def _matmul_ops(hlo_text: str) -> set:
    """Names of the instructions that are, or call a computation containing, a dot/convolution."""
    bodies, calls, current = collections.defaultdict(str), [], None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = header.group(1)
            continue
        if current is None:
            continue
        bodies[current] += line + "\n"
        inst = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
            if inst:
                calls.append((inst.group(1), callee))
    has_dot = {c for c, body in bodies.items() if re.search(r" (dot|convolution)\(", body)}
    names = set(has_dot)
    for c, body in bodies.items():
        for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]* (dot|convolution)\(", body, re.M):
            names.add(m.group(1))
    names.update(inst for inst, callee in calls if callee in has_dot)
    return names


def op_kind(name: str, matmuls: set) -> str:
    if name in matmuls:
        return "matmul (dot/conv, with fused epilogues)"
    if re.search(r"copy|transpose|gather|scatter|slice|concatenate|pad|bitcast|broadcast\.", name):
        return "data movement (copy/transpose/gather/scatter/slice)"
    if "reduce" in name:
        return "reductions (softmax/LN statistics, sums)"
    if "fusion" in name:
        return "other fused element-wise (softmax, LN, adaLN, GELU, optimizer)"
    return "other"


def profile_step(compiled, state, batch):
    """Time per kind of op in one traced step (CPU time summed over threads)."""
    matmuls = _matmul_ops(compiled.as_text())
    trace_dir = tempfile.mkdtemp(prefix="train_bench_trace_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
    events = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    hlo_names = set(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", compiled.as_text(), re.M))
    per_kind = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in hlo_names:
            per_kind[op_kind(e["name"], matmuls)] += e.get("dur", 0.0)
    total = sum(per_kind.values())
    for kind, us in per_kind.most_common():
        print(f"    {kind:<66}{us / 1e6:>8.2f} s{us / total:>7.1%}")
    return state


def matmul_peak(n=2048, reps=10, trials=5):
    """Best of ``trials`` timings of ``reps`` square matmuls: the machine's sustained f32 peak.
    One timing alone varied by 30 % here (CPU clocks and thread wake-up), and a low peak
    would flatter the ratio."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            out = f(a)
        out.block_until_ready()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def bench(size, batch, image_size, steps):
    cfg = tiny.get_config()
    cfg.model.size = size
    cfg.batch_size = batch
    cfg.num_mask_groups = min(8, batch)
    cfg.data.image_size = image_size
    if size != "tiny":
        cfg.model.overrides = {}
    world = SyntheticWorld(image_size, "train")
    tok = train_caption_bpe(world.captions(2000), vocab_size=cfg.data.text_vocab_size)
    model = build_model(cfg, tok, make_image_tokenizer(cfg))
    tx = train.make_optimizer(cfg)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    rules = mesh_lib.logical_rules(cfg.mesh)
    empty = jnp.asarray(tok.encode_batch([""], cfg.data.gen_context)[0])
    it = pipeline.make_train_iterator(cfg, tok)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, _, init_fn, step = train.jit_state_and_step(cfg, model, tx, make_image_tokenizer(cfg), empty,
                                                       mesh, rules)
        state = init_fn()
        batch = next(it)
        batch = mesh_lib.host_to_global({k: batch[k] for k in ("image", "clip_tokens", "gen_tokens")}, mesh)
        compiled = step.lower(state, batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", float("nan")))
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t) / steps
        if FLAGS.profile:
            print(f"  {size}: time per kind of XLA op in one step")
            state = profile_step(compiled, state, batch)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return dict(size=size, batch=cfg.batch_size, params=params, step_s=dt,
                images_per_s=cfg.batch_size / dt, flops=flops)


def main(_):
    peak_before = matmul_peak()
    results = []
    for size in FLAGS.sizes:
        b = tiny.get_config().batch_size if size == "tiny" else FLAGS.b_batch
        image_size = 32 if size == "tiny" else FLAGS.b_image_size
        results.append(bench(size, b, image_size, FLAGS.steps))
    # The peak is measured before and after the steps; the higher one is the denominator.
    peak_after = matmul_peak()
    peak = max(peak_before, peak_after)
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s (before {peak_before / 1e9:.1f}, "
          f"after {peak_after / 1e9:.1f})")
    print(f"{'size':<6}{'batch':>6}{'params':>12}{'step s':>10}{'img/s':>10}{'GFLOP/step':>12}{'GFLOP/s':>10}{'of peak':>9}")
    for r in results:
        achieved = r["flops"] / r["step_s"]
        print(f"{r['size']:<6}{r['batch']:>6}{r['params'] / 1e6:>11.1f}M{r['step_s']:>10.3f}"
              f"{r['images_per_s']:>10.1f}{r['flops'] / 1e9:>12.1f}{achieved / 1e9:>10.1f}{achieved / peak:>9.1%}")


if __name__ == "__main__":
    app.run(main)
