"""Sharded training on 8 fake CPU devices: every mesh gives the same step; weights really shard."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dream_jax import train
from dream_jax.data import pipeline
from dream_jax.data.synthetic import SyntheticWorld
from dream_jax.data.tokenizers import train_caption_bpe
from dream_jax.models.build import build_model
from dream_jax.models.vae import make_image_tokenizer
from dream_jax.parallel import mesh as mesh_lib
from tests.test_train import small_config

MESHES = [(1, 1, 1), (8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 8, 1)]


@pytest.fixture(scope="module")
def setup():
    cfg = small_config()
    tok = train_caption_bpe(SyntheticWorld(16, "train").captions(2000), vocab_size=cfg.data.text_vocab_size)
    image_tokenizer = make_image_tokenizer(cfg)
    model = build_model(cfg, tok, image_tokenizer)
    tx = train.make_optimizer(cfg)
    batch = next(pipeline.make_train_iterator(cfg, tok))
    batch = {k: batch[k] for k in ("image", "clip_tokens", "gen_tokens")}
    empty = jnp.asarray(tok.encode_batch([""], cfg.data.gen_context)[0])
    return cfg, model, tx, image_tokenizer, batch, empty


_RESULTS = {}


def one_step(setup, shape):
    if shape not in _RESULTS:
        _RESULTS[shape] = _one_step(setup, shape)
    return _RESULTS[shape]


def _one_step(setup, shape):
    cfg, model, tx, image_tokenizer, batch, empty = setup
    devices = jax.devices()[: int(np.prod(shape))]
    mesh = jax.make_mesh(shape, mesh_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)
    rules = mesh_lib.DEFAULT_RULES
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shardings, _, init_fn, step_fn = train.jit_state_and_step(cfg, model, tx, image_tokenizer, empty,
                                                                  mesh, rules)
        state = init_fn()
        state, metrics = step_fn(state, mesh_lib.host_to_global(batch, mesh))
    return jax.device_get(state), jax.device_get(metrics), state, shardings


def test_same_step_on_every_mesh(setup):
    ref_state, ref_metrics, _, _ = one_step(setup, MESHES[0])
    assert np.isfinite(ref_metrics["loss"])
    for shape in MESHES[1:]:
        state, metrics, _, _ = one_step(setup, shape)
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-5, err_msg=str(shape))
        for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=str(shape))


def _spec(shardings, *path):
    node = shardings.params
    for p in path:
        node = node[p]
    return node.spec


def test_weights_are_sharded_under_fsdp_and_tensor(setup):
    _, _, state, shardings = one_step(setup, (2, 2, 2))
    qkv = ("encoder", "blocks", "block_0", "attn", "query_kernel")      # [embed, heads, kv]
    fc1 = ("decoder", "blocks", "block_0", "mlp", "fc1", "kernel")      # [embed, mlp]
    assert _spec(shardings, *qkv) == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert _spec(shardings, *fc1) == jax.sharding.PartitionSpec("fsdp", "tensor")
    node = state.params
    for p in fc1:
        node = node[p]
    # Each device holds a quarter of the matrix (2-way fsdp × 2-way tensor).
    shard_shapes = {s.data.shape for s in node.addressable_shards}
    assert shard_shapes == {(node.shape[0] // 2, node.shape[1] // 2)}
    # Optimizer moments follow their parameters.
    mu = state.opt_state[1][0].mu
    for p in fc1:
        mu = mu[p]
    assert mu.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_scanned_weights_keep_their_sharding(setup):
    """Under scan_layers the stacked depth axis is replicated and the weight axes shard as before."""
    _, _, tx, image_tokenizer, _, _ = setup
    cfg = small_config()
    cfg.model.overrides = dict(cfg.model.overrides, scan_layers=True)
    tok = train_caption_bpe(SyntheticWorld(16, "train").captions(2000), vocab_size=cfg.data.text_vocab_size)
    model = build_model(cfg, tok, image_tokenizer)
    mesh = jax.make_mesh((2, 2, 2), mesh_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    shardings, abstract = train.state_shardings(model, tx, 0, mesh, mesh_lib.DEFAULT_RULES)
    fc1 = ("decoder", "blocks", "scanned", "block", "mlp", "fc1", "kernel")
    assert _spec(shardings, *fc1) == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    node = abstract.params
    for p in fc1:
        node = node[p]
    assert node.shape[0] == model.arch.depth
