"""The evaluation suite: FID maths, the Inception port (parity with torch-fidelity), probes,
and every evaluator end to end on a tiny trained workdir."""
import importlib
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

from dream_jax.evals import datasets, fid, inception, probes, report, suite


# =============================================================================================
# torch-fidelity's InceptionV3 (its package __init__ imports torchvision, which cannot be
# installed here; the Inception module itself does not need it).
# =============================================================================================
def _import_torch_fidelity_inception():
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    try:
        import torch_fidelity  # noqa: F401
    except ModuleNotFoundError as e:
        if "torch_fidelity" in str(e):
            return None
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or not spec.submodule_search_locations:
            return None
        for name in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[name]
        pkg = types.ModuleType("torch_fidelity")      # the package without its __init__
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = pkg
    try:
        return (importlib.import_module("torch_fidelity.feature_extractor_inceptionv3"),
                importlib.import_module("torch_fidelity.interpolate_compat_tensorflow"))
    except ImportError:
        return None


TORCH_FIDELITY = _import_torch_fidelity_inception()
requires_torch_fidelity = pytest.mark.skipif(TORCH_FIDELITY is None, reason="torch_fidelity is not importable")


# =============================================================================================
# FID maths.
# =============================================================================================
def _random_spd(rng, d, rank=None, scale=1.0):
    a = rng.normal(size=(d, rank or d)) * scale
    return a @ a.T


def _denman_beavers_sqrt(a, iters=100):
    """Reference principal square root (no eigendecomposition)."""
    y, z = np.array(a, np.float64), np.eye(len(a))
    for _ in range(iters):
        y, z = 0.5 * (y + np.linalg.inv(z)), 0.5 * (z + np.linalg.inv(y))
    return y


def _reference_fid(mu1, s1, mu2, s2):
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(_denman_beavers_sqrt(s1 @ s2))


def test_fid_of_identical_sets_is_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 24)) * 3 + 7
    assert abs(fid.fid_from_features(x, x)) < 1e-8
    # Rank-deficient covariance (fewer samples than dimensions) and a large offset.
    y = rng.normal(size=(10, 32)) + 1e4
    mu, sigma = fid.statistics(y)
    assert np.linalg.matrix_rank(sigma) < 32
    assert fid.frechet_distance(mu, sigma, mu, sigma) < 1e-6 * np.trace(sigma)
    assert fid.fid_from_features(x, x + 1.0) == pytest.approx(24.0, rel=1e-9)   # pure mean shift


def test_fid_closed_form_gaussians():
    d = 6
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    # Isotropic: |dmu|^2 + d (a - b)^2.
    a, b = 1.5, 0.7
    assert fid.frechet_distance(mu1, a**2 * np.eye(d), mu2, b**2 * np.eye(d)) == pytest.approx(
        d * 0.25 + d * (a - b) ** 2, rel=1e-12)
    # Commuting (diagonal) covariances: sum (sqrt(a_i) - sqrt(b_i))^2.
    va, vb = np.arange(1.0, d + 1), np.linspace(0.1, 3.0, d)
    assert fid.frechet_distance(mu1, np.diag(va), mu1, np.diag(vb)) == pytest.approx(
        np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2), rel=1e-12)
    # Same eigenvectors (rotated diagonal): the rotation does not change the distance.
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(d, d)))
    assert fid.frechet_distance(mu1, q @ np.diag(va) @ q.T, mu2, q @ np.diag(vb) @ q.T) == pytest.approx(
        d * 0.25 + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2), rel=1e-10)
    # From samples: the estimate converges to the closed form.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40000, 4)) * a
    y = rng.normal(size=(40000, 4)) * b + 0.5
    assert fid.fid_from_features(x, y) == pytest.approx(4 * 0.25 + 4 * (a - b) ** 2, rel=0.03)


