"""Latent cache: SD-VAE posterior moments (centre crop AND its mirror image) and T5 features.

    python -m dream_jax.data.cache --images=DIR --vae_path=VAE_DIR --t5_path=T5_DIR \
        [--out=DIR/cache] [--image_size=256] [--batch_size=16] [--records_per_shard=1000]

DIR holds *.jpg / *.jpeg / *.png / *.webp images, each with a same-name .txt caption.
    python -m dream_jax.data.cache --arrayrecord=INGEST_DIR --out=DIR ...

(the second form caches the records of a `dream_jax.data.ingest` output, decoded and
centre-cropped exactly as `data.source='arrayrecord'` does, in the same order, so that
`data.source='cache'` trains on the same examples with the same shuffle and flips.)

Records go into ArrayRecord shards `cache-00000.array_record`, ... plus
`cache_info.json` (what was cached, with which weights and settings; `cache_version`
is the record schema below, bumped on any incompatible change) and, with T5,
`empty_t5_features.npy` (float32 [L, d], rounded through the storage dtype: the T5
features of the empty caption, for caption dropout). Each record is a msgpack dict
(flax.serialization, no pickle):

    key          str
    caption      str
    moments      float32 [h, w, 2C]  posterior mean ‖ log-variance of the centre crop
    moments_flip float32 [h, w, 2C]  the same for the horizontally flipped crop
    t5_tokens    int32 [L]           (when T5 is cached) ids, EOS appended, 0-padded
    t5_mask      int32 [L]           1 on real tokens
    t5_features  [L, d] (--t5_dtype, bfloat16 by default) T5 encoder output

The flip needs its own moments: the VAE is not mirror-equivariant. Training
draws `moments` or `moments_flip` (random flip), then a fresh posterior sample
per step with `sample_latent_from_moments` — as the paper's cache does.

The core (`cache_records`, `write_cache`) takes any iterable of
(key, uint8 image, caption), so an ArrayRecord image source can feed it too.
"""
import glob
import json
import os
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import ml_dtypes
import numpy as np
from flax import serialization

from dream_jax.data import images
from dream_jax.models.t5 import padding_mask_from_ids
from dream_jax.models.vae import sample_latent

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SHARD_PATTERN = "cache-{:05d}.array_record"
INFO_FILE = "cache_info.json"
EMPTY_T5_FILE = "empty_t5_features.npy"
CACHE_VERSION = 1


def sample_latent_from_moments(moments, rng):
    """Posterior sample mean + exp(logvar / 2)·ε (unscaled latent) from cached moments [..., 2C].

    rng: a JAX key (traceable, returns a jax array) or a numpy Generator (host side,
    e.g. inside a grain transform; returns numpy). Multiply by the VAE's scaling
    (0.18215) and patchify — `SDVAETokenizer.tokens_from_moments` does both.
    """
    if rng is None:
        raise ValueError("sample_latent_from_moments needs an rng (use the mean for a deterministic latent)")
    return sample_latent(moments, rng)


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
def encode_record(record: Dict) -> bytes:
    return serialization.msgpack_serialize(dict(record))


def decode_record(data: bytes) -> Dict:
    return serialization.msgpack_restore(data)


