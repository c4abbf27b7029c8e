"""SD-VAE / T5 ports without PyTorch: loaders (round trip, LDM names, clear errors), patchify,
the SDVAETokenizer contract, the T5 padding mask, posterior sampling statistics and the latent cache.

Parity with the PyTorch reference implementations is in test_vae_t5.py (needs torch).
"""
import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dream_jax.data import cache, tokenizers
from dream_jax.models import pretrained, t5, vae
from dream_jax.models import tiny_weights
from dream_jax.models.tiny_weights import TINY_T5, TINY_VAE
from dream_jax.models.tiny_weights import random_params as _random_params


@pytest.fixture(scope="module")
def tiny_vae():
    model = vae.AutoencoderKL(TINY_VAE)
    return model, _random_params(model, 1, jnp.zeros((1, 16, 16, 3)))


@pytest.fixture(scope="module")
def vae_tok(tiny_vae):
    return vae.SDVAETokenizer(*tiny_vae, image_size=32, patch_size=2)


@pytest.fixture(scope="module")
def t5_enc(tiny_t5):
    return t5.T5TextEncoder(*tiny_t5, padding_mask=False)


@pytest.fixture(scope="module")
def tiny_t5():
    model = t5.T5Encoder(TINY_T5)
    return model, _random_params(model, 2, jnp.zeros((1, 4), jnp.int32))


def _vae_state_dict(params):
    return pretrained.export_state_dict(params, pretrained.module_path_to_torch_key)


def _t5_state_dict(params):
    return pretrained.export_state_dict(
        params, lambda p: pretrained.module_path_to_torch_key(p, "" if p[0] == "shared" else "encoder."))


_write_vae_dir = tiny_weights.write_vae_dir


def _write_t5_dir(path, params, cfg=TINY_T5, extra=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
                   "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                   "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
                   "relative_attention_max_distance": cfg.relative_attention_max_distance,
                   "feed_forward_proj": "relu"}, f)
    sd = _t5_state_dict(params)
    sd.update(extra or {})
    pretrained.write_safetensors(os.path.join(path, "model.safetensors"), sd)
    return path


def _assert_trees_equal(a, b):
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert len(fa) == len(fb)
    for path, leaf in fa:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(fb[path]), err_msg=str(path))


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------
def test_safetensors_roundtrip_dtypes(tmp_path):
    import ml_dtypes
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((4,), ml_dtypes.bfloat16),
               "c": np.array([1, -2], np.int64)}
    path = str(tmp_path / "x.safetensors")
    pretrained.write_safetensors(path, tensors, metadata={"format": "pt"})
    f = pretrained.SafetensorsFile(path)
    assert sorted(f.keys()) == ["a", "b", "c"] and f.metadata == {"format": "pt"}
    for k, v in tensors.items():
        assert f[k].dtype == v.dtype and f.shape(k) == v.shape
        np.testing.assert_array_equal(f[k], v)