@pytest.mark.parametrize("d", [2, 5, 8])
def test_fid_matches_numpy_reference_on_small_dims(d):
    rng = np.random.default_rng(d)
    for trial in range(4):
        s1 = _random_spd(rng, d) + 1e-3 * np.eye(d)
        s2 = _random_spd(rng, d, scale=rng.uniform(0.1, 3)) + 1e-3 * np.eye(d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        ref = _reference_fid(mu1, s1, mu2, s2)
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8, abs=1e-9)
        # The eig-based general square root agrees with Denman–Beavers and squares back.
        r = fid.sqrtm(s1 @ s2)
        np.testing.assert_allclose(r, _denman_beavers_sqrt(s1 @ s2), rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(r @ r, s1 @ s2, rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(fid.sqrtm_psd(s1) @ fid.sqrtm_psd(s1), s1, rtol=1e-9, atol=1e-10)
    # Low-rank shortcut (fewer samples than dimensions) and a precomputed reference root.
    x = rng.normal(size=(max(d - 1, 2), d)) * 2 + 1
    mu2, s2 = fid.statistics(x)
    ref = fid.Reference(mu1, s1, 100)
    full = fid.frechet_distance(mu1, s1, mu2, s2)
    # (The full path takes square roots of rounding-level eigenvalues of the rank-deficient
    # product, hence the looser tolerance; the n×n path avoids them.)
    assert ref.fid_to_features(x) == pytest.approx(full, rel=1e-6)
    # Same formula; the statistics differ only in summation order (fid.statistics against the
    # streaming GaussianStats), which the cancelling traces amplify: 2e-9 relative on an AMD
    # EPYC (session 5), below 1e-12 on the other machine kind.
    assert fid.frechet_distance(mu1, s1, mu2, s2, sqrt_sigma1=ref.sqrt_sigma,
                                centred2=x - mu2) == pytest.approx(ref.fid_to_features(x), rel=1e-8)
    try:
        import scipy.linalg
    except ImportError:
        return
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    np.testing.assert_allclose(fid.trace_sqrt_product(s1, s2),
                               np.trace(scipy.linalg.sqrtm(s1 @ s2)).real, rtol=1e-8)


def test_sqrtm_imaginary_parts():
    # A PSD product whose eig gives complex-conjugate rounding noise → real result.
    rng = np.random.default_rng(3)
    s1, s2 = _random_spd(rng, 6, rank=3), _random_spd(rng, 6, rank=3)
    r = fid.sqrtm(s1 @ s2)
    assert r.dtype == np.float64
    # A negative eigenvalue (not a product of PSD matrices): the root is complex → clear error.
    with pytest.raises(ValueError, match="imaginary"):
        fid.sqrtm(np.array([[-1.0, 0.3], [0.0, 2.0]]))


def test_streaming_statistics_and_cache(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, 7)) * 0.01 + 1e5        # large mean, tiny variance
    stats = fid.GaussianStats()
    for lo in range(0, 1000, 128):
        stats.update(x[lo:lo + 128])
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x - 1e5, rowvar=False), rtol=1e-6, atol=1e-12)

    calls = []

    def extractor(images):
        calls.append(len(images))
        return images.reshape(len(images), -1)[:, :5].astype(np.float64)

    extractor.fingerprint = "fake"
    images = rng.integers(0, 256, size=(40, 4, 4, 3), dtype=np.uint8)
    path = str(tmp_path / "ref.npz")
    mu, sigma, n = fid.reference_statistics(images, extractor, path, key={"a": 1}, batch_size=16)
    assert n == 40 and calls == [16, 16, 8]
    mu2, sigma2, _ = fid.reference_statistics(images, extractor, path, key={"a": 1})
    assert calls == [16, 16, 8]                           # cached
    np.testing.assert_array_equal(mu, mu2)
    fid.reference_statistics(images, extractor, path, key={"a": 2}, batch_size=64)
    assert calls[-1] == 40                                # another key → recomputed
    # The reference's square root is computed once and kept in the cache file; FID against
    # it (full-rank reference, low-rank or full generated sets) matches the plain formula.
    ref = fid.reference_statistics(images, extractor, path, key={"a": 2})
    assert ref.centred is None and "sqrt_sigma" not in np.load(path).files
    for gen in (images[:3], images[::-1]):
        value = fid.fid_against(ref, gen, extractor)
        assert value == pytest.approx(fid.fid_from_features(extractor(images), extractor(gen)), rel=1e-6)
    assert "sqrt_sigma" in np.load(path).files
    assert fid.fid_against(fid.reference_statistics(images, extractor, path, key={"a": 2}),
                           images, extractor) == pytest.approx(0.0, abs=1e-8)
    # A reference with fewer images than dimensions keeps its centred features instead.
    small = fid.reference_statistics(images[:4], extractor, str(tmp_path / "small.npz"))
    small = fid.Reference.load(str(tmp_path / "small.npz"))
    assert small.centred.shape == (4, 5)
    for gen in (images[4:7], images[4:]):
        assert fid.fid_against(small, gen, extractor) == pytest.approx(
            fid.fid_from_features(extractor(images[:4]), extractor(gen)), rel=1e-6)
    assert fid.fid_against(small, images[:4], extractor) == pytest.approx(0.0, abs=1e-8)
    # From a folder of images (sorted paths, centre-cropped/resized).
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    _, _, n = fid.reference_statistics(str(folder), extractor, None, image_size=4, batch_size=2)
    assert n == 5


