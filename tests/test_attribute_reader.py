"""Attribute reader: reads synthetic-world images back into attributes."""
import numpy as np
import pytest

from dream_jax.data import synthetic as sw
from dream_jax.evals import attribute_reader as ar


def _examples(size, n_per_split):
    exs = []
    for split in sw.SPLITS:
        w = sw.SyntheticWorld(size, split)
        exs += [w[i] for i in range(n_per_split)]
    images = np.stack([e["image"] for e in exs])
    labels = [e["labels"] for e in exs]
    return images, labels


@pytest.fixture(scope="module")
def real32():
    return _examples(32, 300)      # 600 images, both splits


def _primary(objs, lab):
    """The detected object nearest to the labelled primary centre."""
    tx, ty = lab["center_x"] / 1000, lab["center_y"] / 1000
    return min(objs, key=lambda o: (o["x"] - tx) ** 2 + (o["y"] - ty) ** 2) if objs else None


def _accuracies(images, labels):
    objects = ar.read_attributes(images)
    hits = {k: [] for k in ("colour", "shape", "joint", "size", "position", "position_clear",
                            "count")}
    for objs, lab in zip(objects, labels):
        hits["count"].append(len(objs) == lab["num_objects"])
        o = _primary(objs, lab)
        if o is None:
            for k in ("colour", "shape", "joint", "size", "position"):
                hits[k].append(False)
            continue
        hits["colour"].append(o["colour"] == lab["colour"])
        hits["shape"].append(o["shape"] == lab["shape"])
        hits["joint"].append(o["colour"] == lab["colour"] and o["shape"] == lab["shape"])
        hits["size"].append(o["size"] == lab["size"])
        pos_ok = (o["pos_x"], o["pos_y"]) == (lab["pos_x"], lab["pos_y"])
        hits["position"].append(pos_ok)
        if lab["pos_clear"]:
            hits["position_clear"].append(pos_ok)
    return {k: float(np.mean(v)) for k, v in hits.items()}


def test_reader_accuracy_on_real_images(real32):
    images, labels = real32
    acc = _accuracies(images, labels)
    print("attribute reader, 600 real 32px images:",
          {k: round(v, 4) for k, v in acc.items()})
    assert acc["colour"] >= 0.95
    assert acc["shape"] >= 0.95
    assert acc["joint"] >= 0.95
    assert acc["count"] >= 0.95
    assert acc["size"] >= 0.95
    assert acc["position_clear"] >= 0.95       # centres far from a third-boundary
    assert acc["position"] >= 0.85


def test_reader_accuracy_other_sizes_and_noise(real32):
    images, labels = _examples(64, 40)
    acc = _accuracies(images, labels)
    assert acc["joint"] >= 0.95 and acc["count"] >= 0.95, acc
    # Generated images are imperfect: Gaussian pixel noise must not break it.
    images, labels = real32
    rng = np.random.default_rng(0)
    noisy = np.clip(images[:300] + rng.normal(0, 10, images[:300].shape), 0, 255)
    acc = _accuracies(np.rint(noisy).astype(np.uint8), labels[:300])
    print("noise std 10:", {k: round(v, 4) for k, v in acc.items()})
    assert acc["joint"] >= 0.95 and acc["count"] >= 0.9, acc


def test_reader_object_fields(real32):
    images, labels = real32
    objs = ar.read_attributes(images[0])
    assert isinstance(objs, list) and objs
    o = objs[0]
    for key in ("colour", "colour_name", "shape", "shape_name", "size", "x", "y", "pos_x",
                "pos_y", "area", "bbox", "colour_distance", "shape_score"):
        assert key in o
    assert o["colour_name"] == sw.COLOURS[o["colour"]]
    assert o["shape_name"] == sw.SHAPES[o["shape"]]
    assert 0 <= o["x"] <= 1 and 0 <= o["y"] <= 1
    # Batch input gives one list per image; float input is accepted.
    batch = ar.read_attributes(images[:3].astype(np.float32))
    assert len(batch) == 3 and batch[0][0]["colour"] == o["colour"]
    # Largest first.
    two = next(i for i, l in enumerate(labels) if l["num_objects"] == 2)
    areas = [ob["area"] for ob in ar.read_attributes(images[two])]
    assert len(areas) == 2 and areas[0] >= areas[1]


def test_reader_rejects_blank_and_specks():
    assert ar.read_attributes(np.zeros((32, 32, 3), np.uint8)) == []
    assert ar.read_attributes(np.full((2, 32, 32, 3), 200, np.uint8)) == [[], []]
    img = np.full((32, 32, 3), 20, np.uint8)
    img[10, 10] = (255, 0, 0)            # a 2-pixel speck: noise, not an object
    img[10, 11] = (255, 0, 0)
    assert ar.read_attributes(img) == []
    rng = np.random.default_rng(1)
    noise = np.clip(100 + rng.normal(0, 4, (32, 32, 3)), 0, 255).astype(np.uint8)
    assert ar.read_attributes(noise) == []
    with pytest.raises(ValueError):
        ar.read_attributes(np.zeros((32, 32), np.uint8))


