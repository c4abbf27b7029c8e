"""Probes on frozen features: a closed-form few-shot ridge probe and the MAE linear probe.

Few-shot (cheap enough for periodic evaluation during training): for each seed,
draw ``k`` examples per class from a labelled pool, centre them on their own
mean, L2-normalise, and solve ridge regression onto ±1 one-hot targets in closed
form (dual form, since ``k·classes`` is tiny); accuracy is the argmax on a test
set. Mean and std over seeds. The ridge regulariser is by default chosen per
support set by leave-one-out squared error (closed form, over a log grid): a
fixed one over-shrinks the low-variance directions that carry attributes such
as size (on the tiny model, 25-shot size 0.52 at λ = 1 vs 0.62 chosen).

Linear probe (MAE protocol): BatchNorm without affine (eps 1e-6) + a linear layer
(weights trunc-normal std 0.01, zero bias) trained with LARS (momentum 0.9,
trust coefficient 0.001, no weight decay, biases and 1-D parameters excluded
from the trust ratio), learning rate ``base_lr × batch / 256`` with linear
warm-up and cosine decay, cross-entropy. Whole epochs run in one compiled scan
over a fresh permutation each epoch (drop-last batches).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


# =============================================================================================
# Few-shot ridge probe.
# =============================================================================================
def _pm_one_hot(y, num_classes: int) -> np.ndarray:
    """±1 one-hot regression targets [n, C] (float64)."""
    t = -np.ones((len(y), num_classes))
    t[np.arange(len(y)), np.asarray(y)] = 1.0
    return t


def ridge_fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2_reg: float = 1.0):
    """Closed-form ridge regression of ±1 one-hot targets on x [n, d] (float64).

    Returns (weights [d, C], bias [C]). Uses the dual form when n < d."""
    x = np.asarray(x, np.float64)
    t = _pm_one_hot(y, num_classes)
    xm, tm = x.mean(0), t.mean(0)
    xc, tc = x - xm, t - tm
    n, d = xc.shape
    if n < d:
        alpha = np.linalg.solve(xc @ xc.T + l2_reg * np.eye(n), tc)
        w = xc.T @ alpha
    else:
        w = np.linalg.solve(xc.T @ xc + l2_reg * np.eye(d), xc.T @ tc)
    return w, tm - xm @ w


# Leave-one-out candidates for the few-shot ridge regulariser (features are unit-norm).
L2_REG_GRID: Tuple[float, ...] = tuple(float(10.0 ** e) for e in np.arange(-4.0, 2.01, 0.5))
# With one shot per class, leaving an example out removes its class: no LOO signal.
L2_REG_ONE_SHOT = 1.0


def loo_l2_reg(x: np.ndarray, y: np.ndarray, num_classes: int,
               grid: Sequence[float] = L2_REG_GRID) -> float:
    """The ridge regulariser of ``grid`` with the lowest leave-one-out squared error of
    ``ridge_fit`` on (x, y), from one eigendecomposition: with the intercept, the hat matrix
    is 1/n + U diag(s/(s+λ)) Uᵀ (K = Xc Xcᵀ = U diag(s) Uᵀ) and each left-out residual
    is the in-sample one divided by 1 - H_ii. Ties go to the larger regulariser."""
    x = np.asarray(x, np.float64)
    n = len(y)
    t = _pm_one_hot(y, num_classes)
    xc, tc = x - x.mean(0), t - t.mean(0)
    s, u = np.linalg.eigh(xc @ xc.T)
    s = np.maximum(s, 0.0)
    ut = u.T @ tc
    best_err, best = np.inf, None
    for lam in sorted(grid, reverse=True):
        f = s / (s + lam)
        leverage = (u * u) @ f + 1.0 / n
        resid = (tc - u @ (f[:, None] * ut)) / np.maximum(1.0 - leverage, 1e-12)[:, None]
        err = float(np.mean(resid ** 2))
        if err < best_err * (1 - 1e-9):
            best_err, best = err, float(lam)
    return best


def _normalise(x, centre):
    x = np.asarray(x, np.float64) - centre
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def sample_shots(labels: np.ndarray, shots: int, rng: np.random.Generator,
                 classes: Optional[Sequence[int]] = None) -> np.ndarray:
    """Indices of ``shots`` examples per class (classes with too few examples take all)."""
    labels = np.asarray(labels)
    classes = np.unique(labels[labels >= 0]) if classes is None else classes
    idx = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in classes]
    return np.concatenate(idx)


def few_shot_accuracy(train_x, train_y, test_x, test_y, num_classes: int, shots: int, seed: int,
                      l2_reg: Optional[float] = None) -> float:
    """One few-shot run: sample, normalise on the support set's mean, fit, score.
    ``l2_reg`` None: chosen on the support set by ``loo_l2_reg`` (L2_REG_ONE_SHOT for 1 shot)."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    idx = sample_shots(train_y, shots, np.random.default_rng(seed), range(num_classes))
    centre = np.asarray(train_x, np.float64)[idx].mean(0)
    support = _normalise(np.asarray(train_x)[idx], centre)
    if l2_reg is None:
        l2_reg = loo_l2_reg(support, train_y[idx], num_classes) if shots > 1 else L2_REG_ONE_SHOT
    w, b = ridge_fit(support, train_y[idx], num_classes, l2_reg)
    keep = test_y >= 0
    pred = (_normalise(np.asarray(test_x)[keep], centre) @ w + b).argmax(1)
    return float((pred == test_y[keep]).mean())


