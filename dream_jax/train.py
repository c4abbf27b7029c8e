"""The DREAM trainer: config check → mesh → data → state → step → checkpoint → eval → loop.

    python -m dream_jax.main --config=configs/tiny.py --workdir=workdirs/tiny

Running the same command on the same workdir resumes from the last complete
checkpoint (state, optimizer, EMA, batch stats, RNG and data-iterator position),
and the resumed run is bitwise the run that was never interrupted.
"""
import functools
import json
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dream_jax import checkpoint as ckpt_lib
from dream_jax import metrics as metrics_lib
from dream_jax.data import pipeline, synthetic
from dream_jax.data.inputs import make_inputs
from dream_jax.evals import zero_shot
from dream_jax.models import layers
from dream_jax.models.build import build_model
from dream_jax.models.dream import DreamModel, draw_diffusion_noise, dummy_inputs
from dream_jax.models.mar import masked_mean
from dream_jax.models.sizes import SIZES
from dream_jax.objectives import masking
from dream_jax.parallel import mesh as mesh_lib


# =============================================================================================
# Config check: everything that can be wrong is reported before anything compiles.
# =============================================================================================
def validate_config(cfg, num_devices: int) -> None:
    def fail(field, value, why):
        raise ValueError(f"config.{field}={value!r}: {why}")

    if cfg.model.size not in SIZES:
        fail("model.size", cfg.model.size, f"unknown size; choose one of {sorted(SIZES)}")
    if cfg.optim.lr <= 0:
        fail("optim.lr", cfg.optim.lr, "the learning rate must be positive")
    if cfg.optim.warmup_steps < 0:
        fail("optim.warmup_steps", cfg.optim.warmup_steps, "must be >= 0")
    if cfg.optim.schedule not in ("constant", "cosine"):
        fail("optim.schedule", cfg.optim.schedule, "must be 'constant' or 'cosine'")
    if not 0 <= cfg.optim.ema_decay < 1:
        fail("optim.ema_decay", cfg.optim.ema_decay, "must be in [0, 1)")
    if cfg.total_steps <= 0:
        fail("total_steps", cfg.total_steps, "must be positive")
    if cfg.batch_size <= 0:
        fail("batch_size", cfg.batch_size, "must be positive")
    if cfg.batch_size % cfg.num_mask_groups:
        fail("batch_size", cfg.batch_size, f"not divisible by num_mask_groups={cfg.num_mask_groups}")
    parallel = mesh_lib.mesh_shape(cfg.mesh, num_devices)
    batch_shards = parallel[0] * parallel[1]
    if cfg.batch_size % batch_shards:
        fail("batch_size", cfg.batch_size, f"not divisible by the {batch_shards} data×fsdp shards")
    accum = cfg.get("grad_accum_steps", 1)
    if accum < 1:
        fail("grad_accum_steps", accum, "must be >= 1")
    if cfg.batch_size % (accum * batch_shards):
        fail("batch_size", cfg.batch_size,
             f"not divisible by grad_accum_steps={accum} × {batch_shards} data×fsdp shards")
    if cfg.batch_size % jax.process_count():
        fail("batch_size", cfg.batch_size, f"not divisible by {jax.process_count()} processes")
    for name in ("low", "high", "centre_start", "centre_end", "ratio", "mean"):
        value = cfg.masking.get(name)
        if value is not None and not 0.0 <= value <= 1.0:
            fail(f"masking.{name}", value, "must lie in [0, 1]")
    if cfg.masking.kind not in masking.KIND_DEFAULTS:
        fail("masking.kind", cfg.masking.kind, f"choose one of {sorted(masking.KIND_DEFAULTS)}")
    if not 0.0 <= cfg.data.caption_dropout < 1.0:
        fail("data.caption_dropout", cfg.data.caption_dropout, "must be in [0, 1)")
    if cfg.data.source == "synthetic":
        if not 16 <= cfg.data.image_size <= 256:
            fail("data.image_size", cfg.data.image_size, "the synthetic world draws 16..256 px")
    elif cfg.data.source in ("arrayrecord", "cache"):
        path = cfg.data.get("path")
        if not path or not os.path.exists(path):
            fail("data.path", path, f"no {'ArrayRecord data' if cfg.data.source == 'arrayrecord' else 'cache'} there")
    else:
        fail("data.source", cfg.data.source, "unknown data source")
    if cfg.eval.every > 0 and cfg.eval.num_examples % cfg.eval.batch_size:
        fail("eval.num_examples", cfg.eval.num_examples, f"not divisible by eval.batch_size={cfg.eval.batch_size}")


