"""The Corpus: three 1-D id tensors, a vocabulary, optional document starts; and its builder.

Tokenisation, one straight line:

    sources (files / dataset rows) -> lines -> tokenizer.tokenize(line) + [<eos>] -> ids

    train:  ids (N_train,) int64      doc_starts["train"]: (N_train,) bool or absent
    valid:  ids (N_valid,) int64      True where a document's first token sits
    test:   ids (N_test,)  int64

The vocabulary comes from the training split only (or from the tokenizer, for
sentencepiece). Tokens of valid/test that training never saw become ``<unk>`` where the
vocabulary has one (``info["unk"]`` counts them per split), and are an error naming the
token, the file and the line otherwise.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .cache import entry_path, load_entry, save_entry
from .errors import CorpusError
from .vocab import EOS, UNK, Vocabulary

SPLITS = ("train", "valid", "test")
DOCUMENT_MODES = (None, "source", "line")


@dataclass
class Source:
    """Lines of text from one place (a file, or a dataset row range), for error messages.

    Args:
        name: where the lines come from (a path, or "dataset[split]").
        lines: the lines, newlines removed.
        first_line: the line number of ``lines[0]`` in ``name`` (1-based).
    """

    name: str
    lines: Sequence[str]
    first_line: int = 1


@dataclass(eq=False)  # tensors have no single truth value; compare splits explicitly
class Corpus:
    """A tokenised corpus.

    Attributes:
        name: e.g. "ptb-word".
        train, valid, test: 1-D int64 id tensors (a split that was not given is empty).
        vocab: the vocabulary that maps ids to tokens.
        doc_starts: split name -> (N,) bool tensor, True at the first token of each
            document; None when the corpus has no document structure.
        tokenizer: the tokenizer (for ``decode``); not compared, not cached.
        info: plain facts about the load: sources, checksums, settings, cache status.
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab: Vocabulary
    doc_starts: dict[str, torch.Tensor] | None = None
    tokenizer: object | None = field(default=None, repr=False, compare=False)
    info: dict = field(default_factory=dict, repr=False, compare=False)

    def split(self, name: str) -> torch.Tensor:
        """The ids of split "train", "valid" (alias "validation") or "test"."""
        name = "valid" if name == "validation" else name
        if name not in SPLITS:
            raise CorpusError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def decode(self, ids) -> str:
        """Text of an id sequence: tokens joined by the tokenizer, ``<eos>`` as newlines."""
        detok = getattr(self.tokenizer, "detokenize", " ".join)
        lines: list[list[str]] = [[]]
        for t in self.vocab.decode(ids):
            if t == self.vocab.eos_token:
                lines.append([])
            else:
                lines[-1].append(t)
        return "\n".join(detok(line) for line in lines)

    def to_entry(self) -> dict:
        """Tensors and plain values only, for the cache."""
        return {"name": self.name, "vocab": self.vocab.state_dict(),
                **{s: getattr(self, s).to(torch.int32) for s in SPLITS},  # half the disk
                "doc_starts": dict(self.doc_starts) if self.doc_starts is not None else None,
                "info": {k: v for k, v in self.info.items() if k != "cache"}}

    @classmethod
    def from_entry(cls, entry: dict) -> "Corpus":
        """Rebuild a corpus written by ``to_entry``."""
        return cls(name=entry["name"], vocab=Vocabulary.from_state_dict(entry["vocab"]),
                   doc_starts=entry["doc_starts"], info=dict(entry["info"]),
                   **{s: entry[s].to(torch.int64) for s in SPLITS})


def _summary(names: list[str], keep: int = 10) -> list[str]:
    """At most ``keep`` source names (a dataset split may have millions of rows)."""
    if len(names) <= keep:
        return names
    return names[:keep] + [f"... ({len(names)} sources in all)"]


def _to_tensor(a: array) -> torch.Tensor:
    if not len(a):
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(a, dtype=torch.int64).clone()


def _encode_with(stoi: dict, unk: int | None, eos_id: int | None, sources: Sequence[Source],
                 tokenize: Callable[[str], list[str]], unk_name: str, line_starts: list[int],
                 source_starts: list[int]) -> tuple[array, int]:
    """Encode against a fixed token->id map; unknown tokens go to unk (counted) or raise."""
    out, unknown = array("q"), 0
    for src in sources:
        source_starts.append(len(out))
        for k, line in enumerate(src.lines):
            line_starts.append(len(out))
            toks = tokenize(line)
            try:
                out.extend([stoi[t] for t in toks])
            except KeyError as e:
                if unk is None:
                    raise CorpusError(
                        f"token {e.args[0]!r} in {src.name} line {src.first_line + k} is not in "
                        f"the training vocabulary ({len(stoi):,} types), which has no "
                        f"{(unk_name or UNK)!r} to map it to"
                    ) from None
                out.extend([stoi.get(t, unk) for t in toks])
                unknown += sum(t not in stoi for t in toks)
            if eos_id is not None:
                out.append(eos_id)
    return out, unknown


