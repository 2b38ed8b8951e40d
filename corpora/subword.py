"""Subword tokenisation with sentencepiece: train on the training split, cache, encode.

The model is trained once per (training data checksum, settings) and kept in
``<cache>/sentencepiece/<key>.model``. Its pieces are the vocabulary, in sentencepiece's
id order: ``<unk>`` is id 0 and ``<eos>`` id 1 (no ``<s>``, no padding), so corpus ids
and sentencepiece ids are the same numbers and ``decode`` round-trips.

``sentencepiece`` is optional and imported only inside these functions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .cache import cache_key
from .checksums import md5_of
from .errors import CorpusError
from .vocab import EOS, UNK, Vocabulary

INSTALL_HINT = 'sentencepiece is not installed: pip install "dni-rnn[sentencepiece]"'


def import_sentencepiece():
    """The ``sentencepiece`` module, or a CorpusError that says how to install it."""
    try:
        import sentencepiece
    except ImportError:
        raise CorpusError(INSTALL_HINT) from None
    return sentencepiece


class SentencePieceTokenizer:
    """A trained sentencepiece model used as a tokenizer (see ``tokenizers.py``).

    Args:
        model_path: a ``.model`` file written by ``train_sentencepiece``.
    """

    name = "sentencepiece"

    def __init__(self, model_path: str | os.PathLike):
        spm = import_sentencepiece()
        self.model_path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.model_md5 = md5_of(self.model_path)

    def settings(self) -> dict:
        return {"name": self.name, "model_md5": self.model_md5}

    def tokenize(self, line: str) -> list[str]:
        return self.sp.encode(line, out_type=str)

    def detokenize(self, tokens: list[str]) -> str:
        return self.sp.decode_pieces(list(tokens))

    def fixed_vocabulary(self) -> Vocabulary:
        pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        return Vocabulary(pieces, eos=EOS, unk=UNK)

    def encode(self, text: str) -> list[int]:
        """Ids of one line of text (no ``<eos>``)."""
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Text of a list (or 1-D tensor) of ids, ``<eos>`` excluded."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.sp.decode(list(ids))


def train_sentencepiece(lines: Callable[[], Iterable[str]], data_key: dict, *, cache: Path,
                        vocab_size: int = 8000, model_type: str = "unigram",
                        options: dict | None = None) -> SentencePieceTokenizer:
    """Train (or fetch from the cache) a sentencepiece model on the training text.

    Args:
        lines: returns an iterable over the training lines (called only on a cache miss).
        data_key: what identifies the training data (file md5 sums, dataset fingerprint).
        cache: the cache root.
        vocab_size: number of pieces, ``<unk>`` and ``<eos>`` included.
        model_type: "unigram", "bpe", "char" or "word".
        options: further ``SentencePieceTrainer.train`` keyword arguments.

    Returns:
        The tokenizer.
    """
    spm = import_sentencepiece()
    settings = {"vocab_size": int(vocab_size), "model_type": model_type,
                "options": dict(sorted((options or {}).items())), "sp": spm.__version__}
    key = cache_key({"data": data_key, "settings": settings})
    model = cache / "sentencepiece" / f"{key}.model"
    if model.is_file():
        return SentencePieceTokenizer(model)
    model.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(dir=model.parent, prefix=".train-"))
    try:
        kwargs = dict(
            sentence_iterator=iter(line for line in lines() if line.strip()),
            model_prefix=str(tmpdir / "m"), vocab_size=int(vocab_size), model_type=model_type,
            unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, unk_piece=UNK, eos_piece=EOS,
            character_coverage=1.0, num_threads=min(os.cpu_count() or 1, 8),
            minloglevel=2,
        )
        kwargs.update(options or {})
        try:
            spm.SentencePieceTrainer.train(**kwargs)
        except (RuntimeError, ValueError, OSError) as e:
            raise CorpusError(f"sentencepiece training failed ({model_type}, vocab_size="
                              f"{vocab_size}): {e}") from None
        os.replace(tmpdir / "m.model", model)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return SentencePieceTokenizer(model)