def center_crop(image, image_size: int) -> np.ndarray:
    """ADM's centre crop (`images.adm_center_crop`) of a PIL image or uint8 array → uint8 [S, S, 3]."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return images.adm_center_crop(image.convert("RGB"), image_size)


def image_folder_examples(folder: str, image_size: int) -> Iterator[Tuple[str, np.ndarray, str]]:
    """(key, centre-cropped uint8 image, caption) for every image in `folder` with a .txt caption.

    Sorted by file name; the key is the file name without extension. Images without a
    caption file are an error (a silently uncaptioned cache would train on empty text).
    """
    from PIL import Image

    paths = sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {folder}")
    for path in paths:
        stem = os.path.splitext(path)[0]
        if not os.path.exists(stem + ".txt"):
            raise FileNotFoundError(f"image {path} has no caption file {stem}.txt")
        with open(stem + ".txt", encoding="utf-8") as f:
            caption = f.read().strip()
        with Image.open(path) as im:
            yield os.path.basename(stem), center_crop(im, image_size), caption


def _batches(examples: Iterable, batch_size: int):
    batch = []
    for ex in examples:
        batch.append(ex)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def cache_records(examples: Iterable[Tuple[str, np.ndarray, str]], vae=None, t5=None, t5_tokenizer=None,
                  *, image_size: int = 256, batch_size: int = 16, t5_length: int = 128,
                  t5_dtype: str = "bfloat16") -> Iterator[Dict]:
    """Records (see the module docstring) for (key, uint8 image, caption) examples.

    vae: an `SDVAETokenizer` (or None: no moments); t5: a `T5TextEncoder` with its tokenizer
    (`dream_jax.data.tokenizers.T5Tokenizer`; or None: no T5 fields). Images not of size
    image_size are centre-cropped first. Batches are padded to `batch_size` so that each model compiles once.
    """
    if vae is None and t5 is None:
        raise ValueError("nothing to cache: pass a VAE, a T5 encoder, or both")
    if (t5 is None) != (t5_tokenizer is None):
        raise ValueError("T5 caching needs both the encoder and its tokenizer")
    store = np.dtype(ml_dtypes.bfloat16) if t5_dtype == "bfloat16" else np.dtype(t5_dtype)
    for batch in _batches(examples, batch_size):
        keys = [str(k) for k, _, _ in batch]
        captions = [str(c) for _, _, c in batch]
        pixels = np.stack([img if img.shape == (image_size, image_size, 3) else center_crop(img, image_size)
                           for _, img, _ in batch]).astype(np.uint8)
        n = len(batch)
        pad = lambda a: np.concatenate([a, np.repeat(a[-1:], batch_size - n, 0)]) if n < batch_size else a  # noqa
        fields = {}
        if vae is not None:
            pixels = pad(pixels)
            fields["moments"] = np.asarray(vae.encode_moments(pixels), np.float32)[:n]
            fields["moments_flip"] = np.asarray(vae.encode_moments(pixels[:, :, ::-1]), np.float32)[:n]
        if t5 is not None:
            ids = np.asarray(t5_tokenizer.encode_batch(captions, t5_length), np.int32)
            mask = padding_mask_from_ids(ids, t5_tokenizer.eos_id)
            feats = np.asarray(t5(pad(ids), pad(mask)))[:n]
            fields["t5_tokens"], fields["t5_mask"] = ids, mask
            fields["t5_features"] = feats.astype(store)
        for i in range(n):
            rec = {"key": keys[i], "caption": captions[i]}
            rec.update({name: np.ascontiguousarray(value[i]) for name, value in fields.items()})
            yield rec


def t5_caption_features(t5, t5_tokenizer, captions: Sequence[str], t5_length: int,
                        batch_size: Optional[int] = None) -> np.ndarray:
    """float32 [n, L, d] T5 features of captions, computed as `cache_records` does (EOS appended,
    0-padded, the padding mask from the ids; batches padded to `batch_size`)."""
    ids = np.asarray(t5_tokenizer.encode_batch(list(captions), t5_length), np.int32)
    mask = padding_mask_from_ids(ids, t5_tokenizer.eos_id)
    n = len(ids)
    if batch_size and n < batch_size:
        ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - n, 0)])
        mask = np.concatenate([mask, np.repeat(mask[-1:], batch_size - n, 0)])
    return np.asarray(t5(ids, mask), np.float32)[:n]


def arrayrecord_examples(path: str, image_size: int, min_side_fraction: float = 0.75,
                         max_pixels: int = images.DEFAULT_MAX_PIXELS) -> Iterator[Tuple[str, np.ndarray, str]]:
    """(key, uint8 centre crop, caption) of the records of an ingest output (`data.path` of
    `data.source='arrayrecord'`), in manifest order, decoded and cropped exactly as that
    pipeline does (records it would skip are skipped here too)."""
    from array_record.python.array_record_module import ArrayRecordReader

    from dream_jax.data import pipeline, records

    min_side = images.min_side_for(image_size, min_side_fraction)
    for shard in pipeline.arrayrecord_files(path):
        reader = ArrayRecordReader(shard, "readahead_buffer_size:0")
        try:
            for i in range(reader.num_records()):
                data = reader.read([i])[0]
                try:
                    header, offset = records.decode_header(data)
                    if not header["caption"].strip():
                        continue
                    img, _ = images.decode_rgb(bytes(data[offset:]), max_pixels, min_side)
                except Exception:             # noqa: BLE001  the pipeline skips these records too
                    continue
                yield header["key"], images.adm_center_crop(img, image_size), header["caption"]
        finally:
            reader.close()


def load_info(path: str) -> Dict:
    """`cache_info.json` of a cache directory (checks the record schema version)."""
    with open(os.path.join(path, INFO_FILE)) as f:
        info = json.load(f)
    version = info.get("cache_version", CACHE_VERSION)
    if version != CACHE_VERSION:
        raise ValueError(f"{path}: cache_version {version}, this code reads {CACHE_VERSION}; rebuild the cache")
    return info


def load_empty_t5_features(path: str) -> Optional[np.ndarray]:
    """float32 [L, d] T5 features of the empty caption stored with the cache (None if absent)."""
    name = load_info(path).get("empty_t5_features")
    return np.load(os.path.join(path, name)) if name else None


def write_records(records: Iterable[Dict], out_dir: str, records_per_shard: int = 1000,
                  progress_every: int = 0) -> Tuple[List[str], int]:
    """ArrayRecord shards of `records_per_shard` msgpack records each; returns (paths, count)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(out_dir, exist_ok=True)
    paths, writer, count, start = [], None, 0, time.time()
    try:
        for rec in records:
            if count % records_per_shard == 0:
                if writer is not None:
                    writer.close()
                paths.append(os.path.join(out_dir, SHARD_PATTERN.format(len(paths))))
                writer = ArrayRecordWriter(paths[-1], "group_size:1")
            writer.write(encode_record(rec))
            count += 1
            if progress_every and count % progress_every == 0:
                rate = count / (time.time() - start)
                print(f"cached {count} records ({rate:.1f}/s), shard {len(paths) - 1}", flush=True)
    finally:
        if writer is not None:
            writer.close()
    return paths, count


