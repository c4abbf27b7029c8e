"""InceptionV3 as used for FID (the TF "2015-12-05" graph that pytorch-fid and
torch-fidelity port), in Flax, with weights read from torch-fidelity's .pth file.

Architecture (NHWC here; every conv is bias-free + BatchNorm(eps 1e-3) + ReLU):

  stem     3×3/2 32 · 3×3 32 · 3×3 64 (pad 1) · maxpool 3/2 · 1×1 80 · 3×3 192 · maxpool 3/2
  5b,5c,5d InceptionA (pool features 32, 64, 64)              → 35×35×288
  6a       InceptionB (stride-2 reduction)                    → 17×17×768
  6b..6e   InceptionC (7×7 factorised; c7 = 128, 160, 160, 192)
  7a       InceptionD (stride-2 reduction)                    →  8×8×1280
  7b       InceptionE, average pool branch                   →  8×8×2048
  7c       InceptionE, MAX pool branch (a quirk of the FID graph)
  global average pool → 2048 "pool" features; fc 2048 → 1008 logits.

The FID-specific details: every average pool excludes the padding from its
count (TensorFlow's behaviour); Mixed_7c pools with a 3×3/1 max pool; the input
is a uint8 image resized to 299×299 with TensorFlow 1.x's bilinear resize
(``align_corners=False`` *without* half-pixel centres: source = dest·in/out)
and mapped to [-1, 1] by (x − 128) / 128.

Module and parameter names mirror torch-fidelity's ``FeatureExtractorInceptionV3``
state dict (``Mixed_6b.branch7x7_2.conv.weight`` ↔
``Mixed_6b/branch7x7_2/conv/kernel``), so :func:`variables_from_torch` is a
rename + transpose. :func:`load_torch_state_dict` reads a ``torch.save``-d state
dict (zip or legacy format) without PyTorch.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import io
import os
import pickle
import zipfile
from typing import Any, Dict, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
# torch-fidelity's converted weights (download it yourself; nothing here goes online).
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


# =============================================================================================
# The TF1 bilinear resize.
# =============================================================================================
def _tf1_grid(in_size: int, out_size: int):
    """Source indices/fractions of TF 1.x ``resize_bilinear(align_corners=False)``:
    src = dst · (in/out) in float32, low = floor, high = min(low + 1, in − 1)."""
    scale = np.float32(in_size / out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, frac


def resize_bilinear_tf1(x, size: Tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)):
    """TF1-compatible bilinear resize of float [B, H, W, C] to ``size`` (interpolates
    along W first, then along H, exactly as the TF kernel does)."""
    h, w = x.shape[1], x.shape[2]
    ylo, yhi, dy = _tf1_grid(h, size[0])
    xlo, xhi, dx = _tf1_grid(w, size[1])
    top, bottom = x[:, ylo], x[:, yhi]
    dx = jnp.asarray(dx)[None, None, :, None]
    dy = jnp.asarray(dy)[None, :, None, None]
    t0, t1 = top[:, :, xlo], top[:, :, xhi]
    b0, b1 = bottom[:, :, xlo], bottom[:, :, xhi]
    row0 = t0 + (t1 - t0) * dx
    row1 = b0 + (b1 - b0) * dx
    return row0 + (row1 - row0) * dy


# =============================================================================================
# The network.
# =============================================================================================
def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
    features: int
    kernel: Any = 1
    stride: int = 1
    padding: Any = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                    param_dtype=self.dtype, kernel_init=nn.initializers.he_normal(), name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype,
                         param_dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x):
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_reduce(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, dtype=self.dtype)
        b1 = C(64, name="branch1x1")(x)
        b5 = C(64, 5, padding=2, name="branch5x5_2")(C(48, name="branch5x5_1")(x))
        b3 = C(64, name="branch3x3dbl_1")(x)
        b3 = C(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = C(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = C(self.pool_features, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, dtype=self.dtype)
        b3 = C(384, 3, stride=2, name="branch3x3")(x)
        bd = C(64, name="branch3x3dbl_1")(x)
        bd = C(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = C(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_reduce(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, dtype=self.dtype)
        c7 = self.channels_7x7
        b1 = C(192, name="branch1x1")(x)
        b7 = C(c7, name="branch7x7_1")(x)
        b7 = C(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = C(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = C(c7, name="branch7x7dbl_1")(x)
        bd = C(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = C(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = C(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = C(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = C(192, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, dtype=self.dtype)
        b3 = C(320, 3, stride=2, name="branch3x3_2")(C(192, name="branch3x3_1")(x))
        b7 = C(192, name="branch7x7x3_1")(x)
        b7 = C(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = C(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = C(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_reduce(x)], axis=-1)


class InceptionE(nn.Module):
    pool: str = "avg"        # 'avg' (Mixed_7b) or 'max' (Mixed_7c, the FID graph's quirk)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, dtype=self.dtype)
        b1 = C(320, name="branch1x1")(x)
        b3 = C(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([C(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              C(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = C(448, name="branch3x3dbl_1")(x)
        bd = C(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([C(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              C(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_same(x)
        else:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = C(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """uint8 (or float in [0, 255]) images [B, H, W, 3] → {'pool': [B, 2048], 'logits': [B, 1008]}.

    ``resize``: apply the TF1 bilinear resize to ``size``×``size`` (as torch-fidelity does;
    always on for FID). ``size``: 299 for FID; smaller (>= 75) only for smoke tests.
    ``with_logits``: also run the classifier layer.
    """

    dtype: Any = jnp.float32
    resize: bool = True
    with_logits: bool = False
    size: int = INPUT_SIZE

    @nn.compact
    def __call__(self, images):
        x = images.astype(self.dtype)
        if self.resize:
            x = resize_bilinear_tf1(x, (self.size, self.size))   # at 299 → 299 the identity
        x = (x - 128) / 128
        C = functools.partial(BasicConv, dtype=self.dtype)
        x = C(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = C(32, 3, name="Conv2d_2a_3x3")(x)
        x = C(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_reduce(x)
        x = C(80, 1, name="Conv2d_3b_1x1")(x)
        x = C(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_reduce(x)
        x = InceptionA(32, self.dtype, name="Mixed_5b")(x)
        x = InceptionA(64, self.dtype, name="Mixed_5c")(x)
        x = InceptionA(64, self.dtype, name="Mixed_5d")(x)
        x = InceptionB(self.dtype, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, self.dtype, name=name)(x)
        x = InceptionD(self.dtype, name="Mixed_7a")(x)
        x = InceptionE("avg", self.dtype, name="Mixed_7b")(x)
        x = InceptionE("max", self.dtype, name="Mixed_7c")(x)
        pool = x.mean(axis=(1, 2))
        out = {"pool": pool.astype(jnp.float32)}
        # Created whatever with_logits says, so the variables always hold the fc layer.
        fc = nn.Dense(NUM_LOGITS, dtype=self.dtype, param_dtype=self.dtype, name="fc")
        if self.with_logits or self.is_initializing():
            out["logits"] = fc(pool).astype(jnp.float32)
        return out


def _template():
    """Abstract variables (shapes only) of the network."""
    return flax.core.unfreeze(jax.eval_shape(lambda: InceptionV3FID().init(
        jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3), jnp.uint8))))


def init_variables(seed: int = 0) -> dict:
    """Random weights (He-normal kernels, identity BatchNorm, drawn with NumPy: no compile), for
    tests and smoke runs. FID values computed with them are NOT comparable to published ones."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flax.traverse_util.flatten_dict(_template()).items():
        name = path[-1]
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
        elif name in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        out[path] = value.astype(np.float32)
    return flax.traverse_util.unflatten_dict(out)


