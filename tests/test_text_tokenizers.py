"""CLIP BPE (parity with open_clip on OpenAI's vocabulary), trained CLIP BPE, T5 sentencepiece."""
import gzip
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest

from dream_jax.data import fixtures, tokenizers

TEXTS = [
    "A photo of a CAT.", "", "   ", "  multiple   spaces\tand\nnewlines ", "&amp;lt;b&amp;gt; html entities",
    "Ünïcödé café naïve 東京の夜 🙂 Ελληνικά русский", "isn't it'll we've I'm you'd they're",
    "numbers 12345 and 3.14, prices $9.99!", "<start_of_text> injected <END_OF_TEXT> tokens",
    "x" * 300, "word " * 100, "schÃ¶n mojibake â€œquotedâ€\x9d", "emoji 👩‍👩‍👧 and flags 🇫🇷",
    "tabs\tand\u00a0nbsp\u2003em-space", "C++ / C# / .NET -- e-mail: someone@example.com",
    "CAPS LOCK SHOUTING", "hyphen-ated under_scored dotted.name", "'quotes' \"double\" `back`",
]


def _open_clip_reference():
    """open_clip's tokenizer module, loaded from its file: `import open_clip`
    itself needs torchvision, which the test environment must not have."""
    bpe = tokenizers.find_open_clip_bpe()
    if bpe is None:
        pytest.skip("open_clip_torch is not installed")
    pytest.importorskip("ftfy")
    pytest.importorskip("torch")
    path = os.path.join(os.path.dirname(bpe), "tokenizer.py")
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(bpe_path=bpe), bpe


def test_clip_bpe_matches_open_clip_on_openai_vocabulary():
    ref, bpe = _open_clip_reference()
    tok = tokenizers.CLIPTokenizer.load(bpe)
    assert tok.vocab_size == 49408 and (tok.sot_id, tok.eot_id, tok.pad_id) == (49406, 49407, 0)
    captions = TEXTS + [s.caption.decode() for s in fixtures.fixture_samples()
                        if s.caption is not None and s.ingest != "caption_not_utf8"]
    for length in (77, 8, 2):
        ours, cut = tok.encode_batch(captions, length, return_truncated=True)
        theirs = ref(captions, context_length=length).numpy()
        np.testing.assert_array_equal(ours, theirs)
        assert ours.dtype == np.int32
        assert (ours == tok.eot_id).any(axis=1).all()           # EOT kept on truncation
    assert cut.any() and not cut.all()
    for text in ("a photo of a cat .", "ünïcödé café 🙂"):
        ids = tok.encode(text)
        assert tok.encode(tok.decode(tok.encode_batch([text])[0])) == ids
        assert ref.decode(ids).strip() == tok.decode(tok.encode_batch([text])[0])
    # Picklable for grain workers; the same ids afterwards.
    again = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(again.encode_batch(TEXTS), tok.encode_batch(TEXTS))


def test_clip_bpe_from_hf_tokenizer_json(tmp_path):
    """A HF-style CLIP tokenizer.json (OpenAI's special-token names) gives the same ids."""
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("a", "t</w>")]
    tok = tokenizers.CLIPTokenizer.from_merges(merges)
    vocab = tokenizers.CLIPTokenizer.canonical_vocab(merges, ("<|startoftext|>", "<|endoftext|>"))
    spec = {"model": {"type": "BPE", "end_of_word_suffix": "</w>", "vocab": vocab,
                      "merges": [" ".join(m) for m in merges]},
            "added_tokens": [{"id": vocab["<|startoftext|>"], "content": "<|startoftext|>"},
                             {"id": vocab["<|endoftext|>"], "content": "<|endoftext|>"}]}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    hf = tokenizers.load_text_tokenizer(str(path))
    assert isinstance(hf, tokenizers.CLIPTokenizer)
    texts = ["The cat sat at the mat", "THE CAT!"]
    np.testing.assert_array_equal(hf.encode_batch(texts, 12), tok.encode_batch(texts, 12))
    assert hf.encode("the cat") == [vocab["the</w>"], vocab["cat</w>"]]
    assert hf.decode(hf.encode_batch(["the cat"])[0]) == "the cat"