def write_cache(examples: Iterable[Tuple[str, np.ndarray, str]], out_dir: str, vae=None, t5=None,
                t5_tokenizer=None, *, image_size: int = 256, batch_size: int = 16, t5_length: int = 128,
                t5_dtype: str = "bfloat16", records_per_shard: int = 1000, info: Optional[Dict] = None,
                progress_every: int = 0) -> List[str]:
    """Compute and write the cache of `examples` into `out_dir`; returns the shard paths."""
    records = cache_records(examples, vae, t5, t5_tokenizer, image_size=image_size, batch_size=batch_size,
                            t5_length=t5_length, t5_dtype=t5_dtype)
    paths, count = write_records(records, out_dir, records_per_shard, progress_every)
    meta = dict(info or {})
    if t5 is not None:
        empty = t5_caption_features(t5, t5_tokenizer, [""], t5_length, batch_size)[0]
        store = np.dtype(ml_dtypes.bfloat16) if t5_dtype == "bfloat16" else np.dtype(t5_dtype)
        np.save(os.path.join(out_dir, EMPTY_T5_FILE), empty.astype(store).astype(np.float32))
        meta["empty_t5_features"] = EMPTY_T5_FILE
    meta.update(cache_version=CACHE_VERSION, num_records=count, shards=[os.path.basename(p) for p in paths],
                image_size=image_size,
                t5_length=t5_length if t5 is not None else None,
                t5_dtype=t5_dtype if t5 is not None else None,
                t5_width=int(t5.width) if t5 is not None else None,
                t5_padding_mask=getattr(t5, "padding_mask", None),
                scaling_factor=vae.cfg.scaling_factor if vae is not None else None,
                shift_factor=vae.cfg.shift_factor if vae is not None else None,
                latent_shape=[vae.latent_size, vae.latent_size, 2 * vae.cfg.latent_channels]
                if vae is not None else None)
    with open(os.path.join(out_dir, INFO_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return paths


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def shard_paths(path_or_paths: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(path_or_paths, str):
        if os.path.isdir(path_or_paths):
            paths = sorted(glob.glob(os.path.join(path_or_paths, "cache-*.array_record")))
            if not paths:
                raise FileNotFoundError(f"no cache-*.array_record shards in {path_or_paths}")
            return paths
        return [path_or_paths]
    return list(path_or_paths)


class CacheSource:
    """Random access over cache shards (len / getitem → decoded dict): a grain MapDataset source."""

    def __init__(self, path_or_paths: Union[str, Sequence[str]]):
        from array_record.python.array_record_module import ArrayRecordReader

        self.paths = shard_paths(path_or_paths)
        self._readers = [ArrayRecordReader(p, "readahead_buffer_size:0,max_parallelism:0") for p in self.paths]
        self._starts = np.cumsum([0] + [r.num_records() for r in self._readers])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> Dict:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return decode_record(self._readers[shard].read([int(index - self._starts[shard])])[0])

    def __iter__(self):
        for reader in self._readers:
            for data in reader.read_all():
                yield decode_record(data)

    def close(self):
        for r in self._readers:
            r.close()


def read_cache(path_or_paths: Union[str, Sequence[str]]) -> Iterator[Dict]:
    """All records of the shards in order."""
    source = CacheSource(path_or_paths)
    try:
        yield from source
    finally:
        source.close()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    from absl import app, flags

    flags.DEFINE_string("images", None, "Folder of images with same-name .txt captions.")
    flags.DEFINE_string("arrayrecord", None, "Or: an ingest output directory (dream_jax.data.ingest).")
    flags.DEFINE_float("min_side_fraction", 0.75, "--arrayrecord: skip images whose shorter side is below "
                       "this fraction of image_size (as data.min_side_fraction does).")
    flags.DEFINE_string("out", None, "Output folder (default: IMAGES/cache).")
    flags.DEFINE_string("vae_path", None, "SD-VAE: diffusers directory or safetensors file ('' = no moments).")
    flags.DEFINE_string("t5_path", None, "HF T5 directory with spiece.model ('' = no T5 features).")
    flags.DEFINE_integer("image_size", 256, "Centre-crop size.")
    flags.DEFINE_integer("batch_size", 16, "Images / captions per model call.")
    flags.DEFINE_integer("t5_length", 128, "T5 token length (EOS included, 0-padded).")
    flags.DEFINE_string("t5_dtype", "bfloat16", "Storage dtype of the T5 features (bfloat16|float16|float32).")
    flags.DEFINE_bool("t5_padding_mask", False, "Mask padding in T5 (the paper's code does not).")
    flags.DEFINE_integer("records_per_shard", 1000, "Records per ArrayRecord shard.")
    flags.mark_flags_as_required(["vae_path", "t5_path"])
    FLAGS = flags.FLAGS

    def run(_):
        from dream_jax.data.tokenizers import T5Tokenizer
        from dream_jax.models.t5 import T5TextEncoder
        from dream_jax.models.vae import SDVAETokenizer

        vae = SDVAETokenizer.from_pretrained(FLAGS.vae_path, FLAGS.image_size) if FLAGS.vae_path else None
        t5 = tok = None
        if FLAGS.t5_path:
            t5 = T5TextEncoder.from_pretrained(FLAGS.t5_path, padding_mask=FLAGS.t5_padding_mask)
            tok = T5Tokenizer.load(FLAGS.t5_path)
        if bool(FLAGS.images) == bool(FLAGS.arrayrecord):
            raise app.UsageError("pass exactly one of --images and --arrayrecord")
        if FLAGS.images:
            examples = image_folder_examples(FLAGS.images, FLAGS.image_size)
        else:
            examples = arrayrecord_examples(FLAGS.arrayrecord, FLAGS.image_size, FLAGS.min_side_fraction)
        out = FLAGS.out or os.path.join(FLAGS.images or FLAGS.arrayrecord, "cache")
        paths = write_cache(examples, out, vae, t5, tok,
                            image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
                            t5_length=FLAGS.t5_length, t5_dtype=FLAGS.t5_dtype,
                            records_per_shard=FLAGS.records_per_shard, progress_every=100,
                            info={"images": os.path.abspath(FLAGS.images or FLAGS.arrayrecord),
                                  "vae_path": os.path.abspath(FLAGS.vae_path) if FLAGS.vae_path else "",
                                  "t5_path": os.path.abspath(FLAGS.t5_path) if FLAGS.t5_path else ""})
        print(f"wrote {len(paths)} shard(s) to {out}")

    app.run(run, argv)


if __name__ == "__main__":
    main()