# =============================================================================================
# Inception.
# =============================================================================================
@pytest.fixture(scope="module")
def torch_fidelity_weights(tmp_path_factory):
    """torch-fidelity's FeatureExtractorInceptionV3 with random weights saved to a file.

    BatchNorm statistics are calibrated on random images (momentum 1 in train mode) so that
    activations stay O(1) through the whole network and the comparison is not vacuous."""
    import torch

    fe_mod, _ = TORCH_FIDELITY
    FE = fe_mod.FeatureExtractorInceptionV3
    original = FE.load_state_dict
    FE.load_state_dict = lambda self, *a, **k: None          # skip the weight download
    saved_url = fe_mod.load_state_dict_from_url
    fe_mod.load_state_dict_from_url = lambda *a, **k: None
    try:
        net = FE("inception-v3-compat", ["2048"])
    finally:
        FE.load_state_dict = original
        fe_mod.load_state_dict_from_url = saved_url
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0.0, 0.2, generator=g)
            m.momentum = 1.0
    net.fc.bias.data.normal_(0.0, 0.1, generator=g)
    net.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (4, 3, 64, 48), generator=g, dtype=torch.uint8))
    path = str(tmp_path_factory.mktemp("inception") / "weights.pth")
    torch.save(net.state_dict(), path)
    legacy = path.replace(".pth", "_legacy.pth")
    torch.save(net.state_dict(), legacy, _use_new_zipfile_serialization=False)
    return path, legacy


@requires_torch_fidelity
def test_torch_state_dict_reader_matches_torch_load(torch_fidelity_weights):
    import torch

    path, legacy = torch_fidelity_weights
    ref = torch.load(path, weights_only=True)
    for p in (path, legacy):
        sd = inception.load_torch_state_dict(p)
        assert set(sd) == set(ref)
        for k, v in ref.items():
            np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)


@requires_torch_fidelity
def test_tf1_resize_matches_torch_fidelity():
    import torch

    _, interp = TORCH_FIDELITY
    rng = np.random.default_rng(5)
    for h, w in [(16, 16), (37, 53), (320, 301), (299, 299)]:
        x = rng.integers(0, 256, size=(2, h, w, 3)).astype(np.float32)
        ref = interp.interpolate_bilinear_2d_like_tensorflow1x(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), align_corners=False)
        ours = np.asarray(inception.resize_bilinear_tf1(x))
        np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)   # bit-exact here


@requires_torch_fidelity
def test_inception_matches_torch_fidelity_pool_features(torch_fidelity_weights):
    import torch

    fe_mod, _ = TORCH_FIDELITY
    path, _ = torch_fidelity_weights
    net = fe_mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits"],
                                            feature_extractor_weights_path=path)
    import jax

    # Sharded over 2 of the (fake CPU) devices; 3 images: the batch is padded to 4.
    extractor = inception.InceptionExtractor.from_file(path, batch_size=4, with_logits=True,
                                                       devices=jax.devices()[:2])
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(3, 37, 53, 3), dtype=np.uint8)
    with torch.no_grad():
        ref_pool, ref_logits = net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    out = next(extractor.batches(images))
    ref_pool, ref_logits = ref_pool.numpy(), ref_logits.numpy()
    assert out["pool"].shape == (3, 2048) and ref_pool.std() > 0.1     # non-trivial features
    diff = np.abs(out["pool"] - ref_pool).max()
    print(f"Inception pool max abs diff {diff:.2e} (feature scale {np.abs(ref_pool).max():.2f}); "
          f"logits {np.abs(out['logits'] - ref_logits).max():.2e}")
    assert diff < 1e-3
    assert np.abs(out["logits"] - ref_logits).max() < 1e-3
    np.testing.assert_allclose(extractor(images), out["pool"], atol=0)   # __call__ = batches
    # A wrong file is refused with a clear message.
    with pytest.raises(KeyError, match="Conv2d_1a_3x3"):
        inception.variables_from_torch({"fc.weight": np.zeros((1008, 2048))})


