"""img2dataset output → ArrayRecord: every sample written or skipped with its reason,
resumable after a kill, byte-identical on reruns, tar members never extracted."""
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dream_jax.data import fixtures, images, ingest, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = dict(min_side=32, max_pixels=250_000, progress_every=1e9)


def _shard_files(d):
    return sorted(f for f in os.listdir(d) if f.endswith((".array_record", ".json")) and not f.startswith("."))


def _read_all(path):
    from array_record.python.array_record_module import ArrayRecordReader
    reader = ArrayRecordReader(path, "readahead_buffer_size:0")
    try:
        return [records.decode_record(r) for r in reader.read_all()]
    finally:
        reader.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two img2dataset tars and one parquet with every good and bad case."""
    d = tmp_path_factory.mktemp("img2dataset") / "input"
    d.mkdir()
    tar_samples = fixtures.fixture_samples("t/")
    dup = tar_samples[14]             # first sample of shard 1; duplicates are found per shard
    duplicate = fixtures.FixtureSample(dup.key, dup.image, b"a second sample with the same key",
                                       ingest="duplicate_key")
    fixtures.write_webdataset_tar(str(d / "shard-00000.tar"), tar_samples[:14])
    fixtures.write_webdataset_tar(str(d / "shard-00001.tar"), tar_samples[14:], duplicate=duplicate)
    pq_samples = [s for s in fixtures.fixture_samples("p/") if s.ingest != "caption_not_utf8"]
    fixtures.write_parquet(str(d / "shard-00002.parquet"), pq_samples)
    expected = {}                                  # key -> ingest outcome
    for s in tar_samples + pq_samples:
        expected[s.key] = s.ingest
    return {"dir": d, "expected": expected, "duplicate": duplicate,
            "patterns": [str(d / "shard-{00000..00001}.tar"), str(d / "*.parquet")]}


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """One uninterrupted run with two worker processes."""
    out = tmp_path_factory.mktemp("reference") / "ar"
    manifest = ingest.run_ingest(inputs["patterns"], str(out), workers=2, **OPTS)
    return out, manifest


def test_expand_braces_and_inputs(tmp_path):
    assert ingest.expand_braces("s-{00008..00011}.tar") == [f"s-{i:05d}.tar" for i in range(8, 12)]
    assert ingest.expand_braces("s{3..1}") == ["s3", "s2", "s1"]
    assert ingest.expand_braces("{a,b}/{0..1}.{tar,parquet}") == [
        "a/0.tar", "a/0.parquet", "a/1.tar", "a/1.parquet", "b/0.tar", "b/0.parquet", "b/1.tar", "b/1.parquet"]
    assert ingest.expand_braces("{x,{y,z}1}") == ["x", "y1", "z1"]
    assert ingest.expand_braces("plain.tar") == ["plain.tar"]
    for name in ("a.tar", "b.tar", "c.parquet"):
        (tmp_path / name).write_bytes(b"")
    got = ingest.expand_inputs([str(tmp_path / "{a,b}.tar"), str(tmp_path / "*.parquet"), str(tmp_path / "a.tar")])
    assert [os.path.basename(p) for p in got] == ["a.tar", "b.tar", "c.parquet"]
    with pytest.raises(FileNotFoundError, match="missing"):
        ingest.expand_inputs([str(tmp_path / "{a,missing}.tar")])


def test_every_sample_written_or_skipped_with_its_reason(inputs, reference):
    out, manifest = reference
    expected = inputs["expected"]
    good = {k for k, v in expected.items() if v == "ok"}
    want_skipped = Counter(v for v in expected.values() if v != "ok")
    want_skipped["duplicate_key"] += 1
    assert manifest["skipped"] == dict(want_skipped)
    assert manifest["num_records"] == len(good)
    assert manifest["num_skipped"] == sum(want_skipped.values())
    assert manifest["failed_inputs"] == []
    # The list of skipped records names each bad key with its reason.
    listed = Counter((r["key"], r["reason"]) for r in manifest["skipped_records"])
    for key, reason in expected.items():
        if reason != "ok":
            assert listed[(key, reason)] == 1, (key, reason)
    assert listed[(inputs["duplicate"].key, "duplicate_key")] == 1
    # Every good sample is a record, exactly once, with its caption and original bytes.
    by_key = {}
    for shard in manifest["shards"]:
        recs = _read_all(str(out / shard["file"]))
        assert len(recs) == shard["num_records"]
        for header, data in recs:
            assert header["key"] not in by_key
            by_key[header["key"]] = (header, data)
    assert set(by_key) == good
    samples = {s.key: s for s in fixtures.fixture_samples("t/") + fixtures.fixture_samples("p/")}
    for key, (header, data) in by_key.items():
        assert data == samples[key].image
        assert header["caption"] == samples[key].caption.decode("utf-8")
        assert header["image"]["bytes"] == len(data)
        assert header["source"]["file"].startswith("shard-0000")
    assert by_key["t/cmyk_jpeg"][0]["image"]["mode"] == "CMYK"
    assert by_key["t/gray16_png"][0]["image"]["mode"] == "I;16"
    assert by_key["p/good_jpeg"][0]["source"]["row"] == 0
    assert by_key["t/good_jpeg"][0]["source"]["meta"]["url"].startswith("https://example.com/")
    # Directory and symlink members are ignored (one each per tar), never followed.
    assert manifest["notes"]["ignored_member"] == 4
    assert manifest["notes"]["mode/CMYK"] == 2


def test_tar_members_are_never_extracted(inputs, reference):
    out, _ = reference
    root = inputs["dir"].parent
    # "t/../traversal" would land in root/traversal.jpg if anything were extracted.
    found = [os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs if "traversal" in f]
    assert found == []
    assert sorted(os.listdir(out)) == sorted(
        [".ingest.lock", "manifest.json"] + [f"shard-0000{i}.{ext}" for i in range(3)
                                            for ext in ("array_record", "manifest.json")])


def test_rerun_is_idempotent_and_byte_identical(inputs, reference, tmp_path, capsys):
    out, manifest = reference
    # A fresh single-process run elsewhere: the same bytes (shards and manifests).
    fresh = tmp_path / "fresh"
    m2 = ingest.run_ingest(inputs["patterns"], str(fresh), workers=1, **OPTS)
    assert m2 == manifest
    for name in _shard_files(out):
        assert filecmp.cmp(out / name, fresh / name, shallow=False), name
    # Rerunning into a finished directory redoes nothing.
    before = {n: os.stat(fresh / n).st_mtime_ns for n in _shard_files(fresh) if n.endswith(".array_record")}
    capsys.readouterr()
    m3 = ingest.run_ingest(inputs["patterns"], str(fresh), workers=1, progress_every=1e9,
                           min_side=32, max_pixels=250_000)
    assert "(3 already done)" in capsys.readouterr().err
    assert m3 == manifest
    assert before == {n: os.stat(fresh / n).st_mtime_ns for n in before}
    # Other options are another conversion: nothing is reused.
    capsys.readouterr()
    m4 = ingest.run_ingest(inputs["patterns"], str(fresh), workers=1, progress_every=1e9,
                           min_side=50, max_pixels=250_000)
    assert "(0 already done)" in capsys.readouterr().err
    assert m4["skipped"]["too_small"] > manifest["skipped"]["too_small"]


def test_resume_after_simulated_interruption(inputs, reference, tmp_path, capsys):
    """Shard 1 renamed but its manifest never written, shard 2 half written as a
    temporary file: a rerun keeps shard 0 and rebuilds the rest, identically."""
    out, manifest = reference
    work = tmp_path / "work"
    shutil.copytree(out, work)
    os.remove(work / "manifest.json")
    os.remove(work / "shard-00001.manifest.json")
    with open(work / "shard-00001.array_record", "r+b") as f:
        f.truncate(100)
    os.remove(work / "shard-00002.manifest.json")
    os.rename(work / "shard-00002.array_record", work / ".tmp.shard-00002.array_record.12345")
    keep = os.stat(work / "shard-00000.array_record").st_mtime_ns
    capsys.readouterr()
    m = ingest.run_ingest(inputs["patterns"], str(work), workers=1, **OPTS)
    err = capsys.readouterr().err
    assert "removed 1 temporary file" in err and "(1 already done)" in err
    assert m == manifest
    assert os.stat(work / "shard-00000.array_record").st_mtime_ns == keep
    assert _shard_files(work) == _shard_files(out)
    for name in _shard_files(out):
        assert filecmp.cmp(out / name, work / name, shallow=False), name
    assert not [n for n in os.listdir(work) if n.startswith(".tmp.")]


def test_resume_after_sigkill(tmp_path):
    """A real `kill -9` of the ingest CLI after its first finished shard; the rerun
    yields exactly the shards of an uninterrupted run."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        fixtures.synthetic_jpeg_tar(str(src / f"{i:05d}.tar"), 40, 160, 120, seed=i)
    pattern = str(src / "{00000..00005}.tar")
    ref = tmp_path / "ref"
    ingest.run_ingest([pattern], str(ref), workers=1, progress_every=1e9)

    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "dream_jax.data.ingest", "--input", pattern,
                             "--output", str(out), "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    try:
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and any(n.endswith(".manifest.json") and n != "manifest.json"
                                    for n in os.listdir(out)):
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    finished = [n for n in os.listdir(out) if n.endswith(".manifest.json")]
    assert 1 <= len(finished), os.listdir(out)
    interrupted = len(finished) < 6          # on a very fast machine the run may have ended first
    m = ingest.run_ingest([pattern], str(out), workers=1, progress_every=1e9)
    assert m["num_records"] == 240 and m["num_skipped"] == 0
    assert _shard_files(out) == _shard_files(ref)
    for name in _shard_files(ref):
        assert filecmp.cmp(ref / name, out / name, shallow=False), name
    assert interrupted or len(finished) == 6