def test_vae_loader_roundtrip_dir_single_file_and_ldm_names(tmp_path, tiny_vae):
    _, params = tiny_vae
    path = _write_vae_dir(str(tmp_path / "vae"), params)
    model, loaded = vae.load_sd_vae(path)
    assert model.cfg == TINY_VAE
    _assert_trees_equal(params, loaded)

    # A single file: config inferred from the shapes (groups cannot be inferred: override).
    single = os.path.join(path, "diffusion_pytorch_model.safetensors")
    model, loaded = vae.load_sd_vae(single, norm_num_groups=4)
    assert model.cfg == TINY_VAE
    _assert_trees_equal(params, loaded)

    # The original LDM/CompVis names (as in vae-ft-ema-560000-ema-pruned.safetensors),
    # with the legacy 1×1-conv attention weights, inside a whole SD checkpoint.
    n = len(TINY_VAE.block_out_channels)
    table = [("mid_block.resnets.0", "mid.block_1"), ("mid_block.resnets.1", "mid.block_2"),
             ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"),
             ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"), ("mid_block.attentions.0.to_", "mid.attn_1."),
             ("down_blocks.", "down."), ("up_blocks.", "up."), ("resnets.", "block."),
             ("downsamplers.0.", "downsample."), ("upsamplers.0.", "upsample."), ("conv_shortcut", "nin_shortcut"),
             ("conv_norm_out", "norm_out")]
    ldm = {}
    for key, value in _vae_state_dict(params).items():
        new = key
        for a, b in table:
            new = new.replace(a, b)
        if new.startswith("decoder.up."):
            i = int(new.split(".")[2])
            new = new.replace(f"decoder.up.{i}.", f"decoder.up.{n - 1 - i}.", 1)
        if ".attn_1." in new and value.ndim == 2:
            value = value[:, :, None, None]
        ldm["first_stage_model." + new] = value
    ldm["model.diffusion_model.out.0.weight"] = np.zeros((3,), np.float32)   # ignored: not the VAE
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in ldm
    assert "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight" in ldm
    pretrained.write_safetensors(str(tmp_path / "sd.safetensors"), ldm)
    model, loaded = vae.load_sd_vae(str(tmp_path / "sd.safetensors"), norm_num_groups=4)
    assert model.cfg == TINY_VAE
    _assert_trees_equal(params, loaded)


def _vae_error(tmp_path, tiny_vae, edit):
    sd = _vae_state_dict(tiny_vae[1])
    edit(sd)
    path = str(tmp_path / "bad.safetensors")
    pretrained.write_safetensors(path, sd)
    with pytest.raises(pretrained.CheckpointMismatch) as err:
        vae.load_sd_vae(path, norm_num_groups=4)
    return str(err.value)


def test_vae_loader_errors_name_the_key(tmp_path, tiny_vae):
    msg = _vae_error(tmp_path, tiny_vae, lambda sd: sd.pop("decoder.mid_block.attentions.0.to_k.bias"))
    assert "decoder.mid_block.attentions.0.to_k.bias" in msg and "lacks" in msg
    msg = _vae_error(tmp_path, tiny_vae, lambda sd: sd.update({"encoder.extra_conv.weight": np.zeros((2, 2))}))
    assert "encoder.extra_conv.weight" in msg and "no counterpart" in msg

    def reshape(sd):
        sd["encoder.down_blocks.1.resnets.0.conv2.weight"] = np.zeros((8, 8, 1, 1), np.float32)
    msg = _vae_error(tmp_path, tiny_vae, reshape)
    assert "encoder.down_blocks.1.resnets.0.conv2.weight" in msg and "(3, 3, 8, 8)" in msg


def test_vae_config_refuses_unsupported_variants():
    with pytest.raises(ValueError, match="up_block_types"):
        vae.VAEConfig.from_diffusers({"block_out_channels": [8, 16], "up_block_types": ["AttnUpDecoderBlock2D"] * 2})
    with pytest.raises(ValueError, match="act_fn"):
        vae.VAEConfig.from_diffusers({"act_fn": "gelu"})


