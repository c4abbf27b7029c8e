"""Training entry point.

    python -m dream_jax.main --config=configs/tiny.py --workdir=workdirs/tiny
    python -m dream_jax.main --config=configs/cc12m.py:size=L --workdir=/mnt/runs/dream_L \
        --config.data.path=/data/cc12m_arrayrecord

On a TPU pod slice every host runs the same command with --multihost (the
runtime finds its peers). Elsewhere (GPU clusters, CPU tests) pass the
coordinator explicitly: --coordinator_address=host:port --num_processes=N --process_id=i.
"""
import jax
from absl import app, flags
from ml_collections import config_flags

from dream_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (optionally :arg).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the tokenizer live.")
flags.DEFINE_bool("multihost", False, "Initialise jax.distributed (auto-detected peers, e.g. TPU pods).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-process runs).")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed():
    # Must run before anything touches a JAX backend. CPU collectives use gloo (the default).
    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.multihost:
        jax.distributed.initialize()


def main(argv):
    del argv
    init_distributed()
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
