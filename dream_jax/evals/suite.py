"""The evaluators of ``python -m dream_jax.evaluate``; each returns a flat {name: float} dict.

All model computations go through the model's own methods (``embed_image_tokens``,
``encode_image``, ``text_embed``) via :class:`ModelEncoders`, which runs them with
the batch sharded over the mesh (``data × fsdp``) and the parameters as restored.
Image generation is any callable ``generate_fn(prompts) -> uint8 [N, H, W, 3]``
(one image per prompt, prompt order); :func:`generator_fn` wraps
``dream_jax.sampling.api.Generator``.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dream_jax.data import synthetic
from dream_jax.evals import attribute_reader, fid as fid_lib, probes, zero_shot
from dream_jax.evals.datasets import SYNTHETIC_TASKS as _SYNTHETIC_TASKS, pixel_features
from dream_jax.models.dream import DreamModel
from dream_jax.models.mar import masked_mean
from dream_jax.parallel import mesh as mesh_lib

FEATURE_KINDS = ("buffer", "mean", "embed")


# =============================================================================================
# The model's encoders, batched and sharded.
# =============================================================================================
class ModelEncoders:
    """Image/text embeddings and frozen encoder features of a DreamModel.

    ``features(images, kind)``: ``buffer`` = mean of the buffer tokens of the encoder
    output on the unmasked image (the MAE/DREAM linear-probe representation); ``mean`` =
    mean over all output tokens (what the contrastive head pools); ``embed`` = the
    L2-normalised contrastive embedding.
    """

    def __init__(self, model: DreamModel, variables, image_tokenizer, text_tokenizer,
                 clip_context: int, mesh=None, batch_size: int = 128):
        if mesh is None:
            mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
        self.model, self.variables, self.mesh = model, variables, mesh
        self.image_tokenizer, self.text_tokenizer = image_tokenizer, text_tokenizer
        self.clip_context = int(clip_context)
        par = mesh_lib.batch_parallelism(mesh)
        self.batch_size = max(par, -(-int(batch_size) // par) * par)
        self.sharding = mesh_lib.batch_sharding(mesh)
        buffer = model.arch.buffer_size

        # Image tokenization runs outside these programs (image_tokenizer.encode is jitted with its
        # own weights for the SD-VAE; the posterior mean is used: deterministic evaluation).
        def encode(tokens):
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape[:2])
            visible = jnp.ones(tokens.shape[:2], bool)
            return positions, visible

        def image_embed(variables, tokens):
            _, visible = encode(tokens)
            return model.apply(variables, tokens, visible, method=DreamModel.embed_image_tokens)

        def features(variables, tokens, kind):
            positions, visible = encode(tokens)
            if kind == "embed":
                return model.apply(variables, tokens, visible, method=DreamModel.embed_image_tokens)
            feats, valid_all = model.apply(variables, tokens, positions, visible,
                                           method=DreamModel.encode_image)
            if kind == "buffer":
                return feats[:, :buffer].astype(jnp.float32).mean(1)
            return masked_mean(feats, valid_all).astype(jnp.float32)

        def text_embed(variables, clip_tokens):
            return model.apply(variables, clip_tokens, method=DreamModel.text_embed)

        self._image_embed = jax.jit(image_embed)
        self._features = jax.jit(features, static_argnames=("kind",))
        self._text_embed = jax.jit(text_embed)

    def _batched(self, fn, array, tokenize: bool = False, **kwargs) -> np.ndarray:
        array = np.asarray(array)
        bs, n, outs = self.batch_size, len(array), []
        with jax.set_mesh(self.mesh):
            for lo in range(0, n, bs):
                chunk = array[lo:lo + bs]
                real = len(chunk)
                if real < bs:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - real, axis=0)])
                x = jax.device_put(chunk, self.sharding)
                if tokenize:
                    x = self.image_tokenizer.encode(x)
                out = fn(self.variables, x, **kwargs)
                outs.append(np.asarray(jax.device_get(out), np.float32)[:real])
        return np.concatenate(outs)

    def image_embed(self, images) -> np.ndarray:
        """L2-normalised contrastive embeddings of uint8 images [N, H, W, 3]."""
        return self._batched(self._image_embed, images, tokenize=True)

    def features(self, images, kind: str = "buffer") -> np.ndarray:
        if kind not in FEATURE_KINDS:
            raise ValueError(f"feature kind {kind!r} must be one of {FEATURE_KINDS}")
        return self._batched(self._features, images, tokenize=True, kind=kind)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.text_tokenizer.encode_batch(list(prompts), self.clip_context))

    def text_embed(self, prompts_or_tokens) -> np.ndarray:
        if len(prompts_or_tokens) and isinstance(prompts_or_tokens[0], str):
            prompts_or_tokens = self.tokenize(prompts_or_tokens)
        return self._batched(self._text_embed, np.asarray(prompts_or_tokens))

    def with_variables(self, variables) -> "ModelEncoders":
        """The same encoders (same compiled functions) on other weights, e.g. a random init."""
        other = object.__new__(ModelEncoders)
        other.__dict__.update(self.__dict__)
        other.variables = variables
        return other


# =============================================================================================
# 1. Retrieval and zero-shot classification.
# =============================================================================================
def eval_retrieval(enc: ModelEncoders, images, clip_tokens, ks=(1, 5)) -> Dict[str, float]:
    """Image↔text recall@k among N held-out (image, caption) pairs."""
    img, txt = enc.image_embed(images), enc.text_embed(np.asarray(clip_tokens))
    return {f"retrieval/{k}": v for k, v in zero_shot.retrieval_metrics(img, txt, ks).items()}


def eval_zero_shot(enc: ModelEncoders, images, labels: Mapping[str, np.ndarray],
                   attributes: Sequence[str] = ("colour", "shape", "size", "background"),
                   subsets: Optional[Mapping[str, np.ndarray]] = None,
                   image_emb: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Zero-shot attribute classification with prompt templates (synthetic.zero_shot_prompts):
    class embedding = normalised mean of its prompts' text embeddings; accuracy of the argmax
    cosine. ``subsets``: extra {name: bool mask} reported separately."""
    img = enc.image_embed(images) if image_emb is None else image_emb
    out = {}
    for attribute in attributes:
        cls = zero_shot.class_embeddings([enc.text_embed(p) for p in synthetic.zero_shot_prompts(attribute)])
        lab = np.asarray(labels[attribute])
        out[f"zero_shot/{attribute}"] = zero_shot.zero_shot_accuracy(img, cls, lab)
        for name, mask in (subsets or {}).items():
            mask = np.asarray(mask, bool)
            if mask.any():
                out[f"zero_shot/{attribute}/{name}"] = zero_shot.zero_shot_accuracy(img[mask], cls, lab[mask])
    return out