def few_shot_eval(train_x, train_y, test_x, test_y, num_classes: int,
                  shots: Sequence[int] = (1, 5, 10, 25), seeds: Sequence[int] = (0, 1, 2),
                  l2_reg: Optional[float] = None) -> Dict[str, float]:
    """{'{k}shot': mean accuracy, '{k}shot_std': std over seeds} for each k
    (``l2_reg`` None: leave-one-out choice per support set, see few_shot_accuracy)."""
    out = {}
    for k in shots:
        accs = [few_shot_accuracy(train_x, train_y, test_x, test_y, num_classes, k, s, l2_reg)
                for s in seeds]
        out[f"{k}shot"] = float(np.mean(accs))
        out[f"{k}shot_std"] = float(np.std(accs))
    return out


# =============================================================================================
# Linear probe (MAE protocol).
# =============================================================================================
class LinearProbe(nn.Module):
    """BatchNorm without affine (shared: it has no parameters) + one linear head per task."""

    num_classes: Tuple[Tuple[str, int], ...]

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6,
                         use_scale=False, use_bias=False, name="bn")(x)
        return {task: nn.Dense(n, kernel_init=nn.initializers.truncated_normal(0.01),
                               name=f"head_{task}")(x)
                for task, n in self.num_classes}


@dataclasses.dataclass(frozen=True)
class LinearProbeConfig:
    epochs: int = 90
    batch_size: int = 16384
    base_lr: float = 0.1              # lr = base_lr × batch / 256
    warmup_epochs: int = 10
    optimizer: str = "lars"           # 'lars' (MAE) or 'sgd' (momentum 0.9)
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0


def _optimizer(cfg: LinearProbeConfig, steps_per_epoch: int, batch_size: int):
    total = max(cfg.epochs * steps_per_epoch, 1)
    warm = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    peak = cfg.base_lr * batch_size / 256
    if warm > 0:
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warm, total, 0.0)
    else:
        schedule = optax.cosine_decay_schedule(peak, total)
    not_1d = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    if cfg.optimizer == "lars":
        # MAE's LARS: biases / 1-D parameters get neither weight decay nor the trust ratio.
        return optax.lars(schedule, weight_decay=cfg.weight_decay, weight_decay_mask=not_1d,
                          trust_coefficient=0.001, trust_ratio_mask=not_1d, momentum=cfg.momentum)
    if cfg.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=not_1d),
                           optax.sgd(schedule, momentum=cfg.momentum))
    raise ValueError(f"optimizer={cfg.optimizer!r} must be 'lars' or 'sgd'")


