"""Python API for text-to-image generation from a training workdir.

    from dream_jax.sampling.api import Generator
    gen = Generator.from_workdir("workdirs/tiny")            # latest checkpoint, EMA weights
    out = gen.generate(["a red circle on the left"], num_images_per_prompt=4, cfg=3.0,
                       mode="sad", sad_candidates=5, seed=0)
    out.images      # uint8 [4, H, W, 3]
    out.scores      # [4, 5]: every candidate's score (the model's own image–text cosine)
    out.chosen      # [4]: the kept candidate

Modes: 'plain' (MAR decoding), 'sad' (Semantically Aligned Decoding), 'greedy'
(per-step SAD), 'best_of_k' (K full images, keep the best). Results depend only
on (checkpoint, prompts, settings, seed): each image row has its own keys, so the
batch size used to run them does not change them (up to float rounding).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import warnings
from typing import Callable, List, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dream_jax import checkpoint as ckpt_lib
from dream_jax.data.tokenizers import TOKENIZER_FILENAME, TextTokenizer
from dream_jax.models.build import build_model
from dream_jax.models.vae import PatchTokenizer, make_image_tokenizer
from dream_jax.parallel import mesh as mesh_lib
from dream_jax.sampling import sad as sad_lib
from dream_jax.sampling.mar import MARSampler, as_key, trajectory_keys

MODES = ("plain", "sad", "greedy", "best_of_k")


@dataclasses.dataclass
class GenerationResult:
    """Images are prompt-major: image i belongs to prompt ``prompt_index[i]``.

    ``scores``: 'sad' / 'best_of_k' [n, K] (partial-canvas / finished-image scores of
    every candidate); 'greedy' [n, threshold, K] (per iteration); 'plain' [n, 1] (the
    finished image's score). ``chosen``: [n] ('greedy': [n, threshold]; 'plain': zeros).
    ``final_scores`` [n]: the model's own cosine of each finished image with its prompt.
    """

    images: np.ndarray
    tokens: np.ndarray
    prompts: List[str]
    prompt_index: np.ndarray
    scores: np.ndarray
    chosen: np.ndarray
    final_scores: np.ndarray
    threshold: Optional[int]
    truncated: List[bool]
    settings: dict
    timings: dict


def _weight_shapes(tree) -> dict:
    """{'params/encoder/...': shape} of the params / ema_params / batch_stats leaves of a
    train state (abstract, restored, or orbax metadata)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        if names and names[0] in ("params", "ema_params", "batch_stats") and hasattr(leaf, "shape"):
            out["/".join(names)] = tuple(leaf.shape)
    return out


def _check_compatible(state_dir: str, abstract, workdir: str, step: int) -> None:
    """Compares the stored weight shapes with the model's before restoring, so that a
    mismatch is reported by name (and orbax never starts reading). Silently skipped if the
    checkpoint's metadata cannot be read (the restore itself then reports any mismatch)."""
    import logging

    import orbax.checkpoint as ocp

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)   # orbax warns about an optional metadata file
    try:
        with ocp.StandardCheckpointer() as reader:
            meta = reader.metadata(state_dir)
        meta = getattr(meta, "item_metadata", meta)
        stored = _weight_shapes(getattr(meta, "tree", meta))
    except Exception:  # noqa: BLE001 — metadata layout differs between orbax versions
        return
    finally:
        absl_logger.setLevel(level)
    if not stored:
        return
    wanted = _weight_shapes(abstract)
    problems = [f"{k}: checkpoint {stored[k]} vs model {v}" for k, v in wanted.items()
                if k in stored and stored[k] != v]
    problems += [f"{k}: missing from the checkpoint" for k in wanted if k not in stored]
    problems += [f"{k}: in the checkpoint but not in the model" for k in stored if k not in wanted]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(
            f"the checkpoint at step {step} in workdir {workdir} is incompatible with the model built "
            f"from {os.path.join(workdir, 'config.json')}: " + "; ".join(problems[:8]) + more)


def _sampling_mesh(cfg):
    """The training config's mesh if it fits the devices here, else pure data parallelism."""
    try:
        return mesh_lib.make_mesh(cfg.mesh)
    except ValueError:
        return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))


