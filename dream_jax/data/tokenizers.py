"""Text tokenizers.

Synthetic-world part: a small byte-level BPE (HF ``tokenizers``) trained
offline, in about a second, on captions of the synthetic world, wrapped in
:class:`TextTokenizer`, which produces fixed-length CLIP-style token arrays.

Token layout of ``TextTokenizer.encode_batch(texts, L)`` (int32 [B, L])::

    [SOT, t_1, ..., t_n, EOT, PAD, ..., PAD]      (PAD id is 0)

Captions longer than L - 2 tokens are truncated *in their content*; the EOT
is always present (at position L - 1 then). The CLIP text tower pools the
feature at the FIRST EOT, i.e. ``argmax(tokens == eot_id, axis=-1)``
(:func:`eot_positions`; this is what ``models.text.eot_positions`` does). Note
that OpenAI CLIP uses ``argmax(tokens)`` because its EOT has the largest id;
ours does not, so that shortcut must NOT be used with this tokenizer.

Text is lower-cased (NFKC + lower-case normaliser), so ``decode(encode(x)) ==
x.lower()`` for ASCII text with single spaces and no leading/trailing spaces.
Any text can be encoded (byte-level: no unknown token), even words never seen
in training (they split into more pieces).

Real-data tokenizers share the same interface (``encode`` / ``encode_batch(texts,
L, return_truncated=False)`` / ``decode`` / ``vocab_size`` / ``pad_id`` /
``eot_id`` / ``sot_id``):

* :class:`CLIPTokenizer` — OpenAI CLIP's BPE exactly as open_clip runs it
  (``open_clip.tokenizer.SimpleTokenizer``, clean='lower'): ftfy + double HTML
  unescape + whitespace collapse + lower case, the CLIP regex pre-split, byte
  to unicode mapping, ``</w>`` end-of-word BPE; ``[SOT, ..., EOT, 0...]`` with
  the EOT kept on truncation (same layout as above; PAD id 0 as in open_clip).
  Loaded from OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (49,408 ids, SOT 49406,
  EOT 49407; the file ships inside the open_clip_torch wheel: pass
  ``"open_clip"``), from a HF CLIP ``tokenizer.json``, or trained on captions::

      python -m dream_jax.data.tokenizers train --input 'captions/*.txt' \
          --output clip_bpe.txt.gz --vocab-size 16384

  (inputs: text files with one caption per line, ``.array_record`` shards or
  an ingest output directory). ftfy is needed for exact parity; without it
  the fix_text step is skipped (with a warning).
* :class:`T5Tokenizer` — sentencepiece from a local ``spiece.model`` (T5:
  PAD 0, EOS 1, no SOT): ``[t_1, ..., t_n, EOS, PAD...]``, EOS kept on
  truncation; ids equal HF ``T5Tokenizer(extra_ids=0)``.

:func:`load_text_tokenizer` picks the class from a path;
:func:`make_text_tokenizers` builds (clip, generation) tokenizers from
``data.clip_tokenizer`` / ``data.gen_tokenizer``.
"""

from __future__ import annotations

import functools
import glob as globlib
import gzip
import html
import importlib.util
import json
import os
import sys
import tempfile
import warnings
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

PAD_TOKEN = "<pad>"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, SOT_TOKEN, EOT_TOKEN)   # ids 0, 1, 2
TOKENIZER_FILENAME = "tokenizer.json"
DEFAULT_SYNTHETIC_VOCAB = 512
DEFAULT_NUM_TRAIN_CAPTIONS = 20_000


def eot_positions(tokens: np.ndarray, eot_id: int) -> np.ndarray:
    """Index of the first EOT in each row of ``tokens`` [..., L] (the CLIP
    pooling position). Works with NumPy and jax.numpy arrays."""
    return (tokens == eot_id).argmax(axis=-1)


