"""The procedural "synthetic captioned world": the CPU default dataset.

Every example is generated on demand from ``(seed, split, index)``, so the
source is random access (it backs a grain ``MapDataset``) and any index is
reproducible on its own, on any host, in any order.

An image is a plain neutral background (black, dark grey, light grey or white,
with a faint linear gradient and a little pixel noise) carrying ONE (p = 0.6)
or TWO (p = 0.4) axis-aligned objects. Each object has

* a colour from :data:`COLOURS` (8 saturated, well separated colours; none is
  close to any background tone),
* a shape from :data:`SHAPES` (circle, square, upward triangle, plus-shaped
  cross), all of which fill a square box of half-extent ``h`` exactly,
* a size from :data:`SIZES` (small: ``h`` in [0.11, 0.13]·S, large:
  [0.19, 0.22]·S, S = image side),
* a centre (continuous); two objects are separated along one axis by a clear
  gap of 0.08·S, and the other-axis offset is at most 0.6× the main-axis one,
  so the spatial relation between them is unambiguous.

Object 0 is the *primary* object: the caption always names it first. The
caption is true for the image (colour, shape, size, relation, background and
position are only mentioned when they hold; position only when the centre is
clearly inside its third of the image).

Held-out split: a different random stream, and the (colour, shape) pairs in
:data:`HELDOUT_COMBOS` never occur (for any object) in ``train`` but make up
a fraction (default 25 %) of the primary objects of ``heldout``.

Labels (``example["labels"]``) are a flat dict of Python ints so that a batch
stacks into int arrays; see :data:`LABEL_KEYS`. Absent second object → -1.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

# ----------------------------------------------------------------------------
# Vocabulary of the world.
# ----------------------------------------------------------------------------

COLOURS: Tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan")
PALETTE = np.array(
    [
        (220, 30, 30),    # red
        (40, 175, 50),    # green
        (40, 70, 230),    # blue
        (240, 225, 40),   # yellow
        (140, 50, 200),   # purple
        (250, 130, 20),   # orange
        (245, 95, 180),   # pink
        (30, 205, 220),   # cyan
    ],
    dtype=np.uint8,
)
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: Tuple[str, ...] = ("small", "large")
# Relation of object 0 (primary) to object 1.
RELATIONS: Tuple[str, ...] = ("left of", "right of", "above", "below")
POS_X: Tuple[str, ...] = ("left", "centre", "right")
POS_Y: Tuple[str, ...] = ("top", "middle", "bottom")
BACKGROUNDS: Tuple[str, ...] = ("black", "dark grey", "light grey", "white")
BACKGROUND_TONES = np.array([14.0, 52.0, 182.0, 232.0], dtype=np.float32)
SPLITS: Tuple[str, ...] = ("train", "heldout")

# (colour id, shape id) pairs that never appear in the train split. Each colour
# and each shape occurs in exactly one pair, so every colour and every shape is
# still seen in training (with the other 3 shapes / 7 colours).
HELDOUT_COMBOS: Tuple[Tuple[int, int], ...] = (
    (COLOURS.index("purple"), SHAPES.index("triangle")),
    (COLOURS.index("cyan"), SHAPES.index("cross")),
    (COLOURS.index("orange"), SHAPES.index("circle")),
    (COLOURS.index("pink"), SHAPES.index("square")),
)
HELDOUT_COMBO_NAMES: Tuple[Tuple[str, str], ...] = tuple(
    (COLOURS[c], SHAPES[s]) for c, s in HELDOUT_COMBOS)
TRAIN_COMBOS: Tuple[Tuple[int, int], ...] = tuple(
    (c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))
    if (c, s) not in HELDOUT_COMBOS)
ALL_COMBOS: Tuple[Tuple[int, int], ...] = tuple(
    (c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES)))

# Geometry, as fractions of the image side S.
SMALL_H = (0.11, 0.13)
LARGE_H = (0.19, 0.22)
MARGIN = 0.02
GAP = 0.08
CROSS_ARM = 0.36       # half-width of the cross bars, as a fraction of h
MAX_OFF_AXIS = 0.6     # |off-axis offset| <= MAX_OFF_AXIS * |main-axis offset|
POS_CLEAR = 0.04       # a centre this close to a third-boundary is "unclear"
COLOUR_JITTER = 10.0   # +- per channel
NOISE_STD = 2.0
GRADIENT_MAX = 10.0
P_TWO_OBJECTS = 0.4
DEFAULT_LENGTHS = {"train": 1_000_000, "heldout": 2048}

# Words (the first is the canonical one and is chosen half of the time).
COLOUR_WORDS: Dict[str, Tuple[str, ...]] = {
    "red": ("red",), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",),
    "purple": ("purple", "violet"), "orange": ("orange",), "pink": ("pink",),
    "cyan": ("cyan", "turquoise"),
}
SHAPE_WORDS: Dict[str, Tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
}
SIZE_WORDS: Dict[str, Tuple[str, ...]] = {
    "small": ("small", "tiny", "little"),
    "large": ("large", "big"),
}
BACKGROUND_WORDS: Dict[str, Tuple[str, ...]] = {
    "black": ("black", "dark"),
    "dark grey": ("dark grey", "dark gray", "dark"),
    "light grey": ("light grey", "light gray", "light"),
    "white": ("white", "light"),
}
RELATION_WORDS: Dict[str, Tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above",),
    "below": ("below", "under", "beneath"),
}

# Caption templates. {np}/{np0}/{np1}: "a [size] colour shape" noun phrases,
# {bg}: background word, {pos}: position phrase, {rel}: relation phrase.
SINGLE_TEMPLATES: Tuple[str, ...] = (
    "{np}",                                    # 0
    "a photo of {np}",                         # 1
    "an image of {np}",                        # 2
    "there is {np}",                           # 3
    "{np} on a {bg} background",               # 4
    "a picture of {np} on a {bg} background",  # 5
    "{np} {pos}",                              # 6  (needs a clear position)
    "a photo of {np} {pos}",                   # 7  (needs a clear position)
    "{art} {size_}{shape_c}-shaped {colour} object",  # 8
    "{art} {size_}{colour} {shape_c} shape",   # 9
    "a simple drawing of {np}",                # 10
    "a single {size_}{colour} {shape}",        # 11
)
PAIR_TEMPLATES: Tuple[str, ...] = (
    "{np0} {rel} {np1}",                            # 12
    "a photo of {np0} {rel} {np1}",                 # 13
    "there is {np0} {rel} {np1}",                   # 14
    "{np0} {rel} {np1} on a {bg} background",       # 15
    "{np0} and {np1}",                              # 16
    "an image of {np0} {rel} {np1}",                # 17
    "two shapes: {np0} {rel} {np1}",                # 18
)
TEMPLATES: Tuple[str, ...] = SINGLE_TEMPLATES + PAIR_TEMPLATES
_POS_TEMPLATES = (6, 7)
_NUM_SINGLE = len(SINGLE_TEMPLATES)

LABEL_KEYS: Tuple[str, ...] = (
    "num_objects",
    "colour", "shape", "size", "pos_x", "pos_y", "center_x", "center_y",
    "colour2", "shape2", "size2", "pos_x2", "pos_y2", "center_x2", "center_y2",
    "relation", "background", "pos_clear", "heldout_combo", "template",
)
"""Keys of the flat label dict. ``center_*`` are in thousandths of the image
side (0..1000, x to the right, y downwards); ``pos_x``/``pos_y`` index
POS_X/POS_Y (thirds of the image); ``relation`` indexes RELATIONS (object 0
relative to object 1); ``pos_clear`` = 1 iff the primary centre lies at least
POS_CLEAR·S from both third-boundaries; ``heldout_combo`` = 1 iff the primary
(colour, shape) is in HELDOUT_COMBOS; ``template`` indexes TEMPLATES."""


# ----------------------------------------------------------------------------
# Geometry shared with the attribute reader.
# ----------------------------------------------------------------------------

def shape_sdf(shape: int, dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    """Signed distance (positive inside, in the units of dx/dy) of a shape of
    half-extent ``h`` centred at the origin; exact or a close approximation.

    All shapes have the bounding box [-h, h]²; y grows downwards and the
    triangle points up (apex at y = -h, base at y = +h).
    """
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == 0:    # circle
        return h - np.sqrt(dx * dx + dy * dy)
    if shape == 1:    # square
        return np.minimum(h - ax, h - ay)
    if shape == 2:    # triangle: base y <= h, edges dy >= 2|dx| - h
        return np.minimum(h - dy, (dy + h - 2.0 * ax) * (1.0 / math.sqrt(5.0)))
    if shape == 3:    # cross: union of two bars of half-width CROSS_ARM*h
        a = CROSS_ARM * h
        return np.maximum(np.minimum(h - ax, a - ay), np.minimum(a - ax, h - ay))
    raise ValueError(f"unknown shape id {shape}")


def coverage(shape: int, cx: float, cy: float, h: float, x0: int, x1: int,
             y0: int, y1: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of pixels [y0:y1, x0:x1] (pixel centres
    at integer + 0.5) by a shape centred at (cx, cy) with half-extent h."""
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
    return np.clip(shape_sdf(shape, dx, dy, h) + 0.5, 0.0, 1.0)


