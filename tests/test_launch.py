"""Cloud TPU scripts: dry runs print the exact gcloud commands; all scripts pass shellcheck."""
import os
import shutil
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "logs.sh", "teardown.sh"]


def dry(script, *args, **env):
    full_env = dict(os.environ, DRY_RUN="1", TPU_NAME="t1", ZONE="z1", ACCELERATOR_TYPE="v5p-128",
                    **env)
    out = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=full_env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()


def test_create_direct_and_queued():
    assert dry("create.sh") == [
        "gcloud compute tpus tpu-vm create t1 --zone=z1 --accelerator-type=v5p-128 --version=v2-alpha-tpuv5"]
    assert dry("create.sh", QUEUED="1", PROJECT="p1") == [
        "gcloud compute tpus queued-resources create t1-qr --node-id=t1 --zone=z1 --project=p1 "
        "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5"]


def test_setup_copies_and_installs_pinned_jax_on_all_workers():
    lines = dry("setup.sh", BUCKET="b1")
    assert lines[0].startswith("tar -czf /tmp/t1-dream_jax.tar.gz")
    assert lines[1] == ("gcloud compute tpus tpu-vm scp /tmp/t1-dream_jax.tar.gz t1:/tmp/dream_jax.tar.gz "
                        "--zone=z1 --worker=all")
    assert "--worker=all" in lines[2] and "jax\\[tpu\\]==0.10.2" in lines[2]
    assert "gcsfuse\\ --implicit-dirs\\ b1\\ /mnt/b1" in lines[3]


def test_run_starts_the_main_command_on_every_worker():
    lines = dry("run.sh", "configs/cc12m.py:size=L", "/mnt/b1/run", "--config.optim.lr=8e-4")
    assert len(lines) == 1
    assert lines[0].startswith("gcloud compute tpus tpu-vm ssh t1 --zone=z1 --worker=all --command=")
    assert "python\\ -m\\ dream_jax.main\\ --multihost\\ --config=configs/cc12m.py:size=L" in lines[0]
    assert "--workdir=/mnt/b1/run\\ --config.optim.lr=8e-4" in lines[0]


def test_run_needs_config_and_workdir():
    out = subprocess.run(["bash", os.path.join(LAUNCH, "run.sh"), "only-one"], env=dict(os.environ, DRY_RUN="1"),
                         capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


def test_logs_and_teardown():
    assert dry("logs.sh") == [
        "gcloud compute tpus tpu-vm ssh t1 --zone=z1 --worker=0 --command=tail\\ -f\\ ~/dream_train.log"]
    assert dry("teardown.sh") == ["gcloud compute tpus tpu-vm delete t1 --zone=z1 --quiet"]
    assert dry("teardown.sh", QUEUED="1") == [
        "gcloud compute tpus queued-resources delete t1-qr --zone=z1 --force --quiet"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (.ci/run installs it)")
def test_shellcheck():
    subprocess.run(["shellcheck", "-x", *SCRIPTS, "common.sh"], cwd=LAUNCH, check=True)
