"""Sampling: MAR schedule, compiled loop vs Python reference, compilation counts, SAD /
greedy / best-of-K, the Python API and the CLI on a tiny trained workdir.

Untrained diffusion heads drive samples to large magnitudes (the x0 estimate at the
noisiest step is amplified by 1/sqrt(alpha_t)), so comparisons between differently
batched computations use a tolerance relative to the largest value: max|a - b| <
1e-5 · max(1, max|b|). Comparisons that must be EXACT (same seed, SAD K=1) use
array_equal.
"""
import json
import math
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dream_jax.models.dream import DreamModel
from dream_jax.models.sizes import make_arch
from dream_jax.sampling import sad as sad_lib
from dream_jax.sampling.mar import (MARSampler, cfg_scales, masking_schedule, reference_decode,
                                    trajectory_keys)

TINY = dict(seq_len=16, token_dim=12, vocab_size=64, context_length=12, eot_id=2,
            gen_text="learned", gen_vocab_size=64, gen_feature_dim=32, gen_max_length=12,
            width=32, depth=2, num_heads=4, mlp_dim=64, buffer_size=4, aligner_depth=1,
            text_width=32, text_depth=1, text_heads=2, head_width=32, head_depth=2,
            contrastive_hidden=32, embed_dim=16)
NUM_ITER, STEPS, B = 5, 10, 2


def close(a, b, rel=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    diff = np.max(np.abs(a - b))
    assert diff < rel * max(1.0, np.max(np.abs(b))), (diff, np.max(np.abs(b)))


def prompts(seed, rows=B):
    rng = np.random.default_rng(seed)
    gen = rng.integers(3, 64, size=(rows, TINY["gen_max_length"]))
    clip = rng.integers(3, 64, size=(rows, TINY["context_length"]))
    clip[:, 0] = 1
    clip[:, 6] = TINY["eot_id"]
    return jnp.asarray(gen, jnp.int32), jnp.asarray(clip, jnp.int32)


@pytest.fixture(scope="module")
def tiny():
    model = DreamModel(make_arch("tiny", TINY))
    gen, clip = prompts(0)
    tokens = jnp.zeros((B, TINY["seq_len"], TINY["token_dim"]))

    # One compilation instead of one per eager op.
    variables = jax.jit(lambda: nn.unbox(model.init({"params": jax.random.key(0)}, tokens, clip, gen,
                                                    method=DreamModel.init_all)))()
    # Perturb every parameter (on the host: nothing to compile): the diffusion head's
    # output layer starts at zero, which would make every sample ignore the condition.
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.02 * rng.standard_normal(x.shape),
                                                jnp.float32), variables["params"])
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    empty = jnp.zeros((TINY["gen_max_length"],), jnp.int32).at[0].set(1).at[1].set(TINY["eot_id"])
    return model, variables, empty


@pytest.fixture(scope="module")
def samplers(tiny):
    model = tiny[0]
    return {False: MARSampler(model, NUM_ITER, STEPS, guided=False),
            True: MARSampler(model, NUM_ITER, STEPS, guided=True)}


# ---- the host-side schedule ----------------------------------------------------------------
@pytest.mark.parametrize("n,t", [(256, 64), (16, 5), (16, 16), (16, 1), (64, 7), (10, 9)])
def test_masking_schedule_properties(n, t):
    masked = masking_schedule(n, t)
    reveal = masked[:-1] - masked[1:]
    assert masked[0] == n and masked[-1] == 0 and len(masked) == t + 1
    assert reveal.sum() == n and np.all(reveal >= 1)
    for k in range(t - 1):  # MAR's rule, written out
        want = max(1, min(masked[k] - 1, math.floor(n * math.cos(math.pi / 2 * (k + 1) / t))))
        assert masked[k + 1] == want


