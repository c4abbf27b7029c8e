"""The trainer: exact resume, crash safety, config checks, NaN stop."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from dream_jax import train
from dream_jax.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_ARCH = dict(width=32, depth=1, num_heads=2, mlp_dim=64, aligner_depth=1, text_width=32,
                  text_depth=1, text_heads=2, head_width=32, head_depth=1, contrastive_hidden=32,
                  embed_dim=16, gen_feature_dim=32)


def small_arch_flags():
    """SMALL_ARCH as command-line overrides of configs/tiny.py."""
    return [f"--config.model.overrides.{k}={v}" for k, v in SMALL_ARCH.items()]


def small_config(**changes):
    c = tiny.get_config()
    c.total_steps = 6
    c.batch_size = 16
    c.num_mask_groups = 4
    c.log_every = 1
    c.checkpoint_every = 3
    c.eval.every = 0
    c.data.image_size = 16
    c.data.clip_context = 16
    c.data.gen_context = 16
    c.optim.warmup_steps = 2
    c.model.overrides.update(SMALL_ARCH)  # on top of the tiny defaults, as the CLI flags do
    for key, value in changes.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def read_jsonl(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_params(workdir, cfg):
    ckpt = Checkpointer(workdir, async_save=False)
    step = ckpt.latest_step()
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    ckpt.close()
    return step, restored["state"]


def test_exact_resume_is_bitwise(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.train_and_evaluate(small_config(), straight)
    train.train_and_evaluate(small_config(stop_at_step=3), split)
    assert Checkpointer(split).latest_step() == 3
    train.train_and_evaluate(small_config(), split)

    step_a, state_a = final_params(straight, None)
    step_b, state_b = final_params(split, None)
    assert step_a == step_b == 6
    leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The logged metrics of steps 4..6 agree exactly too (drop wall-clock fields).
    drop = ("time", "train/images_per_s", "train/steps_per_s")
    by_step = lambda rows: {r["step"]: {k: v for k, v in r.items() if k not in drop} for r in rows}  # noqa: E731
    a, b = by_step(read_jsonl(straight)), by_step(read_jsonl(split))
    for s in (4, 5, 6):
        assert a[s] == b[s]
    assert a[1]["train/loss"] != a[6]["train/loss"]  # the comparison is not vacuous


def test_kill_minus_9_resumes_from_last_complete_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    args = [sys.executable, "-m", "dream_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
            "--config.total_steps=400", "--config.checkpoint_every=2", "--config.log_every=1",
            "--config.eval.every=0", "--config.batch_size=16", "--config.num_mask_groups=4",
            "--config.data.image_size=16"] + small_arch_flags()
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline:
        done = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
        if len(done) >= 2:
            break
        time.sleep(0.2)
    time.sleep(0.3)  # land somewhere inside the next steps or saves
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    latest = Checkpointer(workdir).latest_step()
    assert latest is not None and latest >= 4
    # A half-written save (what a kill mid-save leaves) must never be picked up.
    os.makedirs(os.path.join(ckpt_dir, f"{latest + 2}.orbax-checkpoint-tmp-1234", "state"))
    assert Checkpointer(workdir).latest_step() == latest

    out = subprocess.run(args[:5] + [f"--config.total_steps={latest + 2}"] + args[6:], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"resumed from step {latest}" in out.stdout
    assert Checkpointer(workdir).latest_step() == latest + 2


@pytest.mark.parametrize("field,value,needle", [
    ("optim.lr", -1.0, "optim.lr=-1.0"),
    ("masking.high", 1.5, "masking.high=1.5"),
    ("masking.low", -0.1, "masking.low=-0.1"),
    ("batch_size", 12, "batch_size=12"),          # not divisible by 8 devices
    ("num_mask_groups", 5, "batch_size=16"),      # not divisible by 5 mask groups
    ("model.size", "XL", "model.size='XL'"),
    ("data.source", "arrayrecord", "data.path"),
])
def test_invalid_config_fails_before_compiling(tmp_path, monkeypatch, field, value, needle):
    def no_compile(*a, **k):
        raise AssertionError("compiled before the config was checked")
    monkeypatch.setattr(jax, "jit", no_compile)
    with pytest.raises(ValueError) as err:
        train.train_and_evaluate(small_config(**{field: value}), str(tmp_path))
    assert needle in str(err.value)
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path)
    train.train_and_evaluate(small_config(stop_at_step=3), workdir)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train.train_and_evaluate(small_config(**{"optim.lr": 1e30, "optim.warmup_steps": 0}), workdir)
    assert Checkpointer(workdir).latest_step() == 3
    _, state = final_params(workdir, None)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def _loss_and_grads_setup(**arch_changes):
    import flax.linen as nn
    import jax.numpy as jnp
    from dream_jax.data import pipeline
    from dream_jax.data.synthetic import SyntheticWorld
    from dream_jax.data.tokenizers import train_caption_bpe
    from dream_jax.models.build import build_model
    from dream_jax.models.vae import make_image_tokenizer
    from dream_jax.objectives import masking

    cfg = small_config(**{"masking.kind": "fixed", "masking.ratio": 0.6})
    cfg.model.overrides = dict(cfg.model.overrides, **arch_changes)
    tok = train_caption_bpe(SyntheticWorld(16, "train").captions(500), vocab_size=cfg.data.text_vocab_size)
    image_tokenizer = make_image_tokenizer(cfg)
    model = build_model(cfg, tok, image_tokenizer)
    variables = nn.unbox(model.init({"params": jax.random.key(0)}, *train.dummy_inputs(model.arch, 2),
                                    method=train.DreamModel.init_all))
    # Move every weight off its initial value (the diffusion head starts at zero output).
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    batch = next(pipeline.make_train_iterator(cfg, tok))
    tokens = image_tokenizer.encode(jnp.asarray(batch["image"]))
    b, n = tokens.shape[:2]
    ratios = jnp.linspace(0.3, 0.9, b)  # some rows gated out of each loss
    masked = masking.mask_from_orders(masking.random_orders(jax.random.key(1), b, n), masking.num_masked(ratios, n))
    inputs = (tokens, jnp.asarray(batch["clip_tokens"]), jnp.asarray(batch["gen_tokens"]), masked,
              masking.gen_active(ratios), masking.clip_active(ratios))
    rngs = {"diffusion": jax.random.key(7), "dropout": jax.random.key(8)}
    noise = train.draw_diffusion_noise(jax.random.key(9), b, n, model.arch.diffusion_batch_mul,
                                       model.arch.token_dim, model.arch.diffusion_steps)
    return model, params, variables["batch_stats"], inputs, (noise, rngs)


@pytest.mark.parametrize("variant", ["accum2", "accum4", "remat"])
def test_grad_accumulation_and_remat_leave_loss_and_grads_unchanged(variant):
    model, params, stats, inputs, rngs = _loss_and_grads_setup()
    noise, rngs = rngs
    ref = jax.jit(lambda p: train.loss_and_grads(model, 1, p, stats, inputs, noise, rngs))(params)
    if variant == "remat":
        model, _, _, _, _ = _loss_and_grads_setup(remat=True)
        out = jax.jit(lambda p: train.loss_and_grads(model, 1, p, stats, inputs, noise, rngs))(params)
    else:
        steps = int(variant[-1])
        out = jax.jit(lambda p: train.loss_and_grads(model, steps, p, stats, inputs, noise, rngs))(params)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-5)
    for key in ("gen_loss", "clip_loss"):
        np.testing.assert_allclose(out[1][key], ref[1][key], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[2]), jax.tree.leaves(ref[2])):   # BatchNorm statistics
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    flat_ref = np.concatenate([np.ravel(x) for x in jax.tree.leaves(ref[3])])
    flat_out = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out[3])])
    assert np.abs(flat_ref).max() > 0
    np.testing.assert_allclose(flat_out, flat_ref, atol=1e-6 + 1e-4 * np.abs(flat_ref).max())


def test_scanned_layers_equal_unrolled_layers():
    """scan_layers=True (with remat inside the scan) computes the same loss, BN statistics and
    gradients as the unrolled blocks, once the weights are stacked; the decay mask agrees."""
    from dream_jax.models import layers
    model, params, stats, inputs, rngs = _loss_and_grads_setup()
    noise, rngs = rngs
    ref = jax.jit(lambda p: train.loss_and_grads(model, 1, p, stats, inputs, noise, rngs))(params)
    scanned_model, scanned_init, _, _, _ = _loss_and_grads_setup(scan_layers=True, remat=True)
    scanned = layers.scan_param_tree(params)
    assert jax.tree.structure(scanned) == jax.tree.structure(scanned_init)
    assert jax.tree.map(np.shape, scanned) == jax.tree.map(np.shape, scanned_init)
    out = jax.jit(lambda p: train.loss_and_grads(scanned_model, 1, p, stats, inputs, noise, rngs))(scanned)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[2]), jax.tree.leaves(ref[2])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    ref_grads = layers.scan_param_tree(ref[3])
    scale = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(ref_grads))
    for a, b in zip(jax.tree.leaves(out[3]), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6 + 1e-4 * scale)
    # A stacked bias is still a bias: the decay mask of the scanned tree is the stacked mask.
    mask = jax.tree.leaves(train.weight_decay_mask(scanned))
    ref_mask = [bool(np.all(m)) for m in jax.tree.leaves(layers.scan_param_tree(train.weight_decay_mask(params)))]
    assert mask == ref_mask and any(mask) and not all(mask)
