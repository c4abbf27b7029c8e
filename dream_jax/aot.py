"""Compile the real train step for a TPU topology on a machine without TPUs.

    pip install -e ".[tpu]"     # adds libtpu; not part of the default install
    python -m dream_jax.aot --config=configs/cc12m.py:size=H --topology=v5p:4x4x4

Prints per-device memory (arguments, temporaries, outputs) against the chip's
HBM, the FLOPs of one step per device, and the step time and whole-run time
implied by an assumed MFU. Exits non-zero when the step does not fit.

The batch is what the paper's cached pipeline feeds: VAE posterior moments
[B, 32, 32, 8], CLIP tokens [B, 77] and T5-Large features [B, 128, 1024].
"""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import topologies
from absl import app, flags
from ml_collections import config_flags

from dream_jax import train
from dream_jax.models.dream import DreamModel
from dream_jax.models.sizes import make_arch
from dream_jax.parallel import mesh as mesh_lib

config_flags.DEFINE_config_file("config", None, "A configs/*.py file (optionally :arg).")
flags.DEFINE_string("topology", "v5p:4x4x4", "TPU topology name, e.g. v5p:4x4x4 or v5e:8x8.")
flags.DEFINE_float("mfu", 0.4, "Assumed model-FLOPs utilisation for the implied step time.")
FLAGS = flags.FLAGS

# Per-chip HBM (bytes) and dense bf16 peak (FLOP/s), from the public Cloud TPU specs.
CHIPS = {
    "TPU v5": (95 * 2**30, 459e12),          # v5p
    "TPU v5 lite": (16 * 2**30, 197e12),     # v5e
    "TPU v4": (32 * 2**30, 275e12),
    "TPU v6 lite": (32 * 2**30, 918e12),     # v6e (Trillium)
}


class CachedLatents:
    """The image tokenizer of a cached run: moments → sampled latent × 0.18215 → 2×2 patches."""

    def __init__(self, latent_size=32, channels=4, patch_size=2, scaling=0.18215):
        self.latent_size, self.channels, self.patch_size, self.scaling = latent_size, channels, patch_size, scaling

    def tokens_from_moments(self, moments, rng):
        from dream_jax.models.vae import patchify, sample_latent
        return patchify(sample_latent(moments, rng) * self.scaling, self.patch_size)


def paper_model(cfg, **arch_changes):
    overrides = dict(cfg.model.overrides.to_dict() if hasattr(cfg.model.overrides, "to_dict")
                     else cfg.model.overrides)
    overrides.update(arch_changes)
    overrides.update(seq_len=256, token_dim=16, vocab_size=49408, context_length=77, eot_id=49407,
                     gen_text="t5", gen_feature_dim=1024, gen_max_length=cfg.data.gen_context)
    return DreamModel(make_arch(cfg.model.size, overrides), gen_weight=cfg.model.gen_weight,
                      clip_weight=cfg.model.clip_weight)


def lower_step(cfg, devices, shape, **arch_changes):
    """The train step lowered (traced, not compiled) on a (data, fsdp, tensor) mesh of devices."""
    mesh = jax.make_mesh(shape, mesh_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)
    rules = mesh_lib.logical_rules(cfg.mesh)
    model = paper_model(cfg, **arch_changes)
    tx = train.make_optimizer(cfg)
    b = cfg.batch_size
    batch_sharding = mesh_lib.batch_sharding(mesh)
    batch = {
        "latent_moments": jax.ShapeDtypeStruct((b, 32, 32, 8), jnp.float32, sharding=batch_sharding),
        "clip_tokens": jax.ShapeDtypeStruct((b, 77), jnp.int32, sharding=batch_sharding),
        "gen_tokens": jax.ShapeDtypeStruct((b, cfg.data.gen_context, 1024), jnp.bfloat16,
                                           sharding=batch_sharding),
    }
    empty_t5 = jnp.zeros((cfg.data.gen_context, 1024), jnp.bfloat16)  # T5("") features in a real run
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, abstract, _, step_fn = train.jit_state_and_step(cfg, model, tx, CachedLatents(), empty_t5, mesh, rules)
        return step_fn.lower(abstract, batch)


