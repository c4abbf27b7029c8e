"""Everything the trainer takes from the data side, built from the config in one call.

    inputs = make_inputs(cfg, workdir, jax.process_index(), jax.process_count())

gives the CLIP-tower tokenizer, the generation-text handling, the image
tokenizer, the train iterator, the generation input of the empty caption (for
caption dropout) and the data-dependent architecture fields for
``models.build.build_model``.

Generation text (``data.gen_text``):

* ``'learned'`` (default): token ids of the generation tokenizer
  (``data.gen_tokenizer``; empty/'clip' = the CLIP-tower tokenizer) feed a
  learned embedding. ``empty_gen`` = the ids of "".
* ``'t5'``: features [L, d] of a frozen T5 encoder (the paper). With
  ``data.source='cache'`` they come from the cache's ``t5_features`` (and
  ``empty_gen`` from its ``empty_t5_features.npy``); otherwise the encoder is
  loaded from ``data.t5_path`` (HF directory with spiece.model) and run on each
  host batch, on the host's default device (fine for small models; use the
  cache at paper scale). L = ``data.gen_context`` must match the cache.

CLIP-tower tokenizer: ``data.clip_tokenizer`` (a path or 'open_clip'); when it is
empty, the synthetic-world caption BPE of ``workdir/tokenizer.json`` (trained
there on first use; byte-level, so it encodes any text) — exactly what the
synthetic default always used.

Image data (``data.source``): 'synthetic' and 'arrayrecord' give uint8 images
(the train step tokenizes them, running the frozen SD-VAE in the step for
``tokenizer.kind='sd_vae'``); 'cache' gives cached SD-VAE moments
(``latent_moments``), a fresh posterior sample is drawn in the step.
"""
import dataclasses
from typing import Any, Dict, Optional

import grain
import numpy as np

from dream_jax.data import cache as cache_lib
from dream_jax.data import pipeline
from dream_jax.data.tokenizers import get_or_train_synthetic_tokenizer, load_text_tokenizer
from dream_jax.models.t5 import padding_mask_from_ids

GEN_TEXT_KINDS = ("learned", "t5")


class T5FeaturesIterator(grain.DatasetIterator):
    """Replaces each batch's T5 ids ``gen_tokens`` [B, L] by frozen-T5 features [B, L, d] (float32).

    The checkpointed state (and ``counters``) are those of the wrapped iterator."""

    def __init__(self, parent, encoder, eos_id: int):
        super().__init__(parent)
        self._encoder, self._eos_id = encoder, int(eos_id)

    @property
    def counters(self) -> Dict[str, int]:
        return getattr(self._parent, "counters", {})

    def __next__(self):
        batch = next(self._parent)
        ids = np.asarray(batch["gen_tokens"], np.int32)
        batch["gen_tokens"] = np.asarray(self._encoder(ids, padding_mask_from_ids(ids, self._eos_id)), np.float32)
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


