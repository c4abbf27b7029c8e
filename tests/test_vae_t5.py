"""Parity of the Flax SD-VAE and T5 encoder with the PyTorch references (diffusers AutoencoderKL,
transformers T5EncoderModel) on tiny random-weight configs saved with `save_pretrained` and loaded
by our loaders. float32, max abs diff < 1e-4.

Needs the test extra (requirements-test.txt: torch CPU, diffusers, transformers); skipped as a
whole without torch. Loader/cache/tokenizer tests that need no torch: test_vae_t5_local.py.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from dream_jax.models import t5, vae  # noqa: E402

TOL = 1e-4


def _perturb_vectors(module, seed):
    """Norm scales/biases and conv/linear biases are 1/0 at init: make them random too."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + 0.2 * torch.randn_like(p))
    return module.eval()


@pytest.fixture(scope="module")
def torch_vae(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=4, latent_channels=4)
    model = _perturb_vectors(model, 1)
    path = str(tmp_path_factory.mktemp("vae"))
    model.save_pretrained(path)
    return model, path


def test_vae_parity(torch_vae):
    ref, path = torch_vae
    tok = vae.SDVAETokenizer.from_pretrained(path, image_size=32, patch_size=2)
    assert tok.cfg.layers_per_block == 2 and tok.cfg.norm_num_groups == 4
    images = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    x = images.astype(np.float32) / 127.5 - 1.0
    z = np.random.RandomState(1).randn(2, 4, 4, 4).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        mean = post.mean.permute(0, 2, 3, 1).numpy()
        logvar = post.logvar.permute(0, 2, 3, 1).numpy()
        decoded = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()

    moments = np.asarray(tok.encode_moments(images))
    ours_dec = np.asarray(tok._decode(tok.params, jnp.asarray(z)))
    diffs = {"mean": np.abs(moments[..., :4] - mean).max(), "logvar": np.abs(moments[..., 4:] - logvar).max(),
             "decode": np.abs(ours_dec - decoded).max()}
    print("VAE parity max abs diff:", diffs)
    assert max(diffs.values()) < TOL, diffs
    assert np.abs(decoded).max() > 0.1 and np.abs(logvar).max() > 0.1   # a non-degenerate comparison

    # Tokens: the mean latent × 0.18215 in MAR's patch order; decode inverts the scaling.
    tokens = np.asarray(tok.encode(images))
    np.testing.assert_allclose(tokens, vae.patchify(mean * 0.18215, 2), atol=TOL)
    with torch.no_grad():
        ref_img = ref.decode(torch.from_numpy(mean).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    ref_img = np.clip(np.round((ref_img + 1) * 127.5), 0, 255)
    assert np.abs(np.asarray(tok.decode(tokens), np.float32) - ref_img).max() <= 1.0


def _hf_t5(proj, seed):
    cfg = transformers.T5Config(vocab_size=100, d_model=16, d_kv=6, d_ff=32, num_layers=3, num_heads=4,
                                relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                feed_forward_proj=proj)
    torch.manual_seed(seed)
    return _perturb_vectors(transformers.T5EncoderModel(cfg), seed + 1)


def _ids_and_mask():
    rs = np.random.RandomState(2)
    ids = rs.randint(2, 100, (3, 40))           # 40 > max_distance: the log-spaced buckets are used
    mask = np.ones_like(ids)
    for i, n in enumerate([40, 25, 3]):
        ids[i, n - 1] = 1                       # EOS
        ids[i, n:] = 0
        mask[i, n:] = 0
    return ids, mask


@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_t5_parity(tmp_path, proj):
    ref = _hf_t5(proj, seed=3)
    ref.save_pretrained(str(tmp_path))
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        want_masked = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        want_plain = ref(input_ids=torch.from_numpy(ids)).last_hidden_state
    masked = t5.T5TextEncoder.from_pretrained(str(tmp_path), padding_mask=True)
    assert masked.cfg.is_gated_act == (proj == "gated-gelu") and masked.cfg.num_layers == 3
    plain = t5.T5TextEncoder(masked.model, masked.params, padding_mask=False)
    diffs = {"padding_mask": np.abs(np.asarray(masked(ids, mask)) - want_masked.numpy()).max(),
             "no_mask": np.abs(np.asarray(plain(ids, mask)) - want_plain.numpy()).max()}
    print(f"T5 ({proj}) parity max abs diff:", diffs)
    assert max(diffs.values()) < TOL, diffs
    # The switch matters on padded rows, and not on the full one.
    gap = np.abs(want_masked.numpy() - want_plain.numpy())
    assert gap[1:].max() > 1e-2 and gap[0].max() < 1e-5


def test_t5_from_conditional_generation_checkpoint(tmp_path):
    cfg = transformers.T5Config(vocab_size=100, d_model=16, d_kv=6, d_ff=32, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                tie_word_embeddings=False)
    torch.manual_seed(4)
    full = _perturb_vectors(transformers.T5ForConditionalGeneration(cfg), 5)
    full.save_pretrained(str(tmp_path))
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        want = full.encoder(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    ours = t5.T5TextEncoder.from_pretrained(str(tmp_path))
    assert np.abs(np.asarray(ours(ids, mask)) - want).max() < TOL