def test_label_components_matches_flood_fill():
    rng = np.random.default_rng(0)

    def flood(mask):
        lab = np.zeros(mask.shape, int)
        n = 0
        for y, x in zip(*np.nonzero(mask)):
            if lab[y, x]:
                continue
            n += 1
            stack = [(y, x)]
            lab[y, x] = n
            while stack:
                a, b = stack.pop()
                for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= c < mask.shape[0] and 0 <= d < mask.shape[1] and mask[c, d] \
                            and not lab[c, d]:
                        lab[c, d] = n
                        stack.append((c, d))
        return lab, n

    for p in (0.3, 0.5, 0.6):
        mask = rng.random((23, 31)) < p
        got, n = ar.label_components(mask)
        want, m = flood(mask)
        assert n == m
        # Same partition (label ids may differ).
        pairs = set(zip(got[mask].tolist(), want[mask].tolist()))
        assert len(pairs) == n and ((got > 0) == mask).all()
    # A U shape joins only at the bottom row.
    u = np.zeros((5, 5), bool)
    u[:, 0] = u[:, 4] = u[4, :] = True
    assert ar.label_components(u)[1] == 1
    assert ar.label_components(np.zeros((4, 4), bool))[1] == 0


def test_match_rate(real32):
    images, labels = real32
    batch = sw.collate_labels(labels)
    rates = ar.match_rates(images, batch)
    print("match rates on real images:", {k: round(v, 4) for k, v in rates.items()})
    for k in ("colour", "shape", "colour+shape", "main_colour", "main_shape", "count", "relation", "both"):
        assert rates[k] >= 0.95, (k, rates)
    assert ar.match_rate(images, labels, "colour") == rates["colour"]   # list of dicts too
    # Wrong prompts must not match: single-object images, colour changed.
    single = batch["num_objects"] == 1
    wrong = {k: v[single].copy() for k, v in batch.items()}
    wrong["colour"] = (wrong["colour"] + 3) % len(sw.COLOURS)
    assert ar.match_rate(images[single], wrong, "colour") <= 0.02
    assert ar.match_rate(images[single], wrong, "colour+shape") <= 0.02
    assert ar.match_rate(images[single], wrong, "main_colour") <= 0.02
    assert ar.match_rate(images[single], wrong, "shape") >= 0.95          # shape unchanged
    wrong_shape = {k: v[single].copy() for k, v in batch.items()}
    wrong_shape["shape"] = (wrong_shape["shape"] + 1) % len(sw.SHAPES)
    assert ar.match_rate(images[single], wrong_shape, "shape") <= 0.05
    assert ar.match_rate(images[single], wrong_shape, "main_shape") <= 0.05
    # A stray speck of the prompt's colour matches `colour` but not `main_colour`.
    i = int(np.flatnonzero(single)[0])
    lab = {k: v[i] for k, v in batch.items()}
    other = (lab["colour"] + 1) % len(sw.COLOURS)
    speck = images[i].copy()
    box = ar.read_attributes(images[i:i + 1])[0][0]["bbox"]
    y = 0 if box[1] > 8 else 28                                   # a corner away from the object
    speck[y:y + 3, 0:3] = sw.PALETTE[lab["colour"]]
    recoloured = dict(lab, colour=other)
    assert ar.match_flags(speck, [lab], "colour")[0] == 1.0
    objs = ar.read_attributes(speck[None])[0]
    assert len(objs) == 2 and objs[0]["colour"] == lab["colour"]     # the real object is largest
    assert ar.match_flags(speck, [recoloured], "colour")[0] == 0.0
    speck[y:y + 3, 0:3] = sw.PALETTE[other]
    assert ar.match_flags(speck, [recoloured], "colour")[0] == 1.0     # any blob
    assert ar.match_flags(speck, [recoloured], "main_colour")[0] == 0.0  # not the object
    # Flipped relations on two-object images.
    pair = ~single
    flipped = {k: v[pair].copy() for k, v in batch.items()}
    flipped["relation"] = flipped["relation"] ^ 1          # left<->right, above<->below
    assert ar.match_rate(images[pair], flipped, "relation") <= 0.05
    assert ar.match_rate(images[pair], flipped, "both") >= 0.95
    # Not applicable → nan; blank images match nothing.
    assert np.isnan(ar.match_rate(images[single], {k: v[single] for k, v in batch.items()},
                                  "relation"))
    blank = np.zeros((4, 32, 32, 3), np.uint8)
    assert ar.match_rate(blank, labels[:4], "colour") == 0.0
    flags = ar.match_flags(blank, labels[:4], "colour+shape")
    assert flags.shape == (4,) and (flags == 0).all()
    with pytest.raises(ValueError):
        ar.match_rate(images[:2], labels[:2], "texture")
    with pytest.raises(ValueError):
        ar.match_rate(images[:3], labels[:2], "colour")