@dataclasses.dataclass
class Inputs:
    cfg: Any
    clip_tokenizer: Any          # CLIP text tower (clip_tokens)
    gen_tokenizer: Any           # ids of the generation text (learned ids, or T5 ids for the encoder); None: cached
    image_tokenizer: Any
    train_iter: Any
    empty_gen: np.ndarray        # generation input of "" ([L] int32 ids or [L, d] float32 features)
    arch_overrides: Dict[str, Any]
    gen_text: str                # 'learned' | 't5'
    t5_encoder: Any = None       # frozen T5TextEncoder (data.t5_path), if loaded
    t5_tokenizer: Any = None     # its sentencepiece tokenizer

    @property
    def text_tokenizer(self):
        return self.clip_tokenizer

    def gen_inputs(self, captions) -> np.ndarray:
        """The model's generation input for captions: ids [n, L] or T5 features [n, L, d]."""
        length = int(self.cfg.data.gen_context)
        if self.gen_text == "learned":
            return np.asarray(self.gen_tokenizer.encode_batch(list(captions), length), np.int32)
        if self.t5_encoder is None:
            raise ValueError("generation text comes from the cache's T5 features and no T5 encoder is loaded: "
                             "set data.t5_path to encode new captions")
        return cache_lib.t5_caption_features(self.t5_encoder, self.t5_tokenizer, list(captions), length)

    def heldout(self, n: int) -> Dict[str, Any]:
        """The first n held-out examples, ready for the model: ``tokens`` (image tokens; the posterior
        mean for the SD-VAE), ``clip_tokens``, ``gen_tokens`` (model input), ``caption`` and, for
        the synthetic world, ``labels``."""
        cfg = self.cfg
        if cfg.data.source == "synthetic" and self.gen_tokenizer is self.clip_tokenizer:
            ex = pipeline.heldout_examples(cfg, self.clip_tokenizer, n)       # exactly as before
        else:
            ex = pipeline.heldout_examples(cfg, self.clip_tokenizer, n, gen_tokenizer=self.gen_tokenizer)
        bs = max(1, int(cfg.eval.get("batch_size", n)))
        if "latent_moments" in ex:
            tokens = [self.image_tokenizer.tokens_from_moments(ex["latent_moments"][i:i + bs])
                      for i in range(0, n, bs)]
        else:
            tokens = [self.image_tokenizer.encode(ex["image"][i:i + bs]) for i in range(0, n, bs)]
        out = dict(ex, tokens=np.concatenate([np.asarray(t) for t in tokens]))
        if self.gen_text == "t5" and cfg.data.source != "cache":          # T5 ids → features
            ids = np.asarray(ex["gen_tokens"], np.int32)
            mask = padding_mask_from_ids(ids, self.t5_tokenizer.eos_id)
            out["gen_tokens"] = np.concatenate([np.asarray(self.t5_encoder(ids[i:i + bs], mask[i:i + bs]), np.float32)
                                                for i in range(0, n, bs)])
        return out


def _clip_tokenizer(cfg, workdir):
    spec = cfg.data.get("clip_tokenizer", "") or ""
    if spec:
        return load_text_tokenizer(spec)
    return get_or_train_synthetic_tokenizer(workdir, vocab_size=cfg.data.text_vocab_size)


def _check_cache(cfg, info, image_tokenizer, gen_text):
    data = cfg.data
    if info.get("latent_shape") is None:
        raise ValueError(f"data.path={data.path!r}: the cache holds no VAE moments (written without --vae_path)")
    if not hasattr(image_tokenizer, "tokens_from_moments"):
        raise ValueError(f"data.source='cache' holds SD-VAE moments: set tokenizer.kind='sd_vae' "
                         f"(got {cfg.tokenizer.kind!r})")
    want = [image_tokenizer.latent_size, image_tokenizer.latent_size, 2 * image_tokenizer.cfg.latent_channels]
    if list(info["latent_shape"]) != want or int(info.get("image_size", data.image_size)) != int(data.image_size):
        raise ValueError(f"data.path={data.path!r}: cached latents {info['latent_shape']} at image size "
                         f"{info.get('image_size')}; this config's VAE at data.image_size={data.image_size} "
                         f"makes {want}")
    scaling = info.get("scaling_factor")
    if scaling is not None and abs(scaling - image_tokenizer.cfg.scaling_factor) > 1e-9:
        raise ValueError(f"data.path={data.path!r}: cached with VAE scaling {info['scaling_factor']}, "
                         f"tokenizer.vae_path has {image_tokenizer.cfg.scaling_factor}: not the same VAE")
    if gen_text == "t5":
        if info.get("t5_length") is None:
            raise ValueError(f"data.gen_text='t5' but the cache at data.path={data.path!r} has no T5 features "
                             f"(write it with --t5_path, or set data.gen_text='learned')")
        if int(info["t5_length"]) != int(data.gen_context):
            raise ValueError(f"data.gen_context={data.gen_context}: the cache's T5 features have length "
                             f"{info['t5_length']}")