# =============================================================================================
# Reading torch.save files without torch.
# =============================================================================================
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _LazyStorage:
    """A storage of a legacy file, whose bytes follow the pickle (filled in afterwards)."""

    def __init__(self, dtype):
        self.dtype, self.data = np.dtype(dtype), None


class _Deferred:
    """A tensor over a _LazyStorage, rebuilt once the storage bytes are read."""

    def __init__(self, args):
        self.args = args


def _strided_copy(storage: np.ndarray, offset, size, stride):
    if len(size) == 0:
        return storage[offset].copy()
    if any(s == 0 for s in size):
        return np.zeros(tuple(size), storage.dtype)
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * storage.dtype.itemsize for s in stride))
    return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    if isinstance(storage, _LazyStorage):
        return _Deferred((storage, offset, size, stride))
    return _strided_copy(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


def _resolve(obj):
    if isinstance(obj, _Deferred):
        storage, *rest = obj.args
        return _strided_copy(storage.data, *rest)
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    return obj


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a state dict of tensors into NumPy arrays; refuses anything else."""

    def __init__(self, f, load_storage):
        super().__init__(f)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(
            f"unsupported object {module}.{name} in a torch file: only state dicts of tensors can "
            f"be read without torch")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return self._load_storage(str(pid[2]), pid[1].dtype)


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """{name: np.ndarray} of a ``torch.save``-d state dict (zip format of torch >= 1.6 or the
    legacy format), read with the standard library and NumPy only (little-endian files)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK":
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not pkl:
                raise ValueError(f"{path}: a zip file without data.pkl is not a torch.save file")
            prefix = pkl[0][: -len("data.pkl")]
            cache = {}

            def load_storage(key, dtype):
                if key not in cache:
                    cache[key] = np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=dtype)
                return cache[key]

            obj = _TorchUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()
    else:
        with open(path, "rb") as f:
            if pickle.load(f) != _LEGACY_MAGIC:
                raise ValueError(f"{path} is neither a zip nor a legacy torch.save file")
            pickle.load(f)          # protocol version
            pickle.load(f)          # system info
            storages = {}

            def load_storage(key, dtype):
                return storages.setdefault(key, _LazyStorage(dtype))

            obj = _TorchUnpickler(f, load_storage).load()
            for key in pickle.load(f):
                st = storages[str(key)]
                n = int(np.frombuffer(f.read(8), "<i8")[0])
                st.data = np.frombuffer(f.read(n * st.dtype.itemsize), dtype=st.dtype)
    obj = _resolve(obj)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {str(k): np.asarray(v) for k, v in obj.items()}