def build_corpus(name: str, splits: dict[str, Sequence[Source]], tokenizer, *,
                 documents: str | None = None, eos: str = EOS, unk: str = UNK,
                 max_vocab: int | None = None, min_freq: int = 1,
                 reserve_unk: bool = False) -> Corpus:
    """Tokenise sources into a Corpus.

    Args:
        name: the corpus name.
        splits: "train" / "valid" / "test" -> sources (valid and test may be absent).
        tokenizer: see ``tokenizers.py``.
        documents: None (no document mask), "source" (each source is a document) or
            "line" (each line is a document).
        eos: the end-of-line token, appended after every line.
        unk: the unknown-token symbol (used only if the training split contains it, if
            pruning needs it, or if ``reserve_unk``); None: unseen tokens are an error.
        max_vocab: keep at most this many tokens (the rest become ``unk``).
        min_freq: drop tokens seen fewer times in training.
        reserve_unk: give ``unk`` an id even if training neither has nor needs it.

    Returns:
        The Corpus (``info``: token counts, ``unk`` = per split the tokens that became
        ``unk`` because the vocabulary lacks them, and the build time).
    """
    if documents not in DOCUMENT_MODES:
        raise CorpusError(f"documents must be one of {DOCUMENT_MODES}, not {documents!r}")
    train_sources = list(splits.get("train") or [])
    if not train_sources:
        raise CorpusError(f"corpus {name}: no training text given")
    for srcs in splits.values():
        for src in srcs or []:
            if not src.lines:
                raise CorpusError(f"{src.name} has no text")
    t0 = time.perf_counter()
    tokenize = tokenizer.tokenize
    starts: dict[str, tuple[list[int], list[int]]] = {s: ([], []) for s in SPLITS}
    fixed = tokenizer.fixed_vocabulary()
    if fixed is None:
        # one pass over train: provisional ids by first appearance, then reorder by count
        stoi: dict[str, int] = {eos: 0}
        get = stoi.setdefault
        raw = array("q")
        lines_at, sources_at = starts["train"]
        for src in train_sources:
            sources_at.append(len(raw))
            for line in src.lines:
                lines_at.append(len(raw))
                raw.extend([get(t, len(stoi)) for t in tokenize(line)])
                raw.append(0)
        first_seen = list(stoi)
        ids = _to_tensor(raw)
        counts = torch.bincount(ids, minlength=len(first_seen)).tolist()
        vocab = Vocabulary.from_counts(first_seen, counts, eos=eos, unk=unk, max_size=max_vocab,
                                       min_freq=min_freq, reserve_unk=reserve_unk)
        unknown = {"train": sum(n for t, n in zip(first_seen, counts) if t not in vocab.stoi)}
        fallback = vocab.unk if vocab.unk is not None else -1
        remap = torch.tensor([vocab.stoi.get(t, fallback) for t in first_seen], dtype=torch.int64)
        train = remap[ids]
    else:
        vocab, unknown = fixed, {}
        train, unknown["train"] = _encode_with(vocab.stoi, vocab.unk, vocab.eos, train_sources,
                                               tokenize, unk, *starts["train"])
        train = _to_tensor(train)
    tensors = {"train": train}
    for split in ("valid", "test"):
        ids, unknown[split] = _encode_with(vocab.stoi, vocab.unk, vocab.eos,
                                           list(splits.get(split) or []), tokenize, unk,
                                           *starts[split])
        tensors[split] = _to_tensor(ids)
    doc_starts = None
    if documents is not None:
        doc_starts = {}
        for split in SPLITS:
            lines_at, sources_at = starts[split]
            mask = torch.zeros(len(tensors[split]), dtype=torch.bool)
            at = sources_at if documents == "source" else lines_at
            if at:
                mask[torch.tensor(at, dtype=torch.int64)] = True
            doc_starts[split] = mask
    info = {"tokens": {s: len(tensors[s]) for s in SPLITS}, "unk": unknown,
            "sources": {s: _summary([src.name for src in (splits.get(s) or [])]) for s in SPLITS},
            "tokenizer": tokenizer.settings(), "build_seconds": round(time.perf_counter() - t0, 3)}
    return Corpus(name=name, vocab=vocab, doc_starts=doc_starts, tokenizer=tokenizer, info=info,
                  **tensors)


def cached_build(cache: Path | None, kind: str, key: str, build: Callable[[], Corpus],
                 tokenizer=None) -> Corpus:
    """Return the cached corpus for ``kind``/``key``, or build and cache it.

    Args:
        cache: the cache root, or None to bypass the cache.
        kind: a file-name-safe label, e.g. "ptb-word".
        key: ``cache.cache_key`` of everything the ids depend on.
        build: makes the corpus on a miss.
        tokenizer: attached to a corpus read from the cache (for ``decode``).

    Returns:
        The corpus; ``info["cache"]`` is "hit", "miss" or "off".
    """
    if cache is None:
        corpus = build()
        corpus.info["cache"] = "off"
        return corpus
    path = entry_path(cache, kind, key)
    entry = load_entry(path)
    if entry is not None:
        corpus = Corpus.from_entry(entry)
        corpus.tokenizer = tokenizer
        corpus.info["cache"] = "hit"
        return corpus
    corpus = build()
    save_entry(path, corpus.to_entry())
    corpus.info["cache"] = "miss"
    return corpus
