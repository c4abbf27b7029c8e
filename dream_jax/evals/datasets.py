"""Labelled image sets for the probes: the synthetic world's attributes (offline, the
default) and a hook for any random-access source such as ``tfds.data_source``
(ArrayRecord-backed ImageNet, …).

A probe set is ``dict(images=uint8 [N, S, S, 3], labels={task: int [N]},
num_classes={task: int})``; labels < 0 mean "not applicable" and are skipped.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np

from dream_jax.data import synthetic
from dream_jax.evals.fid import center_crop_resize

# Probe tasks on the synthetic world: name → (label key, number of classes, label offset).
SYNTHETIC_TASKS: Dict[str, tuple] = {
    "colour": ("colour", len(synthetic.COLOURS), 0),
    "shape": ("shape", len(synthetic.SHAPES), 0),
    "size": ("size", len(synthetic.SIZES), 0),
    "background": ("background", len(synthetic.BACKGROUNDS), 0),
    "pos_x": ("pos_x", len(synthetic.POS_X), 0),
    "pos_y": ("pos_y", len(synthetic.POS_Y), 0),
    "count": ("num_objects", 2, -1),                 # 1 or 2 objects → class 0 / 1
}
DEFAULT_SYNTHETIC_TASKS = ("colour", "shape", "size", "background", "count")


def synthetic_probe_set(image_size: int, split: str, n: int, world_seed: int = 0,
                        tasks: Sequence[str] = DEFAULT_SYNTHETIC_TASKS, start: int = 0) -> dict:
    """Examples ``start .. start+n-1`` of a split of the synthetic world with attribute labels."""
    unknown = sorted(set(tasks) - set(SYNTHETIC_TASKS))
    if unknown:
        raise ValueError(f"unknown synthetic probe task(s) {unknown}; choose from {sorted(SYNTHETIC_TASKS)}")
    world = synthetic.SyntheticWorld(image_size, split, world_seed,
                                     num_examples=max(start + n, synthetic.DEFAULT_LENGTHS[split]))
    examples = [world[i] for i in range(start, start + n)]
    labels = {}
    for task in tasks:
        key, _, offset = SYNTHETIC_TASKS[task]
        labels[task] = np.asarray([e["labels"][key] + offset for e in examples], np.int32)
    return dict(images=np.stack([e["image"] for e in examples]), labels=labels,
                num_classes={t: SYNTHETIC_TASKS[t][1] for t in tasks},
                heldout_combo=np.asarray([e["labels"]["heldout_combo"] for e in examples], np.int32))


def source_probe_set(source, n: Optional[int], image_size: int, num_classes: int,
                     image_key: str = "image", label_key: str = "label", task: str = "label",
                     decode: Optional[Callable] = None, seed: Optional[int] = 0) -> dict:
    """A probe set from any random-access source of records (``len`` and ``[i]``), e.g.
    ``tfds.data_source('imagenet2012', split='train')``: ``n`` records (a seeded random
    subset when ``seed`` is not None, else the first ``n``; None: all), centre-cropped and
    resized to ``image_size``. ``decode`` turns a stored image (e.g. JPEG bytes) into uint8
    [H, W, 3] (default: PIL for bytes, identity for arrays)."""
    total = len(source)
    n = total if n is None else min(int(n), total)
    index = (np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
             if seed is not None and n < total else np.arange(n))
    images, labels = [], []
    for i in index:
        rec = source[int(i)]
        img = rec[image_key]
        img = decode(img) if decode is not None else _default_decode(img)
        images.append(center_crop_resize(img, image_size))
        labels.append(int(rec[label_key]))
    return dict(images=np.stack(images), labels={task: np.asarray(labels, np.int32)},
                num_classes={task: int(num_classes)})


def _default_decode(img):
    if isinstance(img, (bytes, bytearray)):
        import io

        from PIL import Image

        with Image.open(io.BytesIO(img)) as im:
            return np.asarray(im.convert("RGB"))
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr.astype(np.uint8)


def tfds_probe_sets(name: str, image_size: int, n_train: Optional[int], n_test: Optional[int],
                    data_dir: Optional[str] = None, train_split: str = "train",
                    test_split: str = "validation", num_classes: Optional[int] = None) -> tuple:
    """(train, test) probe sets from a prepared ``array_record`` TFDS dataset (no TensorFlow
    needed: ``tfds.data_source``). For ImageNet: ``name='imagenet2012'``."""
    import tensorflow_datasets as tfds

    train = tfds.data_source(name, split=train_split, data_dir=data_dir)
    test = tfds.data_source(name, split=test_split, data_dir=data_dir)
    if num_classes is None:
        num_classes = tfds.builder(name, data_dir=data_dir).info.features["label"].num_classes
    return (source_probe_set(train, n_train, image_size, num_classes),
            source_probe_set(test, n_test, image_size, num_classes, seed=None))


def pixel_features(images: np.ndarray, size: int = 32) -> np.ndarray:
    """The raw-pixel baseline: images area-downsampled to at most ``size``² (integer factor),
    flattened, scaled to [0, 1]."""
    x = np.asarray(images, np.float32) / 255.0
    f = max(1, x.shape[1] // size)
    if f > 1:
        h = (x.shape[1] // f) * f
        x = x[:, :h, :h].reshape(len(x), h // f, f, h // f, f, 3).mean(axis=(2, 4))
    return x.reshape(len(x), -1)
