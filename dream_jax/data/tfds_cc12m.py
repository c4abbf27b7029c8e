"""A TFDS builder (ArrayRecord file format, no TensorFlow needed) over the
records made by ``dream_jax.data.ingest``, for ``tfds.data_source`` users.

    python -m dream_jax.data.ingest --input '/data/cc12m/{00000..01242}.tar' --output /data/cc12m_ar
    python -m dream_jax.data.tfds_cc12m --manual_dir /data/cc12m_ar --data_dir ~/tensorflow_datasets

    import tensorflow_datasets as tfds
    import dream_jax.data.tfds_cc12m          # registers 'dream_cc12m'
    source = tfds.data_source("dream_cc12m", split="train", data_dir="~/tensorflow_datasets")
    example = source[0]   # {'image': uint8 [H, W, 3], 'caption': str, 'key': str, 'metadata': str}

``manual_dir`` is an ingest output directory (its ``manifest.json`` shards are
the ``train`` split), or a directory with ``train/`` and optionally
``validation/`` ingest outputs. Each record is decoded once while building:
RGB images keep their original bytes; other modes are converted to RGB
exactly as the pipeline does (data/images.py) and stored as lossless PNG;
records that fail to decode are left out and counted (the counts are printed
and stored in the dataset description). ``metadata`` is the record's
``source`` JSON (input shard, member/row, img2dataset metadata).

Only ``tfds.data_source`` / ``builder.as_data_source`` reading works without
TensorFlow; ``tfds.load`` / ``as_dataset`` need TensorFlow.
"""
from __future__ import annotations

import collections
import inspect
import io
import os
import sys

import tensorflow_datasets as tfds

from dream_jax.data import images, records

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Convert img2dataset output with `python -m dream_jax.data.ingest --input ... --output DIR`
and pass DIR as the manual_dir (or a directory holding train/ and validation/ ingest outputs)."""


def _split_dirs(manual_dir: str):
    from dream_jax.data import ingest
    if os.path.exists(os.path.join(manual_dir, ingest.MANIFEST_NAME)):
        return {"train": manual_dir}
    splits = {}
    for name in ("train", "validation", "test"):
        d = os.path.join(manual_dir, name)
        if os.path.exists(os.path.join(d, ingest.MANIFEST_NAME)):
            splits[name] = d
    if not splits:
        raise FileNotFoundError(f"{manual_dir}: no ingest manifest.json (nor train/ validation/ ones)")
    return splits


def _orientation(data: bytes):
    from PIL import Image
    try:
        return Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
    except Exception:                              # noqa: BLE001
        return None


def iter_tfds_examples(ingest_dir: str, skipped: collections.Counter):
    """(unique key, tfds example) for every usable record of an ingest output."""
    from array_record.python.array_record_module import ArrayRecordReader
    from dream_jax.data import pipeline

    for path in pipeline.arrayrecord_files(ingest_dir):
        reader = ArrayRecordReader(path, "readahead_buffer_size:0")
        try:
            shard = os.path.basename(path)
            for i in range(reader.num_records()):
                raw = reader.read([i])[0]
                try:
                    header, offset = records.decode_header(raw)
                    data = bytes(raw[offset:])
                    img, converted = images.decode_rgb(data)
                except records.RecordError:
                    skipped["bad_record"] += 1
                    continue
                except images.Skip as s:
                    skipped[s.reason] += 1
                    continue
                keep_bytes = (not converted and header.get("image", {}).get("format") in ("jpeg", "png")
                              and _orientation(data) in (None, 1))
                if not keep_bytes:       # non-RGB, other formats, EXIF-rotated: the pixels as the pipeline sees them
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    data = buf.getvalue()
                yield f"{shard}/{i}", {
                    "image": data,
                    "caption": header["caption"],
                    "key": header["key"],
                    "metadata": records.dumps_json(header.get("source", {})),
                }
        finally:
            reader.close()


class DreamCc12m(tfds.core.GeneratorBasedBuilder):
    """dream_jax image–text records (CC12M via img2dataset + dream_jax ingest)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Records of dream_jax ingest schema version 1."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

    # tfds's default code_path touches importlib_resources (not a dependency of
    # tfds 4.9.10 without TensorFlow) for any builder defined inside a package.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        from etils import epath
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Image–caption pairs converted from img2dataset output by dream_jax.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "caption": tfds.features.Text(),
                "key": tfds.features.Text(),
                "metadata": tfds.features.Text(),
            }),
            supervised_keys=("image", "caption"),
            homepage="https://github.com/google-research/conceptual-12m",
        )

    def _split_generators(self, dl_manager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        return {name: self._generate_examples(d) for name, d in _split_dirs(manual_dir).items()}

    def _generate_examples(self, ingest_dir):
        skipped = collections.Counter()
        yield from iter_tfds_examples(ingest_dir, skipped)
        if skipped:
            print(f"dream_cc12m: {ingest_dir}: left out {dict(skipped)}", file=sys.stderr)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m dream_jax.data.tfds_cc12m")
    ap.add_argument("--manual_dir", required=True, help="ingest output directory")
    ap.add_argument("--data_dir", default=None, help="TFDS data_dir (default: ~/tensorflow_datasets)")
    args = ap.parse_args(argv)
    builder = DreamCc12m(data_dir=args.data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir))
    print(builder.info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