def position_bins(cx: float, cy: float, size: float) -> Tuple[int, int, bool]:
    """(pos_x, pos_y, clear) for a centre in pixels of a ``size``-px image."""
    fx, fy = cx / size, cy / size
    px, py = min(2, max(0, int(fx * 3))), min(2, max(0, int(fy * 3)))
    clear = all(min(abs(f - 1 / 3), abs(f - 2 / 3)) >= POS_CLEAR for f in (fx, fy))
    return px, py, clear


# ----------------------------------------------------------------------------
# Captions.
# ----------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(words: Sequence[str], u: float) -> str:
    """Canonical word with probability 1/2, otherwise a uniform synonym."""
    n = len(words)
    if n == 1 or u < 0.5:
        return words[0]
    return words[1 + min(n - 2, int((u - 0.5) * 2 * (n - 1)))]


def _position_phrase(px: int, py: int, u: float) -> str:
    if (px, py) == (1, 1):
        return ("in the centre", "in the center", "in the middle")[min(2, int(u * 3))]
    if py == 1:
        return "on the " + POS_X[px]
    if px == 1:
        return ("at the " if u < 0.5 else "near the ") + POS_Y[py]
    corner = f"{POS_Y[py]} {POS_X[px]}"
    return ("in the " + corner, "in the " + corner + " corner", "at the " + corner)[min(2, int(u * 3))]


