"""Fréchet Inception Distance: Gaussian statistics in float64 and a stable distance.

    FID = |mu1 − mu2|² + tr(S1) + tr(S2) − 2 tr((S1 S2)^½)

``tr((S1 S2)^½)`` is computed as the sum of the square roots of the eigenvalues of
the symmetric PSD matrix ``S1^½ S2 S1^½`` (it has the same eigenvalues as S1 S2),
with ``S1^½`` from a symmetric eigendecomposition. Everything stays real;
eigenvalues that rounding makes slightly negative are clipped to 0. The general
:func:`sqrtm` (eigendecomposition of a non-symmetric matrix) is kept for
reference/diagnostics and drops imaginary parts below a tolerance.

Reference statistics of real images (:class:`Reference`) are computed once and
cached as ``.npz`` (mu, sigma, count, a key describing the images and the Inception
weights, and sigma^½ once it has been needed), so each FID against them costs
one product and one symmetric eigenvalue problem — of size n×n when the
generated set has fewer samples n than feature dimensions.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable, Iterable, Optional, Tuple

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# =============================================================================================
# Matrix square roots.
# =============================================================================================
def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (float64, eigh-based)."""
    a = np.asarray(a, np.float64)
    a = (a + a.T) / 2
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def sqrtm(a: np.ndarray, imag_tol: float = 1e-3) -> np.ndarray:
    """Principal square root of a diagonalisable matrix with a non-negative spectrum
    (e.g. a product of two PSD matrices) via ``eig``. Small imaginary parts (from rounding)
    are dropped; one above ``imag_tol`` (relative to the largest entry) raises."""
    a = np.asarray(a, np.float64)
    w, v = np.linalg.eig(a)
    w = w.astype(np.complex128)
    # Eigenvalues of a PSD product are real >= 0: rounding noise (a tiny imaginary part or a
    # tiny negative value) is set to the real axis / 0; anything larger is kept and shows up
    # as an imaginary part of the root.
    tol = 1e-10 * max(np.abs(w).max(), 1e-300)
    noise = (np.abs(w.imag) <= tol) & (w.real >= -tol)
    w = np.where(noise, np.clip(w.real, 0, None), w)
    root = (v * np.sqrt(w)) @ np.linalg.inv(v)
    scale = max(np.abs(root).max(), 1e-300)
    if np.abs(root.imag).max() > imag_tol * scale:
        raise ValueError(f"matrix square root has a significant imaginary part "
                         f"({np.abs(root.imag).max():.3g} vs scale {scale:.3g})")
    return root.real


def trace_sqrt_product(sigma1: np.ndarray, sigma2: Optional[np.ndarray] = None,
                       sqrt_sigma1: Optional[np.ndarray] = None,
                       centred2: Optional[np.ndarray] = None,
                       centred1: Optional[np.ndarray] = None) -> float:
    """tr((sigma1 sigma2)^½) for PSD sigma1, sigma2, computed symmetrically as
    sum sqrt(eig(R S2 R)) with R = sigma1^½ (pass ``sqrt_sigma1`` to reuse it).

    Low-rank shortcuts (the same nonzero spectrum from a smaller matrix):
    ``centred2`` = the centred samples Y [m, D] behind sigma2 = YᵀY / (m − 1) and/or
    ``centred1`` = X [n, D] behind sigma1, used when they have fewer rows than D:
    both → singular values of X Yᵀ / sqrt((n−1)(m−1)); only X → eig of X S2 Xᵀ / (n−1);
    only Y → eig of (Y R)(Y R)ᵀ / (m − 1)."""
    d = np.shape(sigma1)[-1]
    low1 = centred1 is not None and len(centred1) < d
    low2 = centred2 is not None and len(centred2) < d
    if low1 and low2:
        x, y = np.asarray(centred1, np.float64), np.asarray(centred2, np.float64)
        sv = np.linalg.svd(x @ y.T, compute_uv=False)
        return float(sv.sum() / np.sqrt(max(len(x) - 1, 1) * max(len(y) - 1, 1)))
    if low1:
        x = np.asarray(centred1, np.float64)
        m = x @ np.asarray(sigma2, np.float64) @ x.T / max(len(x) - 1, 1)
    else:
        r1 = sqrtm_psd(sigma1) if sqrt_sigma1 is None else np.asarray(sqrt_sigma1, np.float64)
        if low2:
            b = np.asarray(centred2, np.float64) @ r1
            m = b @ b.T / max(len(b) - 1, 1)
        else:
            m = r1 @ np.asarray(sigma2, np.float64) @ r1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, sqrt_sigma1=None, centred2=None,
                     centred1=None) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 (>= 0).
    ``sqrt_sigma1`` / ``centred1`` / ``centred2``: optional shortcuts, see
    :func:`trace_sqrt_product`."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    tr = trace_sqrt_product(s1, s2, sqrt_sigma1, centred2, centred1)
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr
    return float(max(value, 0.0))


