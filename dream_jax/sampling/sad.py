"""Semantically Aligned Decoding (SAD), its per-step greedy variant, and best-of-K.

All three score canvases with the model's OWN contrastive branch:
``score = embed_image_tokens(canvas, visible) · text_embed(clip tokens)`` (both
unit vectors, eval-mode BatchNorm), i.e. the cosine the CLIP loss was trained on.

* ``sad``: K candidate trajectories per prompt row (same order, different
  diffusion noise: candidate c uses noise key ``noise_keys[:, c]``) run for the
  first ``threshold`` iterations in one batch of B·K rows; each partial canvas is
  scored on its visible tokens; the best candidate per row is kept and only it is
  finished (a batch of B rows), continuing its own noise stream.
* ``greedy``: at each iteration k < threshold every row proposes K next canvases
  (candidate c samples with ``fold_in(noise_keys[:, c], k)``), keeps the best and
  fans it out again; then the row is finished with the noise stream of the last
  kept candidate.
* ``best_of_k``: K full decodings per row, the best finished image is kept (the
  reranking baseline, with the same scorer instead of an external CLIP).

With K = 1 ``sad`` and ``greedy`` reproduce plain decoding exactly (candidate 0's
noise key is plain decoding's, and the same compiled loop runs both halves).

``threshold`` is an iteration count in [1, num_iter]; :func:`resolve_threshold`
turns a fraction of decoded tokens into one.
"""
from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from dream_jax.sampling.mar import MARSampler, masking_schedule


@dataclasses.dataclass
class CandidateResult:
    """tokens [B, N, C] of the kept images; scores [B, K] (greedy: [B, threshold, K]);
    chosen [B] (greedy: [B, threshold]); threshold: iterations run before choosing."""

    tokens: jax.Array
    scores: np.ndarray
    chosen: np.ndarray
    threshold: int


def resolve_threshold(sad_step: Union[int, float], num_iter: int, seq_len: int) -> int:
    """An iteration count in [1, num_iter].

    ``int``: that many iterations (e.g. 32 of 64). ``float`` in (0, 1]: the
    fewest iterations after which at least that fraction of the tokens is
    decoded (e.g. 0.125 → the first iteration with ≥ 12.5 % of tokens visible).
    """
    if isinstance(sad_step, bool):
        raise TypeError("sad_step must be an int (iterations) or a float (fraction decoded)")
    if isinstance(sad_step, (int, np.integer)):
        if not 1 <= sad_step <= num_iter:
            raise ValueError(f"sad_step={sad_step} iterations must lie in [1, num_iter={num_iter}]")
        return int(sad_step)
    frac = float(sad_step)
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"sad_step={sad_step} as a fraction of decoded tokens must lie in (0, 1]")
    decoded = seq_len - masking_schedule(seq_len, num_iter)[1:]
    return int(np.argmax(decoded >= frac * seq_len - 1e-9)) + 1


def _check_keys(noise_keys, rows: int):
    if noise_keys.ndim != 2 or noise_keys.shape[0] != rows:
        raise ValueError(f"noise_keys must be [rows={rows}, K], got shape {noise_keys.shape}")
    return noise_keys.shape[1]


def _check_threshold(sampler: MARSampler, threshold: int):
    if not 1 <= threshold <= sampler.num_iter:
        raise ValueError(f"threshold={threshold} must lie in [1, {sampler.num_iter}]")


def _repeat(a, k):
    return jnp.repeat(jnp.asarray(a), k, axis=0)


def _take_rows(flat, b, k, chosen):
    """flat [B*K, ...] → the chosen candidate of each row [B, ...]."""
    return flat.reshape(b, k, *flat.shape[1:])[jnp.arange(b), chosen]