def _noun_phrase(colour: int, shape: int, size: int, use_size: bool, nx) -> str:
    words = []
    if use_size:
        words.append(_pick(SIZE_WORDS[SIZES[size]], nx()))
    words.append(_pick(COLOUR_WORDS[COLOURS[colour]], nx()))
    words.append(_pick(SHAPE_WORDS[SHAPES[shape]], nx()))
    return _article(words[0]) + " " + " ".join(words)


def _caption(labels: Dict[str, int], nx) -> Tuple[str, int]:
    """A caption true for ``labels`` (only label ints are used) and its
    template id; ``nx()`` returns the next uniform in [0, 1)."""
    bg = labels.get("background", -1)
    if labels["num_objects"] == 1:
        allowed = [t for t in range(_NUM_SINGLE)
                   if (t not in _POS_TEMPLATES or labels.get("pos_clear", 0))
                   and ("{bg}" not in TEMPLATES[t] or bg >= 0)]
        t = allowed[min(len(allowed) - 1, int(nx() * len(allowed)))]
        c, s, z = labels["colour"], labels["shape"], labels.get("size", -1)
        use_size = nx() < 0.5 and z >= 0
        np_ = _noun_phrase(c, s, z, use_size, nx)
        size_ = (_pick(SIZE_WORDS[SIZES[z]], nx()) + " ") if use_size else ""
        colour_w = _pick(COLOUR_WORDS[COLOURS[c]], nx())
        first = size_ or colour_w
        fields = dict(
            np=np_, size_=size_, colour=colour_w, shape=_pick(SHAPE_WORDS[SHAPES[s]], nx()),
            shape_c=SHAPES[s], art=_article(first if t != 8 else (size_ or SHAPES[s])),
            bg=_pick(BACKGROUND_WORDS[BACKGROUNDS[bg]], nx()) if bg >= 0 else "",
            pos=_position_phrase(labels.get("pos_x", 1), labels.get("pos_y", 1), nx()),
        )
    else:
        allowed = [t for t in range(_NUM_SINGLE, len(TEMPLATES))
                   if ("{bg}" not in TEMPLATES[t] or bg >= 0)]
        t = allowed[min(len(allowed) - 1, int(nx() * len(allowed)))]
        fields = dict(
            np0=_noun_phrase(labels["colour"], labels["shape"], labels.get("size", -1),
                             nx() < 0.4 and labels.get("size", -1) >= 0, nx),
            np1=_noun_phrase(labels["colour2"], labels["shape2"], labels.get("size2", -1),
                             nx() < 0.4 and labels.get("size2", -1) >= 0, nx),
            rel=_pick(RELATION_WORDS[RELATIONS[labels["relation"]]], nx()),
            bg=_pick(BACKGROUND_WORDS[BACKGROUNDS[bg]], nx()) if bg >= 0 else "",
        )
    text = TEMPLATES[t].format(**fields)
    if nx() < 0.15:
        text += "."
    return text, t


