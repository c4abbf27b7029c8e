"""img2dataset output → dream_jax ArrayRecord shards (schema: data/records.py).

    python -m dream_jax.data.ingest --input '/data/cc12m/{00000..01242}.tar' \
        --output /data/cc12m_ar --workers 16

Inputs (one or more ``--input``; each a path, a glob, or a brace pattern such
as ``shard-{00000..00009}.tar`` or ``{a,b}.parquet`` — braces are expanded
here, then globs):

* webdataset ``.tar`` shards as img2dataset writes them: members
  ``KEY.jpg|png|webp`` + ``KEY.txt`` (caption) + ``KEY.json`` (metadata).
  The tar is read as a stream, in memory: nothing is ever extracted to disk,
  so member names such as ``../x.jpg`` or absolute paths are just strings.
  Non-file members (dirs, links, devices) are ignored and counted.
* ``.parquet`` files with an image-bytes column (``jpg``/``png``/``webp``/
  ``image``/``jpeg``, or ``--image-column``) and a caption column (``txt``,
  else ``caption``, or ``--caption-column``).

Output, one ArrayRecord shard per input shard (options ``group_size:1``)::

    DIR/<stem>.array_record        records in input order
    DIR/<stem>.manifest.json       per-shard manifest (counts, skipped keys + reasons)
    DIR/manifest.json              all shards, totals, every skipped record

A shard is finished only once BOTH its ``.array_record`` and then its
``.manifest.json`` have been atomically renamed into place; a rerun skips
finished shards (same input size and same options) and redoes the rest, so a
killed run resumes. Temporary files (``.tmp.*``) of a killed run are deleted.
Output is deterministic: the same inputs and options give byte-identical
shards and manifests (no timestamps inside). One ingest at a time per output
directory (an flock on ``DIR/.ingest.lock``).

Every input sample is either written or skipped and counted under a reason:
``missing_image``, ``missing_caption``, ``caption_not_utf8``, ``empty_caption``,
``empty_image``, ``corrupt_image`` (undecodable or truncated; images are fully
decoded with ``--verify full``, the default), ``decompression_bomb``
(w × h > ``--max-pixels``), ``too_small`` (shorter side < ``--min-side``,
default 64), ``duplicate_key`` (a key seen before in the same shard),
``member_too_large`` (> ``--max-member-bytes``). A tar or parquet file cut
short keeps the samples before the cut (``input_error`` in its manifest); an
input that cannot be opened at all is reported under ``failed_inputs``
(exit status 1) and retried by the next run. Captions are stored
verbatim (over-long ones are truncated later, at tokenization). Non-RGB images
are stored as they are and counted under ``notes`` as ``mode/<MODE>``; the
pipeline converts them to RGB.
"""
from __future__ import annotations

import argparse
import fcntl
import glob as globlib
import hashlib
import json
import multiprocessing
import multiprocessing.pool
import os
import re
import sys
import tarfile
import time
import traceback
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence

from dream_jax.data import images, records

MANIFEST_NAME = "manifest.json"
SHARD_MANIFEST_SUFFIX = ".manifest.json"
TMP_PREFIX = ".tmp."
LOCK_NAME = ".ingest.lock"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "image", "img")
PARQUET_CAPTION_COLUMNS = ("txt", "caption", "text")
DEFAULT_MIN_SIDE = 64
DEFAULT_MAX_MEMBER_BYTES = 64 << 20
SKIP_REASONS = ("missing_image", "missing_caption", "caption_not_utf8", "empty_caption",
                "empty_image", "corrupt_image", "decompression_bomb", "too_small",
                "duplicate_key", "member_too_large")


# ---------------------------------------------------------------------------------------------
# Input expansion.
# ---------------------------------------------------------------------------------------------
_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")