def _atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_tokenizer_", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class TextTokenizer:
    """Fixed-length tokenizer around a HF ``tokenizers.Tokenizer`` whose
    vocabulary contains PAD (id 0), SOT and EOT special tokens."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise ValueError(f"tokenizer lacks one of the special tokens {SPECIAL_TOKENS}")
        self.pad_id, self.sot_id, self.eot_id = ids
        if self.pad_id != 0:
            raise ValueError(f"pad token must have id 0, has {self.pad_id}")

    # -- properties -----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the id space (use it for the embedding table)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def hf_tokenizer(self):
        return self._tok

    # -- encode / decode ------------------------------------------------------

    def encode(self, text: str) -> List[int]:
        """Content ids of one text, without SOT/EOT."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], context_length: int = 77,
                     return_truncated: bool = False
                     ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """int32 [B, context_length] = [SOT, content..., EOT, PAD...].

        Content longer than ``context_length - 2`` is cut; EOT is kept. With
        ``return_truncated`` also returns a bool [B] array (True = cut), so
        that callers can warn.
        """
        if context_length < 2:
            raise ValueError("context_length must be >= 2 (SOT and EOT)")
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not a string")
        texts = [str(t) for t in texts]
        encs = self._tok.encode_batch(texts, add_special_tokens=False) if texts else []
        out = np.full((len(texts), context_length), self.pad_id, np.int32)
        truncated = np.zeros((len(texts),), bool)
        room = context_length - 2
        for i, enc in enumerate(encs):
            ids = enc.ids
            if len(ids) > room:
                ids = ids[:room]
                truncated[i] = True
            n = len(ids)
            out[i, 0] = self.sot_id
            out[i, 1:1 + n] = ids
            out[i, 1 + n] = self.eot_id
        if return_truncated:
            return out, truncated
        return out

    def __call__(self, texts: Sequence[str], context_length: int = 77) -> np.ndarray:
        return self.encode_batch(texts, context_length)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of one id sequence: stops at the first EOT, drops SOT/PAD."""
        content = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self.eot_id:
                break
            if i not in (self.sot_id, self.pad_id):
                content.append(int(i))
        return self._tok.decode(content, skip_special_tokens=True).strip()

    def decode_batch(self, tokens: np.ndarray) -> List[str]:
        return [self.decode(row) for row in np.asarray(tokens)]

    # -- persistence ----------------------------------------------------------

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, path: str) -> str:
        """Writes tokenizer.json to ``path`` (a file path, or a directory in
        which ``tokenizer.json`` is written) atomically; returns the file path."""
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILENAME)
        _atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str) -> "TextTokenizer":
        from tokenizers import Tokenizer
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILENAME)
        return cls(Tokenizer.from_file(path))

    @classmethod
    def from_json(cls, text: str) -> "TextTokenizer":
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_str(text))

    def __eq__(self, other) -> bool:
        return isinstance(other, TextTokenizer) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, sot={self.sot_id}, eot={self.eot_id})"


def train_caption_bpe(captions: Iterable[str], vocab_size: int = DEFAULT_SYNTHETIC_VOCAB,
                      path: Optional[str] = None, min_frequency: int = 2) -> TextTokenizer:
    """Trains a lower-casing byte-level BPE on ``captions`` (offline, seconds).

    The result has PAD=0, SOT=1, EOT=2, the 256 byte symbols, and merges up to
    ``vocab_size`` ids in total (fewer if the corpus has no more pairs worth
    merging: read the true size from ``.vocab_size``). Saved to ``path``
    (atomically) when given. Deterministic for a given caption list.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size), min_frequency=int(min_frequency),
        special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer=trainer)
    out = TextTokenizer(tok)
    if path is not None:
        out.save(path)
    return out


def get_or_train_synthetic_tokenizer(workdir: str, world=None,
                                     vocab_size: int = DEFAULT_SYNTHETIC_VOCAB,
                                     num_captions: int = DEFAULT_NUM_TRAIN_CAPTIONS
                                     ) -> TextTokenizer:
    """Loads ``workdir/tokenizer.json`` if present, else trains a caption BPE
    on the first ``num_captions`` captions of ``world`` (default: the train
    split of ``SyntheticWorld()``) and saves it there atomically.

    Captions do not depend on the image size, so the same tokenizer serves
    every resolution. Training is deterministic, so hosts racing to create
    the file write identical content (the final ``os.replace`` is atomic).
    ``workdir`` must be a local/POSIX path.
    """
    path = os.path.join(workdir, TOKENIZER_FILENAME)
    if os.path.exists(path):
        return TextTokenizer.load(path)
    if world is None:
        from dream_jax.data.synthetic import SyntheticWorld
        world = SyntheticWorld(split="train")
    n = min(int(num_captions), len(world))
    if hasattr(world, "captions"):
        captions = list(world.captions(n))
    else:
        captions = [world[i]["caption"] for i in range(n)]
    return train_caption_bpe(captions, vocab_size=vocab_size, path=path)


