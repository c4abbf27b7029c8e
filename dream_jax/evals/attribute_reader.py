"""Reads synthetic-world images (real or generated) back into attributes.

Pipeline for one uint8 [H, W, 3] image (NumPy only, no SciPy):

1. Background = per-channel median of the outer frame (1 px per 32 px of
   side). Foreground = pixels whose RGB distance to it exceeds
   max(``fg_threshold``, 4 × the pixel-noise std estimated on the border)
   (background gradients/noise of the world stay < ~15; every palette colour
   is >= 100 away from every background tone).
2. Connected components (4-connectivity; run-length union-find).
   Components smaller than ``min_area`` pixels (default max(4, 0.4 % of the
   image)) are ignored as noise.
3. Per component: colour = median of its "core" pixels (the half farthest
   from the background), classified as the nearest PALETTE colour.
   A soft coverage ``alpha`` (projection of pixel − background onto colour −
   background) is computed in the component's box (+1 px, other components
   excluded), so anti-aliased edges count fractionally.
4. Shape = the template (circle, square, triangle, cross — the world's own
   geometry, fitted to the alpha>0.5 bounding box) with the highest soft IoU
   with alpha. Position = centre of that box → thirds of the image.
   Size = small/large from the box half-extent (threshold 0.16·side).

Objects are returned sorted by area, largest first. ``match_flags`` /
``match_rate`` score generated images against the labels of their prompts.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from dream_jax.data.synthetic import (COLOURS, PALETTE, SHAPES, SIZES, position_bins,
                                      shape_sdf)

FG_THRESHOLD = 48.0
SIZE_THRESHOLD = 0.16   # half-extent / side separating small from large
_PALETTE_F = PALETTE.astype(np.float32)

MATCH_ATTRIBUTES = ("colour", "shape", "colour+shape", "main_colour", "main_shape", "size",
                    "position", "count", "relation", "both")
"""What ``match_flags`` can score, for each image against its labels:

* ``colour``: some detected object has the primary colour;
* ``shape``: some detected object has the primary shape;
* ``colour+shape``: one detected object has both;
* ``main_colour`` / ``main_shape``: the primary colour / shape is that of one of the
  ``num_objects`` LARGEST detected objects (the object(s) the prompt asks for), so stray
  blobs in a noisy generated image cannot make the match (``colour`` counts any blob);
* ``size``: an object with the primary colour+shape has the primary size;
* ``position``: an object with the primary colour+shape lies in the primary
  position bin (only examples with ``pos_clear`` == 1 are scored);
* ``count``: number of detected objects == ``num_objects``;
* ``relation``: (two-object prompts only) objects matching the colour+shape
  of object 0 and object 1 exist and their centres are in the labelled
  relation (dominant axis of the offset of their centres);
* ``both``: (two-object prompts only) objects for both colour+shape pairs exist.