def test_masking_schedule_paper_setting_and_cfg_scales():
    masked = masking_schedule(256, 64)
    assert masked[1] == 255 and masked[32] == math.floor(256 * math.cos(math.pi / 4)) == 181
    assert masked[63] == math.floor(256 * math.cos(math.pi / 2 * 63 / 64)) == 6  # revealed last
    lin = cfg_scales(256, 64, 3.0, "linear")
    assert np.all(np.diff(lin) >= 0)
    np.testing.assert_allclose(lin[0], 1 + 2 * 1 / 256, rtol=1e-6)       # 1 token revealed
    np.testing.assert_allclose(lin[31], 1 + 2 * (256 - 181) / 256, rtol=1e-6)
    np.testing.assert_allclose(lin[-1], 1 + 2 * 255 / 256, rtol=1e-6)   # MAR: mask_len clamps to 1
    np.testing.assert_array_equal(cfg_scales(256, 64, 3.0, "constant"), np.full(64, 3.0, np.float32))
    np.testing.assert_array_equal(cfg_scales(16, 5, 1.0), np.ones(5, np.float32))
    for bad in (0, 17):
        with pytest.raises(ValueError, match="num_iter"):
            masking_schedule(16, bad)
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_scales(16, 5, 2.0, "cosine")


def test_resolve_threshold():
    assert sad_lib.resolve_threshold(32, 64, 256) == 32
    assert sad_lib.resolve_threshold(1.0, 64, 256) == 64
    k = sad_lib.resolve_threshold(0.125, 64, 256)
    decoded = 256 - masking_schedule(256, 64)
    assert decoded[k] >= 32 and decoded[k - 1] < 32
    for bad in (0, 65, 0.0, 1.5):
        with pytest.raises(ValueError):
            sad_lib.resolve_threshold(bad, 64, 256)


# ---- the compiled loop ---------------------------------------------------------------------
def test_same_seed_same_tokens_and_seed_matters(tiny, samplers):
    model, variables, empty = tiny
    s = samplers[False]
    gen, _ = prompts(1)
    sched = s.schedule()
    ok, nk = trajectory_keys(jax.random.key(3), B)
    a = s.decode(variables, ok, nk[:, 0], gen, empty, sched)
    b = s.decode(variables, ok, nk[:, 0], gen, empty, sched)
    np.testing.assert_array_equal(a, b)
    ok2, nk2 = trajectory_keys(jax.random.key(4), B)
    c = s.decode(variables, ok2, nk2[:, 0], gen, empty, sched)
    assert np.all(np.isfinite(np.asarray(a)))
    assert not np.allclose(a, c)
    # Every token was written (the canvas starts at zero).
    assert np.all(np.any(np.asarray(a) != 0, axis=-1))


@pytest.mark.parametrize("cfg,schedule,temperature", [(1.0, "linear", 1.0), (3.0, "linear", 0.9),
                                                      (2.0, "constant", 1.0)])
def test_compiled_matches_python_reference(tiny, samplers, cfg, schedule, temperature):
    model, variables, empty = tiny
    s = samplers[cfg != 1.0]
    gen, _ = prompts(2)
    ok, nk = trajectory_keys(jax.random.key(11), B)
    out = s.decode(variables, ok, nk[:, 0], gen, empty, s.schedule(cfg, schedule), temperature)
    ref = reference_decode(model, variables, ok, nk[:, 0], gen, empty, NUM_ITER, STEPS, cfg, schedule,
                           temperature)
    close(out, ref)
    if cfg != 1.0:  # guidance changes the result
        unguided = reference_decode(model, variables, ok, nk[:, 0], gen, empty, NUM_ITER, STEPS, 1.0)
        assert np.max(np.abs(unguided - ref)) > 1e-3 * np.max(np.abs(ref))


def test_compiles_once_per_shape(tiny):
    model, variables, empty = tiny
    s = MARSampler(model, NUM_ITER, STEPS, guided=True)
    for i, (cfg, sched_kind, temp) in enumerate([(3.0, "linear", 1.0), (2.0, "constant", 0.7),
                                                 (5.0, "linear", 1.3)]):
        gen, _ = prompts(10 + i)
        ok, nk = trajectory_keys(jax.random.key(i), B)
        s.decode(variables, ok, nk[:, 0], gen, empty, s.schedule(cfg, sched_kind), temp)
    assert s.traces["run"] == 1 and s.run._cache_size() == 1
    # SAD's prefix and suffix reuse the same executable at the same row count (K=1).
    gen, clip = prompts(20)
    ok, nk = trajectory_keys(jax.random.key(9), B, 1)
    sad_lib.sad(s, variables, ok, nk, gen, clip, empty, s.schedule(3.0), threshold=2)
    assert s.traces["run"] == 1 and s.run._cache_size() == 1
    # A new row count compiles once more.
    gen3, _ = prompts(21, rows=3)
    ok3, nk3 = trajectory_keys(jax.random.key(1), 3)
    s.decode(variables, ok3, nk3[:, 0], gen3, empty, s.schedule(3.0))
    assert s.traces["run"] == 2 and s.run._cache_size() == 2