@functools.lru_cache(maxsize=32)
def _probe_fns(cfg: LinearProbeConfig, num_classes: Tuple[Tuple[str, int], ...], n: int, bs: int):
    """Compiled (init, train, predict) for one static setting (cached: reused across feature sets
    of the same shape)."""
    steps_per_epoch = n // bs
    tx = _optimizer(cfg, steps_per_epoch, bs)
    model = LinearProbe(num_classes)
    tasks = [t for t, _ in num_classes]

    def init(key, dim):
        variables = model.init(key, jnp.zeros((2, dim), jnp.float32), train=False)
        return variables["params"], variables["batch_stats"], tx.init(variables["params"])

    def step(X, Y, carry, idx):
        params, stats, opt_state = carry
        x, y = X[idx], Y[idx]

        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"])
            loss = 0.0
            for i, task in enumerate(tasks):
                lab = y[:, i]
                w = (lab >= 0).astype(jnp.float32)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits[task], jnp.maximum(lab, 0))
                loss = loss + (ce * w).sum() / jnp.maximum(w.sum(), 1.0)
            return loss, upd["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_stats, opt_state), loss

    @jax.jit
    def train(X, Y, params, stats, opt_state, key):
        def epoch(carry, k):
            perm = jax.random.permutation(k, n)[: steps_per_epoch * bs].reshape(steps_per_epoch, bs)
            carry, losses = jax.lax.scan(functools.partial(step, X, Y), carry, perm)
            return carry, losses.mean()

        return jax.lax.scan(epoch, (params, stats, opt_state), jax.random.split(key, cfg.epochs))

    @jax.jit
    def predict(params, stats, x):
        logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
        return jnp.stack([logits[t].argmax(-1) for t in tasks], axis=1)

    return jax.jit(init, static_argnums=1), train, predict


def linear_probes(train_x, train_labels: Dict[str, np.ndarray], test_x, test_labels: Dict[str, np.ndarray],
                  num_classes: Dict[str, int], cfg: Optional[LinearProbeConfig] = None) -> Dict[str, dict]:
    """Linear probes of several tasks on the same frozen features, trained together (one shared
    parameter-free BatchNorm, independent heads, summed losses: equivalent to separate
    probes, one compilation). Labels < 0 are excluded per task.

    Returns {task: {'train_acc', 'test_acc', 'final_loss'}} ('final_loss': summed over tasks)."""
    cfg = cfg or LinearProbeConfig()
    tasks = tuple(sorted(num_classes))
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    Ytr = np.stack([np.asarray(train_labels[t], np.int32) for t in tasks], axis=1)
    Yte = np.stack([np.asarray(test_labels[t], np.int32) for t in tasks], axis=1)
    n = len(train_x)
    bs = min(cfg.batch_size, n)
    init, train, predict = _probe_fns(cfg, tuple((t, int(num_classes[t])) for t in tasks), n, bs)
    init_key, data_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params, stats, opt_state = init(init_key, train_x.shape[1])
    (params, stats, _), epoch_losses = train(jnp.asarray(train_x), jnp.asarray(Ytr), params, stats,
                                             opt_state, data_key)

    def preds(x):
        return np.concatenate([np.asarray(predict(params, stats, jnp.asarray(x[i:i + 8192])))
                               for i in range(0, len(x), 8192)]) if len(x) else np.zeros((0, len(tasks)))

    ptr, pte = preds(train_x), preds(test_x)
    final = float(epoch_losses[-1]) if cfg.epochs else float("nan")
    out = {}
    for i, t in enumerate(tasks):
        acc = lambda p, y: float((p[y >= 0] == y[y >= 0]).mean()) if (y >= 0).any() else float("nan")  # noqa: E731
        out[t] = {"train_acc": acc(ptr[:, i], Ytr[:, i]), "test_acc": acc(pte[:, i], Yte[:, i]),
                  "final_loss": final}
    return out


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int,
                 cfg: Optional[LinearProbeConfig] = None) -> Dict[str, float]:
    """One task: BN (no affine) + linear on frozen features → {'train_acc', 'test_acc', 'final_loss'}."""
    return linear_probes(train_x, {"y": train_y}, test_x, {"y": test_y}, {"y": num_classes}, cfg)["y"]