# =============================================================================================
# CLIP BPE (OpenAI / open_clip).
# =============================================================================================
OPENAI_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_NUM_MERGES = 49152 - 256 - 2          # open_clip keeps this many merges of the file
CLIP_SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")   # open_clip's names (OpenAI: <|startoftext|>)
CLIP_CONTEXT_LENGTH = 77
_CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_BPE_CACHE_LIMIT = 200_000


@functools.lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP reversible byte → printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


_FTFY_WARNED = False


def _fix_text(text: str) -> str:
    global _FTFY_WARNED
    try:
        import ftfy
    except ImportError:
        if not _FTFY_WARNED:
            warnings.warn("ftfy is not installed: CLIP text cleaning skips ftfy.fix_text, so ids may "
                          "differ from open_clip on mojibake text (pip install ftfy)")
            _FTFY_WARNED = True
        return text
    return ftfy.fix_text(text)


def clip_clean(text: str) -> str:
    """open_clip's clean='lower': ftfy, HTML-unescape twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def _read_merges(path: str) -> List[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8").split("\n")


def find_open_clip_bpe() -> Optional[str]:
    """Path of bpe_simple_vocab_16e6.txt.gz inside an installed open_clip (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, OPENAI_BPE_FILENAME)
        if os.path.exists(path):
            return path
    return None