def test_t5_loader_roundtrip_and_errors(tmp_path, tiny_t5):
    _, params = tiny_t5
    # A T5ForConditionalGeneration-style file: decoder and lm_head tensors are skipped.
    extra = {"decoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((24, 16), np.float32),
             "lm_head.weight": np.zeros((300, 16), np.float32)}
    model, loaded = t5.load_t5_encoder(_write_t5_dir(str(tmp_path / "ok"), params, extra=extra))
    assert model.cfg == TINY_T5
    _assert_trees_equal(params, loaded)

    path = _write_t5_dir(str(tmp_path / "missing"), params)
    sd = _t5_state_dict(params)
    del sd["encoder.block.1.layer.1.DenseReluDense.wi.weight"]
    pretrained.write_safetensors(os.path.join(path, "model.safetensors"), sd)
    with pytest.raises(pretrained.CheckpointMismatch, match=r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wi\.weight"):
        t5.load_t5_encoder(path)

    sd = _t5_state_dict(params)
    sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros((32, 4), np.float32)
    pretrained.write_safetensors(os.path.join(path, "model.safetensors"), sd)
    with pytest.raises(pretrained.CheckpointMismatch, match="relative_attention_bias.weight.*(32, 4).*(8, 4)"):
        t5.load_t5_encoder(path)

    sd = _t5_state_dict(params)
    sd["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros((8, 4), np.float32)
    pretrained.write_safetensors(os.path.join(path, "model.safetensors"), sd)
    with pytest.raises(pretrained.CheckpointMismatch, match=r"block\.1\.layer\.0\.SelfAttention\.relative"):
        t5.load_t5_encoder(path)


def test_t5_config_from_hf():
    assert t5.T5Config.from_hf({**_hf_dims(), "feed_forward_proj": "gated-gelu"}).dense_act_fn == "gelu_new"
    assert t5.T5Config.from_hf({**_hf_dims(), "feed_forward_proj": "gated-gelu"}).is_gated_act
    relu = t5.T5Config.from_hf(_hf_dims())
    assert relu.dense_act_fn == "relu" and not relu.is_gated_act
    with pytest.raises(ValueError):
        t5.T5Config.from_hf({**_hf_dims(), "feed_forward_proj": "gated-foo"})


def _hf_dims():
    return dict(vocab_size=10, d_model=8, d_kv=2, d_ff=16, num_layers=1, num_heads=4)


def test_relative_position_buckets_known_values():
    b = t5.relative_position_buckets(300, 300, 32, 128)
    rel = lambda r: b[150, 150 + r]  # noqa: E731  (key − query = r)
    assert rel(0) == 0 and rel(-1) == 1 and rel(1) == 17 and rel(-7) == 7 and rel(7) == 23
    assert rel(-8) == 8 and rel(8) == 24
    assert rel(-149) == 15 and rel(149) == 31      # beyond max_distance: the last bucket
    # Monotone in distance within each sign.
    assert np.all(np.diff(b[0, :]) >= 0) and np.all(np.diff(b[-1, ::-1]) >= 0)


# ---------------------------------------------------------------------------------------------
# Patchify and the tokenizer contract
# ---------------------------------------------------------------------------------------------
def test_patchify_roundtrip_and_mar_order():
    z = np.random.RandomState(0).randn(2, 32, 32, 4).astype(np.float32)
    tokens = vae.patchify(z, 2)
    assert tokens.shape == (2, 256, 16)
    np.testing.assert_array_equal(vae.unpatchify(tokens, 2, 4), z)
    np.testing.assert_array_equal(np.asarray(vae.unpatchify(jnp.asarray(tokens), 2, 4)), z)
    # MAR: x [n, c, h, w] → reshape(n, c, h/p, p, w/p, p) → einsum('nchpwq->nhwcpq').
    nchw = z.transpose(0, 3, 1, 2).reshape(2, 4, 16, 2, 16, 2)
    mar = np.einsum("nchpwq->nhwcpq", nchw).reshape(2, 256, 16)
    np.testing.assert_array_equal(tokens, mar)


def test_sd_vae_tokenizer_contract(tmp_path, tiny_vae, vae_tok):
    params, tok = tiny_vae[1], vae_tok
    assert (tok.latent_size, tok.seq_len, tok.token_dim) == (4, 4, 16)
    images = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    moments = tok.encode_moments(images)
    assert moments.shape == (2, 4, 4, 8) and moments.dtype == jnp.float32
    mean_tokens = tok.encode(images)
    np.testing.assert_allclose(mean_tokens, vae.patchify(moments[..., :4], 2) * 0.18215, rtol=1e-6)
    key = jax.random.PRNGKey(3)
    sampled = tok.encode(images, key)
    assert sampled.shape == (2, 4, 16) and sampled.dtype == jnp.float32
    assert not np.allclose(sampled, mean_tokens)
    np.testing.assert_array_equal(sampled, tok.tokens_from_moments(moments, key))
    np.testing.assert_allclose(tok.tokens_to_latent(mean_tokens), moments[..., :4], rtol=1e-5, atol=1e-6)
    out = tok.decode(sampled)
    assert out.shape == (2, 32, 32, 3) and out.dtype == jnp.uint8
    # Inside a jitted step the parameters travel as an argument.
    step = jax.jit(lambda p, x, k: tok.encode(x, k, params=p))
    np.testing.assert_allclose(step(params, images, key), sampled, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="image_size"):
        tok.encode(images[:, :16, :16])
    # The paper's geometry: 256 px → 32×32×4 latent → 256 tokens of dim 16.
    paper = vae.SDVAETokenizer(vae.AutoencoderKL(vae.VAEConfig()), None, image_size=256, patch_size=2)
    assert (paper.latent_size, paper.seq_len, paper.token_dim) == (32, 256, 16)

    # The registry.
    path = _write_vae_dir(str(tmp_path / "vae"), params)
    cfg = ml_collections.ConfigDict({"tokenizer": {"kind": "sd_vae", "patch_size": 2, "vae_path": path},
                                     "data": {"image_size": 32}})
    made = vae.make_image_tokenizer(cfg)
    assert isinstance(made, vae.SDVAETokenizer) and made.seq_len == 4
    cfg.tokenizer.vae_path = ""
    with pytest.raises(ValueError, match="vae_path"):
        vae.make_image_tokenizer(cfg)


def test_moment_sampling_statistics():
    mean = np.array([0.5, -2.0, 3.0, 0.0], np.float32)
    logvar = np.array([0.0, -2.0, 1.5, -40.0], np.float32)   # the last one is clamped to -30
    moments = np.broadcast_to(np.concatenate([mean, logvar]), (20000, 8))
    want_std = np.exp(0.5 * np.clip(logvar, -30, 20))
    for rng in (jax.random.PRNGKey(0), np.random.default_rng(0)):
        z = np.asarray(cache.sample_latent_from_moments(moments, rng))
        assert z.shape == (20000, 4) and z.dtype == np.float32
        np.testing.assert_allclose(z.mean(0), mean, atol=4 * want_std.max() / np.sqrt(20000))
        np.testing.assert_allclose(z.std(0), want_std, rtol=0.03)
    assert isinstance(cache.sample_latent_from_moments(moments, np.random.default_rng(0)), np.ndarray)
    a = cache.sample_latent_from_moments(moments[:2], jax.random.PRNGKey(1))
    b = cache.sample_latent_from_moments(moments[:2], jax.random.PRNGKey(2))
    assert not np.allclose(a, b)
    with pytest.raises(ValueError):
        cache.sample_latent_from_moments(moments, None)


# ---------------------------------------------------------------------------------------------
# T5 padding mask and the cache
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("spiece")
    words = ["red", "green", "blue", "circle", "square", "small", "large", "a", "on", "the", "left", "photo"]
    rs = np.random.RandomState(0)
    lines = [" ".join(rs.choice(words, 6)) for _ in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(d / "spiece"),
                                   vocab_size=60, model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    return str(d)


def test_t5_padding_mask_from_ids(spiece_dir):
    tok = tokenizers.T5Tokenizer.load(spiece_dir)
    ids = tok.encode_batch(["a red circle", "", "red " * 200], 16)
    mask = t5.padding_mask_from_ids(ids, tok.eos_id)
    assert mask.dtype == np.int32 and mask.shape == (3, 16)
    np.testing.assert_array_equal(mask.sum(-1), [int(np.argmax(ids[0] == 1)) + 1, 1, 16])
    np.testing.assert_array_equal(mask, (ids != tok.pad_id).astype(np.int32))   # content ids are never 0


def _examples(n, size):
    rs = np.random.RandomState(5)
    return [(f"img{i:03d}", rs.randint(0, 256, (size, size, 3)).astype(np.uint8), f"a red circle {i}")
            for i in range(n)]


def test_cache_roundtrip(tmp_path, vae_tok, t5_enc, spiece_dir):
    encoder, t5_tok = t5_enc, tokenizers.T5Tokenizer.load(spiece_dir)
    examples = _examples(4, 32)
    # batch 2 (the shape every test here compiles for), 4 records, 3 per shard → 2 shards.
    paths = cache.write_cache(iter(examples), str(tmp_path / "c"), vae_tok, encoder, t5_tok, image_size=32,
                              batch_size=2, t5_length=16, t5_dtype="float32", records_per_shard=3)
    assert [os.path.basename(p) for p in paths] == ["cache-00000.array_record", "cache-00001.array_record"]
    info = json.load(open(tmp_path / "c" / cache.INFO_FILE))
    assert info["num_records"] == 4 and info["latent_shape"] == [4, 4, 8] and info["scaling_factor"] == 0.18215

    images = np.stack([img for _, img, _ in examples])
    ids = t5_tok.encode_batch([c for _, _, c in examples], 16)
    mask = t5.padding_mask_from_ids(ids, t5_tok.eos_id)
    per_pair = lambda f, x: np.concatenate([np.asarray(f(x[:2])), np.asarray(f(x[2:]))])  # noqa: E731
    want = {"moments": per_pair(vae_tok.encode_moments, images),
            "moments_flip": per_pair(vae_tok.encode_moments, images[:, :, ::-1]),
            "t5_tokens": ids, "t5_mask": mask,
            "t5_features": np.concatenate([np.asarray(encoder(ids[:2], mask[:2])),
                                           np.asarray(encoder(ids[2:], mask[2:]))])}
    records = list(cache.read_cache(str(tmp_path / "c")))
    source = cache.CacheSource(str(tmp_path / "c"))
    assert len(records) == len(source) == 4
    for i, rec in enumerate(records):
        assert rec["key"] == examples[i][0] and rec["caption"] == examples[i][2]
        for name, value in want.items():
            assert rec[name].dtype == value.dtype, name
            np.testing.assert_allclose(rec[name], value[i], rtol=1e-5, atol=1e-6, err_msg=name)
        again = source[i]
        for name in want:
            np.testing.assert_array_equal(again[name], rec[name])
    assert not np.allclose(records[0]["moments"], records[0]["moments_flip"])
    with pytest.raises(IndexError):
        source[4]
    source.close()

    # bfloat16 storage of the T5 features, VAE only / T5 only.
    recs = list(cache.cache_records(iter(examples[:2]), None, encoder, t5_tok, image_size=32, batch_size=2,
                                    t5_length=16))
    assert recs[0]["t5_features"].dtype == jnp.bfloat16 and "moments" not in recs[0]
    np.testing.assert_array_equal(recs[1]["t5_features"], want["t5_features"][1].astype(jnp.bfloat16))
    decoded = cache.decode_record(cache.encode_record(recs[1]))
    assert decoded["t5_features"].dtype == jnp.bfloat16
    recs = list(cache.cache_records(iter(examples[:1]), vae_tok, image_size=32, batch_size=2))   # padded batch
    assert set(recs[0]) == {"key", "caption", "moments", "moments_flip"}


def test_image_folder_examples(tmp_path):
    from PIL import Image
    rs = np.random.RandomState(0)
    for i, (h, w) in enumerate([(40, 60), (90, 50), (32, 32)]):
        Image.fromarray(rs.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text(f"caption {i}\n")
    got = list(cache.image_folder_examples(str(tmp_path), 32))
    assert [k for k, _, _ in got] == ["im0", "im1", "im2"]
    assert [c for _, _, c in got] == ["caption 0", "caption 1", "caption 2"]
    assert all(img.shape == (32, 32, 3) and img.dtype == np.uint8 for _, img, _ in got)
    np.testing.assert_array_equal(got[2][1], np.asarray(Image.open(tmp_path / "im2.png")))
    os.remove(tmp_path / "im1.txt")
    with pytest.raises(FileNotFoundError, match="im1.txt"):
        list(cache.image_folder_examples(str(tmp_path), 32))
