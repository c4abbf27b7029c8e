"""Input pipelines that hand the trainer the batch contract of design.md:

    image uint8 [B, H, W, 3], clip_tokens int32 [B, Lc], gen_tokens int32 [B, Lg],
    labels {name: int32 [B]} (synthetic world only)

Sources are random access (grain MapDataset): seeded global shuffle, then each
process takes its own disjoint slice, then a per-record transform, then
batching with drop_remainder. The iterator's state goes into the checkpoint.

``data.source='arrayrecord'`` (shards written by ``dream_jax.data.ingest``,
schema in ``data/records.py``)::

    ArrayRecord shards of data.path (manifest order)
      → shuffle(seed=cfg.seed).repeat()          global, reshuffled every epoch
      → [process_index::process_count]           disjoint per-host slices
      → DecodeImageText (map_with_index)         parse, decode, RGB, ADM centre
            crop to data.image_size, flip (p=0.5, a hash of (seed, key, epoch):
            the same on any host layout), CLIP + generation tokens
      → to_iter_dataset(ReadOptions(data.read_threads))
      → FilterCountBatch(local batch, drop_remainder)   bad records are dropped
            and counted, never replaced
      → mp_prefetch(data.worker_count)           optional, worker processes
      → counting iterator (main process)         ``it.counters`` for the trainer

``data.source='cache'`` (shards written by ``dream_jax.data.cache``): the same
chain over the cache records, with :class:`CachedExample` in place of the
decoder: ``latent_moments`` float32 [B, h, w, 2C] (the record's ``moments``, or
``moments_flip`` when the flip above — same hash, same record key — says so)
instead of ``image``; ``gen_tokens`` are the cached T5 features [B, L, d]
(storage dtype) or, for learned generation text, the generation tokenizer's ids.

Counters (``it.counters``, a dict of cumulative ints, restored with the
iterator state): ``records`` (delivered), ``skipped/<reason>`` with reasons
``bad_record`` (not a schema-1 record), ``empty_caption``, ``empty_image``,
``corrupt_image``, ``decompression_bomb`` (> data.max_image_pixels),
``too_small`` (shorter side < ceil(data.min_side_fraction × image_size);
images between that and image_size are upsampled by the crop, counted as
``upsampled``), ``converted/<mode>`` (non-RGB converted to RGB, see
data/images.py), ``truncated/clip_tokens`` and ``truncated/gen_tokens``
(over-long captions: cut, EOT kept), ``dropped_remainder`` (finite runs only).
With several hosts each host counts its own slice.
"""
import dataclasses
import glob as globlib
import hashlib
import json
import os
from collections import Counter
from typing import Any, Dict, List, Optional

import grain
import numpy as np

from dream_jax.data import images, records, synthetic


@dataclasses.dataclass
class TokenizeCaption(grain.transforms.Map):
    """Caption → CLIP-tower tokens and generation-text tokens (module level: picklable for workers)."""

    tokenizer: object
    clip_length: int
    gen_length: int
    keep_caption: bool = False
    gen_tokenizer: object = None         # None: ``tokenizer`` makes the generation tokens too

    def map(self, record):
        caption = record["caption"]
        gen_tok = self.tokenizer if self.gen_tokenizer is None else self.gen_tokenizer
        out = {
            "image": record["image"],
            "clip_tokens": self.tokenizer.encode_batch([caption], self.clip_length)[0],
            "gen_tokens": gen_tok.encode_batch([caption], self.gen_length)[0],
            "labels": {k: np.int32(record["labels"][k]) for k in synthetic.LABEL_KEYS},
        }
        if self.keep_caption:
            out["caption"] = caption
        return out