class CLIPTokenizer:
    """CLIP BPE with open_clip's exact behaviour; see the module docstring.

    ``merges`` are (left, right) symbol pairs in rank order; ``encoder`` maps
    every symbol (bytes, bytes + ``</w>``, merged symbols, special tokens) to
    its id.
    """

    def __init__(self, encoder: Dict[str, int], merges: Sequence[Tuple[str, str]],
                 special_tokens: Sequence[str] = CLIP_SPECIAL_TOKENS, pad_id: int = 0):
        import regex
        self._encoder = dict(encoder)
        self._decoder = {v: k for k, v in self._encoder.items()}
        self._merges = [tuple(m) for m in merges]
        self._ranks = dict(zip(self._merges, range(len(self._merges))))
        self._special = tuple(special_tokens)
        missing = [t for t in self._special if t not in self._encoder]
        if missing:
            raise ValueError(f"special tokens {missing} are not in the vocabulary")
        self.sot_id = self._encoder[self._special[0]]
        self.eot_id = self._encoder[self._special[1]]
        self.pad_id = int(pad_id)
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {v: k for k, v in self._byte_encoder.items()}
        special = "|".join(regex.escape(t) for t in self._special)
        self._pattern_text = special + "|" + _CLIP_PATTERN
        self._pat = regex.compile(self._pattern_text, regex.IGNORECASE)
        self._cache: Dict[str, str] = {}

    # -- construction ------------------------------------------------------------------------

    @staticmethod
    def canonical_vocab(merges: Sequence[Tuple[str, str]],
                        special_tokens: Sequence[str] = CLIP_SPECIAL_TOKENS) -> Dict[str, int]:
        """OpenAI's id layout: 256 byte symbols, the same + ``</w>``, one id per merge, specials."""
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(m) for m in merges)
        vocab.extend(special_tokens)
        return dict(zip(vocab, range(len(vocab))))     # later duplicates win, as in open_clip

    @classmethod
    def from_merges(cls, merges: Sequence[Tuple[str, str]],
                    special_tokens: Sequence[str] = CLIP_SPECIAL_TOKENS) -> "CLIPTokenizer":
        merges = [tuple(m) for m in merges]
        return cls(cls.canonical_vocab(merges, special_tokens), merges, special_tokens)

    @classmethod
    def from_bpe_file(cls, path: str, max_merges: int = OPENAI_NUM_MERGES,
                      special_tokens: Sequence[str] = CLIP_SPECIAL_TOKENS) -> "CLIPTokenizer":
        """OpenAI merges file (``#version`` line, then one ``left right`` pair per line;
        gzip or plain). As open_clip, only the first ``max_merges`` merges are used."""
        lines = _read_merges(path)[1:max_merges + 1]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"{path}: not a BPE merges file (line {bad[0]!r})")
        return cls.from_merges(merges, special_tokens)

    @classmethod
    def from_tokenizer_json(cls, path: str) -> "CLIPTokenizer":
        """A HF CLIP ``tokenizer.json`` (BPE model with ``</w>`` suffix)."""
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec.get("model", {})
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
            raise ValueError(f"{path}: not a CLIP-style BPE tokenizer.json")
        encoder = dict(model["vocab"])
        for added in spec.get("added_tokens", []):
            encoder.setdefault(added["content"], added["id"])
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        specials = None
        for pair in (("<|startoftext|>", "<|endoftext|>"), CLIP_SPECIAL_TOKENS):
            if all(t in encoder for t in pair):
                specials = pair
                break
        if specials is None:
            raise ValueError(f"{path}: no start/end-of-text tokens")
        return cls(encoder, merges, specials)

    @classmethod
    def load(cls, path: str) -> "CLIPTokenizer":
        if path == "open_clip":
            found = find_open_clip_bpe()
            if found is None:
                raise FileNotFoundError("open_clip is not installed: pass the path of "
                                        f"{OPENAI_BPE_FILENAME} or a tokenizer.json")
            path = found
        if os.path.isdir(path):
            for name in (TOKENIZER_FILENAME, OPENAI_BPE_FILENAME):
                if os.path.exists(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
        if path.endswith(".json"):
            return cls.from_tokenizer_json(path)
        return cls.from_bpe_file(path)

    # -- properties --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return max(self._encoder.values()) + 1

    @property
    def merges(self) -> List[Tuple[str, str]]:
        return list(self._merges)

    # -- BPE -----------------------------------------------------------------------------------

    def _bpe(self, token: str) -> str:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        if len(word) == 1:
            return token + "</w>"
        ranks = self._ranks
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            bigram = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if bigram not in ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
        out = " ".join(word)
        if len(self._cache) >= _BPE_CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = out
        return out

    def encode(self, text: str) -> List[int]:
        """Content ids of one text (cleaned as open_clip does), without SOT/EOT."""
        ids = []
        for token in self._pat.findall(clip_clean(text)):
            if token in self._special:
                ids.append(self._encoder[token])
                continue
            token = "".join(self._byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self._encoder[t] for t in self._bpe(token).split(" "))
        return ids

    def encode_batch(self, texts: Sequence[str], context_length: int = CLIP_CONTEXT_LENGTH,
                     return_truncated: bool = False):
        """int32 [B, L] = [SOT, content..., EOT, 0...]; over-long content is cut, EOT kept
        (identical to open_clip's ``tokenize``)."""
        if context_length < 2:
            raise ValueError("context_length must be >= 2 (SOT and EOT)")
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not a string")
        out = np.full((len(texts), context_length), self.pad_id, np.int32)
        truncated = np.zeros((len(texts),), bool)
        room = context_length - 2
        for i, text in enumerate(texts):
            ids = self.encode(str(text))
            if len(ids) > room:
                ids = ids[:room]
                truncated[i] = True
            out[i, 0] = self.sot_id
            out[i, 1:1 + len(ids)] = ids
            out[i, 1 + len(ids)] = self.eot_id
        return (out, truncated) if return_truncated else out

    def __call__(self, texts, context_length: int = CLIP_CONTEXT_LENGTH) -> np.ndarray:
        return self.encode_batch([texts] if isinstance(texts, str) else texts, context_length)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of one id row: a leading SOT is dropped, stops at the first EOT."""
        pieces = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self.eot_id:
                break
            if i == self.sot_id:
                continue
            pieces.append(self._decoder.get(int(i), ""))
        text = "".join(pieces)
        data = bytearray(self._byte_decoder[c] for c in text if c in self._byte_decoder)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def decode_batch(self, tokens: np.ndarray) -> List[str]:
        return [self.decode(row) for row in np.asarray(tokens)]

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str) -> str:
        """Writes an OpenAI-format merges file (gzip if ``path`` ends in .gz).
        Only for tokenizers with the canonical id layout (files, trained ones)."""
        if self._encoder != self.canonical_vocab(self._merges, self._special):
            raise ValueError("this vocabulary does not have OpenAI's id layout; keep its tokenizer.json")
        text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp_bpe_", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                if path.endswith(".gz"):
                    with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as g:
                        g.write(text.encode("utf-8"))
                else:
                    f.write(text.encode("utf-8"))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}
        state.pop("_pat", None)
        return state

    def __setstate__(self, state):
        import regex
        self.__dict__.update(state)
        self._pat = regex.compile(self._pattern_text, regex.IGNORECASE)

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={self.vocab_size}, sot={self.sot_id}, eot={self.eot_id})"


def train_clip_bpe(captions: Iterable[str], vocab_size: int = 16384, min_frequency: int = 2,
                   path: Optional[str] = None) -> CLIPTokenizer:
    """Trains CLIP-style merges on captions (HF tokenizers' BPE trainer on the
    open_clip-cleaned, CLIP-regex-split, byte-mapped words; ``</w>`` suffix).

    The result has OpenAI's id layout: 512 byte symbols, ``vocab_size - 514``
    merges at most (fewer if the corpus runs out of pairs), SOT, EOT. Saved as
    a merges file to ``path`` when given. Deterministic for a given caption list.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    num_merges = int(vocab_size) - 512 - len(CLIP_SPECIAL_TOKENS)
    if num_merges < 0:
        raise ValueError(f"vocab_size must be >= {512 + len(CLIP_SPECIAL_TOKENS)}")
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=num_merges + 512, min_frequency=int(min_frequency),
                                  special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>")
    tok.train_from_iterator((clip_clean(c) for c in captions), trainer=trainer)
    raw = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw][:num_merges]
    out = CLIPTokenizer.from_merges(merges)
    if path is not None:
        out.save(path)
    return out