def variables_from_torch(state_dict: Dict[str, np.ndarray], dtype=np.float32) -> dict:
    """torch-fidelity's state dict → Flax variables of :class:`InceptionV3FID`.

    Checks that every parameter is present with the right shape and that the file
    holds nothing unexpected (``num_batches_tracked`` counters are ignored).
    """
    flat = flax.traverse_util.flatten_dict(_template())
    used, out = set(), {}
    for path, leaf in flat.items():
        collection, *mod, leaf_name = path
        prefix = ".".join(mod)
        if collection == "params" and leaf_name == "kernel" and mod[-1] == "conv":
            key, fn = f"{prefix}.weight", lambda w: np.transpose(w, (2, 3, 1, 0))     # OIHW → HWIO
        elif collection == "params" and leaf_name == "kernel":
            key, fn = f"{prefix}.weight", lambda w: w.T                                # [out, in] → [in, out]
        elif collection == "params" and leaf_name == "scale":
            key, fn = f"{prefix}.weight", lambda w: w
        elif collection == "params" and leaf_name == "bias":
            key, fn = f"{prefix}.bias", lambda w: w
        elif collection == "batch_stats" and leaf_name == "mean":
            key, fn = f"{prefix}.running_mean", lambda w: w
        elif collection == "batch_stats" and leaf_name == "var":
            key, fn = f"{prefix}.running_var", lambda w: w
        else:
            raise AssertionError(f"unexpected Inception variable {path}")
        if key not in state_dict:
            raise KeyError(f"Inception weights lack {key!r} (is this torch-fidelity's InceptionV3 file?)")
        value = fn(np.asarray(state_dict[key]))
        if value.shape != leaf.shape:
            raise ValueError(f"Inception weight {key!r} has shape {value.shape} after conversion, "
                             f"expected {leaf.shape}")
        out[path] = value.astype(dtype)
        used.add(key)
    extra = sorted(k for k in state_dict if k not in used and not k.endswith("num_batches_tracked"))
    if extra:
        raise ValueError(f"Inception weights hold unexpected entries, e.g. {extra[:5]}")
    return flax.traverse_util.unflatten_dict(out)


