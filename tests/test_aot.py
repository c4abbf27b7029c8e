"""The AOT tool's FLOP count on CPU devices (the TPU compile itself needs libtpu: README)."""
import jax
import pytest

from configs import cc12m
from dream_jax import aot


def _flops(compiled):
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.fixture(scope="module")
def small_paper_config():
    cfg = cc12m.get_config("size=tiny")     # the paper's data shapes (256 tokens, T5 features), tiny widths
    cfg.batch_size, cfg.num_mask_groups = 16, 8
    cfg.mesh.data = -1
    return cfg


def test_flop_count_sees_through_scanned_layers_and_accumulation(small_paper_config):
    cfg = small_paper_config
    assert cfg.model.overrides.scan_layers
    devices = jax.devices()[:8]
    unrolled = _flops(aot.lower_step(cfg, devices, (8, 1, 1), scan_layers=False).compile()) * 8
    scanned = _flops(aot.lower_step(cfg, devices, (8, 1, 1)).compile()) * 8
    # XLA counts a loop body once: the scanned program's own count misses most blocks ...
    assert scanned < 0.8 * unrolled
    # ... the tool's count does not.
    counted = aot.step_flops(cfg, None, 8)
    assert abs(counted - unrolled) < 0.03 * unrolled
    # Accumulation keeps the work (plus gradient caching's extra encoder forward, a few %).
    accum = cfg.copy_and_resolve_references()
    accum.grad_accum_steps = 2
    assert counted < aot.step_flops(accum, None, 8) < 1.15 * counted
