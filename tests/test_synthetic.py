"""Synthetic captioned world + its caption tokenizer."""
import os
import re
import time

import numpy as np
import pytest

from dream_jax.data import synthetic as sw
from dream_jax.data import tokenizers as tk


# ----------------------------------------------------------------------------
# Helpers: find attribute words in a caption, in order.
# ----------------------------------------------------------------------------

def _word_index(table):
    """Regex matching any synonym, and synonym -> class id (longest first)."""
    names = list(table)
    pairs = sorted(((w, names.index(n)) for n in names for w in table[n]), key=lambda p: -len(p[0]))
    rx = re.compile(r"\b(" + "|".join(re.escape(w) for w, _ in pairs) + r")\b")
    return rx, dict(pairs)


COLOUR_RX, COLOUR_OF = _word_index(sw.COLOUR_WORDS)
SHAPE_RX, SHAPE_OF = _word_index(sw.SHAPE_WORDS)
SIZE_RX, SIZE_OF = _word_index(sw.SIZE_WORDS)


def _found(rx, table, caption):
    return [table[m.group(1)] for m in rx.finditer(caption)]


def check_caption_true(caption, lab):
    """Asserts that a caption's attribute words agree with the labels."""
    cap = caption.lower()
    colours = _found(COLOUR_RX, COLOUR_OF, cap)
    shapes = _found(SHAPE_RX, SHAPE_OF, cap)
    sizes = _found(SIZE_RX, SIZE_OF, cap)
    if lab["num_objects"] == 1:
        assert colours == [lab["colour"]], (caption, lab)
        assert shapes == [lab["shape"]], (caption, lab)
        assert all(z == lab["size"] for z in sizes), (caption, lab)
    else:
        assert colours == [lab["colour"], lab["colour2"]], (caption, lab)
        assert shapes == [lab["shape"], lab["shape2"]], (caption, lab)
        # A size word belongs to the noun phrase it precedes.
        first_np_end = SHAPE_RX.search(cap).end()
        for m in SIZE_RX.finditer(cap):
            want = lab["size"] if m.start() < first_np_end else lab["size2"]
            assert SIZE_OF[m.group(1)] == want, (caption, lab)
        if sw.TEMPLATES[lab["template"]] != "{np0} and {np1}":
            rel_words = sw.RELATION_WORDS[sw.RELATIONS[lab["relation"]]]
            assert any(f" {w} " in cap for w in rel_words), (caption, lab)
            others = [w for r, ws in sw.RELATION_WORDS.items()
                      if r != sw.RELATIONS[lab["relation"]] for w in ws]
            assert not any(f" {w} a" in cap for w in others), (caption, lab)
    if "background" in cap:
        bg_words = sw.BACKGROUND_WORDS[sw.BACKGROUNDS[lab["background"]]]
        assert any(f" {w} background" in cap for w in bg_words), (caption, lab)
    if lab["num_objects"] == 1 and lab["template"] in (6, 7):
        assert lab["pos_clear"] == 1
        px, py = lab["pos_x"], lab["pos_y"]
        if px != 1:
            assert sw.POS_X[px] in cap, (caption, lab)
        if py != 1:
            assert sw.POS_Y[py] in cap, (caption, lab)
        if (px, py) == (1, 1):
            assert any(w in cap for w in ("centre", "center", "middle")), (caption, lab)
        for w in ("left", "right", "top", "bottom"):
            if w in cap:
                assert w in (sw.POS_X[px], sw.POS_Y[py]), (caption, lab)


def check_geometry(lab):
    """Labels agree with the stored centres."""
    S = 1000.0
    for sfx in ("", "2"):
        if lab["colour" + sfx] < 0:
            continue
        cx, cy = lab["center_x" + sfx], lab["center_y" + sfx]
        # Centres are rounded to 1/1000: allow the bins of cx +- 1.
        ok_x = {sw.position_bins(cx + d, 0, S)[0] for d in (-1, 0, 1)}
        ok_y = {sw.position_bins(0, cy + d, S)[1] for d in (-1, 0, 1)}
        assert lab["pos_x" + sfx] in ok_x and lab["pos_y" + sfx] in ok_y, lab
    if lab["num_objects"] == 2:
        dx = lab["center_x"] - lab["center_x2"]
        dy = lab["center_y"] - lab["center_y2"]
        rel = lab["relation"]
        main, off = (dx, dy) if rel <= 1 else (dy, dx)
        assert abs(off) <= sw.MAX_OFF_AXIS * abs(main) + 2
        assert (main < 0) == (rel in (0, 2))
        # Non-overlap: centres at least two small half-extents + gap apart.
        assert abs(main) >= 1000 * (2 * sw.SMALL_H[0] + sw.GAP) - 2


