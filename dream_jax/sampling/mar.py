"""MAR / FLUID sampling for DREAM: one compiled loop over the masked-autoregressive iterations.

The algorithm (paper-notes §4; MAR's ``sample_tokens``)
-------------------------------------------------------
Every image starts fully masked and gets one random token order. Iteration k
(0-based) of ``num_iter``:

1. the shared encoder runs on the current canvas with ``valid = not masked``
   (it never sees text, so with CFG it runs once and its output is reused);
2. the decoder runs on ``[cond text; empty-caption text]`` (CFG) or on the
   conditional text only, giving a condition z per token;
3. the tokens leaving the mask at this iteration are sampled with the
   diffusion head (ancestral sampling over a respaced diffusion; temperature
   multiplies the noise std; guidance on eps only) and written to the canvas.

After iteration k, ``floor(N cos(pi/2 (k+1)/num_iter))`` tokens stay masked,
clamped to ``[1, masked - 1]``; the last iteration reveals all that is left
(:func:`masking_schedule`). The masked set is always a prefix of the order, so
the tokens revealed at iteration k are ``order[masked_after_k : masked_before_k]``.
CFG scale per iteration (:func:`cfg_scales`), MAR's rule exactly:
``linear``: ``1 + (cfg - 1) (N - mask_len_k) / N`` where mask_len_k is MAR's
clamped count (so it is ``1`` at the last iteration, i.e. the final scale is
``1 + (cfg - 1)(N - 1)/N``, as in MAR); ``constant``: ``cfg``.

Static shapes
-------------
The per-iteration counts enter the compiled loop as ARRAYS (``schedule``), so
one compilation serves every prompt batch of a given (rows, settings) shape;
``start``/``stop`` are traced too, so SAD's prefix and suffix reuse the same
executable. Diffusion runs on a static slot of ``S = max revealed per
iteration`` tokens per image, gathered from the order with a dynamic slice;
padded slots are sampled but never written.

Randomness
----------
Everything derives from one key (:func:`trajectory_keys`): image row ``i`` has
``row = fold_in(key, i)``; its order comes from ``fold_in(row, 0)``; the noise of
candidate ``c`` from ``fold_in(fold_in(row, 1), c)``, and iteration ``k`` uses
``fold_in(noise_key, k)`` for its diffusion sampling. Plain decoding is
candidate 0, so SAD with one candidate reproduces it exactly, and a row's
image does not depend on the batch it is decoded in.
"""
from __future__ import annotations

import collections
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from dream_jax.diffusion.gaussian import cfg_model_fn, make_diffusion
from dream_jax.models.dream import DreamModel

ORDER_STREAM = 0
NOISE_STREAM = 1
CFG_SCHEDULES = ("linear", "constant")


# =============================================================================================
# Host-side schedule.
# =============================================================================================
def _mar_mask_len(seq_len: int, num_iter: int, k: int, masked_before: int) -> int:
    """MAR's clamped number of tokens left masked after iteration k (before the last-step rule)."""
    target = math.floor(seq_len * math.cos(math.pi / 2.0 * (k + 1) / num_iter))
    return max(1, min(masked_before - 1, target))