def arrayrecord_files(path: str) -> List[str]:
    """Shard paths of an ingest output directory (the order of its manifest.json;
    without a manifest, every ``*.array_record`` whose per-shard manifest
    exists, i.e. every finished shard), a glob, or a comma-separated list."""
    from dream_jax.data import ingest
    if os.path.isdir(path):
        manifest = os.path.join(path, ingest.MANIFEST_NAME)
        if os.path.exists(manifest):
            with open(manifest, encoding="utf-8") as f:
                m = json.load(f)
            if m.get("schema_version") != records.SCHEMA_VERSION:
                raise ValueError(f"{manifest}: schema version {m.get('schema_version')}, "
                                 f"this code reads {records.SCHEMA_VERSION}")
            files = [os.path.join(path, s["file"]) for s in m["shards"]]
        else:
            files = [f for f in sorted(globlib.glob(os.path.join(path, "*" + records.RECORD_SUFFIX)))
                     if os.path.exists(f[: -len(records.RECORD_SUFFIX)] + ingest.SHARD_MANIFEST_SUFFIX)]
    else:
        files = []
        for part in path.split(","):
            files.extend(sorted(globlib.glob(part)) if globlib.has_magic(part) else [part])
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"missing ArrayRecord shards: {missing[:3]}")
    if not files:
        raise FileNotFoundError(f"no ArrayRecord shards at data.path={path!r}")
    return files


def make_source(data_cfg, split: str):
    if data_cfg.source == "synthetic":
        n = data_cfg.num_train if split == "train" else data_cfg.num_heldout
        return synthetic.SyntheticWorld(data_cfg.image_size, split, data_cfg.world_seed, num_examples=n)
    if data_cfg.source == "arrayrecord":
        path = data_cfg.get("path", "") if split == "train" else data_cfg.get("heldout_path", "")
        if not path:
            raise ValueError(f"data.source='arrayrecord' needs data.{'path' if split == 'train' else 'heldout_path'}"
                             f" (an ingest output directory) for the {split!r} split")
        return grain.sources.ArrayRecordDataSource(arrayrecord_files(path))
    raise ValueError(f"unknown data.source={data_cfg.source!r} (available: 'synthetic', 'arrayrecord')")


# =============================================================================================
# ArrayRecord image–text records.
# =============================================================================================
def flip_decision(seed: int, key: str, epoch: int) -> bool:
    """Deterministic fair coin of (seed, record key, epoch)."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(epoch)}/{key}".encode("utf-8"), digest_size=8).digest()
    return bool(digest[0] & 1)


@dataclasses.dataclass
class DecodeImageText(grain.transforms.MapWithIndex):
    """One record → an example dict, or ``{"_skip": reason}`` (never None, never raises).

    ``index`` is the position in this host's slice of the repeated dataset, so
    the global position is ``process_index + index × process_count`` and the
    epoch is that // ``num_records`` (used for the flip)."""

    image_size: int
    clip_tokenizer: Any
    gen_tokenizer: Any
    clip_length: int
    gen_length: int
    num_records: int
    seed: int = 0
    random_flip: bool = True
    min_side: int = 0
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    process_index: int = 0
    process_count: int = 1
    keep_metadata: bool = False

    def map_with_index(self, index: int, record: bytes):
        try:
            return self._decode(index, record)
        except images.Skip as s:
            return {"_skip": s.reason}
        except Exception:                          # noqa: BLE001  never crash the input pipeline
            return {"_skip": "corrupt_image"}

    def _decode(self, index, record):
        try:
            header, offset = records.decode_header(record)
        except records.RecordError:
            return {"_skip": "bad_record"}
        caption = header["caption"]
        if not caption.strip():
            return {"_skip": "empty_caption"}
        img, converted = images.decode_rgb(bytes(record[offset:]), self.max_pixels, self.min_side)
        notes = []
        if converted:
            notes.append(f"converted/{converted}")
        if min(img.size) < self.image_size:
            notes.append("upsampled")
        arr = images.adm_center_crop(img, self.image_size)
        epoch = (self.process_index + int(index) * self.process_count) // max(1, self.num_records)
        flipped = self.random_flip and flip_decision(self.seed, header["key"], epoch)
        if flipped:
            arr = np.ascontiguousarray(arr[:, ::-1])
        clip, clip_cut = self.clip_tokenizer.encode_batch([caption], self.clip_length, return_truncated=True)
        if self.gen_tokenizer is self.clip_tokenizer and self.gen_length == self.clip_length:
            gen, gen_cut = clip, clip_cut
        else:
            gen, gen_cut = self.gen_tokenizer.encode_batch([caption], self.gen_length, return_truncated=True)
        if clip_cut[0]:
            notes.append("truncated/clip_tokens")
        if gen_cut[0]:
            notes.append("truncated/gen_tokens")
        out = {"image": arr, "clip_tokens": clip[0], "gen_tokens": gen[0], "_notes": tuple(notes)}
        if self.keep_metadata:
            out.update(caption=caption, key=header["key"], epoch=int(epoch), flipped=bool(flipped))
        return out


