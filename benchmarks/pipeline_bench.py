"""Input-pipeline benchmark: decoded + augmented images/s per CPU core from ArrayRecord.

    python benchmarks/pipeline_bench.py                       # 200 JPEGs of 400x300 → 256 px
    python benchmarks/pipeline_bench.py --num_images=500 --image_size=256 --epochs=3
    python benchmarks/pipeline_bench.py --worker_count=2      # also time mp_prefetch workers

Generates synthetic photo-like JPEGs in an img2dataset-style tar, ingests them
(dream_jax.data.ingest), then runs the arrayrecord pipeline (read → parse →
decode → RGB → ADM centre crop → flip → CLIP + generation tokens → batch) in
one process with one read thread, and reports images per second of wall time
and per CPU-second (= per core: user + system time of this process). With
--worker_count > 0 it also times the same pipeline with mp_prefetch worker
processes (wall time only: the workers' CPU is not in this process).
"""
import json
import os
import resource
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("num_images", 200, "Synthetic JPEGs to generate.")
flags.DEFINE_integer("width", 400, "Width of the generated JPEGs.")
flags.DEFINE_integer("height", 300, "Height of the generated JPEGs.")
flags.DEFINE_integer("image_size", 256, "Training resolution (ADM centre crop).")
flags.DEFINE_integer("batch_size", 32, "Host batch size.")
flags.DEFINE_integer("epochs", 3, "Epochs over the generated images to time.")
flags.DEFINE_integer("worker_count", 0, "Also time mp_prefetch with this many workers (0: skip).")
flags.DEFINE_string("tokenizer", "auto", "'auto' (open_clip's vocabulary if installed, else a trained one), "
                                         "or a path for dream_jax.data.tokenizers.load_text_tokenizer.")
FLAGS = flags.FLAGS


def _cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _config(path, image_size, batch_size, worker_count):
    from configs import tiny
    cfg = tiny.get_config()
    cfg.batch_size = batch_size
    cfg.data.source = "arrayrecord"
    cfg.data.path = path
    cfg.data.image_size = image_size
    cfg.data.clip_context = 77
    cfg.data.gen_context = 77
    cfg.data.worker_count = worker_count
    cfg.data.read_threads = 0
    return cfg


def _tokenizer(spec, captions):
    from dream_jax.data import tokenizers
    if spec != "auto":
        return tokenizers.load_text_tokenizer(spec)
    if tokenizers.find_open_clip_bpe():
        return tokenizers.CLIPTokenizer.load("open_clip")
    return tokenizers.train_clip_bpe(captions, vocab_size=2048)


def time_pipeline(cfg, tok, num_records, epochs):
    from dream_jax.data import pipeline
    ds = pipeline.make_arrayrecord_dataset(cfg, tok, 0, 1, num_epochs=epochs, drop_remainder=False)
    it = iter(ds)
    first = next(it)                                     # start-up (and workers) outside the timing
    n, wall, cpu = 0, time.perf_counter(), _cpu_seconds()
    for batch in it:
        n += batch["image"].shape[0]
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    assert first["image"].shape[1:] == (cfg.data.image_size, cfg.data.image_size, 3)
    assert n + first["image"].shape[0] == num_records * epochs, (n, num_records, epochs)
    counters = it.counters
    if hasattr(it, "close"):
        it.close()
    return n, wall, cpu, counters


def main(_):
    from dream_jax.data import fixtures, ingest
    with tempfile.TemporaryDirectory() as tmp:
        tar = os.path.join(tmp, "00000.tar")
        t = time.perf_counter()
        captions = fixtures.synthetic_jpeg_tar(tar, FLAGS.num_images, FLAGS.width, FLAGS.height)
        gen_s = time.perf_counter() - t
        t, c = time.perf_counter(), _cpu_seconds()
        manifest = ingest.run_ingest([tar], os.path.join(tmp, "ar"), workers=1, progress_every=1e9,
                                     log=open(os.devnull, "w"))
        ingest_wall, ingest_cpu = time.perf_counter() - t, _cpu_seconds() - c
        assert manifest["num_records"] == FLAGS.num_images, manifest["skipped"]
        tok = _tokenizer(FLAGS.tokenizer, list(captions.values()))

        cfg = _config(os.path.join(tmp, "ar"), FLAGS.image_size, FLAGS.batch_size, 0)
        n, wall, cpu, counters = time_pipeline(cfg, tok, FLAGS.num_images, FLAGS.epochs)
        result = {
            "images": n, "source": f"{FLAGS.width}x{FLAGS.height} JPEG q90", "image_size": FLAGS.image_size,
            "tokenizer": repr(tok),
            "pipeline_images_per_s_wall_1_thread": round(n / wall, 1),
            "pipeline_images_per_cpu_s": round(n / cpu, 1),
            "ingest_records_per_s_wall": round(FLAGS.num_images / ingest_wall, 1),
            "ingest_records_per_cpu_s": round(FLAGS.num_images / max(ingest_cpu, 1e-9), 1),
            "generate_s": round(gen_s, 2), "counters": counters,
        }
        if FLAGS.worker_count > 0:
            cfg = _config(os.path.join(tmp, "ar"), FLAGS.image_size, FLAGS.batch_size, FLAGS.worker_count)
            n, wall, _, _ = time_pipeline(cfg, tok, FLAGS.num_images, FLAGS.epochs)
            result[f"pipeline_images_per_s_wall_{FLAGS.worker_count}_workers"] = round(n / wall, 1)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