Examples to which an attribute does not apply are excluded (``nan`` flags).
"""


# ----------------------------------------------------------------------------
# Connected components.
# ----------------------------------------------------------------------------

def label_components(mask: np.ndarray) -> tuple:
    """4-connected components of a bool [H, W] mask.

    Returns (labels int32 [H, W] with 0 = background and 1..n, n).
    """
    mask = np.asarray(mask, bool)
    H, W = mask.shape
    padded = np.zeros((H, W + 2), np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rs, ss = np.nonzero(d == 1)
    _, es = np.nonzero(d == -1)           # same row-major order as the starts
    n_runs = len(rs)
    labels = np.zeros((H, W), np.int32)
    if n_runs == 0:
        return labels, 0
    parent = list(range(n_runs))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rs_l, ss_l, es_l = rs.tolist(), ss.tolist(), es.tolist()
    # Runs of the previous row: [first, last) indices into the run list.
    prev_lo = prev_hi = 0
    cur_row = -1
    cur_lo = 0
    for k in range(n_runs):
        r = rs_l[k]
        if r != cur_row:
            if r == cur_row + 1:
                prev_lo, prev_hi = cur_lo, k
            else:
                prev_lo = prev_hi = k
            cur_row, cur_lo = r, k
        s, e = ss_l[k], es_l[k]
        for j in range(prev_lo, prev_hi):
            if ss_l[j] < e and s < es_l[j]:      # overlapping columns
                a, b = find(k), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    roots = np.array([find(k) for k in range(n_runs)])
    uniq, run_label = np.unique(roots, return_inverse=True)
    lengths = es - ss
    starts = rs * W + ss
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    flat = offsets + np.arange(lengths.sum())
    labels.reshape(-1)[flat] = np.repeat(run_label.astype(np.int32) + 1, lengths)
    return labels, len(uniq)


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------

def estimate_background(image: np.ndarray) -> np.ndarray:
    """Per-channel median of the outer frame of an [H, W, 3] image (float32)."""
    H, W = image.shape[:2]
    b = max(1, min(H, W) // 32)
    frame = np.concatenate([image[:b].reshape(-1, 3), image[-b:].reshape(-1, 3),
                            image[b:-b, :b].reshape(-1, 3), image[b:-b, -b:].reshape(-1, 3)])
    return np.median(frame.astype(np.float32), axis=0)


def estimate_noise(image: np.ndarray) -> float:
    """Robust per-channel pixel-noise std from neighbouring pixels of the top
    and bottom rows (differences cancel slow gradients)."""
    rows = np.concatenate([image[0], image[-1]]).astype(np.float32)       # [2W, 3]
    d = np.abs(np.diff(rows, axis=0))
    return float(np.median(d) / (0.6745 * np.sqrt(2.0)))


def _template_iou(alpha: np.ndarray, x0: int, y0: int, bx0: float, bx1: float,
                  by0: float, by1: float) -> np.ndarray:
    """Soft IoU of ``alpha`` (box at pixel offset x0, y0) with each shape
    fitted to the continuous box [bx0, bx1] x [by0, by1]."""
    hx, hy = max(0.5, (bx1 - bx0) / 2), max(0.5, (by1 - by0) / 2)
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    h = (hx + hy) / 2
    dx = ((np.arange(alpha.shape[1], dtype=np.float32) + x0 + 0.5 - cx) / hx)[None, :]
    dy = ((np.arange(alpha.shape[0], dtype=np.float32) + y0 + 0.5 - cy) / hy)[:, None]
    out = np.empty(len(SHAPES), np.float32)
    for s in range(len(SHAPES)):
        t = np.clip(shape_sdf(s, dx, dy, 1.0) * h + 0.5, 0.0, 1.0)
        out[s] = np.minimum(t, alpha).sum() / max(np.maximum(t, alpha).sum(), 1e-6)
    return out


def read_objects(image: np.ndarray, fg_threshold: float = FG_THRESHOLD,
                 min_area: Optional[int] = None) -> List[Dict[str, Any]]:
    """Objects of one uint8 [H, W, 3] image, largest first.

    Each object: ``colour``/``shape``/``size`` (ids) and ``*_name``, ``x``,
    ``y`` (box centre as a fraction of width/height), ``pos_x``/``pos_y``
    (thirds), ``area`` (pixels, soft), ``bbox`` (x0, y0, x1, y1 exclusive),
    ``half_extent`` (fraction of the side), ``colour_distance`` (RGB distance
    of the median colour to its palette colour), ``shape_score`` (IoU of the
    best template) and ``rgb`` (median colour). An image without objects
    gives ``[]``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected [H, W, 3], got {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    H, W = image.shape[:2]
    if min_area is None:
        min_area = max(4, int(0.004 * H * W))
    img = image.astype(np.float32)
    bg = estimate_background(image)
    diff = img - bg
    dist = np.sqrt((diff * diff).sum(-1))
    # Noisy (generated) images: keep the threshold 4 noise stds out, where a
    # 3-channel Gaussian exceeds it on ~0.1 % of the pixels.
    threshold = max(fg_threshold, 4.0 * estimate_noise(image))
    labels, n = label_components(dist > threshold)
    if n == 0:
        return []
    areas = np.bincount(labels.reshape(-1), minlength=n + 1)
    side = float(min(H, W))
    objects = []
    for k in np.flatnonzero(areas >= min_area):
        if k == 0:
            continue
        ys, xs = np.nonzero(labels == k)
        d = dist[ys, xs]
        core = d >= np.median(d)
        rgb = np.median(img[ys[core], xs[core]], axis=0)
        cdist = np.sqrt(((_PALETTE_F - rgb) ** 2).sum(-1))
        colour = int(np.argmin(cdist))
        # Soft coverage in the box + 1 px, other components masked out.
        y0, y1 = max(0, ys.min() - 1), min(H, ys.max() + 2)
        x0, x1 = max(0, xs.min() - 1), min(W, xs.max() + 2)
        v = rgb - bg
        vv = float((v * v).sum())
        if vv < 1e-6:
            continue
        alpha = np.clip((diff[y0:y1, x0:x1] @ v) / vv, 0.0, 1.0)
        lab_box = labels[y0:y1, x0:x1]
        alpha[(lab_box != 0) & (lab_box != k)] = 0.0
        on = alpha > 0.5
        if not on.any():
            continue
        rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
        by0, by1 = y0 + rows[0], y0 + rows[-1] + 1
        bx0, bx1 = x0 + cols[0], x0 + cols[-1] + 1
        ious = _template_iou(alpha, x0, y0, bx0, bx1, by0, by1)
        shape = int(np.argmax(ious))
        area = float(alpha.sum())
        # Centre of the box, not the centroid: the world's object centres are
        # box centres (a triangle's centroid lies h/3 below its centre).
        cx, cy = (bx0 + bx1) / 2.0, (by0 + by1) / 2.0
        px, _, _ = position_bins(cx, 0.0, float(W))
        _, py, _ = position_bins(0.0, cy, float(H))
        half = ((bx1 - bx0) / W + (by1 - by0) / H) / 4.0
        size = int(half >= SIZE_THRESHOLD)
        objects.append(dict(
            colour=colour, colour_name=COLOURS[colour], shape=shape, shape_name=SHAPES[shape],
            size=size, size_name=SIZES[size], x=cx / W, y=cy / H, pos_x=px, pos_y=py,
            area=area, bbox=(int(bx0), int(by0), int(bx1), int(by1)), half_extent=half,
            colour_distance=float(cdist[colour]), shape_score=float(ious[shape]),
            rgb=tuple(float(c) for c in rgb)))
    objects.sort(key=lambda o: -o["area"])
    return objects


def read_attributes(images: np.ndarray, **kwargs) -> Union[List[Dict[str, Any]],
                                                         List[List[Dict[str, Any]]]]:
    """``read_objects`` of one image [H, W, 3] (→ list of object dicts) or of
    each image of a batch [B, H, W, 3] (→ list, per image, of such lists)."""
    images = np.asarray(images)
    if images.ndim == 3:
        return read_objects(images, **kwargs)
    if images.ndim != 4:
        raise ValueError(f"expected [H, W, 3] or [B, H, W, 3], got {images.shape}")
    return [read_objects(im, **kwargs) for im in images]


# ----------------------------------------------------------------------------
# Matching against prompt labels.
# ----------------------------------------------------------------------------

def _label_rows(labels: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]], n: int):
    if isinstance(labels, Mapping):
        cols = {k: np.asarray(v).reshape(-1) for k, v in labels.items()}
        rows = [{k: int(c[i]) for k, c in cols.items()} for i in range(n)]
    else:
        rows = [{k: int(v) for k, v in lab.items()} for lab in labels]
    if len(rows) != n:
        raise ValueError(f"{n} images but {len(rows)} labels")
    return rows