_HOST_FIELDS = ("caption", "key", "epoch", "flipped")


def _stack(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    batch = {}
    for k in items[0]:
        if k in _HOST_FIELDS:
            batch[k] = [x[k] for x in items]
        else:
            batch[k] = np.stack([x[k] for x in items])
    return batch


class FilterCountBatch(grain.IterDataset):
    """Drops ``{"_skip": reason}`` elements (counting them), counts notes, and
    batches the rest. Each batch carries ``_counts``: what happened to the
    records consumed while it was built. When a finite stream ends, counts not
    yet delivered come as a final ``{"_counts": ...}`` element (no arrays)."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool = True):
        super().__init__(parent)
        self._batch_size = int(batch_size)
        self._drop_remainder = bool(drop_remainder)

    def __iter__(self):
        return _FilterCountBatchIterator(self._parent.__iter__(), self._batch_size, self._drop_remainder)

    def __str__(self):
        return f"FilterCountBatch(batch_size={self._batch_size}, drop_remainder={self._drop_remainder})"


class _FilterCountBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size, drop_remainder):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder

    def __next__(self):
        counts: Counter = Counter()
        items = []
        exhausted = False
        while len(items) < self._batch_size:
            try:
                x = next(self._parent)
            except StopIteration:
                exhausted = True
                break
            reason = x.get("_skip")
            if reason is not None:
                counts[f"skipped/{reason}"] += 1
                continue
            for note in x.pop("_notes", ()):
                counts[note] += 1
            items.append(x)
        if exhausted and items and self._drop_remainder:
            counts["dropped_remainder"] += len(items)
            items = []
        if not items:
            if counts:
                return {"_counts": dict(counts)}
            raise StopIteration
        counts["records"] += len(items)
        batch = _stack(items)
        batch["_counts"] = dict(counts)
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class CountingIterDataset(grain.IterDataset):
    """Main-process end of the pipeline: pops ``_counts`` from each element into
    cumulative ``counters`` (part of the iterator state)."""

    def __iter__(self):
        return CountingIterator(self._parent.__iter__())


class CountingIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)
        self._counts: Counter = Counter()

    @property
    def counters(self) -> Dict[str, int]:
        """Cumulative data counters (records, skipped/<reason>, converted/<mode>, ...)."""
        return dict(sorted(self._counts.items()))

    def __next__(self):
        while True:
            element = next(self._parent)
            counts = element.pop("_counts", None)
            if counts:
                self._counts.update(counts)
            if "clip_tokens" in element:       # a batch (not a bare trailing "_counts")
                return element

    def get_state(self):
        return {"pipeline": self._parent.get_state(), "counters": dict(self._counts)}

    def set_state(self, state):
        self._parent.set_state(state["pipeline"])
        self._counts = Counter({k: int(v) for k, v in state.get("counters", {}).items()})


def _resolve_tokenizers(cfg, tokenizer, gen_tokenizer):
    from dream_jax.data import tokenizers as tok_lib
    clip = tokenizer
    if clip is None:
        clip = tok_lib.make_text_tokenizers(cfg.data)[0]
    if gen_tokenizer is None:
        spec = cfg.data.get("gen_tokenizer", "") or ""
        gen_tokenizer = clip if spec in ("", "clip", "same") else tok_lib.load_text_tokenizer(spec)
    return clip, gen_tokenizer


def _decoder(cfg, clip, gen, num_records, process_index, process_count, keep_metadata, train=True):
    data = cfg.data
    return DecodeImageText(
        image_size=int(data.image_size), clip_tokenizer=clip, gen_tokenizer=gen,
        clip_length=int(data.clip_context), gen_length=int(data.gen_context),
        num_records=int(num_records), seed=int(cfg.seed),
        random_flip=bool(data.get("random_flip", True)) and train,
        min_side=images.min_side_for(data.image_size, data.get("min_side_fraction", 0.75)),
        max_pixels=int(data.get("max_image_pixels", images.DEFAULT_MAX_PIXELS)),
        process_index=int(process_index), process_count=int(process_count),
        keep_metadata=keep_metadata)


def make_arrayrecord_dataset(cfg, tokenizer=None, process_index: int = 0, process_count: int = 1, *,
                             gen_tokenizer=None, num_epochs: Optional[int] = None,
                             drop_remainder: bool = True, keep_metadata: bool = False,
                             batch_size: Optional[int] = None) -> grain.IterDataset:
    """The arrayrecord pipeline as an IterDataset (see the module docstring).
    ``num_epochs=None`` repeats forever (training); tests use finite epochs."""
    data = cfg.data
    clip, gen = _resolve_tokenizers(cfg, tokenizer, gen_tokenizer)
    source = make_source(data, "train")
    n = len(source)
    if n == 0:
        raise ValueError(f"data.path={data.path!r} holds no records")
    local_batch = batch_size or cfg.batch_size // process_count
    ds = grain.MapDataset.source(source).shuffle(seed=int(cfg.seed)).repeat(num_epochs)
    ds = ds[process_index::process_count]
    ds = ds.map_with_index(_decoder(cfg, clip, gen, n, process_index, process_count, keep_metadata))
    threads = int(data.get("read_threads", 16))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=int(data.get("read_buffer", 256))))
    it = FilterCountBatch(it, local_batch, drop_remainder=drop_remainder)
    if data.get("worker_count", 0) > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(data.worker_count),
            per_worker_buffer_size=int(data.get("worker_buffer_size", 2))))
    return CountingIterDataset(it)


# =============================================================================================
# Latent cache records (data/cache.py): SD-VAE moments (+ mirror) and optionally T5 features.
# =============================================================================================
@dataclasses.dataclass
class CachedExample(grain.transforms.MapWithIndex):
    """One cache record (msgpack bytes) → ``latent_moments`` float32 [h, w, 2C] (``moments`` or,
    flipped, ``moments_flip``), ``clip_tokens``, and ``gen_tokens``: the cached ``t5_features``
    [L, d] (``gen_tokenizer=None``) or the ids of ``gen_tokenizer``. The flip is the one the
    arrayrecord pipeline draws for the same record (:func:`flip_decision` of (seed, key,
    epoch)), so a cache written from an ingest output in its order trains on the same examples."""

    clip_tokenizer: Any
    gen_tokenizer: Any
    clip_length: int
    gen_length: int
    num_records: int
    seed: int = 0
    random_flip: bool = True
    process_index: int = 0
    process_count: int = 1
    keep_metadata: bool = False

    def map_with_index(self, index: int, record: bytes):
        from dream_jax.data import cache
        try:
            rec = cache.decode_record(bytes(record))
            caption, key = str(rec["caption"]), str(rec["key"])
            moments = rec["moments"]
        except Exception:                          # noqa: BLE001  never crash the input pipeline
            return {"_skip": "bad_record"}
        if not caption.strip():
            return {"_skip": "empty_caption"}
        epoch = (self.process_index + int(index) * self.process_count) // max(1, self.num_records)
        flipped = self.random_flip and flip_decision(self.seed, key, epoch)
        if flipped:
            moments = rec["moments_flip"]
        notes = []
        clip, clip_cut = self.clip_tokenizer.encode_batch([caption], self.clip_length, return_truncated=True)
        if clip_cut[0]:
            notes.append("truncated/clip_tokens")
        if self.gen_tokenizer is None:
            if "t5_features" not in rec:
                return {"_skip": "no_t5_features"}
            gen = rec["t5_features"]
            if gen.shape[0] != self.gen_length:
                raise ValueError(f"cached T5 features have length {gen.shape[0]}, data.gen_context is "
                                 f"{self.gen_length}")
        else:
            ids, gen_cut = self.gen_tokenizer.encode_batch([caption], self.gen_length, return_truncated=True)
            gen = ids[0]
            if gen_cut[0]:
                notes.append("truncated/gen_tokens")
        out = {"latent_moments": np.asarray(moments, np.float32), "clip_tokens": clip[0], "gen_tokens": gen,
               "_notes": tuple(notes)}
        if self.keep_metadata:
            out.update(caption=caption, key=key, epoch=int(epoch), flipped=bool(flipped))
        return out


def cache_files(path: str) -> List[str]:
    from dream_jax.data import cache
    files = cache.shard_paths(path)
    if not files:
        raise FileNotFoundError(f"no cache shards at data.path={path!r}")
    return files


def make_cache_dataset(cfg, tokenizer, process_index: int = 0, process_count: int = 1, *,
                       gen_tokenizer=None, num_epochs: Optional[int] = None, drop_remainder: bool = True,
                       keep_metadata: bool = False, batch_size: Optional[int] = None) -> grain.IterDataset:
    """``data.source='cache'``: the cache shards of ``data.path`` (written by ``data/cache.py``) →
    shuffle(seed).repeat() → per-host slice → :class:`CachedExample` → batch (drop_remainder),
    with the counters of the arrayrecord pipeline. ``gen_tokenizer=None``: ``gen_tokens`` are
    the cached T5 features; otherwise that tokenizer's ids of the caption."""
    data = cfg.data
    source = grain.sources.ArrayRecordDataSource(cache_files(data.path))
    n = len(source)
    if n == 0:
        raise ValueError(f"data.path={data.path!r} holds no cache records")
    local_batch = batch_size or cfg.batch_size // process_count
    ds = grain.MapDataset.source(source).shuffle(seed=int(cfg.seed)).repeat(num_epochs)
    ds = ds[process_index::process_count]
    ds = ds.map_with_index(CachedExample(
        clip_tokenizer=tokenizer, gen_tokenizer=gen_tokenizer, clip_length=int(data.clip_context),
        gen_length=int(data.gen_context), num_records=n, seed=int(cfg.seed),
        random_flip=bool(data.get("random_flip", True)), process_index=int(process_index),
        process_count=int(process_count), keep_metadata=keep_metadata))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(data.get("read_threads", 16)),
                                              prefetch_buffer_size=int(data.get("read_buffer", 256))))
    it = FilterCountBatch(it, local_batch, drop_remainder=drop_remainder)
    if data.get("worker_count", 0) > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(data.worker_count),
            per_worker_buffer_size=int(data.get("worker_buffer_size", 2))))
    return CountingIterDataset(it)