# =============================================================================================
# 2-3. Few-shot and linear probes.
# =============================================================================================
def eval_few_shot(train_feats, train_set, test_feats, test_set, shots=(1, 5, 10, 25),
                  seeds=(0, 1, 2), l2_reg: Optional[float] = None, prefix: str = "few_shot",
                  suffix: str = "") -> Dict[str, float]:
    out = {}
    for task, n_cls in train_set["num_classes"].items():
        res = probes.few_shot_eval(train_feats, train_set["labels"][task], test_feats,
                                   test_set["labels"][task], n_cls, shots, seeds, l2_reg)
        out.update({f"{prefix}/{task}/{k}{suffix}": v for k, v in res.items() if not k.endswith("_std")})
    return out


def buffer_features_fn(model: DreamModel):
    """Jitted ``(variables, tokens [B, N, C]) -> [B, width]``: mean of the buffer tokens of the
    encoder on the unmasked token map (the probe representation), for the trainer's
    periodic evaluation (which already holds tokenized held-out images)."""
    buffer = model.arch.buffer_size

    @jax.jit
    def features(variables, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape[:2])
        visible = jnp.ones(tokens.shape[:2], bool)
        feats, _ = model.apply(variables, tokens, positions, visible, method=DreamModel.encode_image)
        return feats[:, :buffer].astype(jnp.float32).mean(1)

    return features


def heldout_few_shot(features, labels: Mapping[str, np.ndarray], tasks=("colour", "shape"),
                     shots=(1, 5, 10), seeds=(0, 1, 2), l2_reg: Optional[float] = None) -> Dict[str, float]:
    """Few-shot accuracy from ONE labelled set (e.g. the trainer's held-out batch): the first
    half is the support pool, the second half the test set. Cheap (closed form): meant for
    periodic evaluation during training."""
    features = np.asarray(features)
    half = len(features) // 2
    out = {}
    for task in tasks:
        key, n_cls, offset = _SYNTHETIC_TASKS[task]
        y = np.asarray(labels[key]) + offset
        res = probes.few_shot_eval(features[:half], y[:half], features[half:], y[half:], n_cls,
                                   shots, seeds, l2_reg)
        out.update({f"few_shot/{task}/{k}": v for k, v in res.items() if not k.endswith("_std")})
    return out


