"""Language-model data: `cfg.data` -> a vocabulary, batchified id streams and their resets.

    data.corpus     loader                        documents (resets)
    ptb-word/char   corpora.load_ptb              none: one stream per split
    wikitext-2/103  corpora.load_wikitext         none: one stream per split (as in the
                    (data_dir, else the HF cache)   literature)
    text            corpora.load_text_files       data.documents: file or line
    hf              corpora.load_hf               data.documents: line (= row) or file

Each split is a 1-D id stream with a 1-D document-start mask (True at a document's first
token), cut to data.*_tokens, then laid out by `corpora.batchify` / `batchify_mask`:

    ids    (N_total,) -> (N, B)   column b = ids[b*N:(b+1)*N]
    starts (N_total,) -> (N, B)   the same layout: True where x[t, b] begins a document

    inputs  = rows [0, N-1)   targets = rows [1, N)   resets = starts rows [0, N-1)

The runner zeroes stream b's state before reading x[t, b] where resets[t, b] is True, so
no state crosses a document boundary (the first token of a document is still predicted
from the previous document's last step, its <eos>: the usual stream convention). Train
streams are B wide (data.batch_size), valid and test E wide (data.eval_batch_size).
"""
from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import corpora
from corpora import CorpusError
from corpora.text import resolve_files

from .config import ConfigError, data_tokenizer, hf_split_map

SPLITS = ("train", "valid", "test")
SPLIT_WORDS = {"train": ("train",), "valid": ("valid", "validation", "dev"), "test": ("test",)}
SP_VOCAB_SIZE = 8000  # sentencepiece's vocabulary when data.vocab_size is 0


@dataclass(eq=False)
class LMData:
    """A corpus ready for truncated BPTT.

    Attributes:
        name: for logs, e.g. "ptb-word" or "wikitext-2 (char)".
        vocab: the vocabulary (`corpora.Vocabulary`).
        metric: "ppl" (words, subwords) or "bpc" (characters).
        train: (N, B) int64 ids.
        valid, test: (N', E) int64 ids.
        resets: (N, B) bool document starts of train, or None (one document).
        valid_resets, test_resets: (N', E) bool, or None.
        corpus: the loaded `corpora.Corpus` (1-D splits, info).
    """

    name: str
    vocab: object
    metric: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    resets: Optional[torch.Tensor]
    valid_resets: Optional[torch.Tensor]
    test_resets: Optional[torch.Tensor]
    corpus: object

    def split(self, name):
        """One split's streams.

        Args:
            name: "train", "valid" or "test".
        Returns:
            (ids (N, W), resets (N, W) bool or None), W = B for train, E otherwise.
        """
        resets = {"train": self.resets, "valid": self.valid_resets, "test": self.test_resets}
        return getattr(self, name), resets[name]


def load_lm_data(data, data_dir=None):
    """Load, tokenise and batchify the corpus that `data` names.

    Args:
        data: a `DataConfig` (cfg.data) naming a language-model corpus.
        data_dir: the CLI's --data-dir; it wins over data.data_dir (PTB, WikiText).

    Returns:
        LMData.

    Raises:
        corpora.CorpusError: missing files or folders, an empty split or one too short for
            its streams, an unavailable Hugging Face dataset (offline: only local files and
            the HF cache), a missing optional package (datasets, sentencepiece).
    """

    tokenizer = data_tokenizer(data)
    corpus = _load_corpus(data, tokenizer, data_dir or data.data_dir or None)
    name = _describe(corpus, data, tokenizer)
    starts = corpus.doc_starts or {}

    def streams(split, width, width_key):
        limit = getattr(data, f"{split}_tokens")
        ids = _limit(corpus.split(split), limit)
        if ids.numel() < 2 * width:  # a stream needs an input and its target
            raise CorpusError(_too_short(name, split, ids.numel(), width, width_key,
                                         ids.numel() < corpus.split(split).numel()))
        ids = corpora.batchify(ids, width)
        mask = starts.get(split)
        if mask is None:
            return ids, None
        resets = corpora.batchify_mask(_limit(mask, limit), width)
        # a lone start at the very first token resets a state that is zero anyway
        return ids, (resets if resets.flatten()[1:].any() else None)

    B, E = data.batch_size, data.eval_batch_size
    train, resets = streams("train", B, "data.batch_size")
    valid, valid_resets = streams("valid", E, "data.eval_batch_size")
    test, test_resets = streams("test", E, "data.eval_batch_size")
    return LMData(name=name, vocab=corpus.vocab, metric=metric_name(data),
                  train=train, valid=valid, test=test, resets=resets, valid_resets=valid_resets,
                  test_resets=test_resets, corpus=corpus)


def _describe(corpus, data, tokenizer):
    """The corpus name for the run log: its level, and how many held-out tokens are <unk>
    because the vocabulary lacks them (unseen in training, or pruned)."""
    notes = [] if data.corpus.startswith("ptb-") else [tokenizer]
    unk = corpus.info.get("unk") or {}
    if unk.get("valid") or unk.get("test"):
        notes.append("held-out tokens outside the vocabulary, now <unk>: " + ", ".join(
            f"{s} {unk.get(s, 0):,} of {corpus.split(s).numel():,}" for s in ("valid", "test")))
    return corpus.name + (f" ({'; '.join(notes)})" if notes else "")


