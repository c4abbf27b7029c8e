"""Two processes × 4 CPU devices (jax.distributed, gloo) behave like one process with 8."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from dream_jax import train
from dream_jax.checkpoint import Checkpointer
from dream_jax.data import pipeline
from dream_jax.data.synthetic import SyntheticWorld
from dream_jax.data.tokenizers import train_caption_bpe
from tests.test_train import REPO, read_jsonl, small_arch_flags, small_config

STEPS = 2
FLAGS = [
    "--config=configs/tiny.py", f"--config.total_steps={STEPS}", "--config.batch_size=16",
    "--config.num_mask_groups=4", "--config.log_every=1", f"--config.checkpoint_every={STEPS}",
    "--config.eval.every=0", "--config.data.image_size=16", "--config.data.clip_context=16",
    "--config.data.gen_context=16", "--config.optim.warmup_steps=2",
    # Both losses active from the first step (warm-up masking gates L_gen early on).
    "--config.masking.kind=fixed", "--config.masking.ratio=0.6",
] + small_arch_flags()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_process_reads_its_own_rows_of_the_global_batch():
    cfg = small_config()
    tok = train_caption_bpe(SyntheticWorld(16, "train").captions(500), vocab_size=cfg.data.text_vocab_size)
    whole = next(pipeline.make_train_iterator(cfg, tok, 0, 1))
    parts = [next(pipeline.make_train_iterator(cfg, tok, p, 2)) for p in range(2)]
    assert all(p["image"].shape[0] == cfg.batch_size // 2 for p in parts)
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    a, b = (set(map(bytes, p["image"].reshape(p["image"].shape[0], -1))) for p in parts)
    assert not a & b


def test_two_processes_match_one_and_their_checkpoint_restores(tmp_path):
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "dream_jax.main", f"--workdir={multi}", *FLAGS,
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "mesh {'data': 8" in outs[0]

    fixed = {"masking.kind": "fixed", "masking.ratio": 0.6}
    train.train_and_evaluate(small_config(total_steps=STEPS, checkpoint_every=STEPS, **fixed), single)
    for key in ("train/loss", "train/gen_loss", "train/clip_loss"):
        multi_values = [r[key] for r in read_jsonl(multi)]
        single_values = [r[key] for r in read_jsonl(single)]
        np.testing.assert_allclose(multi_values, single_values, rtol=1e-5, atol=1e-6, err_msg=key)

    # One process (8 devices) resumes from the checkpoint the two processes wrote.
    assert Checkpointer(multi).latest_step() == STEPS
    train.train_and_evaluate(small_config(total_steps=STEPS + 1, checkpoint_every=STEPS, **fixed), multi)
    assert Checkpointer(multi).latest_step() == STEPS + 1
    with open(os.path.join(multi, "final_metrics.json")) as f:
        assert json.load(f)["step"] == STEPS + 1