def sad(sampler: MARSampler, variables, order_keys, noise_keys, gen_tokens, clip_tokens,
        empty_tokens, schedule, threshold: int, temperature: float = 1.0) -> CandidateResult:
    """SAD: K trajectories per row up to ``threshold`` iterations, keep the best, finish it."""
    b = gen_tokens.shape[0]
    k = _check_keys(noise_keys, b)
    _check_threshold(sampler, threshold)
    temp = np.float32(temperature)
    prefix = sampler.run(variables, sampler.empty_canvas(b * k), _repeat(order_keys, k),
                         noise_keys.reshape(b * k), _repeat(gen_tokens, k), empty_tokens, schedule,
                         np.int32(0), np.int32(threshold), temp)
    text = sampler.text_embed(variables, jnp.asarray(clip_tokens))
    scores = sampler.score(variables, prefix, _repeat(order_keys, k),
                           np.int32(sampler.masked[threshold]), _repeat(text, k)).reshape(b, k)
    chosen = jnp.argmax(scores, axis=1).astype(jnp.int32)
    canvas = _take_rows(prefix, b, k, chosen)
    kept_keys = noise_keys[jnp.arange(b), chosen]
    tokens = sampler.run(variables, canvas, order_keys, kept_keys, gen_tokens, empty_tokens, schedule,
                         np.int32(threshold), np.int32(sampler.num_iter), temp)
    return CandidateResult(tokens, np.asarray(scores), np.asarray(chosen), int(threshold))


def greedy(sampler: MARSampler, variables, order_keys, noise_keys, gen_tokens, clip_tokens,
           empty_tokens, schedule, threshold: int, temperature: float = 1.0) -> CandidateResult:
    """Per-step greedy SAD up to ``threshold`` iterations, then plain decoding."""
    b = gen_tokens.shape[0]
    k = _check_keys(noise_keys, b)
    _check_threshold(sampler, threshold)
    temp = np.float32(temperature)
    text = sampler.text_embed(variables, jnp.asarray(clip_tokens))
    canvas, scores, chosen = sampler.greedy(variables, sampler.empty_canvas(b), order_keys, noise_keys,
                                            gen_tokens, empty_tokens, schedule, np.int32(threshold),
                                            temp, text, num_candidates=k)
    kept_keys = noise_keys[jnp.arange(b), chosen[threshold - 1]]
    tokens = sampler.run(variables, canvas, order_keys, kept_keys, gen_tokens, empty_tokens, schedule,
                         np.int32(threshold), np.int32(sampler.num_iter), temp)
    scores = np.asarray(scores)[:threshold].transpose(1, 0, 2)
    chosen = np.asarray(chosen)[:threshold].T
    return CandidateResult(tokens, scores, chosen, int(threshold))


def best_of_k(sampler: MARSampler, variables, order_keys, noise_keys, gen_tokens, clip_tokens,
              empty_tokens, schedule, temperature: float = 1.0,
              return_candidates: bool = False) -> Union[CandidateResult, tuple]:
    """K full decodings per row; the finished image with the highest score is kept.
    With ``return_candidates`` also returns all candidates' tokens [B, K, N, C]."""
    b = gen_tokens.shape[0]
    k = _check_keys(noise_keys, b)
    full = sampler.run(variables, sampler.empty_canvas(b * k), _repeat(order_keys, k),
                       noise_keys.reshape(b * k), _repeat(gen_tokens, k), empty_tokens, schedule,
                       np.int32(0), np.int32(sampler.num_iter), np.float32(temperature))
    text = sampler.text_embed(variables, jnp.asarray(clip_tokens))
    scores = sampler.score(variables, full, _repeat(order_keys, k), np.int32(0),
                           _repeat(text, k)).reshape(b, k)
    chosen = jnp.argmax(scores, axis=1).astype(jnp.int32)
    result = CandidateResult(_take_rows(full, b, k, chosen), np.asarray(scores), np.asarray(chosen),
                             sampler.num_iter)
    if return_candidates:
        return result, full.reshape(b, k, *full.shape[1:])
    return result


def final_scores(sampler: MARSampler, variables, order_keys, tokens, clip_tokens) -> np.ndarray:
    """The model's own image–text cosine of finished images [B] (all tokens visible)."""
    text = sampler.text_embed(variables, jnp.asarray(clip_tokens))
    return np.asarray(sampler.score(variables, tokens, order_keys, np.int32(0), text))


def plain(sampler: MARSampler, variables, order_keys, noise_keys, gen_tokens, empty_tokens,
          schedule, temperature: float = 1.0, candidate: int = 0):
    """Plain decoding with candidate ``candidate``'s noise stream (0 = the default)."""
    keys = noise_keys if noise_keys.ndim == 1 else noise_keys[:, candidate]
    return sampler.decode(variables, order_keys, keys, gen_tokens, empty_tokens, schedule, temperature)