# ---- SAD, greedy, best-of-K ---------------------------------------------------------------
def test_sad_and_greedy_with_one_candidate_equal_plain_exactly(tiny, samplers):
    model, variables, empty = tiny
    s = samplers[True]
    gen, clip = prompts(3)
    sched = s.schedule(3.0)
    ok, nk = trajectory_keys(jax.random.key(5), B, 1)
    plain = s.decode(variables, ok, nk[:, 0], gen, empty, sched)
    for threshold in (1, 3, NUM_ITER):
        res = sad_lib.sad(s, variables, ok, nk, gen, clip, empty, sched, threshold)
        np.testing.assert_array_equal(res.tokens, plain)
        np.testing.assert_array_equal(res.chosen, 0)
    res = sad_lib.greedy(s, variables, ok, nk, gen, clip, empty, sched, 3)
    np.testing.assert_array_equal(res.tokens, plain)
    # Candidate 0 of a K-candidate key set is plain decoding's stream too.
    ok5, nk5 = trajectory_keys(jax.random.key(5), B, 4)
    np.testing.assert_array_equal(jax.random.key_data(nk5[:, 0]), jax.random.key_data(nk[:, 0]))
    np.testing.assert_array_equal(jax.random.key_data(ok5), jax.random.key_data(ok))


def _own_score(model, variables, order_keys, tokens, masked_count, clip):
    """The contrastive score written directly with the model's methods (no sampler code)."""
    n = TINY["seq_len"]
    orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, n))(order_keys))
    visible = np.zeros((orders.shape[0], n), bool)
    for i, o in enumerate(orders):
        visible[i, o[masked_count:]] = True
    img = model.apply(variables, jnp.asarray(tokens), jnp.asarray(visible), method=DreamModel.embed_image_tokens)
    txt = model.apply(variables, clip, method=DreamModel.text_embed)
    return np.sum(np.asarray(img) * np.asarray(txt), axis=-1)


def test_sad_keeps_the_best_candidate_and_finishes_it(tiny, samplers):
    model, variables, empty = tiny
    s = samplers[True]
    gen, clip = prompts(4)
    sched = s.schedule(3.0)
    k, threshold = 3, 2
    ok, nk = trajectory_keys(jax.random.key(6), B, k)
    res = sad_lib.sad(s, variables, ok, nk, gen, clip, empty, sched, threshold)
    assert res.scores.shape == (B, k) and res.chosen.shape == (B,)
    np.testing.assert_array_equal(res.chosen, np.argmax(res.scores, axis=1))
    assert np.all(np.ptp(res.scores, axis=1) > 1e-4)  # the candidates really differ
    # Each candidate's partial canvas, decoded alone and scored with the model directly.
    for c in range(k):
        part = s.run(variables, s.empty_canvas(B), ok, nk[:, c], gen, empty, sched, np.int32(0),
                     np.int32(threshold), np.float32(1.0))
        want = _own_score(model, variables, ok, part, int(s.masked[threshold]), clip)
        np.testing.assert_allclose(res.scores[:, c], want, atol=1e-4)
    # The output is the kept candidate decoded from scratch with its own noise stream.
    finished = s.decode(variables, ok, nk[jnp.arange(B), res.chosen], gen, empty, sched)
    close(res.tokens, finished)


def test_greedy_and_best_of_k(tiny, samplers):
    model, variables, empty = tiny
    s = samplers[True]
    gen, clip = prompts(5)
    sched = s.schedule(3.0)
    k = 3
    ok, nk = trajectory_keys(jax.random.key(8), B, k)
    g = sad_lib.greedy(s, variables, ok, nk, gen, clip, empty, sched, threshold=2)
    assert g.scores.shape == (B, 2, k) and g.chosen.shape == (B, 2)
    np.testing.assert_array_equal(g.chosen, np.argmax(g.scores, axis=2))
    assert np.all(np.isfinite(np.asarray(g.tokens)))
    # Greedy's first step proposes exactly SAD's candidates at threshold 1.
    first = sad_lib.sad(s, variables, ok, nk, gen, clip, empty, sched, threshold=1)
    np.testing.assert_allclose(g.scores[:, 0], first.scores, atol=1e-5)

    best, cands = sad_lib.best_of_k(s, variables, ok, nk, gen, clip, empty, sched, return_candidates=True)
    assert best.scores.shape == (B, k)
    np.testing.assert_array_equal(best.chosen, np.argmax(best.scores, axis=1))
    for c in range(k):
        full = s.decode(variables, ok, nk[:, c], gen, empty, sched)
        close(cands[:, c], full)
        np.testing.assert_allclose(best.scores[:, c], _own_score(model, variables, ok, full, 0, clip),
                                   atol=1e-4)
    np.testing.assert_array_equal(best.tokens, np.asarray(cands)[np.arange(B), best.chosen])
    np.testing.assert_allclose(sad_lib.final_scores(s, variables, ok, best.tokens, clip),
                               best.scores.max(axis=1), atol=1e-5)


