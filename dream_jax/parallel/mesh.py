"""The device mesh and the logical-axis rules: the one place that says what is sharded how.

Mesh axes: ('data', 'fsdp', 'tensor').
  - the batch goes over data × fsdp;
  - fsdp shards the embedding (model-width) dimension of weights;
  - tensor shards attention heads, MLP hidden units and vocabularies;
  - activations are sharded over the batch only ('act_embed' is replicated).
Rules can be replaced from the config (`config.mesh.rules`), as a list of
(logical_name, mesh_axes) pairs.
"""
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("seq", None),
    ("act_embed", None),    # activations between blocks: replicated over fsdp/tensor
    ("pos", None),
    ("token_dim", None),
    ("text_feature", None),
    ("cond", None),
    ("layers", None),       # depth axis of scanned blocks: every device holds every layer's shard
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple:
    """Resolve (data, fsdp, tensor) with at most one -1 ("the rest of the devices")."""
    shape = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
    for axis, size in zip(MESH_AXES, shape):
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{axis}={size} must be a positive size or -1")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} has more than one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, "
                         f"have {num_devices}")
    return tuple(shape)


def make_mesh(mesh_cfg, devices: Optional[Sequence] = None) -> jax.sharding.Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def logical_rules(mesh_cfg=None):
    rules = mesh_cfg.get("rules") if mesh_cfg is not None else None
    if not rules:
        return DEFAULT_RULES
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dimension over data × fsdp, everything else replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def batch_parallelism(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def host_to_global(batch, mesh):
    """Host-local numpy batch → global jax.Arrays sharded over the batch axes.

    Each process passes only its own slice; the global batch is the
    concatenation over processes (works unchanged with one process).
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