def _find(objs, colour, shape):
    return [o for o in objs if o["colour"] == colour and o["shape"] == shape]


def _relation(a, b) -> int:
    """Relation of object a to b (index into RELATIONS) from the centres."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dx) >= abs(dy):
        return 0 if dx < 0 else 1
    return 2 if dy < 0 else 3


def _flag(objs: List[Dict[str, Any]], lab: Mapping[str, int], attribute: str) -> float:
    c, s = lab["colour"], lab["shape"]
    two = lab.get("num_objects", 1) == 2
    if attribute == "colour":
        return float(any(o["colour"] == c for o in objs))
    if attribute == "shape":
        return float(any(o["shape"] == s for o in objs))
    if attribute == "colour+shape":
        return float(bool(_find(objs, c, s)))
    if attribute in ("main_colour", "main_shape"):
        key, want = ("colour", c) if attribute == "main_colour" else ("shape", s)
        return float(any(o[key] == want for o in objs[: 2 if two else 1]))
    if attribute == "size":
        if lab.get("size", -1) < 0:
            return float("nan")
        return float(any(o["size"] == lab["size"] for o in _find(objs, c, s)))
    if attribute == "position":
        if not lab.get("pos_clear", 0) or lab.get("pos_x", -1) < 0:
            return float("nan")
        return float(any(o["pos_x"] == lab["pos_x"] and o["pos_y"] == lab["pos_y"]
                         for o in _find(objs, c, s)))
    if attribute == "count":
        return float(len(objs) == lab.get("num_objects", 1))
    if attribute in ("relation", "both"):
        if not two:
            return float("nan")
        a_list, b_list = _find(objs, c, s), _find(objs, lab["colour2"], lab["shape2"])
        if attribute == "both":
            return float(bool(a_list) and bool(b_list))
        return float(any(a is not b and _relation(a, b) == lab["relation"]
                         for a in a_list for b in b_list))
    raise ValueError(f"attribute must be one of {MATCH_ATTRIBUTES}, got {attribute!r}")


def match_flags(images: np.ndarray, labels, attribute: str = "colour",
                objects: Optional[List[List[Dict[str, Any]]]] = None, **kwargs) -> np.ndarray:
    """Per image 1.0 (match), 0.0 (no match) or nan (attribute not applicable);
    see MATCH_ATTRIBUTES. ``labels``: dict of arrays (a batch, e.g. from
    ``synthetic.collate_labels``) or a list of label dicts. ``objects``: reuse
    results of ``read_attributes`` (then ``images`` may be None)."""
    if attribute == "color":
        attribute = "colour"
    if attribute not in MATCH_ATTRIBUTES:
        raise ValueError(f"attribute must be one of {MATCH_ATTRIBUTES}, got {attribute!r}")
    if objects is None:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        objects = read_attributes(images, **kwargs)
    rows = _label_rows(labels, len(objects))
    return np.array([_flag(o, lab, attribute) for o, lab in zip(objects, rows)], np.float64)


def match_rate(images: np.ndarray, labels, attribute: str = "colour",
               objects: Optional[List[List[Dict[str, Any]]]] = None, **kwargs) -> float:
    """Fraction of (applicable) images matching their labels' ``attribute``
    (see MATCH_ATTRIBUTES); nan if it applies to none."""
    flags = match_flags(images, labels, attribute, objects=objects, **kwargs)
    flags = flags[~np.isnan(flags)]
    return float(flags.mean()) if flags.size else float("nan")


def match_rates(images: np.ndarray, labels, attributes: Sequence[str] = MATCH_ATTRIBUTES,
                **kwargs) -> Dict[str, float]:
    """``match_rate`` for several attributes, reading the images once."""
    images = np.asarray(images)
    objects = read_attributes(images if images.ndim == 4 else images[None], **kwargs)
    return {a: match_rate(None, labels, a, objects=objects) for a in attributes}