def test_train_clip_bpe_cli_is_deterministic_and_loadable(tmp_path):
    captions = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "yellow")
                for s in ("circle", "square", "triangle") for b in ("white", "black", "striped")]
    (tmp_path / "caps.txt").write_text("\n".join(captions * 3) + "\n\n")
    outs = []
    for i in range(2):
        out = str(tmp_path / f"bpe{i}.txt.gz")
        assert tokenizers.main(["train", "--input", str(tmp_path / "*.txt"), "--output", out,
                                "--vocab-size", "600"]) == 0
        outs.append(out)
    raw = [gzip.open(o).read() for o in outs]
    assert raw[0] == raw[1] and raw[0].startswith(b"#version")
    assert open(outs[0], "rb").read() == open(outs[1], "rb").read()        # gzip mtime pinned too
    tok = tokenizers.load_text_tokenizer(outs[0])
    assert isinstance(tok, tokenizers.CLIPTokenizer) and tok.vocab_size <= 600
    ids = tok.encode("a red circle on a striped background")
    assert len(ids) == 7                                  # every word learned whole
    assert tok.decode(tok.encode_batch(["A Red circle"])[0]) == "a red circle"
    unseen = tok.encode("zebra 東京")                      # unseen text still encodes (byte fallback)
    assert len(unseen) > 2
    assert tokenizers.CLIPTokenizer.from_bpe_file(outs[0]).merges == tok.merges


def test_t5_sentencepiece_layout_truncation_and_pickle(tmp_path):
    import sentencepiece as spm
    captions = [s.caption.decode() for s in fixtures.fixture_samples()
                if s.caption is not None and s.ingest != "caption_not_utf8"] * 30
    path = str(tmp_path / "spiece.model")
    t5 = tokenizers.train_sentencepiece(captions, path, vocab_size=300)
    loaded = tokenizers.load_text_tokenizer(str(tmp_path))
    assert isinstance(loaded, tokenizers.T5Tokenizer)
    assert (loaded.pad_id, loaded.eos_id, loaded.sot_id) == (0, 1, None)
    sp = spm.SentencePieceProcessor(model_file=path)
    text = "A photo of a red car."
    ids = sp.encode(text)
    row = loaded.encode_batch([text], len(ids) + 3)[0]
    assert row.tolist() == ids + [1, 0, 0]
    cut, truncated = loaded.encode_batch([text, "x"], 4, return_truncated=True)
    assert cut[0].tolist() == ids[:3] + [1] and truncated.tolist() == [True, False]
    again = pickle.loads(pickle.dumps(loaded))
    np.testing.assert_array_equal(again.encode_batch(captions[:5], 16), t5.encode_batch(captions[:5], 16))
    assert loaded.decode(row) == text


def test_t5_tokenizer_matches_hf_t5(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    captions = [s.caption.decode() for s in fixtures.fixture_samples()
                if s.caption is not None and s.ingest != "caption_not_utf8"] * 30
    ours = tokenizers.train_sentencepiece(captions, str(tmp_path / "spiece.model"), vocab_size=300)
    hf = transformers.T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=0)
    texts = captions[:14] + ["x " * 50, "  Leading and trailing  ", "Café « naïve » 🙂"]
    for length in (32, 6):
        want = hf(texts, max_length=length, truncation=True, padding="max_length")["input_ids"]
        np.testing.assert_array_equal(ours.encode_batch(texts, length), np.asarray(want))


def test_make_text_tokenizers_from_config(tmp_path):
    import ml_collections
    merges = [("c", "a"), ("ca", "t</w>")]
    tokenizers.CLIPTokenizer.from_merges(merges).save(str(tmp_path / "m.txt.gz"))
    cfg = ml_collections.ConfigDict({"clip_tokenizer": str(tmp_path / "m.txt.gz"), "gen_tokenizer": "clip"})
    clip, gen = tokenizers.make_text_tokenizers(cfg)
    assert gen is clip and clip.encode("cat") == [clip.vocab_size - 3]
    with pytest.raises(ValueError, match="clip_tokenizer"):
        tokenizers.make_text_tokenizers(ml_collections.ConfigDict({"clip_tokenizer": ""}))