def _uniforms(rng: np.random.Generator) -> Iterator[float]:
    while True:
        yield from rng.random(64).tolist()


def caption_for(labels: Dict[str, Any], seed: int = 0) -> str:
    """A random caption (seeded) that is true for a label dict.

    Needs ``colour``, ``shape`` and, for ``num_objects`` == 2 (default 1),
    ``colour2``, ``shape2``, ``relation``. ``size``/``size2``, ``background``
    and ``pos_x``/``pos_y``/``pos_clear`` are used when present and >= 0
    (absent → never mentioned). Useful to build
    text-to-image evaluation prompts for arbitrary attribute combinations.
    """
    lab = {k: int(v) for k, v in labels.items() if k in LABEL_KEYS}
    lab.setdefault("num_objects", 1)
    return _caption(lab, _uniforms(np.random.default_rng([int(seed), 0xCA9])).__next__)[0]


# ----------------------------------------------------------------------------
# The world.
# ----------------------------------------------------------------------------

class SyntheticWorld:
    """Random-access source of ``dict(image=uint8[S,S,3], caption=str, labels=dict)``.

    Args:
      image_size: side S of the square images (>= 16; geometry scales with S).
      split: ``"train"`` or ``"heldout"``.
      seed: world seed; (seed, split, index) fully determines an example.
      num_examples: ``len()`` of the source (default 1_000_000 train, 2048
        held-out). Indexes are valid in [0, num_examples).
      heldout_fraction: in the held-out split, the fraction of examples whose
        primary object uses a HELDOUT_COMBOS pair.
      p_two_objects: probability of a second object.
    """

    def __init__(self, image_size: int = 32, split: str = "train", seed: int = 0,
                 num_examples: Optional[int] = None, heldout_fraction: float = 0.25,
                 p_two_objects: float = P_TWO_OBJECTS):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if int(image_size) < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        self.image_size = int(image_size)
        self.split = split
        self.split_id = SPLITS.index(split)
        self.seed = int(seed)
        self.num_examples = int(DEFAULT_LENGTHS[split] if num_examples is None else num_examples)
        self.heldout_fraction = float(heldout_fraction)
        self.p_two_objects = float(p_two_objects)

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (f"SyntheticWorld(image_size={self.image_size}, split={self.split!r}, "
                f"seed={self.seed}, num_examples={self.num_examples})")

    # -- sampling -------------------------------------------------------------

    def _rng(self, index: int) -> np.random.Generator:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range [0, {self.num_examples})")
        return np.random.default_rng([self.seed, 0xD4EA, self.split_id, index])

    def _scene(self, nx) -> Tuple[Dict[str, int], Dict[str, Any]]:
        """Samples labels and render parameters (no pixels)."""
        S = float(self.image_size)
        two = nx() < self.p_two_objects
        n = 2 if two else 1
        # (colour, shape) pairs.
        if self.split_id == 1 and nx() < self.heldout_fraction:
            c0 = HELDOUT_COMBOS[min(len(HELDOUT_COMBOS) - 1, int(nx() * len(HELDOUT_COMBOS)))]
        else:
            c0 = TRAIN_COMBOS[min(len(TRAIN_COMBOS) - 1, int(nx() * len(TRAIN_COMBOS)))]
        combos = [c0]
        if two:
            others = [c for c in TRAIN_COMBOS if c != c0]
            combos.append(others[min(len(others) - 1, int(nx() * len(others)))])
        sizes = [int(nx() < 0.5) for _ in range(n)]
        hs = []
        for z in sizes:
            lo, hi = LARGE_H if z else SMALL_H
            hs.append(S * (lo + nx() * (hi - lo)))
        m = MARGIN * S
        if not two:
            h = hs[0]
            centres = [(m + h + nx() * (S - 2 * (m + h)), m + h + nx() * (S - 2 * (m + h)))]
            relation = -1
        else:
            relation = min(3, int(nx() * 4))
            h0, h1 = hs
            # Main axis: split the slack into before / between / after.
            slack = max(0.0, S - 2 * m - 2 * h0 - 2 * h1 - GAP * S)
            a, b = sorted((nx(), nx()))
            first_is_0 = relation in (0, 2)          # left of / above: obj0 first
            hf, hl = (h0, h1) if first_is_0 else (h1, h0)
            pf = m + slack * a + hf
            pl = pf + hf + GAP * S + slack * (b - a) + hl
            p0, p1 = (pf, pl) if first_is_0 else (pl, pf)
            d = abs(pl - pf)
            # Off axis: one centre uniform, the other within MAX_OFF_AXIS * d.
            order = nx() < 0.5
            ha, hb = (h0, h1) if order else (h1, h0)
            qa = m + ha + nx() * (S - 2 * (m + ha))
            lo = max(m + hb, qa - MAX_OFF_AXIS * d)
            hi = min(S - m - hb, qa + MAX_OFF_AXIS * d)
            qb = lo + nx() * max(0.0, hi - lo)
            q0, q1 = (qa, qb) if order else (qb, qa)
            if relation <= 1:
                centres = [(p0, q0), (p1, q1)]
            else:
                centres = [(q0, p0), (q1, p1)]
        bg = min(3, int(nx() * 4))
        px, py, clear = position_bins(centres[0][0], centres[0][1], S)
        labels = dict.fromkeys(LABEL_KEYS, -1)
        labels.update(
            num_objects=n, colour=c0[0], shape=c0[1], size=sizes[0], pos_x=px, pos_y=py,
            center_x=int(round(1000 * centres[0][0] / S)),
            center_y=int(round(1000 * centres[0][1] / S)),
            relation=relation, background=bg, pos_clear=int(clear),
            heldout_combo=int(c0 in HELDOUT_COMBOS),
        )
        if two:
            px2, py2, _ = position_bins(centres[1][0], centres[1][1], S)
            labels.update(
                colour2=combos[1][0], shape2=combos[1][1], size2=sizes[1], pos_x2=px2, pos_y2=py2,
                center_x2=int(round(1000 * centres[1][0] / S)),
                center_y2=int(round(1000 * centres[1][1] / S)))
        render = dict(
            bg_tone=float(BACKGROUND_TONES[bg]) + (nx() - 0.5) * 12.0,
            grad_amp=nx() * GRADIENT_MAX, grad_angle=nx() * 2 * math.pi,
            objects=[dict(shape=cs[1], h=h, cx=c[0], cy=c[1],
                          rgb=PALETTE[cs[0]].astype(np.float32)
                          + np.array([nx(), nx(), nx()], np.float32) * (2 * COLOUR_JITTER)
                          - COLOUR_JITTER)
                     for cs, h, c in zip(combos, hs, centres)],
        )
        return labels, render

    def _render(self, render: Dict[str, Any], rng: np.random.Generator) -> np.ndarray:
        S = self.image_size
        t = (np.arange(S, dtype=np.float32) + 0.5) / S - 0.5
        amp, ang = render["grad_amp"], render["grad_angle"]
        img = np.empty((S, S, 3), np.float32)
        img[...] = (render["bg_tone"] + amp * math.sin(ang) * t[:, None]
                    + amp * math.cos(ang) * t[None, :])[:, :, None]
        for ob in render["objects"]:
            cx, cy, h = ob["cx"], ob["cy"], ob["h"]
            x0, x1 = max(0, int(cx - h - 1)), min(S, int(math.ceil(cx + h + 1)))
            y0, y1 = max(0, int(cy - h - 1)), min(S, int(math.ceil(cy + h + 1)))
            a = coverage(ob["shape"], cx, cy, h, x0, x1, y0, y1)[:, :, None]
            patch = img[y0:y1, x0:x1]
            patch += a * (ob["rgb"] - patch)
        img += rng.standard_normal((S, S, 1), dtype=np.float32) * NOISE_STD
        np.clip(img, 0.0, 255.0, out=img)
        return np.rint(img).astype(np.uint8)

    # -- public ---------------------------------------------------------------

    def describe(self, index: int) -> Tuple[str, Dict[str, int]]:
        """(caption, labels) of example ``index`` without rendering the image;
        identical to ``self[index]["caption"]`` / ``["labels"]``."""
        rng = self._rng(index)
        nx = _uniforms(rng).__next__
        labels, _ = self._scene(nx)
        caption, labels["template"] = _caption(labels, nx)
        return caption, labels

    def __getitem__(self, index: int) -> Dict[str, Any]:
        rng = self._rng(index)
        stream = _uniforms(rng)
        nx = stream.__next__
        labels, render = self._scene(nx)
        caption, labels["template"] = _caption(labels, nx)
        image = self._render(render, rng)
        return dict(image=image, caption=caption, labels=labels)

    def captions(self, n: int, start: int = 0) -> Iterator[str]:
        """Captions of examples start..start+n-1 (cheap: no rendering)."""
        for i in range(start, start + n):
            yield self.describe(i)[0]