def compile_for_topology(cfg, topology: str):
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    devices = topo.devices
    shape = mesh_lib.mesh_shape(cfg.mesh, len(devices))
    return lower_step(cfg, devices, shape).compile(), devices, shape


def step_flops(cfg, compiled, num_devices: int) -> float:
    """FLOPs of one step, all devices together.

    XLA's cost analysis counts a while loop's body once, so with scan_layers or gradient
    accumulation the compiled program under-reports. The count then comes from the same
    global step with every loop unrolled, lowered on one CPU device (tracing only, no
    compile; remat's recomputation is part of that HLO too).
    """
    if dict(cfg.model.overrides).get("scan_layers", False) or cfg.get("grad_accum_steps", 1) > 1:
        unrolled = cfg.copy_and_resolve_references()
        with unrolled.unlocked():
            unrolled.unroll_accum = True
        cost = lower_step(unrolled, jax.devices("cpu")[:1], (1, 1, 1), scan_layers=False).cost_analysis()
        per_device = 1
    else:
        cost = compiled.cost_analysis()
        per_device = num_devices
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) * per_device


def report(cfg, topology, mfu):
    try:
        compiled, devices, shape = compile_for_topology(cfg, topology)
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        print(f"DOES NOT FIT: size={cfg.model.size} global batch={cfg.batch_size} on {topology} "
              f"(remat={model_remat(cfg)}): {str(err).splitlines()[0]}\n"
              f"Try {fit_hints(cfg)}.",
              file=sys.stderr)
        return False, None
    kind = devices[0].device_kind
    hbm, peak = CHIPS.get(kind, (None, None))
    mem = compiled.memory_analysis()
    flops = step_flops(cfg, compiled, len(devices)) / len(devices)
    args, temps, outs = mem.argument_size_in_bytes, mem.temp_size_in_bytes, mem.output_size_in_bytes
    alias = getattr(mem, "alias_size_in_bytes", 0)
    total = args + temps + outs - alias
    gib = 2.0 ** 30
    print(f"config size={cfg.model.size} global batch={cfg.batch_size} topology={topology} "
          f"({len(devices)} × {kind}) mesh data×fsdp×tensor={shape} remat={model_remat(cfg)} "
          f"scan_layers={bool(dict(cfg.model.overrides).get('scan_layers', False))}")
    print(f"per-device memory: arguments {args / gib:.2f} GiB, temporaries {temps / gib:.2f} GiB, "
          f"outputs {outs / gib:.2f} GiB, aliased {alias / gib:.2f} GiB → peak ≈ {total / gib:.2f} GiB"
          + (f" of {hbm / gib:.0f} GiB HBM" if hbm else ""))
    print(f"FLOPs per step per device: {flops / 1e12:.2f} TFLOP (all devices: {flops * len(devices) / 1e15:.2f} PFLOP)")
    fits = hbm is None or total <= hbm
    if peak:
        step_s = flops / (peak * mfu)
        total_h = step_s * cfg.total_steps / 3600
        print(f"at MFU {mfu:.0%} of {peak / 1e12:.0f} TFLOP/s: step {step_s:.2f} s; "
              f"{cfg.total_steps} steps ({cfg.get('epochs', '?')} epochs) ≈ {total_h:.1f} h "
              f"({total_h / 24:.1f} days)")
    if not fits:
        print(f"DOES NOT FIT: needs {total / gib:.2f} GiB per device, the chip has {hbm / gib:.0f} GiB. "
              f"Try {fit_hints(cfg)}.", file=sys.stderr)
    return fits, dict(args=args, temps=temps, outs=outs, alias=alias, total=total, flops=flops)


def fit_hints(cfg) -> str:
    """What to change when the step does not fit, leaving out levers already pulled."""
    hints = [] if model_remat(cfg) else ["--config.model.overrides.remat=True"]
    hints.append("sharding weights and optimizer state (e.g. --config.mesh.data=8 --config.mesh.fsdp=8)")
    hints.append("--config.grad_accum_steps=K or a smaller batch")
    return ", ".join(hints)


def model_remat(cfg):
    return bool(dict(cfg.model.overrides).get("remat", False))


def main(argv):
    del argv
    fits, _ = report(FLAGS.config, FLAGS.topology, FLAGS.mfu)
    sys.exit(0 if fits else 1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