def expand_braces(pattern: str) -> List[str]:
    """Shell-style brace expansion: ``{00000..00009}`` (zero padding kept, both
    ends inclusive, descending allowed) and ``{a,b,c}``; nested and repeated
    groups work. A pattern without braces is returned as is."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        if pattern[end] == "{":
            depth += 1
        elif pattern[end] == "}":
            depth -= 1
            if depth == 0:
                break
    else:
        raise ValueError(f"unbalanced braces in {pattern!r}")
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    m = _RANGE.fullmatch("{" + body + "}")
    if m:
        a, b = m.group(1), m.group(2)
        width = max(len(a.lstrip("-")), len(b.lstrip("-"))) if (a.lstrip("-").startswith("0") or
                                                               b.lstrip("-").startswith("0")) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) if width else str(i) for i in range(lo, hi + step, step)]
    else:
        options, depth, current = [], 0, ""
        for ch in body:
            if ch == "," and depth == 0:
                options.append(current)
                current = ""
                continue
            depth += ch == "{"
            depth -= ch == "}"
            current += ch
        options.append(current)
        if len(options) == 1:     # "{x}" is literal in the shell; keep it literal
            return [head + "{" + o + "}" + t for o in options for t in expand_braces(tail)]
    out = []
    for option in options:
        for expanded in expand_braces(head + option + tail):
            out.append(expanded)
    return out


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Paths of all inputs, in the order given (globs sorted), duplicates removed.
    Raises FileNotFoundError naming every pattern that matched nothing."""
    paths, missing, seen = [], [], set()
    for pattern in patterns:
        for p in expand_braces(pattern):
            matches = sorted(globlib.glob(p)) if globlib.has_magic(p) else ([p] if os.path.exists(p) else [])
            if not matches:
                missing.append(p)
            for m in matches:
                a = os.path.abspath(m)
                if a not in seen:
                    seen.add(a)
                    paths.append(a)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"no input file for {shown}")
    return paths


def input_kind(path: str) -> str:
    name = os.path.basename(path).lower()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"{path}: not a .tar or .parquet shard")


def shard_stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".tar.gz", ".tgz", ".tar", ".parquet"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# ---------------------------------------------------------------------------------------------
# Reading samples (in memory).
# ---------------------------------------------------------------------------------------------
class _Sample:
    __slots__ = ("key", "image", "image_member", "caption", "meta", "source", "skip", "skip_detail")

    def __init__(self, key):
        self.key, self.image, self.image_member = key, None, None
        self.caption, self.meta, self.source = None, {}, {}
        self.skip, self.skip_detail = None, ""


def _split_member(name: str):
    directory, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


def iter_tar_samples(path: str, notes: Counter, max_member_bytes: int) -> Iterator[_Sample]:
    """Samples of a webdataset tar, read as a stream. Consecutive members with
    the same key form one sample (duplicate keys are detected within a shard).
    A read error ends the shard: it is raised as ``_InputError`` after the
    samples read before it; a file that is not a tar raises ``UnreadableInput``."""
    file_name = os.path.basename(path)
    current: Optional[_Sample] = None
    oversize = False

    def finish(sample, oversize):
        if oversize and sample.skip is None:
            sample.skip = "member_too_large"
        return sample

    with open(path, "rb") as raw:
        try:
            tar = tarfile.open(fileobj=raw, mode="r|*")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UnreadableInput(f"not a readable tar: {type(e).__name__}: {e}") from None
        try:
            for member in tar:
                if not member.isfile():
                    notes["ignored_member"] += 1
                    continue
                key, ext = _split_member(member.name)
                if current is not None and key != current.key:
                    yield finish(current, oversize)
                    current, oversize = None, False
                if current is None:
                    current = _Sample(key)
                    current.source = {"file": file_name}
                if member.size > max_member_bytes:
                    oversize = True       # tarfile skips the unread bytes of the stream
                    continue
                if ext in IMAGE_EXTS:
                    data = tar.extractfile(member).read()
                    if current.image is None:
                        current.image, current.image_member = data, member.name
                        current.source["member"] = member.name
                    else:
                        notes["extra_image_member"] += 1
                elif ext == "txt":
                    current.caption = tar.extractfile(member).read()
                elif ext == "json":
                    data = tar.extractfile(member).read()
                    try:
                        meta = json.loads(data.decode("utf-8"))
                        current.meta = meta if isinstance(meta, dict) else {"value": meta}
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        notes["bad_json"] += 1
                else:
                    notes["ignored_member"] += 1
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            if current is not None:
                yield finish(current, oversize)
            raise _InputError(f"tar read error after {e.__class__.__name__}: {e}") from None
    if current is not None:
        yield finish(current, oversize)