def test_member_too_large_and_truncated_tar(tmp_path):
    good = fixtures.FixtureSample("a", fixtures.encode(fixtures.smooth_image(64, 64), "JPEG"), b"fine")
    big = fixtures.FixtureSample("b", os.urandom(300_000), b"huge member", ingest="member_too_large")
    late = fixtures.FixtureSample("c", fixtures.encode(fixtures.smooth_image(64, 64, 1), "JPEG"), b"after")
    fixtures.write_webdataset_tar(str(tmp_path / "x.tar"), [good, big, late], extra_members=False)
    m = ingest.run_ingest([str(tmp_path / "x.tar")], str(tmp_path / "o1"), max_member_bytes=200_000,
                          progress_every=1e9)
    assert m["num_records"] == 2 and m["skipped"] == {"member_too_large": 1}
    # A tar cut short (interrupted download): the samples before the cut are kept,
    # the error is recorded, and the result is still deterministic.
    data = (tmp_path / "x.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) * 2 // 3])
    m = ingest.run_ingest([str(tmp_path / "cut.tar")], str(tmp_path / "o2"), progress_every=1e9)
    assert m["num_records"] >= 1 and m["shards"][0]["input_error"]
    assert m["failed_inputs"] == []
    keys = [h["key"] for h, _ in _read_all(str(tmp_path / "o2" / "cut.array_record"))]
    assert keys[0] == "a" and "c" not in keys
    # A file that is no tar at all fails that input (reported, retried on rerun), not the run.
    (tmp_path / "junk.tar").write_bytes(b"\x00not a tar" * 10)
    (tmp_path / "ok.tar").write_bytes(data)
    m = ingest.run_ingest([str(tmp_path / "{junk,ok}.tar")], str(tmp_path / "o3"), progress_every=1e9)
    assert [f["input"] for f in m["failed_inputs"]] == ["junk.tar"]
    assert m["num_records"] == 2 and m["skipped"] == {"corrupt_image": 1}
    assert ingest.main(["--input", str(tmp_path / "{junk,ok}.tar"), "--output", str(tmp_path / "o3")]) == 1


def test_cli_and_lock(inputs, tmp_path):
    out = tmp_path / "cli"
    rc = ingest.main(["--input", str(inputs["dir"] / "shard-00000.tar"), "--output", str(out),
                      "--workers", "1", "--min-side", "32", "--max-pixels", "250000"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_inputs"] == 1 and m["options"]["min_side"] == 32
    import fcntl
    with open(out / ".ingest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match="another ingest"):
            ingest.run_ingest([str(inputs["dir"] / "shard-00000.tar")], str(out), progress_every=1e9)


def test_record_schema_round_trip_and_rejects():
    header = {"key": "k1", "caption": "ünïcode ✓", "image": {"format": "jpeg", "width": 3, "height": 2,
                                                             "mode": "RGB"}, "source": {"file": "x.tar"}}
    blob = records.encode_record(header, b"IMAGEBYTES")
    assert blob[:4] == b"DJIT" and blob[4] == 1
    assert records.encode_record(dict(reversed(list(header.items()))), b"IMAGEBYTES") == blob
    h, data = records.decode_record(blob)
    assert data == b"IMAGEBYTES" and h["caption"] == "ünïcode ✓" and h["image"]["bytes"] == 10
    bad = [b"", b"XXXX" + blob[4:], blob[:4] + bytes([2]) + blob[5:], blob[:20], blob[:-1], b"\x00" * 40]
    for b in bad:
        with pytest.raises(records.RecordError):
            records.decode_record(b)


def test_image_decoding_policy():
    # Alpha is composited over white; 16-bit is scaled, not clipped.
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    img, mode = images.decode_rgb(fixtures.encode(rgba, "PNG"))
    assert mode == "RGBA" and img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    arr16 = np.array([[0, 65535], [257 * 100, 32768]], np.uint16)
    img, mode = images.decode_rgb(fixtures.encode(Image.fromarray(arr16), "PNG"))
    assert mode == "I;16"
    np.testing.assert_array_equal(np.asarray(img)[..., 0], [[0, 255], [100, 128]])
    cmyk, mode = images.decode_rgb(fixtures.encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    assert mode == "CMYK" and np.asarray(cmyk).mean(axis=(0, 1))[0] > 200
    # Bombs: over our limit (header only), and over 2x PIL's global limit (PIL's own error).
    big = fixtures.encode(Image.new("1", (13_500, 13_500)), "PNG")
    for limit in (images.DEFAULT_MAX_PIXELS, 0):
        with pytest.raises(images.Skip) as e:
            images.decode_rgb(big, max_pixels=limit)
        assert e.value.reason == "decompression_bomb"
    with pytest.raises(images.Skip, match="too_small"):
        images.decode_rgb(fixtures.encode(fixtures.smooth_image(40, 30), "JPEG"), min_side=32)
    for data, reason in ((b"", "empty_image"), (b"GIF89a\x00\x00", "corrupt_image")):
        with pytest.raises(images.Skip) as e:
            images.decode_rgb(data)
        assert e.value.reason == reason


def _mar_center_crop_arr(pil_image, image_size):
    """MAR util/crop.py (from ADM), verbatim."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("size,w,h", [(64, 300, 200), (64, 129, 500), (32, 56, 70), (256, 400, 300), (16, 16, 16)])
def test_adm_center_crop_matches_reference(size, w, h):
    img = fixtures.smooth_image(w, h, seed=w + h)
    out = images.adm_center_crop(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _mar_center_crop_arr(img, size))
