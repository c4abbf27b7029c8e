"""Latent-cache training: a cached run and an uncached run of the same tiny sd_vae config produce the
same first-step loss given the same seed (and a different seed gives a different loss).

Both runs read the same examples: an ArrayRecord ingest of 16 JPEGs. The uncached run decodes it
(data.source='arrayrecord'): the frozen tiny VAE runs inside the train step and a frozen tiny T5
encodes the captions on the host (data.gen_text='t5', data.t5_path). The cached run reads the cache
written from that ingest (data.source='cache': moments + mirrored moments + T5 features + the
empty caption's T5 features). Same record order and count → same seeded shuffle; the flip hash is
shared; the step draws the posterior sample with the same key; caption dropout swaps in the empty
caption's features. So equal losses mean that order, flips, captions, latents and T5 features all
correspond.
"""
import json
import os
import shutil

import numpy as np
import pytest

from configs import tiny_sd_vae
from dream_jax import train
from dream_jax.data import cache, fixtures, ingest, pipeline
from dream_jax.data.inputs import make_inputs
from dream_jax.data.tokenizers import TOKENIZER_FILENAME, T5Tokenizer, get_or_train_synthetic_tokenizer
from dream_jax.models import t5, tiny_weights, vae
from dream_jax.objectives.masking import masking_config

SMALL_ARCH = dict(width=32, depth=1, num_heads=2, mlp_dim=64, buffer_size=2, aligner_depth=1, text_width=32,
                  text_depth=1, text_heads=2, head_width=32, head_depth=1, contrastive_hidden=32,
                  embed_dim=16, gen_feature_dim=32)
IMAGE_SIZE = 64
GEN_LENGTH = 16
N = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache_training")
    vae_dir = tiny_weights.write_random_vae(str(d / "vae"))
    captions = fixtures.synthetic_jpeg_tar(str(d / "imgs.tar"), N, width=80, height=72)
    t5_dir = tiny_weights.write_random_t5(str(d / "t5"), captions=list(captions.values()) * 4)
    ingest.run_ingest([str(d / "imgs.tar")], str(d / "ar"), workers=1, min_side=32, progress_every=1e9)
    vae_tok = vae.SDVAETokenizer.from_pretrained(vae_dir, IMAGE_SIZE)
    encoder, t5_tok = t5.T5TextEncoder.from_pretrained(t5_dir), T5Tokenizer.load(t5_dir)
    cache.write_cache(cache.arrayrecord_examples(str(d / "ar"), IMAGE_SIZE), str(d / "cache"), vae_tok,
                      encoder, t5_tok, image_size=IMAGE_SIZE, batch_size=8, t5_length=GEN_LENGTH,
                      t5_dtype="float32")
    get_or_train_synthetic_tokenizer(str(d / "tok"), vocab_size=512)
    return {"dir": d, "vae": vae_dir, "t5": t5_dir, "ar": str(d / "ar"), "cache": str(d / "cache"),
            "vae_tok": vae_tok, "t5_enc": encoder, "t5_tok": t5_tok,
            "tokenizer": str(d / "tok" / TOKENIZER_FILENAME)}


def small_config(world, source, seed=0, gen_text="t5"):
    c = tiny_sd_vae.get_config(f"vae_path={world['vae']}")
    c.seed = seed
    c.total_steps = 2
    c.batch_size = 8
    c.num_mask_groups = 4
    c.log_every = 1
    c.checkpoint_every = 2
    c.eval.every = 0
    c.eval.num_examples = 8
    c.eval.batch_size = 4
    c.data.clip_context = 16
    c.data.gen_context = GEN_LENGTH
    c.data.caption_dropout = 0.5      # the empty-caption path is exercised too
    c.data.source = source
    c.data.path = c.data.heldout_path = world["ar"] if source == "arrayrecord" else world["cache"]
    c.data.gen_text = gen_text
    c.data.t5_path = world["t5"] if (gen_text == "t5" and source != "cache") else ""
    c.optim.warmup_steps = 0
    c.masking = masking_config("fixed", ratio=0.6)   # both losses active in every group
    c.model.overrides = dict(SMALL_ARCH)
    return c


def workdir_with_tokenizer(world, path):
    os.makedirs(path, exist_ok=True)
    shutil.copy(world["tokenizer"], path)   # the caption BPE, trained once
    return str(path)