def sample_prompts(split: str = "heldout", n: int = 256, seed: int = 0, image_size: int = 32,
                   heldout_only: bool = False, num_examples: Optional[int] = None,
                   ) -> List[Tuple[str, Dict[str, int]]]:
    """(caption, labels) of the first ``n`` examples of a split, without images.

    These are exactly the captions/labels of ``SyntheticWorld(image_size, split,
    seed)[i]``, so generated images can be scored against labels
    (``evals.attribute_reader.match_rate``) and against the real images of the
    same indexes (FID). ``heldout_only`` keeps only examples whose primary
    object is a HELDOUT_COMBOS pair (compositional generalisation prompts).
    """
    world = SyntheticWorld(image_size, split, seed,
                           num_examples=num_examples if num_examples is not None else 2**62)
    out: List[Tuple[str, Dict[str, int]]] = []
    i = 0
    while len(out) < n:
        caption, labels = world.describe(i)
        if not heldout_only or labels["heldout_combo"]:
            out.append((caption, labels))
        i += 1
    return out


def collate_labels(labels: Sequence[Dict[str, int]]) -> Dict[str, np.ndarray]:
    """Stacks a list of label dicts into a dict of int32 arrays."""
    return {k: np.asarray([lab[k] for lab in labels], np.int32) for k in LABEL_KEYS}