def _pick_column(names, explicit, candidates, what, path):
    if explicit:
        if explicit not in names:
            raise ValueError(f"{path}: no {what} column {explicit!r} (columns: {names})")
        return explicit
    for c in candidates:
        if c in names:
            return c
    raise ValueError(f"{path}: no {what} column (looked for {candidates}; columns: {names}); "
                     f"pass --{what}-column")


def iter_parquet_samples(path: str, notes: Counter, image_column: Optional[str],
                         caption_column: Optional[str], batch_rows: int = 256) -> Iterator[_Sample]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file_name = os.path.basename(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:                        # noqa: BLE001
        raise UnreadableInput(f"not a readable parquet file: {type(e).__name__}: {e}") from None
    schema = pf.schema_arrow
    names = list(schema.names)
    image_col = _pick_column(names, image_column, PARQUET_IMAGE_COLUMNS, "image", path)
    caption_col = _pick_column(names, caption_column, PARQUET_CAPTION_COLUMNS, "caption", path)
    meta_cols = [n for n in names if n not in (image_col, caption_col)
                 and not pa.types.is_binary(schema.field(n).type)
                 and not pa.types.is_large_binary(schema.field(n).type)]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[image_col, caption_col] + meta_cols):
            cols = batch.to_pydict()
            for i in range(batch.num_rows):
                key = cols["key"][i] if "key" in cols and cols["key"][i] is not None else f"{row:09d}"
                s = _Sample(str(key))
                s.image = cols[image_col][i]
                s.caption = cols[caption_col][i]
                s.meta = {c: cols[c][i] for c in meta_cols}
                s.source = {"file": file_name, "row": row}
                row += 1
                yield s
    except _InputError:
        raise
    except Exception as e:                        # noqa: BLE001  corrupt row group: keep what was read
        raise _InputError(f"parquet read error at row {row}: {type(e).__name__}: {e}") from None


class _InputError(Exception):
    """A read error part-way through an input: the shard ends there (deterministically)."""


class UnreadableInput(Exception):
    """An input that cannot be opened at all: that input fails (and is retried on a rerun)."""