def test_inception_npz_roundtrip_and_small_input(tmp_path):
    variables = inception.init_variables(0)
    path = str(tmp_path / "w.npz")
    inception.save_variables(path, variables)
    loaded = inception.load_variables(path)
    assert inception.variables_fingerprint(loaded) == inception.variables_fingerprint(variables)
    with pytest.raises(FileNotFoundError, match="weights-inception"):
        inception.load_variables(str(tmp_path / "missing.pth"))


# =============================================================================================
# Probes.
# =============================================================================================
def _clusters(n, num_classes=5, dim=48, sep=0.6, seed=0, offset=4.0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(100).normal(size=(num_classes, dim)) * sep
    y = rng.integers(0, num_classes, n)
    return (centres[y] + rng.normal(size=(n, dim)) + offset).astype(np.float32), y


def test_few_shot_probe_recovers_labels():
    trx, try_ = _clusters(1000)
    tex, tey = _clusters(400, seed=1)
    res = probes.few_shot_eval(trx, try_, tex, tey, 5, shots=(1, 5, 25), seeds=(0, 1, 2))
    assert res["25shot"] > 0.95 and res["5shot"] > 0.85
    assert res["1shot"] < res["25shot"]                      # more shots help
    # Random labels: nothing to recover → about chance.
    shuffled = np.random.default_rng(0).permutation(try_)
    assert probes.few_shot_eval(trx, shuffled, tex, tey, 5, shots=(25,))["25shot"] < 0.5
    # The trainer's variant: one labelled set split into support pool / test halves.
    res = suite.heldout_few_shot(np.concatenate([trx, tex]), {"colour": np.concatenate([try_, tey])},
                                 tasks=("colour",), shots=(10,))
    assert res["few_shot/colour/10shot"] > 0.9
    # Sampling: k per class, labels < 0 never drawn.
    y = np.array([0, 0, 1, 1, 1, -1, 2])
    idx = probes.sample_shots(y, 2, np.random.default_rng(0))
    assert sorted(y[idx].tolist()) == [0, 0, 1, 1, 2]


def test_few_shot_regulariser_is_chosen_by_leave_one_out():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 6))
    y = rng.integers(0, 3, 20)
    t = -np.ones((20, 3))
    t[np.arange(20), y] = 1.0

    def brute_press(lam):      # refit without each example in turn
        err = 0.0
        for i in range(20):
            keep = np.arange(20) != i
            w, b = probes.ridge_fit(x[keep], y[keep], 3, lam)
            err += np.sum((t[i] - (x[i] @ w + b)) ** 2)
        return err

    grid = (1e-3, 1e-1, 1.0, 10.0, 100.0)
    assert probes.loo_l2_reg(x, y, 3, grid) == min(grid, key=brute_press)

    # The class lives in a low-variance direction next to a high-variance nuisance: a fixed
    # λ = 1 on unit-norm features shrinks it away, the leave-one-out choice keeps it.
    def data(n, seed):
        r = np.random.default_rng(seed)
        lab = r.integers(0, 2, n)
        feats = np.concatenate([r.normal(size=(n, 8)) * 3.0, (lab[:, None] * 2 - 1) * 0.3
                                + r.normal(size=(n, 2)) * 0.05], 1)
        return feats, lab
    (trx, try_), (tex, tey) = data(400, 1), data(400, 2)
    fixed = probes.few_shot_eval(trx, try_, tex, tey, 2, shots=(10,), l2_reg=1.0)["10shot"]
    chosen = probes.few_shot_eval(trx, try_, tex, tey, 2, shots=(10,))["10shot"]
    assert chosen > 0.95 and fixed < 0.85, (chosen, fixed)