# ---- the API and the CLI on a tiny trained workdir ------------------------------------------
def _tiny_config():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
    try:
        import tiny as tiny_config
    finally:
        sys.path.pop(0)
    cfg = tiny_config.get_config()
    cfg.total_steps = 3
    cfg.batch_size = 8
    cfg.num_mask_groups = 8
    cfg.eval.every = 0
    cfg.log_every = 1
    cfg.checkpoint_every = 3
    cfg.optim.warmup_steps = 1
    cfg.model.overrides = dict(gen_feature_dim=32, width=32, depth=1, num_heads=2, mlp_dim=64,
                               aligner_depth=1, text_width=32, text_depth=1, text_heads=2,
                               head_width=32, head_depth=1, contrastive_hidden=32, embed_dim=16)
    return cfg


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from dream_jax import train
    from dream_jax.data.synthetic import SyntheticWorld
    from dream_jax.data.tokenizers import train_caption_bpe

    path = str(tmp_path_factory.mktemp("sample_workdir"))
    # A tokenizer from fewer captions than the trainer's default (it is loaded if present).
    train_caption_bpe(list(SyntheticWorld(split="train").captions(2000)), 512,
                      path=os.path.join(path, "tokenizer.json"))
    train.train_and_evaluate(_tiny_config(), path)
    return path


FAST = dict(num_iter=4, diffusion_steps="ddim5", cfg=2.0)


@pytest.fixture(scope="module")
def generator(workdir):
    from dream_jax.sampling.api import Generator
    return Generator.from_workdir(workdir)


def test_api_generate_is_seeded_and_batch_independent(generator):
    kw = dict(FAST, num_images_per_prompt=3, mode="plain")
    texts = ["a red circle", "a blue square", "a green triangle"]
    a = generator.generate(texts, seed=3, batch_size=16, **kw)
    assert a.images.shape == (9, 32, 32, 3) and a.images.dtype == np.uint8
    assert a.prompts == [t for t in texts for _ in range(3)]
    np.testing.assert_array_equal(a.prompt_index, np.repeat(np.arange(3), 3))
    b = generator.generate(texts, seed=3, batch_size=16, **kw)
    np.testing.assert_array_equal(a.images, b.images)
    assert b.timings["compilations"] == 0  # the second call reuses the compiled sampler
    c = generator.generate(texts, seed=4, batch_size=16, **kw)
    assert not np.array_equal(a.tokens, c.tokens)
    # The same rows in two batches (the last one padded) give the same tokens: keys
    # belong to rows, not to batches.
    d = generator.generate(texts, seed=3, batch_size=8, **kw)
    assert len(d.timings["batches_s"]) == 2 and len(a.timings["batches_s"]) == 1
    close(d.tokens, a.tokens)
    assert set(a.timings) >= {"total_s", "sampling_s", "images_per_s"}


def test_api_modes(generator):
    for mode in ("sad", "greedy", "best_of_k"):
        r = generator.generate(["two green triangles"], num_images_per_prompt=2, mode=mode, sad_candidates=3,
                               sad_step=2, seed=0, **FAST)
        assert r.images.shape == (2, 32, 32, 3)
        if mode == "greedy":
            assert r.scores.shape == (2, 2, 3)
            np.testing.assert_array_equal(r.chosen, np.argmax(r.scores, axis=2))
        else:
            assert r.scores.shape == (2, 3)
            np.testing.assert_array_equal(r.chosen, np.argmax(r.scores, axis=1))
    with pytest.raises(ValueError, match="mode"):
        generator.generate(["x"], mode="beam", **FAST)