def make_inputs(cfg, workdir: str, process_index: int = 0, process_count: int = 1, *,
                train_iterator: bool = True) -> Inputs:
    """Tokenizers, image tokenizer, train iterator, empty-caption input and architecture fields."""
    from dream_jax.models.build import data_arch_overrides
    from dream_jax.models.vae import make_image_tokenizer

    data = cfg.data
    gen_text = data.get("gen_text", "learned") or "learned"
    if gen_text not in GEN_TEXT_KINDS:
        raise ValueError(f"config.data.gen_text={gen_text!r}: choose one of {GEN_TEXT_KINDS}")
    clip = _clip_tokenizer(cfg, workdir)
    image_tokenizer = make_image_tokenizer(cfg)
    gen_length = int(data.gen_context)
    if data.source == "cache":
        _check_cache(cfg, cache_lib.load_info(data.path), image_tokenizer, gen_text)

    t5_encoder = t5_tok = None
    gen_feature_dim: Optional[int] = None
    if gen_text == "learned":
        spec = data.get("gen_tokenizer", "") or ""
        gen_tok = clip if spec in ("", "clip", "same") else load_text_tokenizer(spec)
        empty_gen = np.asarray(gen_tok.encode_batch([""], gen_length)[0])
    else:
        t5_path = data.get("t5_path", "") or ""
        if t5_path:
            from dream_jax.data.tokenizers import T5Tokenizer
            from dream_jax.models.t5 import T5TextEncoder
            t5_encoder = T5TextEncoder.from_pretrained(t5_path, padding_mask=bool(data.get("t5_padding_mask", False)))
            t5_tok = T5Tokenizer.load(t5_path)
        if data.source == "cache":
            gen_tok = None                                   # the records' T5 features
            empty_gen = cache_lib.load_empty_t5_features(data.path)
            if empty_gen is None and t5_encoder is not None:
                empty_gen = cache_lib.t5_caption_features(t5_encoder, t5_tok, [""], gen_length)[0]
            if empty_gen is None:
                raise ValueError(f"the cache at data.path={data.path!r} has no empty-caption T5 features "
                                 f"(an older cache writer): set data.t5_path so that they can be computed")
            gen_feature_dim = int(np.asarray(empty_gen).shape[-1])
            if t5_encoder is not None and t5_encoder.width != gen_feature_dim:
                raise ValueError(f"data.t5_path={t5_path!r} has width {t5_encoder.width}, the cached T5 "
                                 f"features {gen_feature_dim}: not the same T5")
        else:
            if t5_encoder is None:
                raise ValueError("data.gen_text='t5' needs data.t5_path (an HF T5 encoder directory with "
                                 "spiece.model), or data.source='cache' with cached T5 features")
            gen_tok = t5_tok                                 # T5 ids in the pipeline, features on the host
            empty_gen = cache_lib.t5_caption_features(t5_encoder, t5_tok, [""], gen_length)[0]
            gen_feature_dim = int(t5_encoder.width)

    it = None
    if train_iterator:
        if data.source == "synthetic" and gen_tok is clip:   # the historical call (bitwise resume)
            it = pipeline.make_train_iterator(cfg, clip, process_index, process_count)
        else:
            it = pipeline.make_train_iterator(cfg, clip, process_index, process_count, gen_tokenizer=gen_tok)
        if gen_text == "t5" and data.source != "cache":
            it = T5FeaturesIterator(it, t5_encoder, t5_tok.eos_id)

    overrides = data_arch_overrides(
        cfg, clip, image_tokenizer, gen_text=gen_text,
        gen_vocab_size=gen_tok.vocab_size if gen_text == "learned" else 0, gen_feature_dim=gen_feature_dim)
    return Inputs(cfg=cfg, clip_tokenizer=clip, gen_tokenizer=gen_tok, image_tokenizer=image_tokenizer,
                  train_iter=it, empty_gen=np.asarray(empty_gen), arch_overrides=overrides, gen_text=gen_text,
                  t5_encoder=t5_encoder, t5_tokenizer=t5_tok)
