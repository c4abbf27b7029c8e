"""Gaussian diffusion as used by MAR's DiffLoss (IDDPM: Nichol & Dhariwal 2021).

Conventions
-----------
* Data ``x`` has a leading batch axis ``N`` (the MAR head uses ``[N, C]``;
  any trailing shape works). Timesteps ``t`` are int arrays ``[N]`` that index
  *this* diffusion's steps (``0 .. num_timesteps-1``).
* ``model_fn(x_t, t_model) -> [N, ..., 2C]``: first ``C`` channels of the last
  axis are the epsilon prediction, the last ``C`` the learned-range variance
  ``v`` in [-1, 1]. ``t_model`` is always the ORIGINAL (un-respaced) timestep
  index, ``timestep_map[t]``, so a model trained on 1000 steps can be sampled
  with any respacing.
* Schedules are computed once in float64 NumPy and enter jitted code as
  float32 constants; the class holds no JAX arrays, so it is safe to build
  before a mesh exists and to close over inside ``jax.jit``.
* Classifier-free guidance: see ``cfg_model_fn`` / ``guided_output``. The
  wrapped model sees a doubled batch ``[cond rows; uncond rows]`` while the
  sampler state keeps only the ``N`` conditional rows.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


# --------------------------------------------------------------------------
# Schedules and respacing (host side, float64).
# --------------------------------------------------------------------------

def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule: alpha_bar(u) = cos^2(((u + s) / (1 + s)) * pi / 2)."""

    def alpha_bar(u):
        return math.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

    betas = [
        min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return np.asarray(betas, dtype=np.float64)


def linear_betas(num_steps: int) -> np.ndarray:
    """DDPM's linear schedule, rescaled so any step count spans the same noise range."""
    scale = 1000.0 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def get_betas(schedule: str, num_steps: int) -> np.ndarray:
    if schedule == "cosine":
        return cosine_betas(num_steps)
    if schedule == "linear":
        return linear_betas(num_steps)
    raise ValueError(f"unknown noise schedule {schedule!r} (use 'cosine' or 'linear')")


def space_timesteps(num_steps: int, section_counts: Union[int, str, Sequence[int]]) -> list[int]:
    """Sorted original timesteps to keep when respacing ``num_steps`` steps.

    ``section_counts`` may be an int ``k`` (same as the string ``"k"``), a
    comma string ``"10,15,20"`` / sequence (the schedule is cut into equal
    sections and each keeps that many steps, evenly spaced with a fractional
    stride rounded to the nearest index, first and last step of every section
    included), or ``"ddimK"`` (the integer stride that yields exactly K steps,
    as DDIM does).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == desired:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",") if x.strip()]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    section_counts = list(section_counts)
    if not section_counts:
        raise ValueError("empty respacing")

    size_per, extra = divmod(num_steps, len(section_counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot keep {count} steps from a section of {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return sorted(set(kept))


# --------------------------------------------------------------------------
# Elementwise helpers (jnp).
# --------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    # The tanh approximation used by IDDPM (kept for loss-value parity).
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales, bin_width: float = 2.0 / 255.0):
    """log-prob of ``x`` under a Gaussian discretised into bins of ``bin_width``.

    IDDPM's decoder term for t == 0 (data assumed in [-1, 1]); the outermost
    bins extend to +-infinity. MAR keeps this term for its continuous latents,
    and so do we, to reproduce the same loss.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + bin_width / 2))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - bin_width / 2))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_over_non_batch(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def guided_output(out_cond: jax.Array, out_uncond: jax.Array, scale) -> jax.Array:
    """Classifier-free guidance on the epsilon half only.

    ``eps = eps_uncond + scale * (eps_cond - eps_uncond)``; the variance half is
    the conditional one (what MAR's sampler ends up using). ``scale`` is a
    scalar or a per-example array ``[N]``. With ``scale == 1`` the result is
    ``out_cond`` exactly.
    """
    channels = out_cond.shape[-1] // 2
    scale = jnp.asarray(scale, dtype=out_cond.dtype)
    if scale.ndim == 1:  # per-example scale -> broadcast over trailing axes
        scale = scale.reshape((-1,) + (1,) * (out_cond.ndim - 1))
    eps_cond, var_cond = out_cond[..., :channels], out_cond[..., channels:]
    eps_uncond = out_uncond[..., :channels]
    eps = eps_uncond + scale * (eps_cond - eps_uncond)
    # Exactly out_cond at scale 1 (the formula above can differ in the last ulp).
    eps = jnp.where(scale == 1, eps_cond, eps)
    return jnp.concatenate([eps, var_cond], axis=-1)


def cfg_model_fn(model_fn: ModelFn, scale) -> ModelFn:
    """Wraps a doubled-batch model into a guided ``N``-row model.

    ``model_fn(x [2N, ...], t [2N]) -> [2N, ..., 2C]`` must treat rows
    ``0..N-1`` as conditional and rows ``N..2N-1`` as unconditional (i.e. its
    condition array is ``concat([cond, uncond])``). The returned function takes
    the ``N`` current samples, feeds them twice, and guides with
    ``guided_output``. ``scale``: scalar or ``[N]``.
    """

    def guided(x, t):
        n = x.shape[0]
        out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0))
        return guided_output(out[:n], out[n:], scale)

    return guided