def test_linear_probe_recovers_labels():
    trx, try_ = _clusters(1024)
    tex, tey = _clusters(512, seed=1)
    cfg = probes.LinearProbeConfig(epochs=30, batch_size=128, base_lr=12.8, warmup_epochs=2)
    # Two tasks trained together; one with missing labels (-1) and one impossible (random).
    rnd = np.random.default_rng(3).integers(0, 3, len(try_))
    partial = np.where(np.arange(len(try_)) % 3 == 0, -1, try_)
    res = probes.linear_probes(trx, {"a": partial, "r": rnd}, tex,
                               {"a": tey, "r": np.random.default_rng(4).integers(0, 3, len(tey))},
                               {"a": 5, "r": 3}, cfg)
    assert res["a"]["test_acc"] > 0.95, res
    assert res["r"]["test_acc"] < 0.5, res
    sgd = probes.linear_probe(trx, try_, tex, tey, 5, probes.LinearProbeConfig(
        epochs=30, batch_size=128, base_lr=0.2, warmup_epochs=2, optimizer="sgd"))
    assert sgd["test_acc"] > 0.95, sgd


def test_probe_datasets_and_pixel_baseline():
    source = [{"image": np.full((20, 30, 3), i * 10, np.uint8), "label": i % 3} for i in range(10)]
    s = datasets.source_probe_set(source, 6, 16, 3, seed=None)
    assert s["images"].shape == (6, 16, 16, 3) and s["labels"]["label"].tolist() == [0, 1, 2, 0, 1, 2]
    assert s["images"][2].mean() == 20
    syn = datasets.synthetic_probe_set(16, "heldout", 8, tasks=("colour", "count"))
    assert syn["images"].shape == (8, 16, 16, 3) and set(syn["labels"]["count"]) <= {0, 1}
    assert datasets.pixel_features(np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, 32 * 32 * 3)
    with pytest.raises(ValueError, match="unknown synthetic probe task"):
        datasets.synthetic_probe_set(16, "train", 2, tasks=("texture",))


# =============================================================================================
# Reports.
# =============================================================================================
def test_reports_json_markdown_and_plots(tmp_path):
    wd = str(tmp_path)
    report.write_step(wd, 100, {"fid/plain": 30.0, "few_shot/colour/5shot": 0.5}, {"x": 1})
    report.write_step(wd, 200, {"fid/plain": 20.0, "few_shot/colour/5shot": 0.7})
    report.write_step(wd, 200, {"fid/sad": 18.0})                  # merges into step 200
    paths = report.write_summary(wd)
    with open(paths["json"]) as f:
        data = json.load(f)
    assert data["200"] == {"fid/plain": 20.0, "few_shot/colour/5shot": 0.7, "fid/sad": 18.0}
    md = open(paths["markdown"]).read()
    assert "| fid/plain | 30.000 | 20.000 |" in md and "| fid/sad | – | 18.000 |" in md
    assert sorted(os.path.basename(p) for p in paths["plots"]) == ["few_shot.png", "fid.png"]
    assert report.plot_has_line(os.path.join(wd, "eval", "plots", "fid.png")) > 50


# =============================================================================================
# Every evaluator on a tiny trained workdir.
# =============================================================================================
@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    from dream_jax import train
    from tests.test_train import small_config

    workdir = str(tmp_path_factory.mktemp("tiny_eval"))
    cfg = small_config(total_steps=3, checkpoint_every=2, log_every=3)
    train.train_and_evaluate(cfg, workdir)
    return workdir


TINY_OPTS = dict(num_examples=64, probe_train=256, probe_test=128, probe_tasks=("colour", "shape", "count"),
                 shots=(1, 5), seeds=(0, 1), probe_epochs=4, probe_batch=64, num_generate=8,
                 sample_modes=("plain", "sad"), num_iter=4, diffusion_steps="4", sad_candidates=2,
                 gen_batch=8, cfg=2.0, inception_weights="random", inception_size=75, inception_batch=8,
                 baselines=("pixels",), batch_size=64)