# =============================================================================================
# Statistics.
# =============================================================================================
class GaussianStats:
    """Streaming mean/covariance of feature batches, accumulated in float64 around a shift
    (the first batch's mean) so that large means do not cancel the covariance. While there
    are fewer samples than dimensions the samples are kept too (see :meth:`centred`)."""

    def __init__(self):
        self.count = 0
        self.shift = None
        self.sum = None
        self.outer = None
        self._samples = []

    def update(self, features) -> "GaussianStats":
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got {x.shape}")
        if len(x) == 0:
            return self
        if self.shift is None:
            self.shift = x.mean(0)
            self.sum = np.zeros_like(self.shift)
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        x = x - self.shift
        self.count += len(x)
        self.sum += x.sum(0)
        self.outer += x.T @ x
        if self._samples is not None:
            self._samples = self._samples + [x] if self.count < x.shape[1] else None
        return self

    def centred(self) -> Optional[np.ndarray]:
        """The samples minus their mean [n, D] when n < D (a low-rank covariance), else None."""
        if not self._samples:
            return None
        x = np.concatenate(self._samples)
        return x - x.mean(0)

    @property
    def mu(self) -> np.ndarray:
        return self.shift + self.sum / self.count

    @property
    def sigma(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.count}")
        m = self.sum / self.count
        return (self.outer - self.count * np.outer(m, m)) / (self.count - 1)


def statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of features [N, D] in float64 (unbiased covariance, as numpy.cov)."""
    s = GaussianStats().update(features)
    return s.mu, s.sigma


def fid_from_features(features1, features2) -> float:
    return frechet_distance(*statistics(features1), *statistics(features2))


class Reference:
    """Statistics of the real images: mu, sigma (float64), count, the key they were made
    under, and sigma^½ (computed once, on first use, and kept in the cache file). With fewer
    images than dimensions the centred features are kept instead (no square root needed)."""

    def __init__(self, mu, sigma, count: int, key: Optional[dict] = None, sqrt_sigma=None,
                 path: Optional[str] = None, centred=None):
        self.mu, self.sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        self.count, self.key, self.path = int(count), dict(key or {}), path
        self._sqrt = None if sqrt_sigma is None else np.asarray(sqrt_sigma, np.float64)
        self.centred = None if centred is None else np.asarray(centred, np.float64)

    @classmethod
    def from_stats(cls, stats: GaussianStats, key: Optional[dict] = None) -> "Reference":
        return cls(stats.mu, stats.sigma, stats.count, key, centred=stats.centred())

    @property
    def sqrt_sigma(self) -> np.ndarray:
        if self._sqrt is None:
            self._sqrt = sqrtm_psd(self.sigma)
            if self.path is not None:
                self.save(self.path)
        return self._sqrt

    def __iter__(self):                       # mu, sigma, count = reference
        return iter((self.mu, self.sigma, self.count))

    def fid_to_features(self, features) -> float:
        """FID of a feature set [N, D] against these statistics."""
        stats = GaussianStats().update(features)
        if self.centred is not None:
            return frechet_distance(self.mu, self.sigma, stats.mu, stats.sigma,
                                    centred1=self.centred, centred2=stats.centred())
        return frechet_distance(self.mu, self.sigma, stats.mu, stats.sigma,
                                sqrt_sigma1=self.sqrt_sigma, centred2=stats.centred())

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        extra = {} if self._sqrt is None else {"sqrt_sigma": self._sqrt}
        if self.centred is not None:
            extra["centred"] = self.centred
        np.savez(tmp, mu=self.mu, sigma=self.sigma, count=np.int64(self.count),
                 key=json.dumps(self.key, sort_keys=True), **extra)
        os.replace(tmp, path)
        self.path = path

    @classmethod
    def load(cls, path: str, key: Optional[dict] = None) -> Optional["Reference"]:
        """The statistics in ``path``; None if missing or made under another ``key``."""
        if not os.path.exists(path):
            return None
        with np.load(path) as z:
            stored = json.loads(str(z["key"]))
            if key is not None and stored != json.loads(json.dumps(key, sort_keys=True)):
                return None
            return cls(z["mu"], z["sigma"], int(z["count"]), stored,
                       z["sqrt_sigma"] if "sqrt_sigma" in z.files else None, path,
                       z["centred"] if "centred" in z.files else None)


# =============================================================================================
# Images → statistics.
# =============================================================================================
def center_crop_resize(image: np.ndarray, size: Optional[int]) -> np.ndarray:
    """ADM-style centre crop to a square and resize to ``size`` (PIL bicubic) of uint8 [H, W, 3]."""
    from PIL import Image

    if size is None:
        return image
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    pil = Image.fromarray(image)
    while min(pil.size) >= 2 * size:          # box-downsample first, as ADM does
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def list_images(folder: str) -> list:
    files = sorted(f for f in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return files


def iter_folder_images(folder: str, batch_size: int = 64, image_size: Optional[int] = None,
                       limit: Optional[int] = None) -> Iterable[np.ndarray]:
    """uint8 batches [B, S, S, 3] of the images under ``folder`` (sorted paths), centre-cropped
    and resized to ``image_size`` (None: images must already share one size)."""
    from PIL import Image

    files = list_images(folder)[:limit]
    for lo in range(0, len(files), batch_size):
        batch = []
        for f in files[lo:lo + batch_size]:
            with Image.open(f) as im:
                batch.append(center_crop_resize(np.asarray(im.convert("RGB")), image_size))
        yield np.stack(batch)


def _as_batches(images, batch_size: int):
    if isinstance(images, np.ndarray):
        for lo in range(0, len(images), batch_size):
            yield images[lo:lo + batch_size]
    else:
        yield from images


def image_features(images, extractor: Callable[[np.ndarray], np.ndarray], batch_size: int = 256):
    """Yields ``extractor`` features of uint8 images (an array or an iterable of batches)."""
    for batch in _as_batches(images, batch_size):
        yield np.asarray(extractor(np.asarray(batch)))


def image_stats(images, extractor: Callable[[np.ndarray], np.ndarray],
                batch_size: int = 256) -> GaussianStats:
    """Streaming statistics of ``extractor`` features of uint8 images (an array or an
    iterable of batches)."""
    stats = GaussianStats()
    for feats in image_features(images, extractor, batch_size):
        stats.update(feats)
    return stats


def image_statistics(images, extractor, batch_size: int = 256) -> Tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, count) of ``extractor`` features of uint8 images."""
    stats = image_stats(images, extractor, batch_size)
    return stats.mu, stats.sigma, stats.count


def reference_statistics(images_or_folder, extractor, cache_path: Optional[str] = None,
                         key: Optional[dict] = None, image_size: Optional[int] = None,
                         limit: Optional[int] = None, batch_size: int = 256) -> Reference:
    """Statistics of real images (an array, an iterable of batches, or a folder), cached at
    ``cache_path`` under ``key`` plus the extractor's fingerprint (recomputed when it differs)."""
    fingerprint = getattr(extractor, "fingerprint", None)
    full_key = dict(key or {}, inception=fingerprint, image_size=image_size, limit=limit)
    if isinstance(images_or_folder, str):
        full_key["folder"] = os.path.abspath(images_or_folder)
    if cache_path is not None:
        cached = Reference.load(cache_path, full_key)
        if cached is not None:
            return cached
    if isinstance(images_or_folder, str):
        images = iter_folder_images(images_or_folder, batch_size, image_size, limit)
    else:
        images = images_or_folder if limit is None else images_or_folder[:limit]
    ref = Reference.from_stats(image_stats(images, extractor, batch_size), key=full_key)
    if cache_path is not None:
        ref.save(cache_path)
    return ref


def fid_against(reference: Reference, images, extractor, batch_size: int = 256) -> float:
    """FID of uint8 images (array or batches) against a :class:`Reference` (or (mu, sigma))."""
    if not isinstance(reference, Reference):
        reference = Reference(reference[0], reference[1], 0)
    feats = list(image_features(images, extractor, batch_size))
    return reference.fid_to_features(np.concatenate(feats))
