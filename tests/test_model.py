"""DreamModel: sizes, masking equivalence, logical names, gradients, argument checks."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dream_jax.models import param_count
from dream_jax.models.dream import DreamModel
from dream_jax.models.sizes import PAPER_TOTALS, make_arch

TINY = dict(seq_len=16, token_dim=12, vocab_size=64, context_length=12, eot_id=2,
            gen_text="learned", gen_vocab_size=64, gen_feature_dim=32, gen_max_length=12,
            width=32, depth=2, num_heads=4, mlp_dim=64, buffer_size=4, aligner_depth=1,
            text_width=32, text_depth=1, text_heads=2, head_width=32, head_depth=2,
            contrastive_hidden=32, embed_dim=16)
B = 8


def tiny_inputs(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.normal(size=(B, TINY["seq_len"], TINY["token_dim"])), jnp.float32)
    clip = rng.integers(3, 64, size=(B, TINY["context_length"]))
    clip[:, 0] = 1
    clip[np.arange(B), rng.integers(2, TINY["context_length"], size=B)] = TINY["eot_id"]
    gen = rng.integers(0, 64, size=(B, TINY["gen_max_length"]))
    return tokens, jnp.asarray(clip, jnp.int32), jnp.asarray(gen, jnp.int32)


def init_tiny(gen_weight=1.0, clip_weight=0.005, **overrides):
    arch = make_arch("tiny", dict(TINY, **overrides))
    model = DreamModel(arch, gen_weight=gen_weight, clip_weight=clip_weight)
    tokens, clip, gen = tiny_inputs()
    variables = model.init({"params": jax.random.key(0)}, tokens, clip, gen, method=DreamModel.init_all)
    return model, variables


@pytest.mark.parametrize("size", ["B", "L", "H", "G"])
def test_parameter_counts_match_paper(size):
    counts = param_count.count_by_component(make_arch(size))
    assert abs(counts["total"] / PAPER_TOTALS[size] - 1) < 0.02, counts
    if size == "L":  # the per-component figures paper-notes gives for L
        for name, millions in [("encoder", 202), ("decoder", 269), ("aligner", 76),
                               ("diffusion_head", 20), ("text_tower", 63)]:
            assert abs(counts[name] / (millions * 1e6) - 1) < 0.02, (name, counts[name])


def test_every_parameter_has_logical_axis_names():
    _, variables = init_tiny()
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)


def test_masked_encoder_equals_dropping_masked_tokens():
    model, variables = init_tiny()
    params = nn.unbox(variables)
    tokens, _, _ = tiny_inputs(1)
    n = TINY["seq_len"]
    rng = np.random.default_rng(3)
    keep = 6  # same count per row so the dropped version has a static shape
    kept_pos = np.stack([np.sort(rng.permutation(n)[:keep]) for _ in range(B)])
    visible = np.zeros((B, n), bool)
    visible[np.arange(B)[:, None], kept_pos] = True
    positions = jnp.broadcast_to(jnp.arange(n), (B, n))

    full, _ = model.apply(params, tokens, positions, jnp.asarray(visible), method=DreamModel.encode_image)
    # Garbage in the masked slots must not matter.
    noisy = jnp.where(jnp.asarray(visible)[..., None], tokens, 1e3)
    full_noisy, _ = model.apply(params, noisy, positions, jnp.asarray(visible), method=DreamModel.encode_image)
    # The dropped computation: only the visible tokens, with their positions.
    gathered = jnp.take_along_axis(tokens, jnp.asarray(kept_pos)[..., None], axis=1)
    dropped, _ = model.apply(params, gathered, jnp.asarray(kept_pos), jnp.ones((B, keep), bool),
                             method=DreamModel.encode_image)

    buf = TINY["buffer_size"]
    full_visible = np.take_along_axis(np.asarray(full[:, buf:]), kept_pos[..., None], axis=1)
    np.testing.assert_allclose(full_visible, dropped[:, buf:], atol=1e-5)
    np.testing.assert_allclose(full[:, :buf], dropped[:, :buf], atol=1e-5)
    np.testing.assert_allclose(full_noisy[:, :buf], full[:, :buf], atol=1e-5)
    # Pooled image embedding agrees too (mean over buffer + visible tokens).
    emb_full = model.apply(params, tokens, jnp.asarray(visible), method=DreamModel.embed_image_tokens)
    emb_noisy = model.apply(params, noisy, jnp.asarray(visible), method=DreamModel.embed_image_tokens)
    np.testing.assert_allclose(emb_full, emb_noisy, atol=1e-5)


def _training_grads(model, params, batch_stats, masked, gen_active, clip_valid):
    tokens, clip, gen = tiny_inputs(2)

    def loss_fn(p):
        (loss, metrics), _ = model.apply({"params": p, "batch_stats": batch_stats}, tokens, clip, gen,
                                         masked, gen_active, clip_valid, train=True,
                                         rngs={"diffusion": jax.random.key(1), "dropout": jax.random.key(2)},
                                         mutable=["batch_stats"])
        return loss, metrics

    return jax.grad(loss_fn, has_aux=True)(params)


def _perturbed_params(variables):
    # The diffusion head's modulation and output layers start at zero, so at exact
    # initialisation no gradient reaches its input. Perturb every parameter slightly
    # to test the wiring rather than the initial point.
    params = nn.unbox(variables)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (1.0, 0.005)])
def test_each_loss_reaches_the_shared_encoder(weights):
    gen_w, clip_w = weights
    model, variables = init_tiny(gen_weight=gen_w, clip_weight=clip_w)
    params = _perturbed_params(variables)
    masked = jnp.asarray(np.random.default_rng(0).random((B, TINY["seq_len"])) < 0.6)
    on = jnp.ones((B,), bool)
    grads, metrics = _training_grads(model, params, nn.unbox(variables)["batch_stats"], masked, on, on)
    for v in metrics.values():
        assert np.isfinite(np.asarray(v)).all()
    enc_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["encoder"]))
    assert enc_norm > 0
    if not clip_w:
        assert "clip_loss" not in metrics
        assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads["text_tower"]))
    if not gen_w:
        assert "gen_loss" not in metrics
        assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads["decoder"]))


def test_gen_gating_zero_when_all_groups_inactive():
    model, variables = init_tiny(gen_weight=1.0, clip_weight=0.0)
    params = _perturbed_params(variables)
    masked = jnp.ones((B, TINY["seq_len"]), bool)
    off = jnp.zeros((B,), bool)
    grads, metrics = _training_grads(model, params, nn.unbox(variables)["batch_stats"], masked, off, off)
    assert float(metrics["gen_loss"]) == 0.0
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads))


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="'XL'"):
        make_arch("XL")
    with pytest.raises(ValueError, match="num_heads=5"):
        make_arch("tiny", dict(TINY, num_heads=5))
    with pytest.raises(ValueError, match="unknown model field"):
        make_arch("tiny", {"widht": 3})
    with pytest.raises(ValueError, match="pos_init='learned'"):
        make_arch("tiny", dict(TINY, pos_init="learned"))
    with pytest.raises(ValueError, match="square token grid, got seq_len=12"):
        make_arch("tiny", dict(TINY, seq_len=12, pos_init="sincos"))
    with pytest.raises(ValueError, match="width divisible by 4, got width=34"):
        make_arch("tiny", dict(TINY, width=34, num_heads=2, pos_init="sincos"))
    model, variables = init_tiny()
    params = nn.unbox(variables)
    tokens, _, _ = tiny_inputs()
    positions = jnp.zeros((B, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"positions shape \(8, 5\)"):
        model.apply(params, tokens, positions, jnp.ones((B, TINY["seq_len"]), bool),
                    method=DreamModel.encode_image)


def test_sincos_position_init():
    """pos_init='sincos': every image position table starts as the 2-D sin-cos grid (buffer
    rows at zero), differs from MAR's N(0, 0.02) start; the tables are ordinary parameters (trained)."""
    from dream_jax.models.layers import sincos_2d
    _, variables = init_tiny(pos_init="sincos")
    params = nn.unbox(variables)["params"]
    grid = sincos_2d(4, TINY["width"])
    # Neighbouring grid cells are more alike than distant ones (what the init is for).
    sim = grid @ grid.T
    assert sim[0, 1] > sim[0, 15]
    tables = {"encoder": params["encoder"]["pos_embed"][0], "decoder": params["decoder"]["pos_embed"][0],
              "diffusion": params["decoder"]["diffusion_pos_embed"][0]}
    for name, table in tables.items():
        table = np.asarray(table)
        np.testing.assert_allclose(table[-16:], grid, atol=1e-6, err_msg=name)
        assert not np.any(table[:-16]), name
    _, normal = init_tiny()
    assert np.asarray(nn.unbox(normal)["params"]["encoder"]["pos_embed"]).std() < 0.05


