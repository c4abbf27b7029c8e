"""Input pipelines that hand the trainer the batch contract of design.md:

    image uint8 [B, H, W, 3], clip_tokens int32 [B, Lc], gen_tokens int32 [B, Lg],
    labels {name: int32 [B]} (synthetic world only)

Sources are random access (grain MapDataset): seeded global shuffle, then each
process takes its own disjoint slice, then a per-record transform, then
batching with drop_remainder. The iterator's state goes into the checkpoint.
"""
import dataclasses

import grain
import numpy as np

from dream_jax.data import synthetic


@dataclasses.dataclass
class TokenizeCaption(grain.transforms.Map):
    """Caption → CLIP-tower tokens and generation-text tokens (module level: picklable for workers)."""

    tokenizer: object
    clip_length: int
    gen_length: int
    keep_caption: bool = False

    def map(self, record):
        caption = record["caption"]
        out = {
            "image": record["image"],
            "clip_tokens": self.tokenizer.encode_batch([caption], self.clip_length)[0],
            "gen_tokens": self.tokenizer.encode_batch([caption], self.gen_length)[0],
            "labels": {k: np.int32(record["labels"][k]) for k in synthetic.LABEL_KEYS},
        }
        if self.keep_caption:
            out["caption"] = caption
        return out


def make_source(data_cfg, split: str):
    if data_cfg.source == "synthetic":
        n = data_cfg.num_train if split == "train" else data_cfg.num_heldout
        return synthetic.SyntheticWorld(data_cfg.image_size, split, data_cfg.world_seed, num_examples=n)
    raise ValueError(f"unknown data.source={data_cfg.source!r} (available: 'synthetic')")


def make_train_iterator(cfg, tokenizer, process_index: int = 0, process_count: int = 1):
    """An infinite, checkpointable iterator of host-local batches."""
    data = cfg.data
    local_batch = cfg.batch_size // process_count
    ds = grain.MapDataset.source(make_source(data, "train"))
    ds = ds.shuffle(seed=cfg.seed).repeat()
    ds = ds[process_index::process_count]
    ds = ds.map(TokenizeCaption(tokenizer, data.clip_context, data.gen_context))
    ds = ds.batch(local_batch, drop_remainder=True)
    it = ds.to_iter_dataset()
    if data.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
    return iter(it)


def heldout_examples(cfg, tokenizer, n: int):
    """The first n held-out examples as one batch (with captions), for evaluation."""
    source = make_source(cfg.data, "heldout")
    if n > len(source):
        raise ValueError(f"eval.num_examples={n} exceeds the held-out split size {len(source)}")
    tok = TokenizeCaption(tokenizer, cfg.data.clip_context, cfg.data.gen_context, keep_caption=True)
    records = [tok.map(source[i]) for i in range(n)]
    return {
        "image": np.stack([r["image"] for r in records]),
        "clip_tokens": np.stack([r["clip_tokens"] for r in records]),
        "gen_tokens": np.stack([r["gen_tokens"] for r in records]),
        "labels": {k: np.asarray([r["labels"][k] for r in records]) for k in synthetic.LABEL_KEYS},
        "caption": [r["caption"] for r in records],
    }
