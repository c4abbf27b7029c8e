"""Tests for dream_jax.objectives: masking (warmup, ratios, orders, gating,
caption dropout) and the gated CLIP loss."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dream_jax.objectives import contrastive, masking


# ---------------------------------------------------------------------------
# Masking-ratio distribution vs. the paper-notes table (§3)
# ---------------------------------------------------------------------------

PAPER_TABLE = {  # centre μ: (mean r, P(clip active: r <= 0.75), P(gen active: r >= 0.5))
    0.0: (0.34, 0.93, 0.25),
    0.5: (0.50, 0.79, 0.50),
    1.0: (0.66, 0.57, 0.75),
}


@pytest.mark.parametrize("centre", sorted(PAPER_TABLE))
def test_truncated_gaussian_matches_paper_table(centre):
    n = 250_000
    r = np.asarray(masking.sample_mask_ratios(jax.random.key(int(centre * 10)), n, centre, 0.45, 0.0, 1.0))
    assert r.shape == (n,) and r.dtype == np.float32
    assert r.min() >= 0.0 and r.max() <= 1.0
    mean = r.mean()
    p_clip = np.asarray(masking.clip_active(r)).mean()
    p_gen = np.asarray(masking.gen_active(r)).mean()
    want = PAPER_TABLE[centre]
    print(f"centre={centre}: mean={mean:.4f} P(clip)={p_clip:.4f} P(gen)={p_gen:.4f}")
    np.testing.assert_allclose([mean, p_clip, p_gen], want, atol=0.02)


def test_fluid_ratios_in_range_and_dispatch():
    cfg = masking.masking_config("fluid")
    r = np.asarray(masking.mask_ratios_for_step(jax.random.key(1), cfg, 0.3, 50_000))
    assert r.min() >= 0.7 and r.max() <= 1.0
    # Mean of N(1, .25) truncated to [.7, 1]: 1 - .25*(phi(0)-phi(-1.2))/(Phi(0)-Phi(-1.2)).
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    want = 1 - 0.25 * (phi(0) - phi(-1.2)) / (Phi(0) - Phi(-1.2))
    assert abs(r.mean() - want) < 0.005


def test_dispatcher_kinds():
    key = jax.random.key(0)
    assert np.all(np.asarray(masking.mask_ratios_for_step(key, {"kind": "none"}, 0.5, 8)) == 0)
    r = masking.mask_ratios_for_step(key, {"kind": "fixed", "ratio": 0.3}, 0.5, 8)
    np.testing.assert_allclose(np.asarray(r), 0.3)
    # warmup: at progress 0 the centre is 0, at the end it is 1 -> means differ as in the table;
    # works with a traced progress inside jit.
    cfg = ml_collections.ConfigDict(dict(kind="warmup", schedule="linear", warmup_fraction=0.75,
                                         centre_start=0.0, centre_end=1.0, sigma=0.45,
                                         low=0.0, high=1.0))
    f = jax.jit(lambda k, p: masking.mask_ratios_for_step(k, cfg, p, 40_000))
    m0 = float(f(key, jnp.float32(0.0)).mean())
    m1 = float(f(key, jnp.float32(0.9)).mean())
    assert abs(m0 - 0.337) < 0.01 and abs(m1 - 0.663) < 0.01
    # A narrow sigma override around the centre: centre at progress 0.375 is 0.5.
    cfg2 = dict(kind="warmup", sigma=0.01)
    r = np.asarray(masking.mask_ratios_for_step(key, cfg2, 0.375, 1000))
    assert abs(r.mean() - 0.5) < 0.002


def test_masking_centre_values():
    ps = [0.0, 0.375, 0.75, 1.0]
    lin = [masking.masking_centre(p, "linear") for p in ps]
    cos = [masking.masking_centre(p, "cosine") for p in ps]
    np.testing.assert_allclose(lin, [0.0, 0.5, 1.0, 1.0], atol=1e-7)
    np.testing.assert_allclose(cos, [0.0, 0.5, 1.0, 1.0], atol=1e-7)
    # Off-midpoint values distinguish the shapes.
    assert masking.masking_centre(0.1875, "linear") == pytest.approx(0.25)
    assert masking.masking_centre(0.1875, "cosine") == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    # start/end and warmup_fraction 0.
    assert masking.masking_centre(0.375, "linear", 0.75, start=0.2, end=0.6) == pytest.approx(0.4)
    assert masking.masking_centre(0.0, "cosine", 0.0, start=0.2, end=0.6) == pytest.approx(0.6)
    # Inside jit with a traced scalar, same values.
    f = jax.jit(lambda p: masking.masking_centre(p, "cosine"))
    np.testing.assert_allclose([float(f(jnp.float32(p))) for p in ps + [0.1875]],
                               cos + [(1 - math.cos(math.pi / 4)) / 2], atol=1e-6)
    g = jax.jit(lambda p: masking.masking_centre(p, "linear", 0.0, 0.1, 0.9))
    assert float(g(jnp.float32(0.0))) == pytest.approx(0.9)


# ---------------------------------------------------------------------------
# Token counts, orders, masks, groups
# ---------------------------------------------------------------------------

def test_num_masked_exact():
    r = jnp.array([0.0, 0.5, 0.25, 1.0, 0.75, 0.3], jnp.float32)
    got = np.asarray(masking.num_masked(r, 256))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [0, 128, 64, 256, 192, math.ceil(256 * 0.3)])
    # Every k/256 maps back to exactly k, and a bit above k/256 gives k+1.
    k = np.arange(257)
    np.testing.assert_array_equal(np.asarray(masking.num_masked(jnp.asarray(k / 256, jnp.float32), 256)), k)
    above = np.asarray(masking.num_masked(jnp.asarray((k[:-1] + 0.01) / 256, jnp.float32), 256))
    np.testing.assert_array_equal(above, k[:-1] + 1)
    # Sequence lengths that are not powers of two: float32 k/N times N can land a hair
    # above k (e.g. N=100: 5 of the 101 values do); the epsilon keeps them at k.
    for n in (77, 100, 196, 1000):
        k = np.arange(n + 1)
        np.testing.assert_array_equal(np.asarray(masking.num_masked(jnp.asarray(k / n, jnp.float32), n)), k)


def test_orders_and_mask_from_orders():
    b, n = 6, 256
    orders = np.asarray(masking.random_orders(jax.random.key(3), b, n))
    assert orders.shape == (b, n) and orders.dtype == np.int32
    for row in orders:
        np.testing.assert_array_equal(np.sort(row), np.arange(n))
    assert len({tuple(row) for row in orders}) == b  # independent per image
    n_masked = masking.num_masked(jnp.array([0.0, 0.25, 0.5, 0.75, 1.0, 0.3]), n)
    mask = np.asarray(masking.mask_from_orders(jnp.asarray(orders), n_masked))
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask.sum(1), np.asarray(n_masked))
    for i in range(b):  # MAR convention: the first n_masked entries of the order are masked
        k = int(n_masked[i])
        assert mask[i, orders[i, :k]].all() and not mask[i, orders[i, k:]].any()
    # jit-friendly with traced counts.
    mask_j = jax.jit(masking.mask_from_orders)(jnp.asarray(orders), n_masked)
    np.testing.assert_array_equal(np.asarray(mask_j), mask)


def test_expand_groups_and_gating():
    ratios = jnp.array([0.1, 0.6, 0.8, 0.75])
    per = np.asarray(masking.expand_groups(ratios, 8))
    np.testing.assert_allclose(per, [0.1, 0.1, 0.6, 0.6, 0.8, 0.8, 0.75, 0.75])
    np.testing.assert_array_equal(np.asarray(masking.clip_active(ratios)), [True, True, False, True])
    np.testing.assert_array_equal(np.asarray(masking.gen_active(ratios)), [False, True, True, True])
    np.testing.assert_array_equal(np.asarray(masking.gen_active(jnp.array([0.5, 0.49]))), [True, False])


# ---------------------------------------------------------------------------
# Caption dropout
# ---------------------------------------------------------------------------

def test_drop_captions():
    b, l = 20_000, 8
    gen = jax.random.randint(jax.random.key(5), (b, l), 1, 1000, jnp.int32)
    empty = jnp.array([0, 1, 2, 3, 4, 5, 6, 7], jnp.int32) + 2000  # not in gen's range
    out, dropped = masking.drop_captions(jax.random.key(6), gen, empty, 0.1)
    out, dropped, gen = np.asarray(out), np.asarray(dropped), np.asarray(gen)
    assert abs(dropped.mean() - 0.1) < 0.01
    np.testing.assert_array_equal(out[dropped], np.broadcast_to(np.asarray(empty), (dropped.sum(), l)))
    np.testing.assert_array_equal(out[~dropped], gen[~dropped])
    # prob 0 / 1 extremes.
    _, d0 = masking.drop_captions(jax.random.key(7), gen[:100], empty, 0.0)
    _, d1 = masking.drop_captions(jax.random.key(7), gen[:100], empty, 1.0)
    assert not np.asarray(d0).any() and np.asarray(d1).all()


# ---------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------

def test_bad_arguments_name_the_value():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"1\.5"):
        masking.sample_mask_ratios(key, 4, 0.5, 0.45, 0.0, 1.5)
    with pytest.raises(ValueError, match=r"-1"):
        masking.sample_mask_ratios(key, 4, 0.5, -1.0)
    with pytest.raises(ValueError, match=r"0\.8.*0\.7"):
        masking.sample_mask_ratios(key, 4, 0.5, 0.45, 0.8, 0.7)
    with pytest.raises(ValueError, match=r"10.*3"):
        masking.expand_groups(jnp.zeros(3), 10)
    with pytest.raises(ValueError, match="foo"):
        masking.mask_ratios_for_step(key, {"kind": "foo"}, 0.0, 4)
    with pytest.raises(ValueError, match="foo"):
        masking.masking_config("foo")
    with pytest.raises(ValueError, match="bar"):
        masking.masking_centre(0.5, kind="bar")
    with pytest.raises(ValueError, match=r"1\.5"):
        masking.mask_ratios_for_step(key, {"kind": "warmup", "high": 1.5}, 0.0, 4)


# ---------------------------------------------------------------------------
# Gated CLIP loss
# ---------------------------------------------------------------------------

def _np_logsumexp(x):
    m = max(x)
    return m + math.log(sum(math.exp(v - m) for v in x))


def reference_clip_loss(img, txt, logit_scale, valid):
    """Float64 NumPy reference of the documented gating definition (loops on purpose)."""
    img = np.asarray(img, np.float64)
    txt = np.asarray(txt, np.float64)
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    s = math.exp(float(logit_scale))
    b = img.shape[0]
    V = [i for i in range(b) if valid[i]]
    if not V:
        return 0.0
    i2t = []
    for i in V:  # query image i, candidates all texts
        row = [s * float(img[i] @ txt[j]) for j in range(b)]
        i2t.append(_np_logsumexp(row) - row[i])
    t2i = []
    for j in V:  # query text j, candidates valid images only
        row = {i: s * float(txt[j] @ img[i]) for i in V}
        t2i.append(_np_logsumexp(list(row.values())) - row[j])
    return 0.5 * (np.mean(i2t) + np.mean(t2i))


def _embs(seed, b=12, d=16, dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(seed))
    img = jax.random.normal(k1, (b, d), dtype)
    txt = jax.random.normal(k2, (b, d), dtype) + 0.5 * img  # correlated pairs
    return img, txt


def test_clip_loss_matches_reference_with_gating():
    img, txt = _embs(0)
    valid = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0], bool)
    for logit_scale in (math.log(1 / 0.07), 0.5):
        loss, m = contrastive.clip_loss(img, txt, logit_scale, jnp.asarray(valid))
        want = reference_clip_loss(img, txt, logit_scale, valid)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-5)
        assert int(m["num_valid"]) == valid.sum()
    # The gated loss differs from the ungated one (the gating has an effect).
    full, _ = contrastive.clip_loss(img, txt, 0.5)
    assert abs(float(full) - float(loss)) > 1e-3
    # bf16 inputs are computed in f32 and land close to the reference.
    loss_bf, _ = contrastive.clip_loss(img.astype(jnp.bfloat16), txt.astype(jnp.bfloat16), 0.5, valid)
    assert loss_bf.dtype == jnp.float32
    want_bf = reference_clip_loss(np.asarray(img.astype(jnp.bfloat16).astype(jnp.float32)),
                                  np.asarray(txt.astype(jnp.bfloat16).astype(jnp.float32)), 0.5, valid)
    np.testing.assert_allclose(float(loss_bf), want_bf, rtol=1e-5, atol=1e-5)


def test_clip_loss_all_valid_is_standard_clip():
    img, txt = _embs(1)
    ls = math.log(1 / 0.07)
    loss, m = contrastive.clip_loss(img, txt, ls, jnp.ones(12, bool))
    loss_none, _ = contrastive.clip_loss(img, txt, ls)
    a = np.asarray(img, np.float64)
    t = np.asarray(txt, np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    logits = math.exp(ls) * a @ t.T

    def ce(lg):
        lg = lg - lg.max(1, keepdims=True)
        return np.mean(np.log(np.exp(lg).sum(1)) - np.diag(lg))

    want = 0.5 * (ce(logits) + ce(logits.T))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(loss_none), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["i2t_acc"]), np.mean(logits.argmax(1) == np.arange(12)))
    np.testing.assert_allclose(float(m["t2i_acc"]), np.mean(logits.T.argmax(1) == np.arange(12)))


def test_clip_loss_gated_examples_get_zero_gradient():
    img, txt = _embs(2)
    valid = jnp.array([1, 1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 1], bool)
    f = jax.jit(lambda i, t, s: contrastive.clip_loss(i, t, s, valid)[0])
    gi, gt, gs = jax.grad(f, argnums=(0, 1, 2))(img, txt, 1.0)
    gi = np.asarray(gi)
    inv = ~np.asarray(valid)
    assert np.all(gi[inv] == 0.0)
    assert np.all(np.abs(gi[~inv]).sum(1) > 0)
    assert np.all(np.abs(np.asarray(gt)).sum(1) > 0)  # every text is still a candidate
    assert np.isfinite(float(gs))
    # Changing an invalid image's embedding does not change the loss.
    img2 = img.at[2].set(100.0 * jax.random.normal(jax.random.key(9), (16,))).at[10].set(0.0)
    np.testing.assert_array_equal(np.asarray(f(img, txt, 1.0)), np.asarray(f(img2, txt, 1.0)))
    gi2 = np.asarray(jax.grad(f)(img2, txt, 1.0))
    assert np.all(np.isfinite(gi2)) and np.all(gi2[inv] == 0.0)
    # ...but changing a valid one does.
    img3 = img.at[3].set(jax.random.normal(jax.random.key(10), (16,)))
    assert float(f(img3, txt, 1.0)) != float(f(img, txt, 1.0))


def test_clip_loss_all_invalid_is_zero_with_zero_grads():
    img, txt = _embs(3)
    valid = jnp.zeros(12, bool)
    f = lambda i, t, s: contrastive.clip_loss(i, t, s, valid)  # noqa: E731
    (loss, m), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(img, txt, 2.0)
    assert float(loss) == 0.0 and int(m["num_valid"]) == 0
    for g in grads:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.all(g == 0.0)
    assert np.isfinite(float(m["i2t_acc"])) and np.isfinite(float(m["t2i_acc"]))


def test_clip_loss_single_valid_example():
    # One valid pair: its t->i row has only itself as candidate (CE 0); i->t sees all texts.
    img, txt = _embs(4, b=5)
    valid = np.array([0, 0, 1, 0, 0], bool)
    loss, m = contrastive.clip_loss(img, txt, 0.0, jnp.asarray(valid))
    np.testing.assert_allclose(float(loss), reference_clip_loss(img, txt, 0.0, valid), rtol=1e-5)
    assert float(m["t2i_acc"]) == 1.0


def test_clip_loss_global_batch_sharded_over_devices():
    # The batch sharded over the 8 fake devices gives the same (global) loss as on one device.
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    n_dev = len(jax.devices())
    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(AxisType.Auto,))
    img, txt = _embs(5, b=2 * n_dev)
    ratios = jnp.linspace(0.0, 1.0, n_dev)                      # one mask group per device
    valid = masking.clip_active(masking.expand_groups(ratios, 2 * n_dev))
    shard = NamedSharding(mesh, P("data"))
    img_s, txt_s, valid_s = (jax.device_put(x, shard) for x in (img, txt, valid))
    loss = jax.jit(lambda i, t, v: contrastive.clip_loss(i, t, 1.0, v)[0])(img_s, txt_s, valid_s)
    want = reference_clip_loss(img, txt, 1.0, np.asarray(valid))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