# --------------------------------------------------------------------------
# The diffusion process.
# --------------------------------------------------------------------------

class GaussianDiffusion:
    """IDDPM Gaussian diffusion: eps prediction, learned-range variance, hybrid loss."""

    def __init__(self, betas, timestep_map: Optional[Sequence[int]] = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.num_timesteps = int(betas.shape[0])
        if timestep_map is None:
            timestep_map = np.arange(self.num_timesteps)
        self.timestep_map = np.asarray(timestep_map, dtype=np.int32)
        if self.timestep_map.shape != (self.num_timesteps,):
            raise ValueError("timestep_map must have one entry per step")

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        acp, acp_prev = self.alphas_cumprod, self.alphas_cumprod_prev

        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance).
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        # The variance is 0 at t=0; its log is clipped to the t=1 value (IDDPM).
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        else:
            self.posterior_log_variance_clipped = np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
        self.log_betas = np.log(betas)

    # -- small helpers ---------------------------------------------------

    @staticmethod
    def _extract(table: np.ndarray, t, like: jax.Array) -> jax.Array:
        """table[t] as float32, shaped [N, 1, ...] to broadcast against ``like``."""
        values = jnp.asarray(table, dtype=jnp.float32)[t]
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    def model_timesteps(self, t) -> jax.Array:
        """Original timestep indices that the model is conditioned on."""
        return jnp.asarray(self.timestep_map)[t]

    def sample_timesteps(self, rng, n: int) -> jax.Array:
        """Uniform training timesteps, as MAR draws them."""
        return jax.random.randint(rng, (n,), 0, self.num_timesteps, dtype=jnp.int32)

    # -- forward process ---------------------------------------------------

    def q_mean_variance(self, x0, t):
        mean = self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
        var = jnp.broadcast_to(self._extract(1.0 - self.alphas_cumprod, t, x0), x0.shape)
        return mean, var

    def q_sample(self, x0, t, noise):
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(acp_t) x0, (1 - acp_t) I)."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0, xt, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract(self.posterior_mean_coef1, t, xt) * x0
                + self._extract(self.posterior_mean_coef2, t, xt) * xt)
        var = jnp.broadcast_to(self._extract(self.posterior_variance, t, xt), xt.shape)
        log_var = jnp.broadcast_to(
            self._extract(self.posterior_log_variance_clipped, t, xt), xt.shape)
        return mean, var, log_var

    # -- reverse process ---------------------------------------------------

    def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = False):
        """p(x_{t-1} | x_t) from a raw ``[N, ..., 2C]`` model output."""
        model_output = model_output.astype(jnp.float32)
        x_t = x_t.astype(jnp.float32)
        channels = x_t.shape[-1]
        if model_output.shape[-1] != 2 * channels:
            raise ValueError(f"model output has {model_output.shape[-1]} channels, "
                             f"expected 2 x {channels}")
        eps, v = model_output[..., :channels], model_output[..., channels:]

        # Learned range: interpolate in log space between the two natural bounds.
        min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._extract(self.log_betas, t, x_t)
        frac = (v + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log

        pred_xstart = (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                       - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": jnp.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
        }

    def _vb_terms(self, model_output, x0, x_t, t):
        """Per-example VLB term in bits: KL for t > 0, decoder NLL at t == 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = _mean_over_non_batch(kl) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = _mean_over_non_batch(nll) / math.log(2.0)
        return jnp.where(t == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x0, t, noise):
        """IDDPM hybrid loss per example: MSE(eps) + VLB (returns loss [N], terms).

        The VLB sees the eps half stop-gradiented, so it trains only the
        variance half; the MSE trains only the eps half (it ignores v).
        """
        x0 = x0.astype(jnp.float32)
        noise = noise.astype(jnp.float32)
        x_t = self.q_sample(x0, t, noise)
        model_output = model_fn(x_t, self.model_timesteps(t)).astype(jnp.float32)
        channels = x0.shape[-1]
        eps, v = model_output[..., :channels], model_output[..., channels:]

        frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
        vb = self._vb_terms(frozen, x0, x_t, t)
        mse = _mean_over_non_batch(jnp.square(noise - eps))
        loss = mse + vb
        return loss, {"mse": mse, "vb": vb}

    def p_sample(self, model_fn: ModelFn, x_t, t_index, rng, temperature=1.0,
                 clip_denoised: bool = False):
        """One ancestral step x_t -> x_{t-1}; ``t_index`` is a step of this diffusion.

        ``t_index``: int scalar or ``[N]``. ``temperature`` (scalar or ``[N]``)
        multiplies the noise std, as in MAR; no noise is added at step 0.
        """
        n = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t_index, dtype=jnp.int32), (n,))
        out = self.p_mean_variance(model_fn(x_t, self.model_timesteps(t)), x_t, t,
                                   clip_denoised=clip_denoised)
        noise = jax.random.normal(rng, x_t.shape, dtype=jnp.float32)
        nonzero = (t != 0).astype(jnp.float32).reshape((n,) + (1,) * (x_t.ndim - 1))
        temperature = jnp.asarray(temperature, dtype=jnp.float32)
        if temperature.ndim == 1:
            temperature = temperature.reshape((n,) + (1,) * (x_t.ndim - 1))
        sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * temperature * noise
        return sample, out["pred_xstart"]

    def p_sample_loop(self, model_fn: ModelFn, shape, rng, temperature=1.0, noise=None,
                      clip_denoised: bool = False):
        """Full ancestral sampling from N(0, I) over all (respaced) steps; returns x_0.

        Compiles to one ``lax.fori_loop``; step ``i`` uses ``fold_in(rng, i)``.
        """
        noise_rng, step_rng = jax.random.split(rng)
        if noise is None:
            noise = jax.random.normal(noise_rng, shape, dtype=jnp.float32)
        x = noise.astype(jnp.float32)

        def body(i, x):
            step = self.num_timesteps - 1 - i
            x, _ = self.p_sample(model_fn, x, step, jax.random.fold_in(step_rng, i),
                                 temperature=temperature, clip_denoised=clip_denoised)
            return x

        return jax.lax.fori_loop(0, self.num_timesteps, body, x)


def respace(base: GaussianDiffusion, use_timesteps: Sequence[int]) -> GaussianDiffusion:
    """A diffusion over a subset of ``base``'s steps with the same marginals.

    Betas are recomputed from the kept steps' alphas_cumprod so that
    q(x_t | x_0) at kept step t is unchanged; the map back to original indices
    composes with any map ``base`` already had.
    """
    kept = sorted(set(int(i) for i in use_timesteps))
    if not kept or kept[0] < 0 or kept[-1] >= base.num_timesteps:
        raise ValueError("timesteps to keep must lie in [0, num_timesteps)")
    acp = base.alphas_cumprod[kept]
    acp_prev = np.append(1.0, acp[:-1])
    betas = 1.0 - acp / acp_prev
    return GaussianDiffusion(betas, timestep_map=base.timestep_map[kept])


def make_diffusion(num_steps: int = 1000, schedule: str = "cosine",
                   respacing: Union[int, str, Sequence[int], None] = None) -> GaussianDiffusion:
    """Build the MAR diffusion: ``num_steps`` base steps, optionally respaced.

    ``respacing``: None or "" (keep all steps), an int k, "k", "k1,k2,...", or
    "ddimK" (see ``space_timesteps``). MAR trains with ``make_diffusion()`` and
    samples with ``make_diffusion(respacing=100)``.
    """
    base = GaussianDiffusion(get_betas(schedule, num_steps))
    if respacing is None or respacing == "":
        return base
    return respace(base, space_timesteps(num_steps, respacing))
