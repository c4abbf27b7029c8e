"""DREAM on CC12M: the paper's recipe (paper-notes §5).

    python -m dream_jax.main --config=configs/cc12m.py:size=L --workdir=gs://BUCKET/dream_L \
        --config.data.path=/path/to/cc12m_arrayrecord

Sizes: size=B|L|H|G (default L). Global batch 2048, 48 epochs, AdamW (0.9, 0.95),
lr = 1e-4 × batch / 256, linear warm-up over 12 epochs then constant, weight decay
0.04 (not on biases / 1-D params / the diffusion head), grad clip 3.0, EMA 0.9999,
bf16 compute; Masking Warmup (centre 0 → 1 over the first 75 %, σ 0.45); loss
1.0·L_gen + 0.005·L_clip. Epoch-based schedules are converted to steps from
data.num_train.

Expected (paper, DREAM-L): ImageNet linear probe ≈ 72.7 %, CC12M FID ≈ 4.25.

Data: either the ArrayRecord ingest (data.source='arrayrecord', data.path=INGEST_DIR;
the frozen SD-VAE and T5 then run in the input/train step, data.t5_path and
tokenizer.vae_path needed), or — the paper's way — the latent/T5 cache written by
`python -m dream_jax.data.cache --arrayrecord=INGEST_DIR --vae_path=VAE --t5_path=T5 --out=CACHE`:

    python -m dream_jax.main --config=configs/cc12m.py:size=L --workdir=... \
        --config.data.source=cache --config.data.path=CACHE \
        --config.tokenizer.vae_path=VAE [--config.data.heldout_path=HELDOUT_CACHE]

Without data.path the config check stops with a message naming it.
"""
import ml_collections

from configs import tiny
from dream_jax.objectives.masking import masking_config

DATASET_SIZE = 10_500_000   # pairs of CC12M that survive link rot (≈10–11 M)


def get_config(arg=None):
    args = dict(a.split("=") for a in arg.split(",")) if arg else {}
    size = args.get("size", "L")
    c = tiny.get_config()
    c.model.size = size
    # bf16 compute; per-block rematerialisation (DREAM-B at batch 2048 on 64 chips: 7.0 GiB of
    # temporaries per chip with it, 46.7 GiB without — fine on v5p, not on 16-GiB v5e; README);
    # blocks as one nn.scan, so that XLA compiles one block per stack, not depth copies.
    c.model.overrides = ml_collections.ConfigDict({"dtype": "bfloat16", "remat": True, "scan_layers": True})
    c.model.gen_weight = 1.0
    c.model.clip_weight = 0.005

    c.batch_size = 2048
    c.num_mask_groups = 32         # 32 accelerators × 64 images in the original
    c.epochs = 48
    c.warmup_epochs = 12
    steps_per_epoch = DATASET_SIZE // c.batch_size
    c.total_steps = c.epochs * steps_per_epoch

    # vae_path: diffusers sd-vae-ft-ema directory (`python -m dream_jax.models.fetch --what=vae`).
    c.tokenizer = ml_collections.ConfigDict(dict(kind="sd_vae", patch_size=2, vae_path=""))
    c.data.source = "arrayrecord"
    c.data.path = ""                 # `python -m dream_jax.data.ingest --output DIR` (train split)
    c.data.heldout_path = ""         # another ingest output for held-out evaluation (optional)
    c.data.clip_tokenizer = "open_clip"  # OpenAI bpe_simple_vocab_16e6.txt.gz path, CLIP tokenizer.json, or
    #                                  'open_clip' (the file inside an installed open_clip_torch)
    c.data.gen_text = "t5"           # frozen T5-Large features (the paper); 'learned' = ids of gen_tokenizer
    c.data.t5_path = ""              # HF T5 encoder dir with spiece.model; not needed with data.source='cache'
    #                                  (T5 features come from the cache), else T5 runs on each host batch
    c.data.gen_tokenizer = "clip"    # gen_text='learned' only: 'clip' (same ids) or a tokenizer path
    c.data.min_side_fraction = 0.75  # skip images whose shorter side < 0.75 × image_size; upsample the rest
    c.data.max_image_pixels = 89_478_485   # PIL's decompression-bomb limit
    c.data.random_flip = True
    c.data.read_threads = 16         # grain ReadOptions.num_threads per process
    c.data.worker_buffer_size = 2    # batches buffered per mp_prefetch worker
    c.data.image_size = 256
    c.data.num_train = DATASET_SIZE
    c.data.text_vocab_size = 49408
    c.data.clip_context = 77
    c.data.gen_context = 128
    c.data.worker_count = 16

    c.masking = masking_config("warmup")

    c.optim.lr = 1e-4 * c.batch_size / 256
    c.optim.warmup_steps = c.warmup_epochs * steps_per_epoch
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.04
    c.optim.grad_clip = 3.0
    c.optim.ema_decay = 0.9999

    c.log_every = 100
    c.checkpoint_every = 2000
    c.keep_checkpoints = 3
    c.eval.every = 10_000
    c.eval.num_examples = 1024
    c.eval.batch_size = 256
    return c