# ----------------------------------------------------------------------------
# Zero-shot prompts.
# ----------------------------------------------------------------------------

_ZS_TEMPLATES = {
    "colour": ("a photo of {a} {w} object", "{a} {w} shape", "an image of {a} {w} object",
               "{a} {w} object on a plain background"),
    "shape": ("a photo of {a} {w}", "{a} {w}", "{a} {w} shape", "an image of {a} {w}"),
    "size": ("a photo of {a} {w} object", "{a} {w} shape", "{a} {w} object"),
    "background": ("an object on a {w} background", "a photo of a shape on a {w} background"),
}
_ZS_CLASSES = {
    "colour": (COLOURS, COLOUR_WORDS),
    "shape": (SHAPES, SHAPE_WORDS),
    "size": (SIZES, SIZE_WORDS),
    "background": (BACKGROUNDS, {b: (b,) for b in BACKGROUNDS}),
}
ZERO_SHOT_ATTRIBUTES: Tuple[str, ...] = tuple(_ZS_TEMPLATES)


def single_object(labels) -> np.ndarray:
    """Bool mask of the examples with one object. A two-object example's attribute labels name
    only its first object, so single-object examples give the unambiguous per-attribute score."""
    return np.asarray(labels["num_objects"]) == 1


def zero_shot_prompts(attribute: str, synonyms: bool = True) -> List[List[str]]:
    """Per class of ``attribute`` (colour, shape, size, background; class order
    as in COLOURS/SHAPES/SIZES/BACKGROUNDS) a list of prompt strings whose text
    embeddings are averaged into the class embedding; the label to compare with
    is ``labels[attribute]``. ``synonyms`` adds prompts with the synonyms.

    Example: ``zero_shot_prompts("colour")[0][0] == "a photo of a red object"``.
    """
    if attribute == "color":
        attribute = "colour"
    if attribute not in _ZS_TEMPLATES:
        raise ValueError(f"attribute must be one of {ZERO_SHOT_ATTRIBUTES}, got {attribute!r}")
    names, words = _ZS_CLASSES[attribute]
    out = []
    for name in names:
        ws = words[name] if synonyms else words[name][:1]
        out.append([tpl.format(a=_article(w), w=w) for w in ws for tpl in _ZS_TEMPLATES[attribute]])
    return out