def train_rows(world, tmp_path, name, cfg):
    """The logged train metrics of steps 1 and 2."""
    workdir = workdir_with_tokenizer(world, tmp_path / name)
    train.train_and_evaluate(cfg, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [[r for r in rows if r["step"] == step and "train/loss" in r][0] for step in (1, 2)]


def test_cache_records_match_the_arrayrecord_pipeline(world, tmp_path):
    """Batch by batch: same keys, flips, tokens; moments = the VAE on the images; T5 features =
    the T5 on the captions. Held-out inputs of both sources agree as well."""
    cfg = small_config(world, "arrayrecord", gen_text="learned")
    tok = get_or_train_synthetic_tokenizer(os.path.dirname(world["tokenizer"]))
    ar = iter(pipeline.make_arrayrecord_dataset(cfg, tok, keep_metadata=True, num_epochs=2))
    cfg_c = small_config(world, "cache", gen_text="learned")
    ca = iter(pipeline.make_cache_dataset(cfg_c, tok, gen_tokenizer=tok, keep_metadata=True, num_epochs=2))
    feats = iter(pipeline.make_cache_dataset(cfg_c, tok, gen_tokenizer=None, num_epochs=1))
    flips = []
    for i in range(2 * N // cfg.batch_size):
        a, c = next(ar), next(ca)
        assert a["key"] == c["key"] and a["flipped"] == c["flipped"] and a["epoch"] == c["epoch"]
        np.testing.assert_array_equal(a["clip_tokens"], c["clip_tokens"])
        np.testing.assert_array_equal(a["gen_tokens"], c["gen_tokens"])
        np.testing.assert_allclose(c["latent_moments"], np.asarray(world["vae_tok"].encode_moments(a["image"])),
                                   rtol=1e-5, atol=1e-5)
        if i < N // cfg.batch_size:
            ids = world["t5_tok"].encode_batch(a["caption"], GEN_LENGTH)
            want = np.asarray(world["t5_enc"](ids, t5.padding_mask_from_ids(ids, world["t5_tok"].eos_id)))
            f = next(feats)
            assert f["gen_tokens"].shape == (cfg.batch_size, GEN_LENGTH, tiny_weights.TINY_T5.d_model)
            np.testing.assert_allclose(f["gen_tokens"], want, rtol=1e-5, atol=1e-5)
        flips += c["flipped"]
    assert 0 < sum(flips) < len(flips)          # flips happen, and not always
    assert ca.counters["records"] == 2 * N

    # Held-out evaluation inputs: the cache (posterior mean, cached T5) = the images through VAE + T5.
    held = {src: make_inputs(small_config(world, src), workdir_with_tokenizer(world, tmp_path / src),
                             train_iterator=False).heldout(8) for src in ("arrayrecord", "cache")}
    assert held["arrayrecord"]["caption"] == held["cache"]["caption"]
    for k in ("tokens", "gen_tokens"):
        np.testing.assert_allclose(held["cache"][k], held["arrayrecord"][k], rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_array_equal(held["cache"]["clip_tokens"], held["arrayrecord"]["clip_tokens"])


def test_cached_and_uncached_first_step_loss_agree(world, tmp_path):
    """Step 1 (and step 2, after one update) of the two runs agree; a new seed does not.

    At initialisation the diffusion head's output layer is zero, so the step-1 generative loss
    does not see the data; the step-1 contrastive loss does (images, flips, captions: switching
    the flips off alone moves the loss by ~2e-4), and step 2 sees the data through both losses."""
    uncached = train_rows(world, tmp_path, "uncached", small_config(world, "arrayrecord"))
    cached = train_rows(world, tmp_path, "cached", small_config(world, "cache"))
    for u, c in zip(uncached, cached):
        print(f"step {u['step']} loss: uncached {u['train/loss']!r}, cached {c['train/loss']!r}")
        assert abs(c["train/loss"] - u["train/loss"]) <= 1e-5, (c, u)
        assert abs(c["train/clip_loss"] - u["train/clip_loss"]) <= 1e-5, (c, u)
        np.testing.assert_allclose(c["train/grad_norm"], u["train/grad_norm"], rtol=1e-5)
    assert np.isfinite(cached[1]["train/loss"]) and cached[0]["train/gen_loss"] > 0
    assert uncached[0]["data/records"] == cached[0]["data/records"] == 8   # the pipeline counters are logged
    assert cached[1]["data/records"] == 16
    other = train_rows(world, tmp_path, "cached_seed1", small_config(world, "cache", seed=1))
    assert abs(other[0]["train/loss"] - cached[0]["train/loss"]) > 1e-4     # the agreement is not vacuous


def test_synthetic_inputs_are_the_historical_ones(world, tmp_path):
    """make_inputs on the synthetic default builds exactly what the trainer built before it existed."""
    from configs import tiny
    from dream_jax.models.build import build_model
    from dream_jax.models.vae import make_image_tokenizer

    cfg = tiny.get_config()
    cfg.batch_size = 8
    workdir = workdir_with_tokenizer(world, tmp_path)
    inputs = make_inputs(cfg, workdir, 0, 1)
    tok = get_or_train_synthetic_tokenizer(workdir, vocab_size=cfg.data.text_vocab_size)
    old_iter = pipeline.make_train_iterator(cfg, tok, 0, 1)
    for _ in range(2):
        a, b = next(inputs.train_iter), next(old_iter)
        for k in ("image", "clip_tokens", "gen_tokens"):
            np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(inputs.empty_gen, tok.encode_batch([""], cfg.data.gen_context)[0])
    image_tok = make_image_tokenizer(cfg)
    assert (build_model(cfg, tok, image_tok, inputs.arch_overrides).arch
            == build_model(cfg, tok, image_tok).arch)
    assert inputs.arch_overrides["gen_text"] == "learned"