# =============================================================================================
# State: a pytree; every leaf sharded by its logical axis names.
# =============================================================================================
@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array          # raw uint32 key data: saved and restored like any array


def learning_rate_schedule(cfg):
    o = cfg.optim
    if o.schedule == "constant":
        after = optax.constant_schedule(o.lr)
    else:
        after = optax.cosine_decay_schedule(o.lr, max(cfg.total_steps - o.warmup_steps, 1))
    warm = optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1))
    return optax.join_schedules([warm, after], [o.warmup_steps])


def weight_decay_mask(params):
    """Decay matrices only: no biases, norms or other 1-D/0-D params, nothing in the diffusion head.

    Scanned blocks (layers.SCANNED in the path) carry one extra leading depth axis, which
    does not count: a stacked bias is still a bias.
    """
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(
        {k: (getattr(v, "value", v).ndim - (layers.SCANNED in k) >= 2 and k[0] != "diffusion_head")
         for k, v in flat.items()})


def make_optimizer(cfg):
    o = cfg.optim
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(learning_rate_schedule(cfg), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                    mask=weight_decay_mask),
    )


def create_state(model, tx, seed: int):
    """The train state with boxed (logically named) params, for eval_shape and init."""
    rng = jax.random.PRNGKey(seed)
    init_rng, train_rng = jax.random.split(rng)
    variables = model.init({"params": init_rng}, *dummy_inputs(model.arch, 2), method=DreamModel.init_all)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      batch_stats=variables["batch_stats"], opt_state=tx.init(params), rng=train_rng)


