"""The on-disk record schema of dream_jax image–text ArrayRecord shards.

Schema version 1 — one ArrayRecord record (written with options
``group_size:1`` so that every record is randomly addressable) is::

    offset  size  field
    0       4     magic  b"DJIT"            ("dream_jax image-text")
    4       1     schema version, uint8     (= 1)
    5       4     header length H, uint32 little-endian
    9       H     header: UTF-8 JSON object, keys sorted, separators (",", ":"),
                  ensure_ascii=False (so the same record always has the same bytes)
    9+H     ...   the image file bytes exactly as downloaded (JPEG/PNG/WebP/...),
                  to the end of the record; length = header["image"]["bytes"]

Header fields (v1)::

    key      str   the img2dataset key (e.g. "000012345")
    caption  str   the caption as downloaded (valid UTF-8, non-empty after
                   strip(); not cleaned, not truncated — tokenizers do that)
    image    {"format": PIL format name lower-case ("jpeg", "png", "webp", ...),
              "width": int, "height": int  (as stored, before EXIF rotation),
              "mode": PIL mode ("RGB", "L", "CMYK", "RGBA", "P", "I;16", ...),
              "bytes": int}
    source   {"file": input shard basename, "member": tar member name of the
              image (tar input) | "row": row index (parquet input),
              "meta": the img2dataset per-sample JSON / parquet row without
              binary columns (url, status, original_width, sha256, ...)}

No pickle: any language can read a record with a JSON parser. Readers must
reject unknown magic and versions they do not know (:func:`decode_record`
raises ``RecordError``). A new field is a minor change (readers ignore unknown
keys); anything else bumps ``SCHEMA_VERSION``.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Dict, Tuple

MAGIC = b"DJIT"
SCHEMA_VERSION = 1
SCHEMA_NAME = "dream_jax.image_text"
ARRAY_RECORD_OPTIONS = "group_size:1"
RECORD_SUFFIX = ".array_record"
_PREFIX = struct.Struct("<4sBI")


class RecordError(ValueError):
    """Bytes that are not a record of a known schema version."""


def dumps_json(obj: Any) -> str:
    """The canonical JSON used in headers and manifests (deterministic)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def encode_record(header: Dict[str, Any], image: bytes) -> bytes:
    header = dict(header)
    image_info = dict(header.get("image", {}))
    image_info["bytes"] = len(image)
    header["image"] = image_info
    blob = dumps_json(header).encode("utf-8")
    return _PREFIX.pack(MAGIC, SCHEMA_VERSION, len(blob)) + blob + bytes(image)


def decode_header(record: bytes) -> Tuple[Dict[str, Any], int]:
    """(header dict, offset of the image bytes). Raises RecordError."""
    if not isinstance(record, (bytes, bytearray, memoryview)) or len(record) < _PREFIX.size:
        raise RecordError("record shorter than its prefix")
    magic, version, n = _PREFIX.unpack_from(record, 0)
    if magic != MAGIC:
        raise RecordError(f"bad magic {magic!r}")
    if version != SCHEMA_VERSION:
        raise RecordError(f"unknown schema version {version} (this reader knows {SCHEMA_VERSION})")
    end = _PREFIX.size + n
    if end > len(record):
        raise RecordError("header runs past the end of the record")
    try:
        header = json.loads(bytes(record[_PREFIX.size:end]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"bad header: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("caption"), str) \
            or not isinstance(header.get("key"), str):
        raise RecordError("header lacks a string key/caption")
    expected = header.get("image", {}).get("bytes")
    if expected is not None and expected != len(record) - end:
        raise RecordError(f"image is {len(record) - end} bytes, header says {expected}")
    return header, end


def decode_record(record: bytes) -> Tuple[Dict[str, Any], bytes]:
    """(header, image bytes). Raises RecordError."""
    header, offset = decode_header(record)
    return header, bytes(record[offset:])
