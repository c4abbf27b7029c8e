"""ArrayRecord pipeline: every good record exactly once per epoch across hosts,
every bad one counted under its reason, images equal to the reference decode
(never substituted), exact resume from a saved iterator state."""
import json
from collections import Counter

import numpy as np
import pytest

from configs import tiny
from dream_jax.data import fixtures, images, ingest, pipeline, records, tokenizers

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    tar_samples = fixtures.fixture_samples("t/")
    pq_samples = [s for s in fixtures.fixture_samples("p/") if s.ingest != "caption_not_utf8"]
    fixtures.write_webdataset_tar(str(d / "a.tar"), tar_samples[:12])
    fixtures.write_webdataset_tar(str(d / "b.tar"), tar_samples[12:])
    fixtures.write_parquet(str(d / "c.parquet"), pq_samples)
    ingest.run_ingest([str(d / "{a,b}.tar"), str(d / "c.parquet")], str(d / "ar"), workers=1,
                      min_side=32, max_pixels=250_000, progress_every=1e9)
    samples = {s.key: s for s in tar_samples + pq_samples if s.ingest == "ok"}
    tok = tokenizers.train_clip_bpe([s.caption.decode() for s in samples.values()] * 3, vocab_size=700,
                                    min_frequency=1)
    return {"dir": d, "path": str(d / "ar"), "samples": samples, "tok": tok}


def make_cfg(path, **data):
    cfg = tiny.get_config()
    cfg.seed = 7
    cfg.batch_size = 8
    cfg.data.source = "arrayrecord"
    cfg.data.path = path
    cfg.data.image_size = IMAGE_SIZE
    cfg.data.clip_context = 16
    cfg.data.gen_context = 12
    cfg.data.worker_count = 0
    cfg.data.read_threads = 4
    cfg.data.max_image_pixels = 250_000
    for k, v in data.items():
        cfg.data[k] = v
    return cfg


def expected_image(sample, flipped):
    img, _ = images.decode_rgb(sample.image)
    out = images.adm_center_crop(img, IMAGE_SIZE)
    return out[:, ::-1] if flipped else out


def run_hosts(cfg, tok, hosts, epochs, **kwargs):
    per_host, counters = [], Counter()
    for p in range(hosts):
        it = iter(pipeline.make_arrayrecord_dataset(cfg, tok, p, hosts, num_epochs=epochs, drop_remainder=False,
                                                    keep_metadata=True, **kwargs))
        rows = []
        for batch in it:
            assert batch["image"].dtype == np.uint8 and batch["image"].shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
            assert batch["clip_tokens"].dtype == np.int32 and batch["gen_tokens"].dtype == np.int32
            for i, key in enumerate(batch["key"]):
                rows.append({k: batch[k][i] for k in batch})
        per_host.append(rows)
        counters.update(it.counters)
    return per_host, counters


def expected_counters(samples, tok, cfg, epochs=1):
    want = Counter()
    for s in samples.values():
        if s.pipeline != "ok":
            want[f"skipped/{s.pipeline}"] += epochs
            continue
        want["records"] += epochs
        for note in s.notes:
            if not note.startswith("truncated/"):
                want[note] += epochs
        n = len(tok.encode(s.caption.decode()))
        want["truncated/clip_tokens"] += epochs * (n > cfg.data.clip_context - 2)
        want["truncated/gen_tokens"] += epochs * (n > cfg.data.gen_context - 2)
    return {k: v for k, v in want.items() if v}


def test_two_hosts_one_epoch_disjoint_complete_and_counted(data):
    cfg = make_cfg(data["path"])
    per_host, counters = run_hosts(cfg, data["tok"], hosts=2, epochs=1)
    keys = [[r["key"] for r in rows] for rows in per_host]
    good = {k for k, s in data["samples"].items() if s.pipeline == "ok"}
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(good)
    assert abs(len(keys[0]) - len(keys[1])) <= 3
    assert counters == expected_counters(data["samples"], data["tok"], cfg)
    # Each image is exactly the reference decode of its own record (flipped as decided).
    for row in per_host[0] + per_host[1]:
        sample = data["samples"][row["key"]]
        assert row["epoch"] == 0
        assert row["flipped"] == pipeline.flip_decision(cfg.seed, row["key"], 0)
        np.testing.assert_array_equal(row["image"], expected_image(sample, row["flipped"]), err_msg=row["key"])
        np.testing.assert_array_equal(row["clip_tokens"], data["tok"].encode_batch([sample.caption.decode()], 16)[0])
        assert row["gen_tokens"].shape == (12,)
    flips = [r["flipped"] for r in per_host[0] + per_host[1]]
    assert 0 < sum(flips) < len(flips)


def test_epochs_reshuffle_and_reflip_deterministically(data):
    cfg = make_cfg(data["path"])
    per_host, counters = run_hosts(cfg, data["tok"], hosts=2, epochs=2)
    rows = per_host[0] + per_host[1]
    seen = Counter((r["key"], r["epoch"]) for r in rows)
    good = {k for k, s in data["samples"].items() if s.pipeline == "ok"}
    assert set(seen) == {(k, e) for k in good for e in (0, 1)} and set(seen.values()) == {1}
    assert counters == expected_counters(data["samples"], data["tok"], cfg, epochs=2)
    order = {e: [r["key"] for r in per_host[0] if r["epoch"] == e] for e in (0, 1)}
    assert order[0] != order[1]
    by = {(r["key"], r["epoch"]): r for r in rows}
    for k in good:
        a, b = by[(k, 0)], by[(k, 1)]
        same = a["flipped"] == b["flipped"]
        np.testing.assert_array_equal(a["image"], b["image"] if same else b["image"][:, ::-1])
    # The flip depends on (seed, key, epoch) only: one host sees the same flips as two.
    single, _ = run_hosts(cfg, data["tok"], hosts=1, epochs=2)
    assert {(r["key"], r["epoch"]): r["flipped"] for r in single[0]} == {kk: r["flipped"] for kk, r in by.items()}


