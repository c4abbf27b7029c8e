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

Other tokenizers (CLIP BPE, T5 sentencepiece) are to be added to this module
next to this one, sharing the ``encode_batch`` / ``vocab_size`` / ``*_id``
interface.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterable, List, Optional, Sequence, Tuple, Union

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