def make_train_iterator(cfg, tokenizer, process_index: int = 0, process_count: int = 1,
                        gen_tokenizer=None):
    """An infinite, checkpointable iterator of host-local batches.

    ``tokenizer`` makes ``clip_tokens`` (and ``gen_tokens`` unless
    ``gen_tokenizer`` or ``data.gen_tokenizer`` names another one). For
    arrayrecord and cache data the iterator has ``.counters`` (see the module
    docstring). ``data.source='cache'`` yields ``latent_moments`` instead of
    ``image``, and with ``gen_tokenizer=None`` the cached T5 features as
    ``gen_tokens`` (see :func:`make_cache_dataset`).
    """
    data = cfg.data
    if data.source == "arrayrecord":
        return iter(make_arrayrecord_dataset(cfg, tokenizer, process_index, process_count,
                                             gen_tokenizer=gen_tokenizer))
    if data.source == "cache":
        return iter(make_cache_dataset(cfg, tokenizer, process_index, process_count, gen_tokenizer=gen_tokenizer))
    local_batch = cfg.batch_size // process_count
    ds = grain.MapDataset.source(make_source(data, "train"))
    ds = ds.shuffle(seed=cfg.seed).repeat()
    ds = ds.map(TokenizeCaption(tokenizer, data.clip_context, data.gen_context, gen_tokenizer=gen_tokenizer))
    # Lazy batching, then every process_count-th chunk: process p holds rows
    # [p·Bl, (p+1)·Bl) of each global batch, so the global batch (contents AND order,
    # hence mask groups) is the same whatever the number of processes. Each process
    # reads only its own records.
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds[process_index::process_count]
    it = ds.to_iter_dataset()
    if data.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
    return iter(it)