def test_every_evaluator_on_tiny_workdir(tiny_workdir):
    from dream_jax import evaluate

    opts = evaluate.EvalOptions(**TINY_OPTS)
    results = evaluate.evaluate_workdir(tiny_workdir, opts, steps="latest")
    assert list(results) == [3]
    r = results[3]
    for key in ("retrieval/i2t_R@1", "retrieval/t2i_R@5", "zero_shot/colour", "zero_shot/shape",
                "zero_shot/shape/single_object", "few_shot/colour/5shot", "few_shot/colour/5shot/pixels",
                "linear_probe/count", "linear_probe/count/pixels", "fid/plain/random_inception/75px",
                "fid/sad/random_inception/75px", "clip_score/plain", "clip_score/sad", "clip_score/real",
                "compositional/plain/all/colour+shape", "compositional/sad/all/colour",
                "compositional/real/all/shape"):
        assert key in r, key
        assert np.isfinite(r[key]), key
    for k, v in r.items():
        if k.split("/")[0] in ("retrieval", "zero_shot", "few_shot", "linear_probe", "compositional"):
            assert 0.0 <= v <= 1.0, (k, v)
        if k.startswith("clip_score"):
            assert 0.0 <= v <= 100.0, (k, v)
    assert r["fid/plain/random_inception/75px"] > 0
    # The attribute reader reads the real held-out images well (the ceiling of the metric).
    assert r["compositional/real/all/colour"] >= 0.75
    # Files.
    with open(os.path.join(tiny_workdir, "eval", "step_00000003.json")) as f:
        rec = json.load(f)
    assert rec["results"]["clip_score/real"] == pytest.approx(r["clip_score/real"])
    assert "| retrieval/i2t_R@1 |" in open(os.path.join(tiny_workdir, "eval", "results.md")).read()
    # The trainer's hook (tokens in, buffer-mean features out) agrees with the evaluator's.
    import jax.numpy as jnp
    from dream_jax.data import synthetic

    ev = evaluate.WorkdirEvaluator(tiny_workdir, opts)
    ev.load()
    images = np.stack([synthetic.SyntheticWorld(16, "heldout", 0)[i]["image"] for i in range(8)])
    tokens = ev.generator.image_tokenizer.encode(jnp.asarray(images))
    hook = np.asarray(suite.buffer_features_fn(ev.generator.model)(ev.generator.variables, tokens))
    np.testing.assert_allclose(hook, ev.enc.features(images, "buffer"), rtol=1e-5, atol=1e-5)
    assert hook.shape == (8, ev.generator.model.arch.width) and hook.std() > 0

    # Training's periodic evaluation reports the same retrieval and zero-shot numbers for this
    # checkpoint (same held-out examples, same model methods, same batch size).
    from dream_jax import train

    cfg = ev.cfg.copy_and_resolve_references()
    cfg.eval.num_examples, cfg.eval.batch_size, cfg.eval.num_samples = (
        opts.num_examples, opts.batch_size, 0)
    g = ev.generator
    periodic = train.Evaluator(cfg, g.model, g.text_tokenizer, g.image_tokenizer, g.mesh)
    ema = types.SimpleNamespace(ema_params=g.variables["params"], params=None,
                                batch_stats=g.variables["batch_stats"])
    p = periodic(ema)
    labels = ev._heldout(opts.num_examples)["labels"]
    assert 0 < (labels["num_objects"] == 1).sum() < opts.num_examples   # both kinds of image
    pairs = {"eval/i2t_R@1": "retrieval/i2t_R@1", "eval/t2i_R@5": "retrieval/t2i_R@5",
             "eval/zero_shot_colour_acc": "zero_shot/colour", "eval/zero_shot_shape_acc": "zero_shot/shape",
             "eval/zero_shot_colour_acc_single": "zero_shot/colour/single_object",
             "eval/zero_shot_shape_acc_single": "zero_shot/shape/single_object"}
    for mine, theirs in pairs.items():
        assert p[mine] == pytest.approx(r[theirs], abs=1e-9), (mine, p[mine], r[theirs])