def eval_linear_probe(train_feats, train_set, test_feats, test_set,
                      cfg: Optional[probes.LinearProbeConfig] = None, prefix: str = "linear_probe",
                      suffix: str = "") -> Dict[str, float]:
    out = {}
    all_res = probes.linear_probes(train_feats, train_set["labels"], test_feats, test_set["labels"],
                                   train_set["num_classes"], cfg)
    for task, res in all_res.items():
        out[f"{prefix}/{task}{suffix}"] = res["test_acc"]
        out[f"{prefix}/{task}/train_acc{suffix}"] = res["train_acc"]
    return out


def probe_features(enc: Optional[ModelEncoders], images, kind: str) -> np.ndarray:
    """Features for a probe: the model's (``buffer``/``mean``/``embed``) or ``pixels``."""
    if kind == "pixels":
        return pixel_features(images)
    return enc.features(images, kind)


# =============================================================================================
# 4. FID.
# =============================================================================================
def eval_fid(extractor, reference, generated: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """FID of each set of generated images (e.g. {'plain': ..., 'sad': ...}) against
    ``reference`` (a fid.Reference, or (mu, sigma)) of real images."""
    return {f"fid/{name}": fid_lib.fid_against(reference, images, extractor)
            for name, images in generated.items()}


# =============================================================================================
# 5. CLIP score.
# =============================================================================================
def clip_scores(enc: ModelEncoders, images, prompts) -> np.ndarray:
    """Per image 100 × max(cos(image, prompt), 0) with the model's own contrastive branch."""
    img = enc.image_embed(images)
    txt = enc.text_embed(prompts)
    cos = (img.astype(np.float64) * txt.astype(np.float64)).sum(-1)
    return 100.0 * np.maximum(cos, 0.0)


def eval_clip_score(enc: ModelEncoders, images_by_name: Mapping[str, np.ndarray], prompts,
                    openclip_checkpoint: Optional[str] = None) -> Dict[str, float]:
    if openclip_checkpoint:
        raise NotImplementedError(
            "CLIP score with an external OpenCLIP checkpoint is not supported: open_clip needs "
            "torchvision, which this environment cannot install, and no JAX port of OpenCLIP "
            "image/text towers is included. Use the model's own branch (the default) or score "
            f"the saved images elsewhere (checkpoint given: {openclip_checkpoint})")
    return {f"clip_score/{name}": float(clip_scores(enc, images, prompts).mean())
            for name, images in images_by_name.items()}


# =============================================================================================
# 6. Compositional accuracy (synthetic world).
# =============================================================================================
COMPOSITIONAL_ATTRIBUTES = ("colour", "shape", "colour+shape", "main_colour", "main_shape", "count")


def eval_compositional(images_by_name: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                       attributes: Sequence[str] = COMPOSITIONAL_ATTRIBUTES) -> Dict[str, float]:
    """Attribute-reader match rates of images against their prompts' labels, overall and split
    into prompts whose primary (colour, shape) pair is held out of training vs seen."""
    held = np.asarray(labels["heldout_combo"]).astype(bool)
    out = {}
    for name, images in images_by_name.items():
        objects = attribute_reader.read_attributes(np.asarray(images))
        for attribute in attributes:
            flags = attribute_reader.match_flags(None, labels, attribute, objects=objects)
            for subset, mask in (("all", np.ones_like(held)), ("heldout_combos", held),
                                 ("seen_combos", ~held)):
                f = flags[mask]
                f = f[~np.isnan(f)]
                if f.size:
                    out[f"compositional/{name}/{subset}/{attribute}"] = float(f.mean())
    return out


# =============================================================================================
# Generation.
# =============================================================================================
def generator_fn(generator, mode: str = "plain", **settings) -> Callable[[Sequence[str]], np.ndarray]:
    """``prompts -> uint8 images`` from a ``dream_jax.sampling.api.Generator`` (one image per
    prompt, fixed seed so that every checkpoint is scored on the same noise)."""

    def generate(prompts):
        return np.asarray(generator.generate(list(prompts), num_images_per_prompt=1, mode=mode,
                                             **settings).images)

    return generate
