"""The TFDS builder over ingest output: built and read through tfds.data_source, no TensorFlow."""
import json

import numpy as np
import pytest

from dream_jax.data import fixtures, images, ingest


def test_tfds_builder_reads_back_every_record(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from dream_jax.data import tfds_cc12m

    samples = fixtures.fixture_samples("t/")
    fixtures.write_webdataset_tar(str(tmp_path / "a.tar"), samples)
    manifest = ingest.run_ingest([str(tmp_path / "a.tar")], str(tmp_path / "ar"), workers=1, min_side=32,
                                 max_pixels=250_000, progress_every=1e9)
    builder = tfds_cc12m.DreamCc12m(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "ar")))
    assert builder.info.splits["train"].num_examples == manifest["num_records"]
    source = tfds.data_source("dream_cc12m", split="train", data_dir=str(tmp_path / "tfds"))
    assert len(source) == manifest["num_records"]
    by_key = {}
    for i in range(len(source)):
        ex = source[i]
        by_key[ex["key"].decode()] = ex
    good = {s.key: s for s in samples if s.ingest == "ok"}
    assert set(by_key) == set(good)
    for key, ex in by_key.items():
        want, _ = images.decode_rgb(good[key].image)          # RGB, EXIF-oriented, as the pipeline sees it
        assert ex["image"].dtype == np.uint8 and ex["image"].shape[-1] == 3
        np.testing.assert_array_equal(ex["image"], np.asarray(want), err_msg=key)
        assert ex["caption"].decode() == good[key].caption.decode()
        assert json.loads(ex["metadata"])["file"] == "a.tar"
