"""Optional download of the public frozen weights (needs network and `pip install huggingface_hub`).

    python -m dream_jax.models.fetch --dest=~/dream_weights               # both
    python -m dream_jax.models.fetch --what=vae --dest=~/dream_weights

Writes DEST/sd-vae-ft-ema (config.json + diffusion_pytorch_model.safetensors, ~335 MB) and
DEST/t5-large (config.json + model.safetensors + spiece.model, ~3 GB; only the encoder is
used). Point `tokenizer.vae_path` and the T5 path of the cache/config at those folders.
Nothing in the library calls this module; tests never do.
"""
import os
from typing import Optional

REPOS = {
    "vae": ("stabilityai/sd-vae-ft-ema", "sd-vae-ft-ema", ["config.json", "diffusion_pytorch_model.safetensors"]),
    "t5": ("google-t5/t5-large", "t5-large", ["config.json", "model.safetensors", "spiece.model"]),
}


def fetch(what: str, dest: str, repo_id: Optional[str] = None, revision: Optional[str] = None) -> str:
    """Download one of REPOS ('vae' or 't5') into dest/<name>; returns that folder."""
    if what not in REPOS:
        raise ValueError(f"unknown weights {what!r} (available: {sorted(REPOS)})")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise ImportError("fetching weights needs huggingface_hub: pip install huggingface_hub") from e
    default_repo, name, files = REPOS[what]
    folder = os.path.join(os.path.expanduser(dest), name)
    os.makedirs(folder, exist_ok=True)
    for filename in files:
        hf_hub_download(repo_id or default_repo, filename, revision=revision, local_dir=folder)
    return folder


def main(argv=None):
    from absl import app, flags

    flags.DEFINE_list("what", ["vae", "t5"], "Which weights: vae, t5.")
    flags.DEFINE_string("dest", None, "Folder to download into.")
    flags.mark_flag_as_required("dest")

    def run(_):
        for what in flags.FLAGS.what:
            print(f"{what}: {fetch(what, flags.FLAGS.dest)}", flush=True)

    app.run(run, argv)


if __name__ == "__main__":
    main()