def masking_schedule(seq_len: int, num_iter: int) -> np.ndarray:
    """int32 [num_iter + 1]: entry k = tokens still masked before iteration k; last entry 0.

    ``reveal = -np.diff(masking_schedule(...))`` gives the tokens revealed per
    iteration; it sums to ``seq_len`` and is >= 1 everywhere for
    ``1 <= num_iter <= seq_len``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be positive")
    if not 1 <= num_iter <= seq_len:
        raise ValueError(f"num_iter={num_iter} must lie in [1, {seq_len}] (the number of image tokens)")
    masked = [seq_len]
    for k in range(num_iter - 1):
        masked.append(_mar_mask_len(seq_len, num_iter, k, masked[-1]))
    masked.append(0)
    return np.asarray(masked, np.int32)


def cfg_scales(seq_len: int, num_iter: int, cfg: float, schedule: str = "linear") -> np.ndarray:
    """float32 [num_iter]: the guidance scale of each iteration (see the module docstring)."""
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule={schedule!r} must be one of {CFG_SCHEDULES}")
    if schedule == "constant":
        return np.full((num_iter,), cfg, np.float32)
    masked = masking_schedule(seq_len, num_iter)
    mask_len = np.asarray([_mar_mask_len(seq_len, num_iter, k, int(masked[k])) for k in range(num_iter)])
    return (1.0 + (cfg - 1.0) * (seq_len - mask_len) / seq_len).astype(np.float32)


# =============================================================================================
# Keys.
# =============================================================================================
def as_key(seed_or_key) -> jax.Array:
    """An int seed, a typed key, or a raw uint32[2] key → a typed key."""
    if isinstance(seed_or_key, (int, np.integer)):
        return jax.random.key(int(seed_or_key))
    key = jnp.asarray(seed_or_key) if not isinstance(seed_or_key, jax.Array) else seed_or_key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key.astype(jnp.uint32))


def trajectory_keys(key, num_rows: int, num_candidates: int = 1, row_offset: int = 0):
    """(order_keys [R], noise_keys [R, K]) for image rows ``row_offset .. row_offset + R - 1``.

    All K candidates of a row share its order; candidate 0's noise key is the one
    plain decoding uses.
    """
    key = as_key(key)
    rows = jnp.arange(row_offset, row_offset + num_rows, dtype=jnp.uint32)
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, rows)
    order_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, ORDER_STREAM)
    noise_base = jax.vmap(jax.random.fold_in, (0, None))(row_keys, NOISE_STREAM)
    cands = jnp.arange(num_candidates, dtype=jnp.uint32)
    noise_keys = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, cands))(noise_base)
    return order_keys, noise_keys


def orders_from_keys(order_keys, seq_len: int):
    """(orders [R, N], ranks [R, N]): a uniform permutation per row and its inverse."""
    orders = jax.vmap(lambda k: jax.random.permutation(k, seq_len))(order_keys).astype(jnp.int32)
    ranks = jnp.argsort(orders, axis=1).astype(jnp.int32)
    return orders, ranks


# =============================================================================================
# The compiled sampler.
# =============================================================================================
class MARSampler:
    """Compiled MAR decoding for one model and one static setting.

    Static (one instance each): ``num_iter``, ``diffusion_steps`` (a respacing:
    int k, "k", "k1,k2", or "ddimK"), ``guided`` (whether the decoder runs on the
    doubled CFG batch). Everything else (cfg value and schedule, temperature,
    prompts, keys, start/stop iteration) is a runtime array, so it never
    recompiles. Each jitted function compiles once per row count.

    Jitted entry points (all take ``variables = {'params', 'batch_stats'}``):
      run(variables, canvas, order_keys, noise_keys, gen_tokens, empty_tokens,
          schedule, start, stop, temperature) -> canvas        iterations [start, stop)
      greedy(... , text_emb, num_candidates) -> (canvas, scores, chosen)
      score(variables, canvas, order_keys, masked_count, text_emb) -> [R]
      text_embed(variables, clip_tokens) -> [R, E]
    """

    def __init__(self, model: DreamModel, num_iter: int = 64,
                 diffusion_steps: Union[int, str] = 100, guided: bool = True,
                 clip_denoised: bool = False):
        # clip_denoised: clip the predicted x0 to [-1, 1] at every diffusion step. Right for
        # the `patch` tokenizer (pixels are bounded); off for VAE latents (as MAR samples).
        self.clip_denoised = bool(clip_denoised)
        arch = model.arch
        self.model = model
        self.seq_len = int(arch.seq_len)
        self.token_dim = int(arch.token_dim)
        self.num_iter = int(num_iter)
        self.masked = masking_schedule(self.seq_len, self.num_iter)
        self.reveal = (self.masked[:-1] - self.masked[1:]).astype(np.int32)
        self.slot_size = int(self.reveal.max())
        self.diffusion_steps = diffusion_steps
        self.diffusion = make_diffusion(arch.diffusion_steps, arch.noise_schedule,
                                        respacing=diffusion_steps)
        self.guided = bool(guided)
        self.traces = collections.Counter()   # how often each entry point was traced
        self.run = jax.jit(self._run)
        self.greedy = jax.jit(self._greedy, static_argnames=("num_candidates",))
        self.score = jax.jit(self._score)
        self.text_embed = jax.jit(self._text_embed)

    # ---- host side ----------------------------------------------------------------------
    def schedule(self, cfg: float = 1.0, cfg_schedule: str = "linear") -> dict:
        """The per-iteration arrays the compiled loop reads."""
        if not self.guided and cfg != 1.0:
            raise ValueError(f"cfg={cfg} needs a guided sampler (built with guided=True)")
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule={cfg_schedule!r} must be one of {CFG_SCHEDULES}")
        return {
            "masked_before": jnp.asarray(self.masked[:-1], jnp.int32),
            "masked_after": jnp.asarray(self.masked[1:], jnp.int32),
            "scale": jnp.asarray(cfg_scales(self.seq_len, self.num_iter, cfg, cfg_schedule), jnp.float32),
        }

    def empty_canvas(self, rows: int):
        return jnp.zeros((rows, self.seq_len, self.token_dim), jnp.float32)

    def decode(self, variables, order_keys, noise_keys, gen_tokens, empty_tokens, schedule,
               temperature=1.0):
        """Plain decoding of all iterations: tokens [R, N, C]."""
        return self.run(variables, self.empty_canvas(gen_tokens.shape[0]), order_keys, noise_keys,
                        gen_tokens, empty_tokens, schedule, np.int32(0), np.int32(self.num_iter),
                        np.float32(temperature))

    # ---- pieces used inside the compiled functions ---------------------------------------
    def _apply(self, variables, *args, method):
        return self.model.apply(variables, *args, method=method)

    def _context(self, variables, gen_tokens, empty_tokens):
        """Decoder context: [cond; uncond] rows when guided, else the cond rows."""
        ctx = self._apply(variables, gen_tokens, method=DreamModel.align_text)
        if not self.guided:
            return ctx
        empty = jnp.reshape(empty_tokens, (1, -1))
        uncond = self._apply(variables, empty, method=DreamModel.align_text)
        return jnp.concatenate([ctx, jnp.broadcast_to(uncond, ctx.shape)], axis=0)

    def _diffuse(self, variables, z_cond, z_uncond, key, scale, temperature):
        """Ancestral sampling of one image's slot: z [S, D] → tokens [S, C]."""
        def head(z):
            return lambda x, t: self._apply(variables, x, t, z, method=DreamModel.head)

        if z_uncond is None:
            fn = head(z_cond)
        else:
            fn = cfg_model_fn(head(jnp.concatenate([z_cond, z_uncond], axis=0)), scale)
        return self.diffusion.p_sample_loop(fn, (z_cond.shape[0], self.token_dim), key,
                                            temperature=temperature, clip_denoised=self.clip_denoised)

    def _iteration(self, variables, k, canvas, orders, ranks, noise_keys, ctx, schedule, temperature):
        """One MAR iteration on every row: returns the updated canvas."""
        n, s = self.seq_len, self.slot_size
        rows = canvas.shape[0]
        m_before = schedule["masked_before"][k]
        m_after = schedule["masked_after"][k]
        scale = schedule["scale"][k]
        visible = ranks >= m_before
        positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (rows, n))
        features, _ = self._apply(variables, canvas, positions, visible, method=DreamModel.encode_image)
        if self.guided:
            def twice(a):
                return jnp.concatenate([a, a], axis=0)
            z = self._apply(variables, twice(features), twice(positions), twice(visible), ctx,
                            method=DreamModel.decode)
            z_cond, z_uncond = z[:rows], z[rows:]
        else:
            z_cond = self._apply(variables, features, positions, visible, ctx, method=DreamModel.decode)
            z_uncond = None
        # The slot: ranks [m_after, m_after + S) of the order; entries past the revealed
        # count (or past the end, via the sentinel N) are padding.
        padded = jnp.concatenate([orders, jnp.full((rows, s), n, jnp.int32)], axis=1)
        slot = jax.lax.dynamic_slice_in_dim(padded, m_after, s, axis=1)
        slot_valid = jnp.arange(s, dtype=jnp.int32)[None, :] < (m_before - m_after)
        gather = jnp.minimum(slot, n - 1)[..., None]
        zc = jnp.take_along_axis(z_cond, gather, axis=1)
        keys = jax.vmap(jax.random.fold_in, (0, None))(noise_keys, k)
        if self.guided:
            zu = jnp.take_along_axis(z_uncond, gather, axis=1)
            x = jax.vmap(lambda a, b, kk: self._diffuse(variables, a, b, kk, scale, temperature))(zc, zu, keys)
        else:
            x = jax.vmap(lambda a, kk: self._diffuse(variables, a, None, kk, scale, temperature))(zc, keys)
        write = jnp.where(slot_valid, slot, n)
        return jax.vmap(lambda c, w, v: c.at[w].set(v, mode="drop"))(canvas, write, x.astype(canvas.dtype))

    def _embed_score(self, variables, canvas, ranks, masked_count, text_emb):
        visible = ranks >= masked_count
        img = self._apply(variables, canvas, visible, method=DreamModel.embed_image_tokens)
        return jnp.sum(img * text_emb, axis=-1)

    # ---- jitted entry points --------------------------------------------------------------
    def _run(self, variables, canvas, order_keys, noise_keys, gen_tokens, empty_tokens, schedule,
             start, stop, temperature):
        self.traces["run"] += 1
        orders, ranks = orders_from_keys(order_keys, self.seq_len)
        ctx = self._context(variables, gen_tokens, empty_tokens)

        def body(k, c):
            return self._iteration(variables, k, c, orders, ranks, noise_keys, ctx, schedule, temperature)

        return jax.lax.fori_loop(start, stop, body, canvas)

    def _greedy(self, variables, canvas, order_keys, noise_keys, gen_tokens, empty_tokens, schedule,
                stop, temperature, text_emb, num_candidates):
        """Per-step greedy SAD over iterations [0, stop): at each iteration every row's K
        proposals (noise keys [B, K]) are scored and the best replaces the row.

        Returns (canvas [B, N, C], scores [num_iter, B, K], chosen [num_iter, B]); entries
        at iterations >= stop are zero.
        """
        self.traces["greedy"] += 1
        b, kc = noise_keys.shape
        assert kc == num_candidates
        orders, ranks = orders_from_keys(order_keys, self.seq_len)

        def rep(a):
            return jnp.repeat(a, kc, axis=0)

        orders_r, ranks_r, txt_r = rep(orders), rep(ranks), rep(text_emb)
        keys_r = noise_keys.reshape(b * kc)
        ctx = self._context(variables, rep(gen_tokens), empty_tokens)
        scores0 = jnp.zeros((self.num_iter, b, kc), jnp.float32)
        chosen0 = jnp.zeros((self.num_iter, b), jnp.int32)

        def body(k, carry):
            cur, scores, chosen = carry
            cand = self._iteration(variables, k, rep(cur), orders_r, ranks_r, keys_r, ctx, schedule,
                                   temperature)
            s = self._embed_score(variables, cand, ranks_r, schedule["masked_after"][k], txt_r)
            s = s.reshape(b, kc)
            best = jnp.argmax(s, axis=1).astype(jnp.int32)
            cur = cand.reshape(b, kc, *cand.shape[1:])[jnp.arange(b), best]
            return cur, scores.at[k].set(s), chosen.at[k].set(best)

        return jax.lax.fori_loop(0, stop, body, (canvas, scores0, chosen0))

    def _score(self, variables, canvas, order_keys, masked_count, text_emb):
        """Cosine between the model's image embedding of the visible part of each canvas
        (the tokens at ranks >= masked_count) and text_emb [R, E]."""
        self.traces["score"] += 1
        _, ranks = orders_from_keys(order_keys, self.seq_len)
        return self._embed_score(variables, canvas, ranks, masked_count, text_emb)

    def _text_embed(self, variables, clip_tokens):
        return self._apply(variables, clip_tokens, method=DreamModel.text_embed)