def flatten_variables(variables) -> Dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(flax.core.unfreeze(variables)).items()}


def load_variables(path: str, dtype=np.float32) -> dict:
    """Inception variables from torch-fidelity's ``.pth`` or from an ``.npz`` written by
    :func:`save_variables`."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no Inception weights at {path}; FID needs torch-fidelity's {TORCH_FIDELITY_WEIGHTS} "
            f"(or an .npz made by dream_jax.evals.inception.save_variables)")
    if path.endswith(".npz"):
        with np.load(path) as z:
            flat = {tuple(k.split("/")): z[k].astype(dtype) for k in z.files}
        return flax.traverse_util.unflatten_dict(flat)
    return variables_from_torch(load_torch_state_dict(path), dtype)


def save_variables(path: str, variables) -> None:
    np.savez(path, **flatten_variables(variables))


def variables_fingerprint(variables) -> str:
    """A short hash of the weights (cache keys of reference statistics depend on it)."""
    h = hashlib.sha1()
    for k, v in sorted(flatten_variables(variables).items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v, np.float32).tobytes()[:4096])
        h.update(np.float64(np.asarray(v, np.float64).sum()).tobytes())
    return h.hexdigest()[:16]


# =============================================================================================
# Sharded feature extraction.
# =============================================================================================
class InceptionExtractor:
    """Pool (2048-d) features of uint8 images, the batch sharded over the local devices.

        extractor = InceptionExtractor.from_file("weights-inception-2015-12-05-6726825d.pth")
        feats = extractor(images_uint8_nhwc)          # float32 [N, 2048]

    Each call pads the last batch (and every batch to a multiple of the device count);
    one compilation per (batch, H, W).
    """

    def __init__(self, variables, batch_size: int = 64, devices: Optional[Sequence] = None,
                 with_logits: bool = False, input_size: int = INPUT_SIZE):
        self.devices = list(devices) if devices is not None else jax.local_devices()
        n = len(self.devices)
        self.batch_size = max(n, -(-int(batch_size) // n) * n)
        self.mesh = jax.sharding.Mesh(np.asarray(self.devices), ("batch",))
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P("batch"))
        self.variables = jax.device_put(variables, self.replicated)
        self.input_size = int(input_size)
        self.fingerprint = variables_fingerprint(variables) + (
            "" if self.input_size == INPUT_SIZE else f"_{self.input_size}px")
        self.with_logits = with_logits
        model = InceptionV3FID(with_logits=with_logits, size=self.input_size)
        self._apply = jax.jit(lambda v, x: model.apply(v, x), in_shardings=(self.replicated, self.sharded),
                              out_shardings=self.sharded)

    @classmethod
    def from_file(cls, path: str, **kwargs) -> "InceptionExtractor":
        return cls(load_variables(path), **kwargs)

    def batches(self, images):
        """Yields pool features batch by batch (images: array or iterable of arrays)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (as torch-fidelity), got {images.dtype}")
        bs = self.batch_size
        for lo in range(0, len(images), bs):
            chunk = images[lo:lo + bs]
            real = len(chunk)
            if real < bs:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - real, axis=0)])
            out = self._apply(self.variables, jax.device_put(chunk, self.sharded))
            yield {k: np.asarray(v)[:real] for k, v in out.items()}

    def __call__(self, images) -> np.ndarray:
        feats = [b["pool"] for b in self.batches(images)]
        return np.concatenate(feats) if feats else np.zeros((0, POOL_DIM), np.float32)