def _first_usable(decode, source, n: int, path: str):
    """The first n records of `source` that decode (file order; bad ones skipped, never replaced)."""
    found = []
    for i in range(len(source)):
        x = decode.map_with_index(i, source[i])
        if "_skip" not in x:
            x.pop("_notes", None)
            found.append(x)
            if len(found) == n:
                break
    if len(found) < n:
        raise ValueError(f"eval.num_examples={n} exceeds the {len(found)} usable held-out records "
                         f"in data.heldout_path={path!r}")
    return _stack(found)


def heldout_cache_examples(cfg, tokenizer, n: int, gen_tokenizer=None):
    """The first n usable records of the cache at ``data.heldout_path`` (file order, no flip) as
    one batch: ``latent_moments``, ``clip_tokens``, ``gen_tokens`` (the cached T5 features when
    ``gen_tokenizer`` is None), ``caption``, ``key``."""
    path = cfg.data.get("heldout_path", "")
    if not path:
        raise ValueError("data.source='cache' needs data.heldout_path (a cache directory) for evaluation")
    source = grain.sources.ArrayRecordDataSource(cache_files(path))
    decode = CachedExample(tokenizer, gen_tokenizer, int(cfg.data.clip_context), int(cfg.data.gen_context),
                           len(source), seed=int(cfg.seed), random_flip=False, keep_metadata=True)
    batch = _first_usable(decode, source, n, path)
    return {k: batch[k] for k in ("latent_moments", "clip_tokens", "gen_tokens", "caption", "key")}