# ----------------------------------------------------------------------------
# The world.
# ----------------------------------------------------------------------------

def test_determinism_and_random_access():
    a = sw.SyntheticWorld(32, "train", seed=0)
    b = sw.SyntheticWorld(32, "train", seed=0)
    for i in (0, 7, 123_456, len(a) - 1):
        x, y = a[i], b[np.int64(i)]
        assert x["image"].tobytes() == y["image"].tobytes()
        assert x["caption"] == y["caption"] and x["labels"] == y["labels"]
    # Access order does not matter.
    first = [a[i]["image"].tobytes() for i in (5, 3, 9)]
    assert first == [sw.SyntheticWorld(32)[i]["image"].tobytes() for i in (5, 3, 9)]
    h = sw.SyntheticWorld(32, "heldout", seed=0)
    s1 = sw.SyntheticWorld(32, "train", seed=1)
    same_split = sum(a[i]["image"].tobytes() == h[i]["image"].tobytes() for i in range(20))
    same_seed = sum(a[i]["image"].tobytes() == s1[i]["image"].tobytes() for i in range(20))
    same_index = sum(a[i]["image"].tobytes() == a[i + 1]["image"].tobytes() for i in range(20))
    assert same_split == same_seed == same_index == 0
    assert len(a) == 1_000_000 and len(h) == 2048 and len(sw.SyntheticWorld(num_examples=10)) == 10
    with pytest.raises(IndexError):
        sw.SyntheticWorld(num_examples=10)[10]
    with pytest.raises(ValueError):
        sw.SyntheticWorld(split="test")


@pytest.mark.parametrize("size", [16, 32, 64, 256])
def test_shapes_dtypes_and_resolution_independent_scene(size):
    w, ref = sw.SyntheticWorld(size), sw.SyntheticWorld(32)
    for i in range(4 if size == 256 else 20):
        ex = w[i]
        assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
        assert isinstance(ex["caption"], str) and ex["caption"]
        assert tuple(ex["labels"]) == sw.LABEL_KEYS
        assert all(type(v) is int for v in ex["labels"].values())
        # The scene (caption, labels) does not depend on the resolution.
        assert (ex["caption"], ex["labels"]) == (ref[i]["caption"], ref[i]["labels"])
        assert w.describe(i) == (ex["caption"], ex["labels"])
        # Not blank: objects are there.
        assert ex["image"].std() > 10


def test_images_show_the_labelled_colours():
    """The pixel at the primary centre has (about) the primary colour, except
    for crosses/triangles whose centre is also inside; all shapes cover it."""
    w = sw.SyntheticWorld(64)
    for i in range(50):
        ex = w[i]
        lab = ex["labels"]
        x = int(lab["center_x"] * 64 / 1000)
        y = int(lab["center_y"] * 64 / 1000)
        pix = ex["image"][y, x].astype(float)
        assert np.abs(pix - sw.PALETTE[lab["colour"]]).max() < 30, (i, pix, lab)


def test_captions_are_true_and_labels_consistent():
    for split in sw.SPLITS:
        w = sw.SyntheticWorld(32, split)
        for i in range(1500):
            caption, lab = w.describe(i)
            check_caption_true(caption, lab)
            check_geometry(lab)
            if lab["num_objects"] == 1:
                assert lab["colour2"] == lab["shape2"] == lab["relation"] == -1
            else:
                assert (lab["colour"], lab["shape"]) != (lab["colour2"], lab["shape2"])