# =============================================================================================
# T5 sentencepiece.
# =============================================================================================
class T5Tokenizer:
    """sentencepiece ids of a local ``spiece.model`` (T5): ``[ids..., EOS, PAD...]``.

    No SOT (``sot_id`` is None); ``eot_id`` is the EOS id. Over-long text keeps
    its first ``L - 1`` pieces and the EOS, as HF ``T5Tokenizer`` truncation
    does. Text is not cleaned (T5 is case-sensitive). Picklable (the model
    proto travels, not the file path).
    """

    sot_id = None

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else 0
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError("sentencepiece model has no EOS piece")
        self.eot_id = self.eos_id

    @classmethod
    def load(cls, path: str) -> "T5Tokenizer":
        if os.path.isdir(path):
            path = os.path.join(path, "spiece.model")
        with open(path, "rb") as f:
            return cls(f.read())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> List[int]:
        return list(self._sp.encode(str(text), out_type=int))

    def encode_batch(self, texts: Sequence[str], context_length: int = 128,
                     return_truncated: bool = False):
        if context_length < 1:
            raise ValueError("context_length must be >= 1 (EOS)")
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not a string")
        out = np.full((len(texts), context_length), self.pad_id, np.int32)
        truncated = np.zeros((len(texts),), bool)
        encoded = self._sp.encode([str(t) for t in texts], out_type=int) if len(texts) else []
        for i, ids in enumerate(encoded):
            if len(ids) > context_length - 1:
                ids = ids[:context_length - 1]
                truncated[i] = True
            out[i, :len(ids)] = ids
            out[i, len(ids)] = self.eos_id
        return (out, truncated) if return_truncated else out

    def __call__(self, texts, context_length: int = 128) -> np.ndarray:
        return self.encode_batch([texts] if isinstance(texts, str) else texts, context_length)

    def decode(self, ids: Iterable[int]) -> str:
        content = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self.eos_id:
                break
            if i != self.pad_id:
                content.append(int(i))
        return self._sp.decode(content)

    def decode_batch(self, tokens: np.ndarray) -> List[str]:
        return [self.decode(row) for row in np.asarray(tokens)]

    def __getstate__(self):
        return {"proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["proto"])

    def __repr__(self) -> str:
        return f"T5Tokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, eos={self.eos_id})"


def train_sentencepiece(captions: Iterable[str], path: str, vocab_size: int = 8000,
                        model_type: str = "unigram") -> T5Tokenizer:
    """A T5-style spiece.model (unigram like T5's by default; PAD 0, EOS 1, UNK 2,
    no BOS) trained on captions. ``model_type="bpe"`` trains faster on large
    corpora, but HF's T5 tokenizer converts every spiece.model as a unigram
    model, so only unigram models give HF-identical ids."""
    import io
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([c for c in captions if c.strip()]), model_writer=model,
        vocab_size=int(vocab_size), model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    proto = model.getvalue()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_spiece_", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(proto)
    os.replace(tmp, path)
    return T5Tokenizer(proto)


# =============================================================================================
# Factories and the command line.
# =============================================================================================
def load_text_tokenizer(path: str):
    """CLIPTokenizer / T5Tokenizer / TextTokenizer from a path:
    ``*.model`` or a directory with ``spiece.model`` → T5; ``*.txt(.gz)`` merges
    or ``"open_clip"`` → CLIP; ``tokenizer.json`` → CLIP if it is a ``</w>`` BPE,
    else the synthetic-world :class:`TextTokenizer`."""
    if path == "open_clip":
        return CLIPTokenizer.load(path)
    if os.path.isdir(path):
        for name in ("spiece.model", OPENAI_BPE_FILENAME, TOKENIZER_FILENAME):
            if os.path.exists(os.path.join(path, name)):
                return load_text_tokenizer(os.path.join(path, name))
        raise FileNotFoundError(f"{path}: no spiece.model, {OPENAI_BPE_FILENAME} or {TOKENIZER_FILENAME}")
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if path.endswith(".model"):
        return T5Tokenizer.load(path)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            model = json.load(f).get("model", {})
        if model.get("type") == "BPE" and model.get("end_of_word_suffix") == "</w>":
            return CLIPTokenizer.from_tokenizer_json(path)
        return TextTokenizer.load(path)
    return CLIPTokenizer.from_bpe_file(path)


def make_text_tokenizers(data_cfg, default=None):
    """(clip_tokenizer, gen_tokenizer) from ``data.clip_tokenizer`` (a path, or
    ``"open_clip"``; empty → ``default``) and ``data.gen_tokenizer`` (a path to a
    spiece.model / tokenizer; ``"clip"`` or empty → the CLIP tokenizer)."""
    clip_spec = data_cfg.get("clip_tokenizer", "") or ""
    clip = load_text_tokenizer(clip_spec) if clip_spec else default
    if clip is None:
        raise ValueError("set data.clip_tokenizer (bpe_simple_vocab_16e6.txt.gz, a CLIP tokenizer.json, "
                         "or 'open_clip')")
    gen_spec = data_cfg.get("gen_tokenizer", "") or ""
    gen = clip if gen_spec in ("", "clip", "same") else load_text_tokenizer(gen_spec)
    return clip, gen


def iter_captions(patterns: Sequence[str]) -> Iterator[str]:
    """Captions from text files (one per line), ``.array_record`` shards or ingest directories."""
    from dream_jax.data import records
    paths = []
    for pattern in patterns:
        matches = sorted(globlib.glob(pattern)) or [pattern]
        for m in matches:
            if os.path.isdir(m):
                paths.extend(sorted(globlib.glob(os.path.join(m, "*" + records.RECORD_SUFFIX))))
            else:
                paths.append(m)
    for p in paths:
        if p.endswith(records.RECORD_SUFFIX):
            from array_record.python.array_record_module import ArrayRecordReader
            reader = ArrayRecordReader(p, "readahead_buffer_size:0")
            try:
                for i in range(reader.num_records()):
                    try:
                        yield records.decode_header(reader.read([i])[0])[0]["caption"]
                    except records.RecordError:
                        continue
            finally:
                reader.close()
        else:
            with open(p, encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.rstrip("\n")
                    if line.strip():
                        yield line


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m dream_jax.data.tokenizers")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a tokenizer on captions")
    tr.add_argument("--input", action="append", required=True,
                    help="caption text file(s) (one per line), .array_record shards or ingest dirs; globs ok")
    tr.add_argument("--output", required=True, help="clip: merges file (.txt.gz); sentencepiece: spiece.model")
    tr.add_argument("--kind", choices=("clip", "sentencepiece"), default="clip")
    tr.add_argument("--vocab-size", type=int, default=16384)
    tr.add_argument("--min-frequency", type=int, default=2)
    tr.add_argument("--max-captions", type=int, default=0, help="use at most this many captions (0: all)")
    tr.add_argument("--spm-model-type", choices=("unigram", "bpe"), default="unigram",
                    help="sentencepiece model type (T5 uses unigram)")
    enc = sub.add_parser("encode", help="print the ids of some texts")
    enc.add_argument("--tokenizer", required=True)
    enc.add_argument("--context-length", type=int, default=CLIP_CONTEXT_LENGTH)
    enc.add_argument("texts", nargs="+")
    args = ap.parse_args(argv)
    if args.command == "train":
        captions = iter_captions(args.input)
        if args.max_captions:
            import itertools
            captions = itertools.islice(captions, args.max_captions)
        captions = list(captions)
        if args.kind == "clip":
            tok = train_clip_bpe(captions, args.vocab_size, args.min_frequency, path=args.output)
        else:
            tok = train_sentencepiece(captions, args.output, args.vocab_size, args.spm_model_type)
        print(f"trained {tok!r} on {len(captions)} captions → {args.output}")
        return 0
    tok = load_text_tokenizer(args.tokenizer)
    for row in tok.encode_batch(args.texts, args.context_length):
        print(" ".join(str(int(i)) for i in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
