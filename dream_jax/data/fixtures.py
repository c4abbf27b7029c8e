"""Small img2dataset-style inputs for tests and benchmarks (no network).

img2dataset's webdataset layout: one ``.tar`` per shard whose members are
``KEY.jpg`` (or png/webp), ``KEY.txt`` (caption) and ``KEY.json`` (metadata:
url, key, status, caption, width, height, original_width, ...), consecutive
per key; its parquet layout: one row per sample with ``key``, the image bytes
in a column named after the encode format (``jpg``), ``txt``, ``url``,
``status``, ``error_message``, ``width``, ``height`` ... (image and txt are
null for failed downloads).

:func:`fixture_samples` returns samples covering every good and bad case the
ingest and pipeline must handle, each tagged with what must happen to it.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
from PIL import Image


def smooth_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth colour gradient with a little noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, size=3)
    freq = rng.uniform(0.01, 0.05, size=3)
    chans = [127 + 100 * np.sin(freq[c] * (x + 0.7 * y) + phase[c]) for c in range(3)]
    arr = np.stack(chans, -1) + rng.normal(0, 4, size=(height, width, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@dataclass
class FixtureSample:
    key: str
    image: Optional[bytes]               # None: no image member / null column
    caption: Optional[bytes]             # raw caption bytes; None: no .txt member / null
    ext: str = "jpg"
    ingest: str = "ok"                   # "ok" or the ingest skip reason
    pipeline: str = "ok"                 # "ok" or the pipeline skip reason (if ingest ok)
    notes: List[str] = field(default_factory=list)   # pipeline counters expected for this record
    member_name: Optional[str] = None    # override the image member name


def _png16(width, height, seed):
    rng = np.random.default_rng(seed)
    arr = (rng.integers(0, 65535, size=(height, width))).astype(np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def fixture_samples(prefix: str = "", image_size: int = 64) -> List[FixtureSample]:
    """Every case, for ingest ``min_side=32, max_pixels=250_000`` and pipeline
    ``image_size=64, min_side_fraction=0.75`` (min side 48)."""
    assert image_size == 64, "the sizes below are chosen for image_size=64"
    k = lambda name: prefix + name                               # noqa: E731
    cap = lambda text: text.encode("utf-8")                       # noqa: E731
    jpeg = encode(smooth_image(96, 80, 1), "JPEG", quality=90)
    long_caption = " ".join(f"word{i}" for i in range(200))
    rgba = smooth_image(70, 90, 5).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 70, dtype=np.uint8), (90, 1))))
    palette = smooth_image(80, 64, 6).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    exif_img = smooth_image(120, 64, 13)
    exif = exif_img.getexif()
    exif[0x0112] = 6                                             # rotate 90° on display
    samples = [
        FixtureSample(k("good_jpeg"), jpeg, cap("A photo of a red car.")),
        FixtureSample(k("good_png_large"), encode(smooth_image(300, 200, 2), "PNG"), cap("A large PNG landscape")),
        FixtureSample(k("good_webp"), encode(smooth_image(128, 96, 3), "WEBP", quality=80),
                      cap("webp image of a dog"), ext="webp"),
        FixtureSample(k("gray_jpeg"), encode(smooth_image(64, 72, 4, "L"), "JPEG"), cap("grey cat"),
                      notes=["converted/L"]),
        FixtureSample(k("cmyk_jpeg"), encode(smooth_image(80, 64, 7, "CMYK"), "JPEG"), cap("cmyk print scan"),
                      notes=["converted/CMYK"]),
        FixtureSample(k("rgba_png"), encode(rgba, "PNG"), cap("logo with alpha"), ext="png",
                      notes=["converted/RGBA"]),
        FixtureSample(k("palette_png"), encode(palette, "PNG"), cap("palette drawing"), ext="png",
                      notes=["converted/P"]),
        FixtureSample(k("palette_transparent_png"), encode(palette_t, "PNG", transparency=3),
                      cap("palette with transparency"), ext="png", notes=["converted/P"]),
        FixtureSample(k("gray16_png"), _png16(64, 64, 8), cap("16 bit depth map"), ext="png",
                      notes=["converted/I;16"]),
        FixtureSample(k("bilevel_png"), encode(smooth_image(64, 80, 9, "1"), "PNG"), cap("black and white"),
                      ext="png", notes=["converted/1"]),
        FixtureSample(k("la_png"), encode(smooth_image(64, 64, 10, "LA"), "PNG"), cap("grey with alpha"),
                      ext="png", notes=["converted/LA"]),
        FixtureSample(k("long_caption"), encode(smooth_image(90, 70, 11), "JPEG"), cap(long_caption),
                      notes=["truncated/clip_tokens", "truncated/gen_tokens"]),
        FixtureSample(k("upsampled"), encode(smooth_image(56, 70, 12), "JPEG"), cap("small but usable"),
                      notes=["upsampled"]),
        FixtureSample(k("exif_rotated"), encode(exif_img, "JPEG", exif=exif), cap("phone photo, rotated")),
        FixtureSample(k("unicode_caption"), encode(smooth_image(64, 64, 14), "JPEG"),
                      cap("Café « naïve » 東京の夜 🙂 &amp; more")),
        FixtureSample(k("../traversal"), encode(smooth_image(64, 64, 15), "JPEG"), cap("member named ../x")),
        # ---- skipped at ingest ----
        FixtureSample(k("corrupt"), b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10, cap("corrupt"),
                      ingest="corrupt_image"),
        FixtureSample(k("not_an_image"), b"<html>404 not found</html>", cap("an error page"),
                      ingest="corrupt_image"),
        FixtureSample(k("truncated"), jpeg[: len(jpeg) // 2], cap("truncated download"), ingest="corrupt_image"),
        FixtureSample(k("zero_bytes"), b"", cap("empty file"), ingest="empty_image"),
        FixtureSample(k("bomb"), encode(Image.new("L", (600, 500), 128), "PNG"), cap("too many pixels"),
                      ext="png", ingest="decompression_bomb"),
        FixtureSample(k("tiny"), encode(smooth_image(30, 40, 16), "JPEG"), cap("thumbnail"), ingest="too_small"),
        FixtureSample(k("no_caption"), encode(smooth_image(64, 64, 17), "JPEG"), None, ingest="missing_caption"),
        FixtureSample(k("no_image"), None, cap("caption without image"), ingest="missing_image"),
        FixtureSample(k("blank_caption"), encode(smooth_image(64, 64, 18), "JPEG"), b"  \n\t ",
                      ingest="empty_caption"),
        FixtureSample(k("latin1_caption"), encode(smooth_image(64, 64, 19), "JPEG"), "café".encode("latin-1"),
                      ingest="caption_not_utf8"),
        # ---- pass ingest (min side 40 >= 32), skipped by the 64-px pipeline (40 < 48) ----
        FixtureSample(k("small_for_64"), encode(smooth_image(100, 40, 20), "JPEG"), cap("wide strip"),
                      pipeline="too_small"),
    ]
    return samples


def write_webdataset_tar(path: str, samples: List[FixtureSample], duplicate: Optional[FixtureSample] = None,
                         extra_members: bool = True) -> None:
    """A tar laid out as img2dataset writes it (plus a directory and a symlink
    member, which ingest must ignore, and optionally a non-contiguous
    duplicate key)."""
    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        if extra_members:
            d = tarfile.TarInfo("subdir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            link = tarfile.TarInfo("link.jpg")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tar.addfile(link)
        for s in samples + ([duplicate] if duplicate else []):
            if s.image is not None:
                add(tar, s.member_name or f"{s.key}.{s.ext}", s.image)
            if s.caption is not None:
                add(tar, f"{s.key}.txt", s.caption)
            meta = {"key": s.key, "url": f"https://example.com/{s.key}.{s.ext}", "status": "success",
                    "caption": s.caption.decode("utf-8", "replace") if s.caption else None}
            add(tar, f"{s.key}.json", json.dumps(meta).encode())


def write_parquet(path: str, samples: List[FixtureSample]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def text(c):
        if c is None:
            return None
        return c.decode("utf-8")

    table = pa.table({
        "key": [s.key for s in samples],
        "jpg": pa.array([s.image for s in samples], pa.binary()),
        "txt": pa.array([text(s.caption) for s in samples], pa.string()),
        "url": [f"https://example.com/{s.key}" for s in samples],
        "status": ["success" if s.image is not None else "failed_to_download" for s in samples],
        "error_message": [None if s.image is not None else "404" for s in samples],
        "width": pa.array([None] * len(samples), pa.int64()),
    })
    pq.write_table(table, path)


def synthetic_jpeg_tar(path: str, n: int, width: int = 400, height: int = 300, seed: int = 0,
                       quality: int = 90) -> Dict[str, str]:
    """``n`` photo-like JPEGs in one img2dataset-style tar (for benchmarks)."""
    samples = []
    for i in range(n):
        img = smooth_image(width, height, seed * 100_003 + i)
        samples.append(FixtureSample(f"{i:09d}", encode(img, "JPEG", quality=quality),
                                     f"synthetic photo number {i} of a colourful gradient".encode()))
    write_webdataset_tar(path, samples, extra_members=False)
    return {s.key: s.caption.decode() for s in samples}