def test_two_objects_fraction_and_balance():
    labs = [sw.SyntheticWorld(32).describe(i)[1] for i in range(3000)]
    two = np.mean([l["num_objects"] == 2 for l in labs])
    assert 0.35 < two < 0.45
    for key, n in (("colour", 8), ("shape", 4), ("size", 2), ("background", 4)):
        counts = np.bincount([l[key] for l in labs], minlength=n)
        assert counts.min() > 0.6 * len(labs) / n, (key, counts)
    rel = np.bincount([l["relation"] for l in labs if l["relation"] >= 0], minlength=4)
    assert rel.min() > 0.15 * rel.sum()


def test_heldout_combos():
    held = set(sw.HELDOUT_COMBOS)
    assert len(held) == 4
    assert {c for c, _ in held} | {s for _, s in held}  # well formed
    train = sw.SyntheticWorld(32, "train")
    for i in range(6000):
        lab = train.describe(i)[1]
        assert (lab["colour"], lab["shape"]) not in held
        assert (lab["colour2"], lab["shape2"]) not in held
        assert lab["heldout_combo"] == 0
    hw = sw.SyntheticWorld(32, "heldout")
    labs = [hw.describe(i)[1] for i in range(len(hw))]
    prim = [(l["colour"], l["shape"]) for l in labs]
    flagged = np.array([l["heldout_combo"] for l in labs])
    assert flagged.tolist() == [int(p in held) for p in prim]
    assert 0.2 < flagged.mean() < 0.3
    assert {p for p in prim if p in held} == held
    assert not any((l["colour2"], l["shape2"]) in held for l in labs)
    # Every colour and every shape still occurs in train (with other partners).
    train_labs = [train.describe(i)[1] for i in range(500)]
    assert {l["colour"] for l in train_labs} == set(range(8))
    assert {l["shape"] for l in train_labs} == set(range(4))


def test_caption_variety():
    w = sw.SyntheticWorld(32)
    described = [w.describe(i) for i in range(1000)]
    templates = {lab["template"] for _, lab in described}
    captions = {c for c, _ in described}
    assert len(templates) >= 16, templates
    assert len(captions) >= 600
    text = " ".join(captions)
    for word in ("violet", "box", "plus sign", "big", "tiny", "beneath", "to the left of",
                 "background", "turquoise", "disc"):
        assert word in text, word


def test_sample_prompts_caption_for_and_zero_shot():
    prompts = sw.sample_prompts("heldout", 20, seed=0)
    hw = sw.SyntheticWorld(32, "heldout")
    for i, (cap, lab) in enumerate(prompts):
        ex = hw[i]
        assert (cap, lab) == (ex["caption"], ex["labels"])
    hp = sw.sample_prompts("heldout", 30, heldout_only=True)
    assert len(hp) == 30 and all(l["heldout_combo"] == 1 for _, l in hp)
    assert all(check_caption_true(c, l) is None for c, l in hp)
    batch = sw.collate_labels([l for _, l in hp])
    assert batch["colour"].shape == (30,) and batch["colour"].dtype == np.int32
    # caption_for: any attribute combination, size optional.
    cap = sw.caption_for(dict(colour=4, shape=2))
    assert _found(COLOUR_RX, COLOUR_OF, cap) == [4] and _found(SHAPE_RX, SHAPE_OF, cap) == [2]
    assert not _found(SIZE_RX, SIZE_OF, cap)
    two = dict(num_objects=2, colour=0, shape=1, colour2=2, shape2=3, relation=2)
    for seed in range(20):
        lab = dict(two, template=-1)
        cap = sw.caption_for(two, seed=seed)
        assert _found(COLOUR_RX, COLOUR_OF, cap) == [0, 2], cap
        assert _found(SHAPE_RX, SHAPE_OF, cap) == [1, 3], cap
        assert "above" in cap or " and " in cap, cap
    for attr, n in (("colour", 8), ("shape", 4), ("size", 2), ("background", 4)):
        zs = sw.zero_shot_prompts(attr)
        assert len(zs) == n and all(len(p) >= 2 for p in zs)
        assert len({tuple(p) for p in zs}) == n
    assert sw.zero_shot_prompts("colour")[0][0] == "a photo of a red object"
    assert "an orange shape" in sw.zero_shot_prompts("colour")[5]
    with pytest.raises(ValueError):
        sw.zero_shot_prompts("texture")