def test_dropout_keeps_the_right_fraction_with_independent_halves():
    from dream_jax.models.layers import Dropout
    x = jnp.ones((256, 257))            # odd last axis: the last draw's high half goes unused
    drop = Dropout(0.25)
    assert drop.apply({}, x, deterministic=True) is x
    y = np.asarray(drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    kept = y != 0
    np.testing.assert_allclose(y[kept], 4.0 / 3.0, rtol=1e-6)      # inverted scaling, exact rate
    assert abs(kept.mean() - 0.75) < 0.01                           # ± 6 standard deviations
    # The low and high halves of one draw land in columns 2j and 2j + 1: they must not agree
    # more than chance (a shared bit pattern would show as correlation).
    lo, hi = kept[:, 0:256:2].astype(float), kept[:, 1:256:2].astype(float)
    assert abs(np.corrcoef(lo.ravel(), hi.ravel())[0, 1]) < 0.03
    # Both halves keep 0.75 (neither is biased).
    assert abs(lo.mean() - 0.75) < 0.015 and abs(hi.mean() - 0.75) < 0.015
    other = np.asarray(drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}))
    assert (other != y).any()
    np.testing.assert_array_equal(Dropout(1.0).apply({}, x, deterministic=False,
                                                     rngs={"dropout": jax.random.key(0)}), 0.0)


def test_dropout_on_a_sharded_last_axis_needs_no_communication():
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dream_jax.models.layers import Dropout
    mesh = jax.make_mesh((len(jax.devices()),), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P(None, "tensor"))
    x = jax.device_put(jnp.ones((4, 16 * len(jax.devices()))), sharding)
    fn = jax.jit(lambda x, key: Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": key}),
                 out_shardings=sharding)
    hlo = fn.lower(x, jax.random.key(0)).compile().as_text()
    for collective in ("all-to-all", "collective-permute", "all-gather", "all-reduce"):
        assert collective not in hlo, collective