def _too_short(name, split, n, width, width_key, cut):
    if n == 0:
        return (f"{name}: the {split} split is empty (0 tokens); every split needs text "
                f"(data.path, data.hf_split)")
    where = f" (cut by data.{split}_tokens)" if cut else ""
    return (f"{name}: the {split} split has {n:,} tokens{where}, but {width_key}={width} "
            f"streams need at least {2 * width:,} (2 each); add {split} text or lower "
            f"{width_key}")


def metric_name(data):
    """"bpc" for characters, "ppl" for words and subwords (`data`: a DataConfig)."""
    return "bpc" if data_tokenizer(data) == "char" else "ppl"


def _limit(x, n):
    return x[:n] if n and n > 0 else x


def _load_corpus(data, tokenizer, directory):

    kind = data.corpus
    if kind in ("ptb-word", "ptb-char"):
        return corpora.load_ptb(tokenizer, data_dir=directory, progress=False)
    if tokenizer == "sentencepiece":
        vocab = {"sp_vocab_size": data.vocab_size or SP_VOCAB_SIZE}
    else:
        vocab = {"max_vocab": data.vocab_size or None, "min_freq": data.min_count}
    try:
        if kind in ("wikitext-2", "wikitext-103"):
            return corpora.load_wikitext(kind.split("-")[1], data_dir=directory,
                                         tokenizer=tokenizer, **vocab)
        if kind == "text":
            files = text_splits(data.path)
            return corpora.load_text_files(files["train"], files["valid"], files["test"],
                                           tokenizer=tokenizer, documents=data.documents,
                                           **vocab)
        if kind == "hf":
            data_files = None
            if data.path.strip():  # local files for a builder such as "text" or "json"
                hf_names = {"train": "train", "valid": "validation", "test": "test"}
                data_files = {hf_names[s]: [str(f) for f in resolve_files(spec, s)]
                              for s, spec in text_splits(data.path).items()}
            return corpora.load_hf(data.hf_name, data.hf_config or None, data_files=data_files,
                                   split_names=hf_split_map(data),
                                   text_field=data.hf_text_field,
                                   documents="row" if data.documents == "line" else None,
                                   tokenizer=tokenizer, **vocab)
    except corpora.CorpusError as e:
        raise corpora.CorpusError(_cli_hint(str(e))) from None
    raise ConfigError(f"data.corpus: {kind!r} is not a language-model corpus")


def _cli_hint(message):
    """corpora's messages speak Python (split_names=, encoding=); add the CLI's words."""
    if message.endswith(" or pass encoding="):  # the CLI has no encoding key: utf-8 only
        return message[:-len(" or pass encoding=")] + " (e.g. iconv -f latin1 -t utf-8)"
    if "text file is empty" in message:
        return message + "; every split needs text (a few hundred lines held out will do)"
    if "split_names=" in message:
        return message + " (the CLI: data.hf_split, e.g. valid=validation)"
    if "text_field=" in message:
        return message + " (the CLI: data.hf_text_field)"
    return message


def _word_pattern(word):
    # the word as a whole name part: "train" in ptb.train.txt, train/, train_1.txt, not trainer
    return re.compile(rf"(?<![A-Za-z]){word}(?![A-Za-z])")


def _exists(spec):
    return bool(glob.glob(spec)) if any(c in spec for c in "*?[") else Path(spec).exists()


def text_splits(path):
    """The train / valid / test text that data.path names.

    Two forms:

        corpus/                 a folder whose files or subfolders are named by split:
                                train.txt, wiki.valid.tokens, dev/, test_0.txt, ...
                                (valid may be called valid, validation or dev)
        corpus/ptb.train.txt    a file, folder or glob whose path says "train": valid and
        corpus/train/           test are the same path with "valid" (or "validation",
        corpus/train/*.txt      "dev") and "test" in its place (the last "train")

    Args:
        path: data.path.

    Returns:
        {"train": spec, "valid": spec, "test": spec}; a spec is a path or glob string, or a
        list of paths, as `corpora.load_text_files` takes them.

    Raises:
        corpora.CorpusError: the path is missing, or a split cannot be found.
    """

    path = str(Path(path.strip()).expanduser()) if path.strip() else ""
    if not path:
        raise CorpusError("data.path is empty: give a folder with train/valid/test files, or "
                          "a training file, folder or glob whose path says 'train'")
    if not _exists(path):
        raise CorpusError(f"data.path: no such file, folder or glob match: {path}")
    root = Path(path)
    if root.is_dir():
        entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
        found = {s: [p for p in entries if any(_word_pattern(w).search(p.name)
                                               for w in SPLIT_WORDS[s])] for s in SPLITS}
        if found["train"]:
            for s in ("valid", "test"):
                if not found[s]:
                    raise CorpusError(f"data.path: {root} has train text but no {s} file or "
                                      f"folder (named {' / '.join(SPLIT_WORDS[s])})")
            return found
    matches = list(_word_pattern("train").finditer(path))
    if not matches:
        raise CorpusError(f"data.path: cannot tell the splits of {path}: give a folder with "
                          f"train, valid and test files or folders, or a training path that "
                          f"says 'train' (valid / test: the same path with 'valid' / 'test')")
    at = matches[-1]
    splits = {"train": path}
    for s in ("valid", "test"):
        tries = [path[:at.start()] + w + path[at.end():] for w in SPLIT_WORDS[s]]
        spec = next((t for t in tries if _exists(t)), None)
        if spec is None:
            raise CorpusError(f"data.path: no {s} text beside {path}: expected {tries[0]}")
        splits[s] = spec
    return splits