def test_generation_speed_32px():
    w = sw.SyntheticWorld(32)
    w[0]
    n = 500
    t = time.perf_counter()
    for i in range(n):
        w[i]
    per = (time.perf_counter() - t) / n
    print(f"synthetic world: {per * 1e3:.3f} ms per 32px image")
    assert per < 2e-3      # ~0.09 ms measured alone; loose for a shared machine


# ----------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    captions = list(sw.SyntheticWorld(32).captions(4000))
    return tk.train_caption_bpe(captions, vocab_size=512)


def test_tokenizer_round_trip_and_layout(tokenizer):
    tok = tokenizer
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= 512
    caps = [sw.SyntheticWorld(32, "heldout").describe(i)[0] for i in range(200)]
    caps += ["A Photo of a RED Circle", "a purple thing never seen: zebra!"]
    ids, cut = tok.encode_batch(caps, 77, return_truncated=True)
    assert ids.shape == (len(caps), 77) and ids.dtype == np.int32 and not cut.any()
    assert (ids[:, 0] == tok.sot_id).all()
    for row, cap in zip(ids, caps):
        n = len(tok.encode(cap))
        assert row[n + 1] == tok.eot_id and (row[n + 2:] == tok.pad_id).all()
        assert (row[1:n + 1] > 2).all()
        assert tok.decode(row) == cap.lower()
    assert (tk.eot_positions(ids, tok.eot_id) == (ids != 0).sum(1) - 1).all()
    # Known words of the world are single tokens or near (BPE has merged them).
    assert len(tok.encode("a red circle")) == 3
    assert tok.decode_batch(ids[:2]) == [caps[0].lower(), caps[1].lower()]
    assert tok.encode_batch([], 8).shape == (0, 8)


def test_tokenizer_truncation_keeps_eot(tokenizer):
    tok = tokenizer
    long = "a red circle to the left of a blue square " * 10
    short = "a red circle"
    ids, cut = tok.encode_batch([long, short], 8, return_truncated=True)
    assert cut.tolist() == [True, False]
    assert ids[0, -1] == tok.eot_id and ids[0, 0] == tok.sot_id
    assert (ids[0] == tok.eot_id).sum() == 1 and (ids[0] != tok.pad_id).all()
    assert tok.decode(ids[0]) == tok.decode([tok.sot_id] + tok.encode(long)[:6])
    assert tk.eot_positions(ids, tok.eot_id).tolist() == [7, 4]
    exact = tok.encode_batch([short], 5)            # 3 content tokens fit exactly
    assert exact[0].tolist() == [tok.sot_id] + tok.encode(short) + [tok.eot_id]
    with pytest.raises(ValueError):
        tok.encode_batch([short], 1)


def test_tokenizer_save_load_and_get_or_train(tokenizer, tmp_path):
    path = tokenizer.save(str(tmp_path / "tok.json"))
    loaded = tk.TextTokenizer.load(path)
    assert loaded == tokenizer and loaded.vocab_size == tokenizer.vocab_size
    caps = ["a tiny violet plus sign beneath a big cyan disc.", "there is a box"]
    assert (loaded.encode_batch(caps, 16) == tokenizer.encode_batch(caps, 16)).all()
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]   # no temp leftovers

    workdir = str(tmp_path / "work")
    world = sw.SyntheticWorld(32)
    t = time.perf_counter()
    first = tk.get_or_train_synthetic_tokenizer(workdir, world, vocab_size=400, num_captions=3000)
    print(f"caption BPE: trained in {time.perf_counter() - t:.2f} s (3000 captions)")
    fpath = os.path.join(workdir, tk.TOKENIZER_FILENAME)
    assert os.path.exists(fpath) and os.listdir(workdir) == [tk.TOKENIZER_FILENAME]
    assert first.vocab_size <= 400
    # Second call loads the file (a different world/vocab would train differently).
    mtime = os.stat(fpath).st_mtime_ns
    again = tk.get_or_train_synthetic_tokenizer(workdir, sw.SyntheticWorld(32, seed=5),
                                                vocab_size=300, num_captions=100)
    assert again == first and os.stat(fpath).st_mtime_ns == mtime
    # Training is deterministic.
    assert tk.train_caption_bpe(list(world.captions(3000)), 400) == first
