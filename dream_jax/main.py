"""Training entry point.

    python -m dream_jax.main --config=configs/tiny.py --workdir=workdirs/tiny
    python -m dream_jax.main --config=configs/cc12m.py:size=L --workdir=gs://bucket/run \
        --config.optim.lr=8e-4
"""
from absl import app, flags
from ml_collections import config_flags

from dream_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (optionally :arg).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the tokenizer live.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