def strip_boxes(tree):
    """Replace logical-partitioning boxes by their values (no sharding constraint applied)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def state_shardings(model, tx, seed, mesh, rules):
    """(mesh shardings, abstract unboxed state) of the train state."""
    abstract = jax.eval_shape(functools.partial(create_state, model, tx, seed))
    logical = nn.get_partition_spec(abstract)
    return nn.logical_to_mesh_sharding(logical, mesh, rules), strip_boxes(abstract)


def jit_state_and_step(cfg, model, tx, image_tokenizer, empty_gen_tokens, mesh, rules):
    """(shardings, abstract state, init_fn, step_fn): the jitted init and train step for a mesh.

    Call under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`.
    """
    shardings, abstract = state_shardings(model, tx, cfg.seed, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    init_fn = jax.jit(lambda: strip_boxes(create_state(model, tx, cfg.seed)), out_shardings=shardings)
    step_fn = jax.jit(make_train_step(cfg, model, tx, image_tokenizer, empty_gen_tokens),
                      in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                      out_shardings=(shardings, None), donate_argnums=(0,))
    return shardings, abstract, init_fn, step_fn


# =============================================================================================
# Step: masking and gating, one forward pass feeding both losses, AdamW, EMA.
# =============================================================================================
def loss_and_grads(model: DreamModel, accum_steps: int, params, batch_stats, inputs, noise, rngs,
                   unroll_accum: bool = False):
    """(loss, metrics, new batch stats, grads) of one batch; in micro-batches if accum_steps > 1.

    `noise` = (t, noise) of the diffusion loss for the whole batch (`draw_diffusion_noise`).
    `unroll_accum` unrolls the micro-batch loops (same maths; used to count FLOPs, see aot.py).
    """
    if accum_steps > 1:
        return accumulated_loss_and_grads(model, accum_steps, params, batch_stats, inputs, noise, rngs,
                                          unroll=unroll_accum)

    def loss_fn(p):
        (loss, metrics), updates = model.apply({"params": p, "batch_stats": batch_stats}, *inputs,
                                               train=True, diffusion_noise=noise, rngs=rngs,
                                               mutable=["batch_stats"])
        return loss, (metrics, updates["batch_stats"])

    (loss, (metrics, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, metrics, new_stats, grads


def accumulated_loss_and_grads(model: DreamModel, accum_steps: int, params, batch_stats, inputs, noise,
                               rngs, unroll: bool = False):
    """The loss and gradients of the whole batch, computed over `accum_steps` micro-batches.

    Equal to the one-pass computation (up to float summation order, and dropout masks,
    which are drawn per micro-batch): the generative loss is a token average, so its
    per-micro-batch sums are divided by the global token weight; the contrastive loss
    and its BatchNorm need the global batch, so they run once on the pooled encoder
    features of all micro-batches (computed without gradient), and the gradient with
    respect to those features is pushed back through each micro-batch's encoder
    ("gradient caching"). Micro-batch i holds rows i, i+A, i+2A, … so that each keeps
    the batch sharding. Costs one extra encoder forward pass per micro-batch.
    """
    tokens, clip_tokens, gen_text, masked, gen_on, clip_on = inputs
    batch, seq_len = masked.shape
    micro = batch // accum_steps
    split = lambda x: x.reshape(micro, accum_steps, *x.shape[1:]).swapaxes(0, 1)   # noqa: E731
    merge = lambda x: x.swapaxes(0, 1).reshape(batch, *x.shape[2:])                # noqa: E731
    positions = jnp.broadcast_to(jnp.arange(seq_len), (micro, seq_len))
    weights = masked & gen_on[:, None]
    weight_total = jnp.maximum(weights.sum().astype(jnp.float32), 1.0)
    per_micro = dict(tokens=tokens, gen_text=gen_text, visible=~masked, weights=weights,
                     t=noise[0], noise=noise[1])
    per_micro = {k: split(v) for k, v in per_micro.items()}
    per_micro["index"] = jnp.arange(accum_steps)
    variables = lambda p: {"params": p, "batch_stats": batch_stats}                  # noqa: E731
    dropout = lambda i: {"dropout": jax.random.fold_in(rngs["dropout"], i)}         # noqa: E731

    def pooled_features(p, mb):
        features, valid = model.apply(variables(p), mb["tokens"], positions, mb["visible"], False,
                                      method=DreamModel.encode_image, rngs=dropout(mb["index"]))
        return masked_mean(features, valid)

    metrics, new_stats = {}, batch_stats
    pooled_grad = jnp.zeros((accum_steps, micro, model.arch.width), jnp.float32)
    clip_grads = jax.tree.map(jnp.zeros_like, params)
    clip = jnp.zeros((), jnp.float32)
    if model.clip_weight:
        _, pooled = jax.lax.scan(lambda c, mb: (c, pooled_features(params, mb)), None, per_micro,
                                 unroll=unroll)
        pooled = merge(pooled)

        def clip_fn(p, pooled):
            (loss, clip_metrics), updates = model.apply(
                variables(p), pooled, clip_tokens, clip_on, True, method=DreamModel.contrastive_loss,
                rngs=rngs, mutable=["batch_stats"])
            return model.clip_weight * loss, (loss, clip_metrics, updates["batch_stats"])

        (_, (clip, clip_metrics, new_stats)), (clip_grads, pooled_grad) = jax.value_and_grad(
            clip_fn, argnums=(0, 1), has_aux=True)(params, pooled)
        pooled_grad = split(pooled_grad)
        metrics.update(clip_loss=clip, **{f"clip_{k}": v for k, v in clip_metrics.items()})

    def micro_step(carry, mb):
        grad_sum, gen_sum = carry

        def fn(p):
            features, valid = model.apply(variables(p), mb["tokens"], positions, mb["visible"], False,
                                          method=DreamModel.encode_image, rngs=dropout(mb["index"]))
            # Its gradient w.r.t. the encoder is the contrastive loss's share for this micro-batch.
            surrogate = (jax.lax.stop_gradient(mb["pooled_grad"]) * masked_mean(features, valid)).sum()
            gen = jnp.zeros((), jnp.float32)
            if model.gen_weight:
                gen, _ = model.apply(variables(p), features, positions, mb["visible"], mb["tokens"],
                                     mb["gen_text"], mb["weights"], (mb["t"], mb["noise"]), False,
                                     method=DreamModel.generation_loss_terms,
                                     rngs={**rngs, **dropout(mb["index"])})
            return model.gen_weight * gen / weight_total + surrogate, gen

        (_, gen), grads = jax.value_and_grad(fn, has_aux=True)(params)
        return (jax.tree.map(jnp.add, grad_sum, grads), gen_sum + gen), None

    per_micro["pooled_grad"] = pooled_grad
    (grads, gen_total), _ = jax.lax.scan(micro_step, (clip_grads, jnp.zeros((), jnp.float32)), per_micro,
                                         unroll=unroll)
    gen = gen_total / weight_total
    if model.gen_weight:
        metrics["gen_loss"] = gen
    metrics["logit_scale"] = jnp.exp(params["logit_scale"])
    loss = model.gen_weight * gen + model.clip_weight * clip
    return loss, metrics, new_stats, grads


def make_train_step(cfg, model: DreamModel, tx, image_tokenizer, empty_gen_tokens):
    seq_len = model.arch.seq_len
    groups = cfg.num_mask_groups
    ema_decay = cfg.optim.ema_decay
    lr_fn = learning_rate_schedule(cfg)
    accum_steps = cfg.get("grad_accum_steps", 1)
    unroll_accum = cfg.get("unroll_accum", False)   # set only by aot.py's FLOP count

    def train_step(state: TrainState, batch):
        batch_size = batch["clip_tokens"].shape[0]
        key = jax.random.fold_in(state.rng, state.step)
        k_ratio, k_order, k_drop, k_diff, k_dropout, k_latent = jax.random.split(key, 6)
        progress = state.step.astype(jnp.float32) / cfg.total_steps
        ratios = masking.mask_ratios_for_step(k_ratio, cfg.masking, progress, groups)
        per_example = masking.expand_groups(ratios, batch_size)
        orders = masking.random_orders(k_order, batch_size, seq_len)
        masked = masking.mask_from_orders(orders, masking.num_masked(per_example, seq_len))
        gen_on = masking.gen_active(per_example)
        clip_on = masking.clip_active(per_example)
        gen_text, _ = masking.drop_captions(k_drop, batch["gen_tokens"], empty_gen_tokens,
                                            cfg.data.caption_dropout)
        if "latent_moments" in batch:   # cached VAE posterior: sample the latent here, as the paper does
            tokens = image_tokenizer.tokens_from_moments(batch["latent_moments"], k_latent)
        elif hasattr(image_tokenizer, "encode_moments"):  # uncached: the frozen VAE runs in the step
            tokens = image_tokenizer.tokens_from_moments(image_tokenizer.encode_moments(batch["image"]), k_latent)
        else:
            tokens = image_tokenizer.encode(batch["image"])

        inputs = (tokens, batch["clip_tokens"], gen_text, masked, gen_on, clip_on)
        noise = draw_diffusion_noise(k_diff, batch_size, seq_len, model.arch.diffusion_batch_mul,
                                     model.arch.token_dim, model.arch.diffusion_steps)
        rngs = {"diffusion": k_diff, "dropout": k_dropout}
        loss, metrics, batch_stats, grads = loss_and_grads(model, accum_steps, state.params,
                                                           state.batch_stats, inputs, noise, rngs,
                                                           unroll_accum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema_params, params)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), lr=lr_fn(state.step),
                       mask_ratio_mean=ratios.mean(), mask_ratio_min=ratios.min(),
                       mask_ratio_max=ratios.max(),
                       frac_groups_gen=masking.gen_active(ratios).mean(),
                       frac_groups_clip=masking.clip_active(ratios).mean())
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                                  batch_stats=batch_stats, opt_state=opt_state)
        return new_state, metrics

    return train_step


# =============================================================================================
# Eval: zero-shot retrieval and attribute classification, held-out generative loss.
# =============================================================================================
class Evaluator:
    """Held-out evaluation with the model's own methods; inputs prepared once."""

    def __init__(self, cfg, model, text_tokenizer, image_tokenizer, mesh, inputs=None):
        self.cfg, self.model, self.mesh = cfg, model, mesh
        if inputs is not None:   # data.inputs.Inputs: any source, generation text ready for the model
            self.data = inputs.heldout(cfg.eval.num_examples)
            self.tokens = self.data["tokens"]
        else:
            self.data = pipeline.heldout_examples(cfg, text_tokenizer, cfg.eval.num_examples)
            self.tokens = np.asarray(image_tokenizer.encode(jnp.asarray(self.data["image"])))
        self.prompts = {}
        if "labels" in self.data:
            self.single_object = synthetic.single_object(self.data["labels"])
        for attribute in (("colour", "shape") if "labels" in self.data else ()):  # synthetic-world attributes
            per_class = synthetic.zero_shot_prompts(attribute)
            self.prompts[attribute] = [text_tokenizer.encode_batch(p, cfg.data.clip_context)
                                       for p in per_class]
        # A grid of generated samples for the first held-out captions (learned generation text).
        self.sample_prompts = list(self.data.get("caption", []))[: cfg.eval.get("num_samples", 0)]
        if cfg.data.get("gen_text", "learned") != "learned":
            self.sample_prompts = []
        self.generator, self.last_grid = None, None
        if self.sample_prompts:
            from dream_jax.sampling.api import Generator
            self.generator = Generator(model, None, text_tokenizer, image_tokenizer, cfg.data.gen_context,
                                       cfg.data.clip_context, mesh)
        seq_len = model.arch.seq_len
        n = cfg.eval.batch_size
        rng = jax.random.PRNGKey(1234)  # fixed: the held-out generative loss is comparable over time
        ratio = jnp.full((n,), cfg.eval.gen_loss_ratio)
        orders = masking.random_orders(rng, n, seq_len)
        self.gen_masked = masking.mask_from_orders(orders, masking.num_masked(ratio, seq_len))

        @jax.jit
        def image_embed(variables, tokens):
            visible = jnp.ones(tokens.shape[:2], bool)
            return model.apply(variables, tokens, visible, method=DreamModel.embed_image_tokens)

        @jax.jit
        def text_embed(variables, clip_tokens):
            return model.apply(variables, clip_tokens, method=DreamModel.text_embed)

        @jax.jit
        def gen_loss(variables, tokens, gen_tokens):
            return model.apply(variables, tokens, gen_tokens, self.gen_masked, rngs={"diffusion": jax.random.PRNGKey(99)},
                               method=DreamModel.masked_generation_loss)

        self._image_embed, self._text_embed, self._gen_loss = image_embed, text_embed, gen_loss

    def _batched(self, fn, variables, *arrays):
        n, bs = arrays[0].shape[0], self.cfg.eval.batch_size
        return [fn(variables, *(a[i:i + bs] for a in arrays)) for i in range(0, n, bs)]

    def __call__(self, state: TrainState) -> dict:
        params = state.ema_params if self.cfg.eval.use_ema else state.params
        variables = {"params": params, "batch_stats": state.batch_stats}
        results = {}
        with jax.set_mesh(self.mesh):
            if self.model.clip_weight:
                img = np.concatenate(self._batched(self._image_embed, variables, self.tokens))
                txt = np.concatenate(self._batched(self._text_embed, variables, self.data["clip_tokens"]))
                results.update({f"eval/{k}": v for k, v in zero_shot.retrieval_metrics(img, txt).items()})
                for attribute, prompt_tokens in self.prompts.items():
                    cls = zero_shot.class_embeddings(
                        [np.asarray(self._text_embed(variables, p)) for p in prompt_tokens])
                    labels, single = np.asarray(self.data["labels"][attribute]), self.single_object
                    results[f"eval/zero_shot_{attribute}_acc"] = zero_shot.zero_shot_accuracy(img, cls, labels)
                    if single.any():
                        results[f"eval/zero_shot_{attribute}_acc_single"] = zero_shot.zero_shot_accuracy(
                            img[single], cls, labels[single])
            if self.model.gen_weight:
                losses = self._batched(self._gen_loss, variables, self.tokens, self.data["gen_tokens"])
                results["eval/gen_loss"] = float(np.mean([float(x) for x in losses]))
        if self.generator is not None:
            from dream_jax.sample import make_grid
            self.generator.variables = variables
            e = self.cfg.eval
            out = self.generator.generate(self.sample_prompts, mode="plain", num_iter=e.sample_iters,
                                          diffusion_steps=e.sample_diffusion_steps, cfg=e.get("sample_cfg", 3.0),
                                          cfg_schedule=e.get("sample_cfg_schedule", "linear"), seed=0)
            cols = int(np.ceil(np.sqrt(len(out.images))))
            self.last_grid = make_grid(out.images, int(np.ceil(len(out.images) / cols)), cols)
        return results


# =============================================================================================
# Loop.
# =============================================================================================
def _fetch(metrics_list):
    """Device metrics of several steps → host means (one transfer)."""
    host = jax.device_get(metrics_list)
    keys = host[0].keys()
    return {k: float(np.mean([np.asarray(m[k], np.float64) for m in host])) for k in keys}, host


def _check_finite(host_metrics, first_step):
    for i, m in enumerate(host_metrics):
        if not np.isfinite(m["loss"]):
            raise FloatingPointError(
                f"non-finite loss {m['loss']} at step {first_step + i}; training stopped, the last "
                f"saved checkpoint is left intact (lower optim.lr or check the data)")


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains until cfg.total_steps (or cfg.stop_at_step); returns the last logged metrics."""
    validate_config(cfg, jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0

    # ---- mesh -----------------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(cfg.mesh)
    rules = mesh_lib.logical_rules(cfg.mesh)

    # ---- data -----------------------------------------------------------------------------
    inputs = make_inputs(cfg, workdir, jax.process_index(), jax.process_count())
    text_tokenizer, image_tokenizer, data_iter = inputs.clip_tokenizer, inputs.image_tokenizer, inputs.train_iter
    empty_gen_tokens = jnp.asarray(inputs.empty_gen)

    # ---- state, step, checkpoint -----------------------------------------------------------
    model = build_model(cfg, text_tokenizer, image_tokenizer, inputs.arch_overrides)
    tx = make_optimizer(cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shardings, abstract, init_fn, step_fn = jit_state_and_step(
            cfg, model, tx, image_tokenizer, empty_gen_tokens, mesh, rules)
        checkpointer = ckpt_lib.Checkpointer(workdir, keep=cfg.keep_checkpoints)
        latest = checkpointer.latest_step()
        if latest is not None:
            state = checkpointer.restore(latest, abstract, data_iter)
            print(f"resumed from step {latest} in {checkpointer.directory}", flush=True)
        else:
            state = init_fn()
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(cfg.to_json_best_effort(indent=2))

    # ---- eval -----------------------------------------------------------------------------
    evaluator = Evaluator(cfg, model, text_tokenizer, image_tokenizer, mesh, inputs) if cfg.eval.every > 0 else None
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)

    # ---- loop -----------------------------------------------------------------------------
    step = int(jax.device_get(state.step))
    stop = cfg.total_steps if not cfg.get("stop_at_step") else min(cfg.stop_at_step, cfg.total_steps)
    progress = metrics_lib.Progress(cfg.total_steps, step, cfg.batch_size)
    pending, pending_first, last = [], step, {}
    if is_main:
        print(f"training {cfg.model.size} from step {step} to {stop} on mesh {dict(mesh.shape)}; "
              f"workdir {workdir}", flush=True)

    def run_eval():
        t0 = time.time()
        results = evaluator(state)
        writer.write_scalars(step, results)
        if evaluator.last_grid is not None:
            writer.write_image(step, "samples", evaluator.last_grid)
        if is_main:
            print(f"eval at step {step} ({time.time() - t0:.1f}s): "
                  + ", ".join(f"{k[5:]} {v:.3f}" for k, v in results.items()), flush=True)
        return results

    if evaluator is not None and step == 0:
        run_eval()  # the starting point, so that progress is measurable
    while step < stop:
        batch = next(data_iter)
        batch = {k: batch[k] for k in ("image", "latent_moments", "clip_tokens", "gen_tokens") if k in batch}
        with jax.set_mesh(mesh):
            state, metrics = step_fn(state, mesh_lib.host_to_global(batch, mesh))
        step += 1
        pending.append(metrics)
        if progress.t0 is None:
            jax.block_until_ready(metrics)
            progress.start(step)
        is_log = step % cfg.log_every == 0 or step == stop
        is_ckpt = step % cfg.checkpoint_every == 0 or step == stop
        if is_log or is_ckpt:
            means, host = _fetch(pending)
            _check_finite(host, pending_first)
            pending, pending_first = [], step
            if is_log:
                steps_per_s, images_per_s = progress.rates(step)
                means.update(images_per_s=images_per_s, steps_per_s=steps_per_s)
                writer.write_scalars(step, {**{f"train/{k}": v for k, v in means.items()},
                                            **{f"data/{k}": v for k, v in getattr(data_iter, "counters", {}).items()}})
                if is_main:
                    progress.print(step, means, steps_per_s)
                last = means
        if evaluator is not None and (step % cfg.eval.every == 0 or step == cfg.total_steps):
            last.update(run_eval())
        if is_ckpt:
            checkpointer.save(step, state, data_iter, cfg)
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    if is_main:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump({"step": step, **last}, f, indent=2)
    return last
