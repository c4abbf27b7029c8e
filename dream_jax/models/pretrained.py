"""Loading PyTorch checkpoints in their public formats into Flax parameter trees.

* `SafetensorsFile` reads the safetensors format directly (an 8-byte header
  length, a JSON header, raw little-endian data), memory-mapped, one tensor at a
  time — no torch and no `safetensors` package needed, and a 3 GB T5 checkpoint
  whose decoder we do not need is never read in full. `open_checkpoint` also
  understands sharded checkpoints (`*.safetensors.index.json`).
* `write_safetensors` writes the same format (tests and tools).
* `load_params` fills a Flax parameter tree from PyTorch tensors whose names
  mirror ours (PyTorch `a.b.0.c.weight` ↔ Flax `a/b_0/c/kernel`), converting
  layouts on the way: conv OIHW → HWIO, linear [out, in] → [in, out], 1×1 convs
  used as linears squeezed. Every key must be used and every parameter filled,
  with the expected shape; otherwise `CheckpointMismatch` names the key.
"""
import json
import os
import struct
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import flax
import jax
import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the model: unknown or missing key, or a wrong shape."""


class SafetensorsFile:
    """Random access to the tensors of one .safetensors file (memory-mapped)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ValueError(f"{path}: not a safetensors file (bad JSON header: {e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._header = header
        self._start = 8 + n
        self._mmap = None

    def keys(self):
        return list(self._header)

    def __contains__(self, key):
        return key in self._header

    def shape(self, key) -> Tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def __getitem__(self, key) -> np.ndarray:
        info = self._header[key]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._mmap[self._start + begin:self._start + end]
        return np.frombuffer(raw.tobytes(), dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])


class ShardedCheckpoint:
    """Several safetensors files behind one `weight_map` (HF `*.safetensors.index.json`)."""

    def __init__(self, index_path: str):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        folder = os.path.dirname(index_path)
        files = {name: SafetensorsFile(os.path.join(folder, name)) for name in sorted(set(weight_map.values()))}
        self._where = {key: files[name] for key, name in weight_map.items()}
        self.path = index_path

    def keys(self):
        return list(self._where)

    def __contains__(self, key):
        return key in self._where

    def shape(self, key):
        return self._where[key].shape(key)

    def __getitem__(self, key):
        return self._where[key][key]


def open_checkpoint(path: str, filename: str):
    """A file, or a directory holding `filename` (or its sharded `filename.index.json`)."""
    if os.path.isdir(path):
        single = os.path.join(path, filename)
        index = os.path.join(path, filename.replace(".safetensors", ".safetensors.index.json"))
        if os.path.exists(single):
            return SafetensorsFile(single)
        if os.path.exists(index):
            return ShardedCheckpoint(index)
        raise FileNotFoundError(f"{path} holds neither {filename} nor {os.path.basename(index)} "
                                "(only safetensors checkpoints are supported)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.endswith(".index.json"):
        return ShardedCheckpoint(path)
    return SafetensorsFile(path)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Optional[dict] = None):
    """Write tensors (C order, little endian) in the safetensors format."""
    header, blobs, offset = {}, [], 0
    for key in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[key]))
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {key!r}: dtype {arr.dtype} has no safetensors name")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[key] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


# ---------------------------------------------------------------------------------------------
# PyTorch names ↔ Flax paths
# ---------------------------------------------------------------------------------------------
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def torch_key_to_module_path(key: str) -> Tuple[Tuple[str, ...], str]:
    """'a.b.0.c.weight' → (('a', 'b_0', 'c'), 'weight'): list indices join their parent's name."""
    parts = key.split(".")
    leaf, out = parts[-1], []
    for part in parts[:-1]:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out), leaf


# Module names that are PyTorch lists (`resnets.0` ↔ `resnets_0`); any other `_N` suffix is
# part of the PyTorch name itself (T5's `wi_0`).
LIST_NAMES = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers",
                        "upsamplers", "to_out", "block", "layer"})


def module_path_to_torch_key(path: Tuple[str, ...], prefix: str = "") -> str:
    """Inverse of `torch_key_to_module_path` for a full Flax parameter path."""
    *modules, leaf = path
    parts = []
    for m in modules:
        head, _, tail = m.rpartition("_")
        parts.extend([head, tail] if head in LIST_NAMES and tail.isdigit() else [m])
    parts.append("bias" if leaf == "bias" else "weight")
    return prefix + ".".join(parts)


def _convert(key: str, value: np.ndarray, leaf: str, target_shape: Tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4 and len(target_shape) == 4:
            value = value.transpose(2, 3, 1, 0)                  # OIHW → HWIO
        elif value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0].T                          # 1×1 conv used as a linear
        elif value.ndim == 2 and len(target_shape) == 2:
            value = value.T                                      # linear [out, in] → [in, out]
    if tuple(value.shape) != tuple(target_shape):
        raise CheckpointMismatch(
            f"checkpoint tensor {key!r} has shape {tuple(value.shape)} after conversion to the Flax "
            f"layout, but the model expects {tuple(target_shape)}")
    return value


def load_params(abstract_params, checkpoint, keys: Iterable[str], rename: Callable[[str], str],
                *, model_name: str, expected_key: Callable[[Tuple[str, ...]], str],
                dtype=np.float32) -> Dict:
    """Fill `abstract_params` (a tree of ShapeDtypeStructs) from `checkpoint[key]` for `keys`.

    `rename` maps a checkpoint key to a canonical PyTorch-style name mirroring our
    module tree; `expected_key` maps a Flax path back to the key a checkpoint
    should have had (for the "missing" message).
    """
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(abstract_params))
    out = {}
    for key in keys:
        modules, leaf = torch_key_to_module_path(rename(key))
        if leaf == "bias":
            candidates = [modules + ("bias",)]
        elif leaf == "weight":
            candidates = [modules + (name,) for name in _WEIGHT_LEAVES]
        else:
            candidates = []
        found = [c for c in candidates if c in flat]
        if not found:
            raise CheckpointMismatch(f"checkpoint key {key!r} has no counterpart in the {model_name} "
                                     f"model (looked for {'/'.join(modules)}/{leaf})")
        path = found[0]
        if path in out:
            raise CheckpointMismatch(f"checkpoint key {key!r} fills {'/'.join(path)} a second time")
        value = np.asarray(checkpoint[key])
        out[path] = _convert(key, value, path[-1], flat[path].shape).astype(dtype)
    missing = [p for p in flat if p not in out]
    if missing:
        names = ", ".join(f"{expected_key(p)!r} (for {'/'.join(p)})" for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointMismatch(f"the checkpoint lacks {len(missing)} {model_name} tensor(s): {names}{more}")
    return flax.traverse_util.unflatten_dict({p: jax.numpy.asarray(v) for p, v in out.items()})


def export_state_dict(params, torch_key: Callable[[Tuple[str, ...]], str]) -> Dict[str, np.ndarray]:
    """The inverse of `load_params`: Flax params → PyTorch-layout numpy tensors by name.

    Used to write checkpoints of randomly initialised models (tests, tools) without torch.
    """
    out = {}
    for path, value in flax.traverse_util.flatten_dict(flax.core.meta.unbox(params)).items():
        value = np.asarray(value)
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        out[torch_key(path)] = np.ascontiguousarray(value)
    return out