class Generator:
    """A DREAM model with its tokenizers, ready to sample. Samplers are compiled once per
    (num_iter, diffusion_steps, guided) and row count, then reused."""

    def __init__(self, model, variables, text_tokenizer, image_tokenizer, gen_context: int,
                 clip_context: int, mesh=None, info: Optional[dict] = None):
        self.model = model
        self.variables = variables
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer
        self.gen_context = int(gen_context)
        self.clip_context = int(clip_context)
        self.mesh = mesh
        self.info = dict(info or {})
        self._samplers = {}
        self._empty = np.asarray(text_tokenizer.encode_batch([""], self.gen_context)[0])

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_workdir(cls, workdir: str, step: Optional[int] = None, use_ema: bool = True) -> "Generator":
        """Builds the model from ``workdir/config.json`` + ``workdir/tokenizer.json`` and
        restores the train state of ``step`` (default: the latest checkpoint)."""
        from dream_jax import train  # the trainer's own state abstractions

        workdir = os.path.abspath(os.fspath(workdir))
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"workdir {workdir} does not exist")
        for name in ("config.json", TOKENIZER_FILENAME):
            if not os.path.exists(os.path.join(workdir, name)):
                raise FileNotFoundError(f"workdir {workdir} has no {name}: not a dream_jax training workdir")
        ckpt_dir = os.path.join(workdir, "checkpoints")
        if not os.path.isdir(ckpt_dir):
            raise FileNotFoundError(f"workdir {workdir} has no checkpoints/ directory (train it first)")
        with open(os.path.join(workdir, "config.json")) as f:
            cfg = ml_collections.ConfigDict(json.load(f))
        text_tokenizer = TextTokenizer.load(workdir)
        image_tokenizer = make_image_tokenizer(cfg)
        model = build_model(cfg, text_tokenizer, image_tokenizer)
        tx = train.make_optimizer(cfg)
        mesh = _sampling_mesh(cfg)
        rules = mesh_lib.logical_rules(cfg.mesh)
        checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
        try:
            available = sorted(checkpointer.manager.all_steps())
            if not available:
                raise FileNotFoundError(f"workdir {workdir} has no complete checkpoint in {ckpt_dir}")
            if step is None:
                step = checkpointer.latest_step()
            elif int(step) not in available:
                raise FileNotFoundError(f"workdir {workdir} has no checkpoint at step {step}; "
                                        f"available steps: {available}")
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                shardings, abstract = train.state_shardings(model, tx, cfg.seed, mesh, rules)
                abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        abstract, shardings)
                _check_compatible(os.path.join(ckpt_dir, str(int(step)), "state"), abstract, workdir,
                                  int(step))
                try:
                    state = checkpointer.restore(int(step), abstract)
                except Exception as e:  # orbax raises several types for a mismatched tree/shape
                    raise ValueError(
                        f"the checkpoint at step {step} in workdir {workdir} is incompatible with the "
                        f"model built from {os.path.join(workdir, 'config.json')} "
                        f"({type(e).__name__}: {str(e)[:500]})") from e
        finally:
            checkpointer.close()
        params = state.ema_params if use_ema else state.params
        variables = {"params": params, "batch_stats": state.batch_stats}
        info = dict(workdir=workdir, step=int(step), use_ema=bool(use_ema), model_size=cfg.model.size)
        return cls(model, variables, text_tokenizer, image_tokenizer, cfg.data.gen_context,
                   cfg.data.clip_context, mesh=mesh, info=info)

    # ---- pieces -------------------------------------------------------------------------
    def sampler(self, num_iter: int, diffusion_steps: Union[int, str], guided: bool) -> MARSampler:
        key = (int(num_iter), str(diffusion_steps), bool(guided))
        if key not in self._samplers:
            self._samplers[key] = MARSampler(self.model, num_iter, diffusion_steps, guided,
                                             clip_denoised=isinstance(self.image_tokenizer, PatchTokenizer))
        return self._samplers[key]

    def encode_prompts(self, prompts: Sequence[str]):
        """(gen_tokens [P, Lg], clip_tokens [P, Lc], truncated [P]); warns on truncation."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty ({p!r}); every prompt needs some text")
        gen, cut_gen = self.text_tokenizer.encode_batch(prompts, self.gen_context, return_truncated=True)
        clip, cut_clip = self.text_tokenizer.encode_batch(prompts, self.clip_context, return_truncated=True)
        truncated = [bool(a or b) for a, b in zip(cut_gen, cut_clip)]
        for p, cut in zip(prompts, truncated):
            if cut:
                warnings.warn(f"prompt {p[:60]!r}... is longer than the text context "
                              f"(generation {self.gen_context}, contrastive {self.clip_context} tokens) "
                              f"and was truncated (end-of-text kept)", stacklevel=3)
        return gen, clip, truncated

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], num_images_per_prompt: int = 1, cfg: float = 3.0,
                 temperature: float = 1.0, num_iter: int = 64, diffusion_steps: Union[int, str] = 100,
                 sad_candidates: int = 5, sad_step: Union[int, float, None] = None, mode: str = "plain",
                 seed=0, cfg_schedule: str = "linear", batch_size: int = 16,
                 progress: Optional[Callable[[str], None]] = None) -> GenerationResult:
        """Generates ``num_images_per_prompt`` images per prompt.

        ``sad_step``: iterations decoded before choosing (int) or a fraction of decoded
        tokens (float); default ``num_iter // 2`` (the paper's 32 of 64). ``batch_size``:
        image rows per compiled call (SAD/best-of-K run ``batch_size × K`` candidate rows),
        rounded up to a multiple of the mesh's batch parallelism.
        ``progress`` receives one line per batch.
        """
        t_start = time.perf_counter()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {MODES}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0")
        k = 1 if mode == "plain" else int(sad_candidates)
        if k < 1:
            raise ValueError(f"sad_candidates={sad_candidates} must be >= 1")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        gen, clip, truncated = self.encode_prompts(prompts)
        seq_len = self.model.arch.seq_len
        sampler = self.sampler(num_iter, diffusion_steps, guided=float(cfg) != 1.0)
        schedule = sampler.schedule(float(cfg), cfg_schedule)
        threshold = None
        if mode in ("sad", "greedy"):
            threshold = sad_lib.resolve_threshold(max(1, num_iter // 2) if sad_step is None else sad_step,
                                                  num_iter, seq_len)

        n = len(prompts) * num_images_per_prompt
        prompt_index = np.repeat(np.arange(len(prompts)), num_images_per_prompt)
        gen_rows, clip_rows = gen[prompt_index], clip[prompt_index]
        order_keys, noise_keys = trajectory_keys(as_key(seed), n, k)
        # Rows are split over the mesh's batch axes (data × fsdp); a batch is rounded up
        # to a multiple of them (the padding rows are dropped), so no device idles or
        # repeats the others' work.
        par = mesh_lib.batch_parallelism(self.mesh) if self.mesh is not None else 1
        bs = -(-min(batch_size, n) // par) * par

        def place(a):
            return jax.device_put(a, mesh_lib.batch_sharding(self.mesh)) if par > 1 else jnp.asarray(a)
        empty = jnp.asarray(self._empty)
        tokens, scores, chosen, finals, batch_times = [], [], [], [], []
        traces_before = sum(sampler.traces.values())
        t_prep = time.perf_counter() - t_start
        mesh_ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with mesh_ctx:
            for lo in range(0, n, bs):
                t0 = time.perf_counter()
                idx = np.arange(lo, lo + bs)
                real = int(np.sum(idx < n))
                idx = np.minimum(idx, n - 1)      # pad the last batch by repeating its last row
                ok, nk = place(order_keys[idx]), place(noise_keys[idx])
                g, c = place(gen_rows[idx]), place(clip_rows[idx])
                if mode == "plain":
                    toks = sad_lib.plain(sampler, self.variables, ok, nk, g, empty, schedule, temperature)
                    fin = sad_lib.final_scores(sampler, self.variables, ok, toks, c)
                    sc, ch = fin[:, None], np.zeros((bs,), np.int32)
                else:
                    if mode == "sad":
                        res = sad_lib.sad(sampler, self.variables, ok, nk, g, c, empty, schedule, threshold,
                                          temperature)
                    elif mode == "greedy":
                        res = sad_lib.greedy(sampler, self.variables, ok, nk, g, c, empty, schedule,
                                             threshold, temperature)
                    else:
                        res = sad_lib.best_of_k(sampler, self.variables, ok, nk, g, c, empty, schedule,
                                                temperature)
                    toks, sc, ch = res.tokens, res.scores, res.chosen
                    fin = sad_lib.final_scores(sampler, self.variables, ok, toks, c)
                toks = np.asarray(jax.device_get(toks))
                tokens.append(toks[:real])
                scores.append(np.asarray(sc)[:real])
                chosen.append(np.asarray(ch)[:real])
                finals.append(np.asarray(fin)[:real])
                batch_times.append(time.perf_counter() - t0)
                if progress is not None:
                    done = lo + real
                    progress(f"[{mode}] images {done}/{n} (prompts {prompt_index[lo]}..{prompt_index[done - 1]}) "
                             f"in {batch_times[-1]:.2f}s, {real / batch_times[-1]:.2f} images/s")
        t_img = time.perf_counter()
        tokens = np.concatenate(tokens)
        images = np.asarray(self.image_tokenizer.decode(jnp.asarray(tokens)))
        t_img = time.perf_counter() - t_img
        total = time.perf_counter() - t_start
        settings = dict(mode=mode, num_images_per_prompt=int(num_images_per_prompt), cfg=float(cfg),
                        cfg_schedule=cfg_schedule, temperature=float(temperature), num_iter=int(num_iter),
                        diffusion_steps=diffusion_steps, sad_candidates=k,
                        sad_step=sad_step, threshold=threshold, batch_size=int(bs),
                        seed=int(seed) if isinstance(seed, (int, np.integer)) else "key", **self.info)
        # `compilations` > 0: the first batch's time includes tracing and compiling.
        timings = dict(prepare_s=t_prep, batches_s=batch_times, sampling_s=float(sum(batch_times)),
                       decode_images_s=t_img, total_s=total, images_per_s=n / total,
                       compilations=int(sum(sampler.traces.values()) - traces_before))
        return GenerationResult(images=images, tokens=tokens, prompts=[prompts[i] for i in prompt_index],
                                prompt_index=prompt_index, scores=np.concatenate(scores),
                                chosen=np.concatenate(chosen), final_scores=np.concatenate(finals),
                                threshold=threshold, truncated=truncated, settings=settings, timings=timings)