def test_generated_image_evaluators_with_real_images_and_all_checkpoints(tiny_workdir):
    """generate_fn = the real held-out images of the prompts: FID against their own reference is
    0 and the compositional rates equal the real images'. Two checkpoints → plots."""
    from dream_jax import evaluate
    from dream_jax.data import synthetic

    opts = evaluate.EvalOptions(**dict(TINY_OPTS, evals=("retrieval", "fid", "clip_score", "compositional")))
    world = synthetic.SyntheticWorld(16, "heldout", 0)       # the tiny config's held-out split
    real = [world[i] for i in range(opts.num_generate)]
    lookup = {e["caption"]: e["image"] for e in real}
    calls = []

    def oracle(prompts):
        calls.append(list(prompts))
        return np.stack([lookup[p] for p in prompts])

    results = evaluate.evaluate_workdir(tiny_workdir, opts, steps="all", generate_fns={"oracle": oracle})
    assert sorted(results) == [2, 3] and len(calls) == 2
    assert calls[0] == [e["caption"] for e in real]
    for r in results.values():
        assert abs(r["fid/oracle/random_inception/75px"]) < 1e-6
        assert r["clip_score/oracle"] == pytest.approx(r["clip_score/real"], abs=1e-6)
        for attr in ("colour", "shape", "colour+shape"):
            assert r[f"compositional/oracle/all/{attr}"] == r[f"compositional/real/all/{attr}"]
    assert results[2]["retrieval/i2t_R@1"] != results[3]["retrieval/i2t_R@1"] or \
        results[2]["clip_score/real"] != results[3]["clip_score/real"]      # the weights changed
    plots = os.listdir(os.path.join(tiny_workdir, "eval", "plots"))
    assert {"retrieval.png", "fid.png", "clip_score.png", "compositional.png"} <= set(plots)


def test_clear_errors():
    from dream_jax import evaluate

    with pytest.raises(NotImplementedError, match="OpenCLIP"):
        suite.eval_clip_score(None, {}, [], openclip_checkpoint="/some/open_clip.bin")
    with pytest.raises(ValueError, match="unknown eval"):
        evaluate._validate(evaluate.EvalOptions(evals=("fid_score",)))
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        evaluate.resolve_inception_weights("/nonexistent/inception.pth")
    assert evaluate._parse_l2_reg("auto") is None and evaluate._parse_l2_reg("0.1") == 0.1
    for bad in ("-1", "0", "lots"):
        with pytest.raises(ValueError, match="l2_reg"):
            evaluate._parse_l2_reg(bad)
    with pytest.raises(ValueError, match="l2_reg"):
        evaluate._validate(evaluate.EvalOptions(l2_reg=0.0))


def test_cli_probe_report_against_baselines(tiny_workdir, capsys):
    """The CLI path the lead runs on a trained workdir: probes of the model's features vs raw
    pixels and a randomly initialised encoder, printed as a table and written to results.md."""
    from absl import flags

    from dream_jax import evaluate

    evaluate._define_flags()
    argv = ["evaluate", f"--workdir={tiny_workdir}", "--evals=few_shot,linear_probe",
            "--baselines=pixels,random_init", "--probe_train=128", "--probe_test=64",
            "--probe_tasks=colour,size", "--shots=1,5", "--seeds=0", "--probe_epochs=3",
            "--probe_batch=64", "--batch_size=64"]
    flags.FLAGS(argv)
    try:
        results = evaluate.main()
    finally:
        flags.FLAGS.unparse_flags()
    r = results[3]
    for variant in ("", "/pixels", "/random_init"):
        assert 0.0 <= r[f"linear_probe/colour{variant}"] <= 1.0
        assert 0.0 <= r[f"few_shot/size/5shot{variant}"] <= 1.0
    assert r["linear_probe/colour/pixels"] != r["linear_probe/colour/random_init"]
    out = capsys.readouterr().out
    assert "| probe | task | model | pixels | random_init |" in out
    assert "| linear probe | colour |" in out and "| 5shot | size |" in out
    assert "Probes vs baselines" in open(os.path.join(tiny_workdir, "eval", "results.md")).read()