def test_api_prompt_errors_and_truncation(generator):
    with pytest.raises(ValueError, match="empty"):
        generator.generate(["a red circle", "  "], **FAST)
    with pytest.raises(ValueError, match="no prompts"):
        generator.generate([], **FAST)
    long = " ".join(["a small red circle at the top left"] * 12)
    with pytest.warns(UserWarning, match="truncated"):
        r = generator.generate([long, "a red circle"], seed=3, num_images_per_prompt=2, batch_size=4,
                               mode="plain", **FAST)
    assert r.truncated == [True, False] and r.images.shape == (4, 32, 32, 3)
    with pytest.warns(UserWarning, match="truncated"):
        gen, clip, _ = generator.encode_prompts([long])
    eot = generator.text_tokenizer.eot_id
    assert gen[0, -1] == eot and clip[0, -1] == eot  # cut in the content, end-of-text kept


def test_from_workdir_errors(workdir, tmp_path):
    from dream_jax.sampling.api import Generator

    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        Generator.from_workdir(missing)
    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
    shutil.copy(os.path.join(workdir, "tokenizer.json"), empty / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        Generator.from_workdir(str(empty))
    with pytest.raises(FileNotFoundError, match="step 7"):
        Generator.from_workdir(workdir, step=7)
    # A checkpoint that does not fit the config (a wider diffusion head than was trained).
    bad = tmp_path / "mismatch"
    shutil.copytree(workdir, bad)
    with open(bad / "config.json") as f:
        cfg = json.load(f)
    cfg["model"]["overrides"]["head_width"] = 48
    with open(bad / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="incompatible") as info:
        Generator.from_workdir(str(bad))
    assert str(bad) in str(info.value)
    assert "diffusion_head" in str(info.value) and "(32,) vs model (48,)" in str(info.value)


def test_cli_writes_pngs_grid_and_json(workdir, tmp_path):
    from absl import flags
    from PIL import Image

    from dream_jax import sample

    out = tmp_path / "out"
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("two blue squares\n\n")
    argv = ["sample", f"--workdir={workdir}", "--prompt=a red circle", f"--prompts_file={prompts_file}",
            "--num_images=2", "--num_iter=4", "--diffusion_steps=ddim5", "--cfg=2.0",
            "--sad_candidates=2", "--sad_step=0.5", "--seed=5", f"--out={out}"]
    fv = sample.define_flags(flags.FlagValues())  # not absl's global FLAGS: no clashes
    fv(argv)
    path = sample.run(fv)
    assert path == str(out / "samples.json")
    pngs = sorted(p for p in os.listdir(out) if p.startswith("p"))
    assert pngs == ["p000_i00.png", "p000_i01.png", "p001_i00.png", "p001_i01.png"]
    assert np.asarray(Image.open(out / pngs[0])).shape == (32, 32, 3)
    assert np.asarray(Image.open(out / "grid.png")).shape == (2 * 34 + 2, 2 * 34 + 2, 3)
    record = json.loads((out / "samples.json").read_text())
    assert record["prompts"] == ["a red circle", "two blue squares"] and record["seed"] == 5
    assert record["settings"]["mode"] == "sad" and record["settings"]["num_iter"] == 4
    assert record["threshold"] == sad_lib.resolve_threshold(0.5, 4, 64)
    for image in record["images"]:
        assert len(image["scores"]) == 2 and image["chosen"] == int(np.argmax(image["scores"]))
    assert record["timings"]["total_s"] > 0


@pytest.mark.parametrize("args,want", [
    ([], "plain"), (["--sad_step=32"], "sad"), (["--sad_candidates=5"], "sad"),
    (["--mode=best_of_k", "--sad_candidates=3"], "best_of_k"), (["--mode=plain"], "plain"),
    (["--mode=plain", "--sad_step=32"], None)])
def test_cli_mode_follows_the_sad_flags(args, want):
    """SAD settings on the command line ask for SAD; with an explicit --mode=plain they are an error
    (before anything loads), not silently ignored."""
    from absl import app, flags

    from dream_jax import sample

    fv = sample.define_flags(flags.FlagValues())
    fv(["sample"] + args)
    if want is None:
        with pytest.raises(app.UsageError, match="--sad_step applies to --mode=sad"):
            sample.resolve_mode(fv)
    else:
        assert sample.resolve_mode(fv) == want
