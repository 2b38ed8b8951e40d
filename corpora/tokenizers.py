"""Word and character tokenizers: one line of text -> a list of token strings.

A tokenizer has ``name``, ``settings()`` (what the cache key needs), ``tokenize(line)``,
``detokenize(tokens)`` and ``fixed_vocabulary()`` (None here: the vocabulary is built from
the training split; sentencepiece brings its own, see ``subword.py``). ``<eos>`` is not a
tokenizer's business: the corpus adds one after every line.
"""

from __future__ import annotations

from .errors import CorpusError
from .paths import cache_root
from .vocab import Vocabulary

SPACE = "_"  # word separator at character level, as in Mikolov's ptb.char.* files


class WordTokenizer:
    """Whitespace-separated words (PTB, WikiText)."""

    name = "word"

    def settings(self) -> dict:
        return {"name": self.name}

    def tokenize(self, line: str) -> list[str]:
        return line.split()

    def detokenize(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def fixed_vocabulary(self) -> Vocabulary | None:
        return None


class CharTokenizer:
    """Characters, with each run of whitespace written as one ``space`` symbol.

    Leading and trailing whitespace is dropped, so a PTB word line gives exactly the
    symbols of the matching ptb.char line: ``list("_".join(line.split()))``.

    Args:
        space: the symbol that stands for a word boundary.
    """

    name = "char"

    def __init__(self, space: str = SPACE):
        self.space = space

    def settings(self) -> dict:
        return {"name": self.name, "space": self.space}

    def tokenize(self, line: str) -> list[str]:
        return list(self.space.join(line.split()))

    def detokenize(self, tokens: list[str]) -> str:
        return "".join(" " if t == self.space else t for t in tokens)

    def fixed_vocabulary(self) -> Vocabulary | None:
        return None


class SymbolTokenizer(WordTokenizer):
    """Text that is already one symbol per whitespace-separated item (ptb.char.* files)."""

    name = "symbols"

    def __init__(self, space: str = SPACE):
        self.space = space

    def settings(self) -> dict:
        return {"name": self.name, "space": self.space}

    def detokenize(self, tokens: list[str]) -> str:
        return "".join(" " if t == self.space else t for t in tokens)


TOKENIZERS = ("word", "char", "sentencepiece")


def make_tokenizer(spec, *, train_lines=None, data_key: dict | None = None, cache=None,
                   sp_vocab_size: int = 8000, sp_model_type: str = "unigram",
                   sp_options: dict | None = None):
    """A tokenizer from its name (or pass an object with the tokenizer methods through).

    Args:
        spec: "word", "char", "sentencepiece", or a tokenizer object.
        train_lines: for sentencepiece, a callable returning the training lines.
        data_key: for sentencepiece, what identifies the training data (cache key).
        cache: the cache root, for the sentencepiece model.
        sp_vocab_size, sp_model_type, sp_options: sentencepiece training settings.

    Returns:
        The tokenizer.
    """
    if not isinstance(spec, str):
        return spec
    if spec == "word":
        return WordTokenizer()
    if spec == "char":
        return CharTokenizer()
    if spec == "sentencepiece":
        from .subword import train_sentencepiece

        if cache is None:

            cache = cache_root()
        return train_sentencepiece(train_lines, data_key or {}, cache=cache,
                                   vocab_size=sp_vocab_size, model_type=sp_model_type,
                                   options=sp_options)

    raise CorpusError(f"unknown tokenizer {spec!r}; choose one of {', '.join(TOKENIZERS)}")
