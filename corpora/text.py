"""Local text files as a corpus, at word, character or subword (sentencepiece) level.

Each split is a file, a list of files, a directory (its files, sorted by name) or a glob
pattern. Documents are either whole files (``documents="file"``) or single lines
(``documents="line"``); with either, ``Corpus.doc_starts`` marks each document's first
token so that a runner can reset per-stream state there.

A word or char vocabulary always holds ``<unk>`` (reserved when the training text lacks
it), so held-out words and characters that training never saw become ``<unk>``;
``Corpus.info["unk"]`` counts them per split.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence, Union

from .cache import cache_key
from .checksums import file_md5
from .corpus import Corpus, Source, build_corpus, cached_build
from .errors import CorpusError
from .paths import cache_root
from .textio import read_text, split_lines
from .tokenizers import make_tokenizer
from .vocab import EOS, UNK

PathLike = Union[str, os.PathLike]
SplitSpec = Union[PathLike, Sequence[PathLike], None]


def resolve_files(spec: SplitSpec, split: str) -> list[Path]:
    """The files a split names: a file, a list, a directory or a glob pattern.

    Args:
        spec: the split's specification (None for no files).
        split: the split's name, for messages.

    Returns:
        The file paths, in order.
    """
    if spec is None:
        return []
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if isinstance(item, str) and any(c in item for c in "*?[") and not p.exists():
            matches = sorted(Path(m) for m in glob.glob(str(p)) if Path(m).is_file())
            if not matches:
                raise CorpusError(f"{split}: no files match {item}")
            files.extend(matches)
        elif p.is_dir():
            inside = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            if not inside:
                raise CorpusError(f"{split}: directory {p} holds no files")
            files.extend(inside)
        elif not p.exists():
            parent = p.parent
            if not parent.is_dir():
                raise CorpusError(f"{split}: directory not found: {parent}")
            raise CorpusError(f"{split}: text file not found: {p}")
        else:
            files.append(p)
    return files


def load_text_files(train: SplitSpec, valid: SplitSpec = None, test: SplitSpec = None, *,
                    tokenizer="word", documents: str | None = None, name: str = "text",
                    cache_dir: PathLike | None = None, use_cache: bool = True,
                    encoding: str = "utf-8", max_vocab: int | None = None, min_freq: int = 1,
                    sp_vocab_size: int = 8000, sp_model_type: str = "unigram",
                    sp_options: dict | None = None, eos: str = EOS, unk: str = UNK) -> Corpus:
    """Tokenise local text files into a Corpus (cached by file checksums and settings).

    Args:
        train: the training text (file, list of files, directory or glob).
        valid: the validation text, or None (the split is then empty).
        test: the test text, or None.
        tokenizer: "word" (whitespace), "char" (characters, spaces as ``_``),
            "sentencepiece" (trained on ``train``), or a tokenizer object.
        documents: None, "file" (each file a document) or "line" (each line a document).
        name: the corpus name.
        cache_dir: the cache root (default ``$DNI_RNN_CACHE_DIR`` or ~/.cache/dni_rnn).
        use_cache: read/write the tokenised tensors in the cache.
        encoding: the files' text encoding.
        max_vocab: keep at most this many tokens (the rest become ``<unk>``).
        min_freq: drop training tokens seen fewer times (they become ``<unk>``).
        sp_vocab_size: sentencepiece vocabulary size.
        sp_model_type: "unigram", "bpe", "char" or "word".
        sp_options: further sentencepiece trainer options.
        eos: the end-of-line token.
        unk: the unknown-token symbol, always in a word or char vocabulary; None: no
            such symbol, and a valid/test token that training lacks is an error.

    Returns:
        The Corpus.

    Raises:
        CorpusError: a missing directory or file, an empty file, text that is not valid
            ``encoding`` (naming the split, file, byte and line), or (``unk=None``) a
            valid/test token that training lacks.
    """
    modes = {None: None, "file": "source", "line": "line"}
    if documents not in modes:
        raise CorpusError(f"documents must be None, 'file' or 'line', not {documents!r}")
    files = {"train": resolve_files(train, "train"), "valid": resolve_files(valid, "valid"),
             "test": resolve_files(test, "test")}
    if not files["train"]:
        raise CorpusError("no training files given")
    cache = cache_root(cache_dir)
    md5s = {s: [file_md5(f, cache if use_cache else None) for f in fs] for s, fs in files.items()}

    def train_lines():
        for f in files["train"]:
            yield from split_lines(read_text(f, encoding))

    tok = make_tokenizer(tokenizer, train_lines=train_lines, data_key={"md5": md5s["train"]},
                         cache=cache, sp_vocab_size=sp_vocab_size, sp_model_type=sp_model_type,
                         sp_options=sp_options)
    options = {"documents": documents, "encoding": encoding, "max_vocab": max_vocab,
               "min_freq": min_freq, "eos": eos, "unk": unk}
    key = cache_key({"corpus": "text", "md5": md5s, "tokenizer": tok.settings(), **options})

    def read(f: Path, split: str) -> Source:
        try:
            return Source(str(f), split_lines(read_text(f, encoding)))
        except CorpusError as e:
            raise CorpusError(f"{split}: {e}") from None

    def build() -> Corpus:
        splits = {s: [read(f, s) for f in fs] for s, fs in files.items()}
        return build_corpus(name, splits, tok, documents=modes[documents], eos=eos, unk=unk,
                            max_vocab=max_vocab, min_freq=min_freq, reserve_unk=unk is not None)

    kind = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{name}-{tok.name}")
    return cached_build(cache if use_cache else None, kind, key, build, tok)