# =============================================================================================
# Python-loop reference (for the equivalence test): MAR's formulation with boolean masks.
# =============================================================================================
def reference_decode(model: DreamModel, variables, order_keys, noise_keys, gen_tokens, empty_tokens,
                     num_iter: int, diffusion_steps: Union[int, str] = 100, cfg: float = 1.0,
                     cfg_schedule: str = "linear", temperature: float = 1.0,
                     guided: Optional[bool] = None) -> np.ndarray:
    """The same algorithm as ``MARSampler.run`` written as MAR writes it: a host loop, a
    boolean mask per image, exact (unpadded) token sets, the decoder run separately on
    the conditional and the unconditional text. Same keys ⇒ same tokens. ``guided``
    defaults to ``cfg != 1`` (as ``MARSampler``'s is chosen by the API).
    """
    arch = model.arch
    n, c = arch.seq_len, arch.token_dim
    rows = gen_tokens.shape[0]
    guided = (cfg != 1.0) if guided is None else guided
    diffusion = make_diffusion(arch.diffusion_steps, arch.noise_schedule, respacing=diffusion_steps)
    orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, n))(order_keys))
    positions = jnp.broadcast_to(jnp.arange(n), (rows, n))

    encode = jax.jit(lambda v, t, vis: model.apply(v, t, positions, vis, method=DreamModel.encode_image)[0])
    decode = jax.jit(lambda v, f, vis, ctx: model.apply(v, f, positions, vis, ctx, method=DreamModel.decode))
    ctx_cond = model.apply(variables, jnp.asarray(gen_tokens), method=DreamModel.align_text)
    ctx_uncond = model.apply(variables, jnp.reshape(jnp.asarray(empty_tokens), (1, -1)),
                             method=DreamModel.align_text)
    ctx_uncond = jnp.broadcast_to(ctx_uncond, ctx_cond.shape)

    @jax.jit
    def diffuse(v, z_c, z_u, key, scale):
        def model_fn(x, t):
            z = z_c if z_u is None else jnp.concatenate([z_c, z_u])
            return model.apply(v, x, t, z, method=DreamModel.head)
        fn = model_fn if z_u is None else cfg_model_fn(model_fn, scale)
        return diffusion.p_sample_loop(fn, (z_c.shape[0], c), key, temperature=temperature)

    tokens = np.zeros((rows, n, c), np.float32)
    mask = np.ones((rows, n), bool)
    for step in range(num_iter):
        visible = jnp.asarray(~mask)
        features = encode(variables, jnp.asarray(tokens), visible)
        z_c = np.asarray(decode(variables, features, visible, ctx_cond))
        z_u = np.asarray(decode(variables, features, visible, ctx_uncond)) if guided else None
        mask_len = max(1, min(int(mask[0].sum()) - 1,
                              math.floor(n * math.cos(math.pi / 2.0 * (step + 1) / num_iter))))
        mask_next = np.zeros_like(mask)
        for i in range(rows):
            mask_next[i, orders[i, :mask_len]] = True
        to_pred = mask if step >= num_iter - 1 else (mask & ~mask_next)
        if cfg_schedule == "linear":
            scale = 1.0 + (cfg - 1.0) * (n - mask_len) / n
        else:
            scale = cfg
        for i in range(rows):
            idx = np.asarray([p for p in orders[i] if to_pred[i, p]], np.int64)  # by rank
            if idx.size == 0:
                continue
            key = jax.random.fold_in(noise_keys[i], step)
            zu = None if z_u is None else jnp.asarray(z_u[i, idx])
            x = diffuse(variables, jnp.asarray(z_c[i, idx]), zu, key, jnp.float32(scale))
            tokens[i, idx] = np.asarray(x)
        mask = mask_next if step < num_iter - 1 else np.zeros_like(mask)
    return tokens