# ---------------------------------------------------------------------------------------------
# One sample → one record (or a skip reason).
# ---------------------------------------------------------------------------------------------
def _json_safe(value):
    """img2dataset metadata → JSON-serialisable (bytes dropped, NaN → None)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, (bytes, bytearray)):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def make_record(sample: _Sample, options: Dict[str, Any], notes: Counter) -> bytes:
    """Validated record bytes, or raises images.Skip with the reason."""
    if sample.skip:
        raise images.Skip(sample.skip, sample.skip_detail)
    if sample.image is None:
        raise images.Skip("missing_image")
    if sample.caption is None:
        raise images.Skip("missing_caption")
    caption = sample.caption
    if isinstance(caption, (bytes, bytearray)):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError as e:
            raise images.Skip("caption_not_utf8", str(e)) from None
    if not isinstance(caption, str):
        caption = str(caption)
    if not caption.strip():
        raise images.Skip("empty_caption")
    if len(sample.image) == 0:
        raise images.Skip("empty_image")
    verify = options["verify"]
    img = images.open_image(sample.image, options["max_pixels"])
    width, height = img.size
    if options["min_side"] and min(width, height) < options["min_side"]:
        raise images.Skip("too_small", f"{width}x{height} < {options['min_side']}")
    if verify == "full":
        images.load_pixels(img)
    mode, fmt = img.mode, (img.format or "unknown").lower()
    if mode != "RGB" or "transparency" in img.info:
        notes[f"mode/{mode}"] += 1
    header = {
        "key": sample.key,
        "caption": caption,
        "image": {"format": fmt, "width": int(width), "height": int(height), "mode": mode},
        "source": dict(sample.source, meta=_json_safe(sample.meta)),
    }
    return records.encode_record(header, sample.image)


# ---------------------------------------------------------------------------------------------
# One shard (runs in a worker process).
# ---------------------------------------------------------------------------------------------
_COUNTER = None     # multiprocessing.Value('q') of records processed, shared with the parent


def _init_worker(counter, die_with_parent=False):
    global _COUNTER
    _COUNTER = counter
    if die_with_parent:      # a killed ingest must not leave workers writing into the directory
        try:
            import ctypes
            import signal
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except Exception:                         # noqa: BLE001  not Linux: best effort
            pass


def _bump(n):
    if _COUNTER is not None and n:
        with _COUNTER.get_lock():
            _COUNTER.value += n


def _input_info(path: str) -> Dict[str, Any]:
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "kind": input_kind(path)}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{os.path.basename(path)}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ingest_shard(input_path: str, output_dir: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """Converts one input shard; returns its manifest (also written next to the shard)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    stem = shard_stem(input_path)
    out_name = stem + records.RECORD_SUFFIX
    out_path = os.path.join(output_dir, out_name)
    tmp_path = os.path.join(output_dir, f"{TMP_PREFIX}{out_name}.{os.getpid()}")
    info = _input_info(input_path)
    notes: Counter = Counter()
    skipped: Counter = Counter()
    skipped_records: List[Dict[str, str]] = []
    seen_keys = set()
    n_written, pending, input_error = 0, 0, None

    if info["kind"] == "tar":
        samples = iter_tar_samples(input_path, notes, options["max_member_bytes"])
    else:
        samples = iter_parquet_samples(input_path, notes, options.get("image_column"),
                                       options.get("caption_column"))
    writer = ArrayRecordWriter(tmp_path, options["array_record_options"])
    try:
        try:
            for sample in samples:
                pending += 1
                if pending >= 64:
                    _bump(pending)
                    pending = 0
                try:
                    if sample.key in seen_keys:
                        raise images.Skip("duplicate_key")
                    seen_keys.add(sample.key)
                    record = make_record(sample, options, notes)
                except images.Skip as s:
                    skipped[s.reason] += 1
                    skipped_records.append({"key": sample.key, "reason": s.reason, "detail": s.detail[:200]})
                    continue
                writer.write(record)
                n_written += 1
        except _InputError as e:
            input_error = str(e)
        _bump(pending)
    finally:
        writer.close()
    if not os.path.exists(tmp_path):
        raise RuntimeError(f"ArrayRecord writer produced no file for {input_path}")
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    manifest = {
        "schema": records.SCHEMA_NAME,
        "schema_version": records.SCHEMA_VERSION,
        "input": info,
        "options": _manifest_options(options),
        "output": {"file": out_name, "bytes": os.path.getsize(tmp_path), "sha256": _sha256(tmp_path)},
        "num_records": n_written,
        "num_samples": n_written + sum(skipped.values()),
        "skipped": dict(sorted(skipped.items())),
        "notes": dict(sorted(notes.items())),
        "input_error": input_error,
        "skipped_records": skipped_records,
    }
    os.replace(tmp_path, out_path)                              # 1. the shard
    _atomic_write_text(os.path.join(output_dir, stem + SHARD_MANIFEST_SUFFIX),
                       json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n")  # 2. finished
    return manifest


def _manifest_options(options):
    keys = ("verify", "min_side", "max_pixels", "max_member_bytes", "array_record_options",
            "image_column", "caption_column")
    return {k: options.get(k) for k in keys}


def _run_shard(args):
    input_path, output_dir, options = args
    try:
        return {"ok": True, "input": input_path, "manifest": ingest_shard(input_path, output_dir, options)}
    except BaseException as e:                    # noqa: BLE001  report, never take the run down
        tmp = os.path.join(output_dir, f"{TMP_PREFIX}{shard_stem(input_path)}{records.RECORD_SUFFIX}.{os.getpid()}")
        if os.path.exists(tmp):
            os.remove(tmp)
        return {"ok": False, "input": input_path,
                "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5)}


# ---------------------------------------------------------------------------------------------
# The run: resume, workers, progress, global manifest.
# ---------------------------------------------------------------------------------------------
def finished_manifest(input_path: str, output_dir: str, options: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The shard's manifest if it is finished for this input and these options, else None."""
    stem = shard_stem(input_path)
    manifest_path = os.path.join(output_dir, stem + SHARD_MANIFEST_SUFFIX)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    out_path = os.path.join(output_dir, stem + records.RECORD_SUFFIX)
    if (manifest.get("schema_version") != records.SCHEMA_VERSION
            or manifest.get("input") != _input_info(input_path)
            or manifest.get("options") != _manifest_options(options)
            or not os.path.exists(out_path)
            or os.path.getsize(out_path) != manifest.get("output", {}).get("bytes")):
        return None
    if options.get("check_existing") and _sha256(out_path) != manifest["output"]["sha256"]:
        return None
    return manifest


def _clean_temporaries(output_dir: str) -> int:
    n = 0
    for name in os.listdir(output_dir):
        if name.startswith(TMP_PREFIX):
            os.remove(os.path.join(output_dir, name))
            n += 1
    return n


def _progress_line(done, total, resumed, n_records, n_skipped, elapsed, new_records):
    rate = new_records / elapsed if elapsed > 0 else 0.0
    return (f"ingest: shards {done}/{total} ({resumed} already done), {n_records:,} records written, "
            f"{n_skipped:,} skipped, {rate:,.1f} records/s, {elapsed:,.0f} s")


def run_ingest(inputs: Sequence[str], output_dir: str, workers: int = 1, *,
               min_side: int = DEFAULT_MIN_SIDE, max_pixels: int = images.DEFAULT_MAX_PIXELS,
               verify: str = "full", max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
               array_record_options: str = records.ARRAY_RECORD_OPTIONS,
               image_column: Optional[str] = None, caption_column: Optional[str] = None,
               check_existing: bool = False, progress_every: float = 10.0,
               log=None) -> Dict[str, Any]:
    """Converts ``inputs`` (paths/globs/brace patterns) into ``output_dir``.
    Returns the global manifest (also written as ``output_dir/manifest.json``)."""
    if verify not in ("full", "header"):
        raise ValueError(f"verify must be 'full' or 'header', not {verify!r}")
    paths = expand_inputs(inputs)
    for p in paths:
        input_kind(p)
    stems = Counter(shard_stem(p) for p in paths)
    clashes = sorted(s for s, n in stems.items() if n > 1)
    if clashes:
        raise ValueError(f"several inputs map to the same output shard name: {clashes[:5]}; "
                         f"ingest them into separate directories")
    options = dict(verify=verify, min_side=int(min_side), max_pixels=int(max_pixels),
                   max_member_bytes=int(max_member_bytes), array_record_options=array_record_options,
                   image_column=image_column, caption_column=caption_column,
                   check_existing=bool(check_existing))
    os.makedirs(output_dir, exist_ok=True)
    lock = open(os.path.join(output_dir, LOCK_NAME), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RuntimeError(f"another ingest is writing to {output_dir}") from None
    try:
        return _run_locked(paths, output_dir, workers, options, progress_every, log or sys.stderr)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _run_locked(paths, output_dir, workers, options, progress_every, log):
    removed = _clean_temporaries(output_dir)
    if removed:
        print(f"ingest: removed {removed} temporary file(s) of an interrupted run", file=log, flush=True)
    manifests: Dict[str, Dict[str, Any]] = {}
    todo = []
    for p in paths:
        m = finished_manifest(p, output_dir, options)
        if m is not None:
            manifests[p] = m
        else:
            todo.append(p)
    resumed = len(manifests)
    failures = []
    workers = max(1, int(workers))
    counter = multiprocessing.get_context("spawn").Value("q", 0)
    start = time.time()
    if todo:
        if workers > 1 and len(todo) > 1:
            pool = multiprocessing.get_context("spawn").Pool(
                min(workers, len(todo)), initializer=_init_worker, initargs=(counter, True))
        else:
            _init_worker(counter)
            pool = multiprocessing.pool.ThreadPool(1)
        try:
            pending = [pool.apply_async(_run_shard, ((p, output_dir, options),)) for p in todo]
            last = time.time()
            while pending:
                still = []
                for r in pending:
                    if r.ready():
                        res = r.get()
                        if res["ok"]:
                            manifests[res["input"]] = res["manifest"]
                        else:
                            failures.append(res)
                            print(f"ingest: FAILED {res['input']}: {res['error']}", file=log, flush=True)
                    else:
                        still.append(r)
                pending = still
                now = time.time()
                if pending and now - last >= progress_every:
                    last = now
                    n_rec = sum(m["num_records"] for m in manifests.values())
                    n_skip = sum(sum(m["skipped"].values()) for m in manifests.values())
                    print(_progress_line(len(manifests), len(paths), resumed, n_rec, n_skip,
                                         now - start, counter.value), file=log, flush=True)
                if pending:
                    pending[0].wait(0.2)
        finally:
            pool.close()
            pool.join()
        _init_worker(None)
    manifest = _global_manifest(paths, manifests, failures, options)
    _atomic_write_text(os.path.join(output_dir, MANIFEST_NAME),
                       json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    elapsed = time.time() - start
    print(_progress_line(len(manifests), len(paths), resumed, manifest["num_records"],
                         manifest["num_skipped"], elapsed, counter.value)
          + (f"; {len(failures)} input(s) FAILED (rerun to retry)" if failures else ""), file=log, flush=True)
    return manifest


def _global_manifest(paths, manifests, failures, options):
    shards, skipped, notes, skipped_records = [], Counter(), Counter(), []
    for p in paths:
        m = manifests.get(p)
        if m is None:
            continue
        shards.append({"file": m["output"]["file"], "manifest": shard_stem(p) + SHARD_MANIFEST_SUFFIX,
                       "input": m["input"]["file"], "num_records": m["num_records"],
                       "skipped": m["skipped"], "input_error": m["input_error"],
                       "sha256": m["output"]["sha256"]})
        skipped.update(m["skipped"])
        notes.update(m["notes"])
        skipped_records.extend(dict(r, shard=m["output"]["file"]) for r in m["skipped_records"])
    shards.sort(key=lambda s: s["file"])
    skipped_records.sort(key=lambda r: (r["shard"], r["key"]))
    return {
        "schema": records.SCHEMA_NAME,
        "schema_version": records.SCHEMA_VERSION,
        "options": _manifest_options(options),
        "num_inputs": len(paths),
        "num_records": sum(s["num_records"] for s in shards),
        "num_skipped": sum(skipped.values()),
        "skipped": dict(sorted(skipped.items())),
        "notes": dict(sorted(notes.items())),
        "shards": shards,
        "failed_inputs": sorted(({"input": os.path.basename(f["input"]), "error": f["error"]}
                                 for f in failures), key=lambda f: f["input"]),
        "skipped_records": skipped_records,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dream_jax.data.ingest", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", action="append", required=True,
                    help="path, glob or brace pattern of .tar/.parquet shards (repeatable)")
    ap.add_argument("--output", required=True, help="output directory")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--min-side", type=int, default=DEFAULT_MIN_SIDE,
                    help="skip images whose shorter side is below this (too_small)")
    ap.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                    help="skip images with more pixels (decompression_bomb)")
    ap.add_argument("--verify", choices=("full", "header"), default="full",
                    help="full: decode every image (finds truncated files); header: parse headers only")
    ap.add_argument("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES)
    ap.add_argument("--array-record-options", default=records.ARRAY_RECORD_OPTIONS)
    ap.add_argument("--image-column", default=None, help="parquet: the image-bytes column")
    ap.add_argument("--caption-column", default=None, help="parquet: the caption column")
    ap.add_argument("--check-existing", action="store_true",
                    help="re-hash finished shards before skipping them")
    ap.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    args = ap.parse_args(argv)
    manifest = run_ingest(args.input, args.output, args.workers, min_side=args.min_side,
                          max_pixels=args.max_pixels, verify=args.verify,
                          max_member_bytes=args.max_member_bytes,
                          array_record_options=args.array_record_options,
                          image_column=args.image_column, caption_column=args.caption_column,
                          check_existing=args.check_existing, progress_every=args.progress_every)
    print(json.dumps({k: manifest[k] for k in ("num_records", "num_skipped", "skipped")}))
    return 1 if manifest["failed_inputs"] else 0


if __name__ == "__main__":
    sys.exit(main())