def test_train_iterator_contract_and_exact_resume(data):
    cfg = make_cfg(data["path"])
    it = pipeline.make_train_iterator(cfg, data["tok"], 1, 2)
    first = [next(it) for _ in range(5)]           # crosses an epoch boundary (~16 records per host)
    for b in first:
        assert set(b) == {"image", "clip_tokens", "gen_tokens"}
        assert b["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and b["image"].dtype == np.uint8
        assert b["clip_tokens"].shape == (4, 16) and b["gen_tokens"].shape == (4, 12)
    state = json.loads(json.dumps(it.get_state()))      # what grain's orbax handler stores
    counters = it.counters
    rest = [next(it) for _ in range(6)]
    again = pipeline.make_train_iterator(cfg, data["tok"], 1, 2)
    again.set_state(state)
    assert again.counters == counters
    for a, b in zip(rest, [next(again) for _ in range(6)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert again.counters == it.counters and it.counters["records"] == 44


def _bad_records_shard(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    jpeg = fixtures.encode(fixtures.smooth_image(80, 70, 3), "JPEG")

    def rec(key, caption, image):
        return records.encode_record({"key": key, "caption": caption, "image": {}, "source": {}}, image)

    items = [
        ("good", rec("good", "a fine photo", jpeg)),
        ("junk", b"this is not a record at all"),
        ("v9", rec("v9", "future schema", jpeg)[:4] + bytes([9]) + rec("v9", "future schema", jpeg)[5:]),
        ("blank", rec("blank", " \t ", jpeg)),
        ("empty", rec("empty", "zero bytes", b"")),
        ("cut", rec("cut", "truncated jpeg", jpeg[: len(jpeg) // 2])),
        ("bomb", rec("bomb", "many pixels", fixtures.encode(fixtures.smooth_image(600, 500, 1, "L"), "PNG"))),
        ("small", rec("small", "too small", fixtures.encode(fixtures.smooth_image(47, 200, 2), "JPEG"))),
        ("cmyk", rec("cmyk", "cmyk", fixtures.encode(fixtures.smooth_image(64, 64, 4, "CMYK"), "JPEG"))),
    ]
    d = tmp_path / "bad"
    d.mkdir()
    w = ArrayRecordWriter(str(d / "x.array_record"), "group_size:1")
    for _, r in items:
        w.write(r)
    w.close()
    (d / "x.manifest.json").write_text("{}")
    return str(d)


def test_bad_records_are_skipped_and_counted_never_replaced(data, tmp_path):
    path = _bad_records_shard(tmp_path)
    cfg = make_cfg(path)
    per_host, counters = run_hosts(cfg, data["tok"], hosts=1, epochs=1)
    assert sorted(r["key"] for r in per_host[0]) == ["cmyk", "good"]
    assert counters == {"records": 2, "converted/CMYK": 1, "skipped/bad_record": 2, "skipped/empty_caption": 1,
                        "skipped/empty_image": 1, "skipped/corrupt_image": 1, "skipped/decompression_bomb": 1,
                        "skipped/too_small": 1}
    # Finite runs with drop_remainder count what the last partial batch dropped.
    cfg.batch_size = 3
    it = iter(pipeline.make_arrayrecord_dataset(cfg, data["tok"], 0, 1, num_epochs=1))
    assert [b["image"].shape[0] for b in it] == []
    assert it.counters["dropped_remainder"] == 2 and it.counters.get("records", 0) == 0
    # Held-out examples: the first usable records in file order, unflipped, with keys.
    cfg = make_cfg(data["path"], heldout_path=path)
    held = pipeline.heldout_examples(cfg, data["tok"], 2)
    assert held["key"] == ["good", "cmyk"] and held["image"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(held["image"][0], images.adm_center_crop(
        images.decode_rgb(fixtures.encode(fixtures.smooth_image(80, 70, 3), "JPEG"))[0], IMAGE_SIZE))
    with pytest.raises(ValueError, match="usable held-out"):
        pipeline.heldout_examples(cfg, data["tok"], 3)


def test_generation_tokenizer_is_pluggable(data, tmp_path):
    captions = [s.caption.decode() for s in data["samples"].values()] * 20
    spiece = str(tmp_path / "spiece.model")
    t5 = tokenizers.train_sentencepiece(captions, spiece, vocab_size=300)
    cfg = make_cfg(data["path"], gen_tokenizer=spiece, gen_context=10)
    rows, _ = run_hosts(cfg, data["tok"], hosts=1, epochs=1)
    for r in rows[0]:
        want = t5.encode_batch([data["samples"][r["key"]].caption.decode()], 10)[0]
        np.testing.assert_array_equal(r["gen_tokens"], want)
        assert 1 in r["gen_tokens"].tolist()                      # EOS kept, even when truncated
    np.testing.assert_array_equal(rows[0][0]["clip_tokens"],
                                  data["tok"].encode_batch([rows[0][0]["caption"]], 16)[0])


def test_source_errors_name_the_field(data, tmp_path):
    cfg = make_cfg("")
    with pytest.raises(ValueError, match="data.path"):
        pipeline.make_source(cfg.data, "train")
    with pytest.raises(ValueError, match="data.heldout_path"):
        pipeline.make_source(cfg.data, "heldout")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ArrayRecord shards"):
        pipeline.make_source(make_cfg(str(tmp_path / "empty")).data, "train")
    assert len(pipeline.make_source(make_cfg(data["path"]).data, "train")) == \
        sum(1 for s in data["samples"].values())