def heldout_examples(cfg, tokenizer, n: int, gen_tokenizer=None):
    """The first n held-out examples as one batch (with captions), for evaluation.

    arrayrecord: the first n usable records of ``data.heldout_path`` in file
    order (no shuffle, no flip; bad records are skipped, not replaced); the
    batch has ``key`` and no ``labels``."""
    if cfg.data.source == "cache":
        return heldout_cache_examples(cfg, tokenizer, n, gen_tokenizer)
    if cfg.data.source == "arrayrecord":
        clip, gen = _resolve_tokenizers(cfg, tokenizer, gen_tokenizer)
        source = make_source(cfg.data, "heldout")
        decode = _decoder(cfg, clip, gen, len(source), 0, 1, keep_metadata=True, train=False)
        batch = _first_usable(decode, source, n, cfg.data.heldout_path)
        return {k: batch[k] for k in ("image", "clip_tokens", "gen_tokens", "caption", "key")}
    source = make_source(cfg.data, "heldout")
    if n > len(source):
        raise ValueError(f"eval.num_examples={n} exceeds the held-out split size {len(source)}")
    tok = TokenizeCaption(tokenizer, cfg.data.clip_context, cfg.data.gen_context, keep_caption=True,
                          gen_tokenizer=gen_tokenizer)
    records_ = [tok.map(source[i]) for i in range(n)]
    return {
        "image": np.stack([r["image"] for r in records_]),
        "clip_tokens": np.stack([r["clip_tokens"] for r in records_]),
        "gen_tokens": np.stack([r["gen_tokens"] for r in records_]),
        "labels": {k: np.asarray([r["labels"][k] for r in records_]) for k in synthetic.LABEL_KEYS},
        "caption": [r["caption"] for r in records_],
    }
