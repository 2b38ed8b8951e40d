"""Hugging Face ``datasets`` text corpora (WikiText and any other), and WikiText from disk.

``datasets`` is optional: it is imported inside the functions, never by ``import corpora``.
Each row of the text column is one line (a row with inner newlines is several lines), and
each line gets one ``<eos>``: the rule of pytorch/examples' word_language_model, whose
WikiText-2 counts are 2,088,628 / 217,646 / 245,569 ids and 33,278 types (not checked
here: WikiText is not in shared/data and there is no network).

Offline, ``load_dataset`` still reads local files: ``load_hf("text", data_files={"train":
..., "validation": ..., "test": ...})``; the tokenised ids are cached by the dataset
fingerprint, which ``datasets`` derives from the files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from .cache import cache_key
from .checksums import file_md5
from .corpus import Corpus, Source, build_corpus, cached_build
from .errors import CorpusError
from .paths import DATA_DIR_ENV, cache_root, env_data_dir, existing_dir
from .text import load_text_files
from .tokenizers import make_tokenizer
from .vocab import EOS, UNK

INSTALL_HINT = 'Hugging Face datasets is not installed: pip install "dni-rnn[hf]"'
SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}


def import_datasets():
    """The ``datasets`` module, or a CorpusError that says how to install it."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(INSTALL_HINT) from None
    return datasets


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _row_lines(row) -> list[str]:
    if row is None:
        return [""]
    row = row[:-1] if row.endswith("\n") else row
    return [line[:-1] if line.endswith("\r") else line for line in row.split("\n")]


def _local_md5s(data_files, cache) -> list:
    """md5 sums of the local files in a ``data_files`` argument (str, list or dict)."""
    if data_files is None:
        return []
    if isinstance(data_files, (str, os.PathLike)):
        items = [data_files]
    elif isinstance(data_files, Mapping):
        items = [f for v in data_files.values()
                 for f in ([v] if isinstance(v, (str, os.PathLike)) else list(v))]
    else:
        items = list(data_files)
    return [[str(f), file_md5(f, cache)] for f in items if Path(f).is_file()]


def load_hf(name: str, config: str | None = None, *, data_files=None,
            split_names: Mapping[str, str | None] | None = None, text_field: str = "text",
            tokenizer="word", documents: str | None = None,
            cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
            hf_cache_dir: str | os.PathLike | None = None, max_vocab: int | None = None,
            min_freq: int = 1, sp_vocab_size: int = 8000, sp_model_type: str = "unigram",
            sp_options: dict | None = None, eos: str = EOS, unk: str = UNK,
            **load_kwargs) -> Corpus:
    """Tokenise a Hugging Face text dataset into a Corpus.

    Args:
        name: the dataset (``"Salesforce/wikitext"``, or a builder such as ``"text"``).
        config: its configuration (e.g. ``"wikitext-2-v1"``), or None.
        data_files: local files for builders such as "text" (a dict split -> files).
        split_names: our split ("train", "valid", "test") -> the dataset's split name, or
            None to leave that split empty; by default "train", "validation"/"valid"/"dev",
            "test".
        text_field: the column holding the text.
        tokenizer: "word", "char", "sentencepiece" or a tokenizer object.
        documents: None, or "row" (each dataset row is a document: ``doc_starts``).
        cache_dir: the cache root for our tensors and sentencepiece models.
        use_cache: read/write the tokenised tensors in the cache.
        hf_cache_dir: ``datasets``' own cache (default: its HF_DATASETS_CACHE).
        max_vocab, min_freq: vocabulary pruning (pruned tokens become ``<unk>``).
        sp_vocab_size, sp_model_type, sp_options: sentencepiece settings.
        eos, unk: the end-of-line and unknown-token symbols; as in ``load_text_files``,
            a word or char vocabulary always holds ``unk`` (None: unseen tokens are errors).
        **load_kwargs: passed to ``datasets.load_dataset`` (e.g. revision=).

    Returns:
        The Corpus, named after the dataset and config.

    Raises:
        CorpusError: datasets missing, the dataset unavailable (e.g. offline), a split or
            the text column missing.
    """
    datasets = import_datasets()
    if documents not in (None, "row"):
        raise CorpusError(f"documents must be None or 'row', not {documents!r}")
    label = name + (f"/{config}" if config else "")
    try:
        if hf_cache_dir is not None:
            load_kwargs["cache_dir"] = str(hf_cache_dir)
        ds = datasets.load_dataset(name, config, data_files=data_files, **load_kwargs)
    except Exception as e:  # datasets raises many types; all mean "not available"
        offline = "1" in (os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE"))
        hint = (" (HF offline mode is on: only local files and the HF cache can be read)"
                if offline else "")
        raise CorpusError(f"could not load Hugging Face dataset {label}{hint}: "
                          f"{_one_line(e)}") from None
    available = list(ds.keys())
    chosen: dict[str, str | None] = {}
    for split, candidates in SPLIT_NAMES.items():
        if split_names is not None and split in split_names:
            chosen[split] = split_names[split]
        else:
            chosen[split] = next((c for c in candidates if c in available), None)
            if chosen[split] is None:
                raise CorpusError(
                    f"{label} has no {split} split (it has {', '.join(available)}); pass "
                    f"split_names={{'{split}': NAME or None}}")
        if chosen[split] is not None and chosen[split] not in available:
            raise CorpusError(f"{label} has no split {chosen[split]!r} "
                              f"(it has {', '.join(available)})")
    for split, hf_split in chosen.items():
        columns = ds[hf_split].column_names if hf_split is not None else [text_field]
        if text_field not in columns:
            raise CorpusError(f"{label}[{hf_split}] has no column {text_field!r} (it has "
                              f"{', '.join(columns)}); pass text_field=")
    fingerprints = {s: getattr(ds[h], "_fingerprint", None) if h else None
                    for s, h in chosen.items()}
    if any(h is not None and fingerprints[s] is None for s, h in chosen.items()):
        use_cache = False  # nothing identifies the data: do not cache
    cache = cache_root(cache_dir)
    local_md5 = _local_md5s(data_files, cache)  # belt and braces: local files by content

    def rows(split: str):
        return ds[chosen[split]][text_field] if chosen[split] is not None else []

    def train_lines():
        for row in rows("train"):
            yield from _row_lines(row)

    tok = make_tokenizer(tokenizer, train_lines=train_lines,
                         data_key={"hf": fingerprints["train"], "local_md5": local_md5},
                         cache=cache, sp_vocab_size=sp_vocab_size, sp_model_type=sp_model_type,
                         sp_options=sp_options)
    options = {"documents": documents, "text_field": text_field, "max_vocab": max_vocab,
               "min_freq": min_freq, "eos": eos, "unk": unk}
    key = cache_key({"corpus": "hf", "name": label, "fingerprints": fingerprints,
                     "local_md5": local_md5, "tokenizer": tok.settings(), **options})

    def build() -> Corpus:
        splits = {}
        for split, hf_split in chosen.items():
            if hf_split is None:
                continue
            where = f"{label}[{hf_split}]"
            if documents == "row":
                splits[split] = [Source(f"{where} row {i}", _row_lines(r), 1)
                                 for i, r in enumerate(rows(split))]
            else:
                lines: list[str] = []
                for r in rows(split):
                    lines.extend(_row_lines(r))
                splits[split] = [Source(where, lines)] if lines else []
        corpus = build_corpus(label, splits, tok, documents="source" if documents else None,
                              eos=eos, unk=unk, max_vocab=max_vocab, min_freq=min_freq,
                              reserve_unk=unk is not None)
        corpus.info["hf_splits"] = dict(chosen)
        return corpus

    kind = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"hf-{label}-{tok.name}")
    return cached_build(cache if use_cache else None, kind, key, build, tok)


# local WikiText layouts: Salesforce's zip (wiki.*.tokens / wiki.*.raw) and pytorch/examples'
_WIKITEXT_NAMES = {
    False: (("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
            ("train.txt", "valid.txt", "test.txt")),
    True: (("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"),),
}


def _find_wikitext(root: Path, folder: str, raw: bool) -> tuple[Path, ...] | None:
    for d in (root, root / folder):
        for names in _WIKITEXT_NAMES[raw]:
            if all((d / n).is_file() for n in names):
                return tuple(d / n for n in names)
    return None


def load_wikitext(version: str = "2", raw: bool = False, *,
                  data_dir: str | os.PathLike | None = None, tokenizer="word",
                  cache_dir: str | os.PathLike | None = None, **kwargs) -> Corpus:
    """WikiText-2 or WikiText-103, from local files if present, else Hugging Face.

    Local files are looked for in ``data_dir`` (authoritative when given), then
    ``$DNI_RNN_DATA_DIR``, each directly or in ``wikitext-2/`` (``wikitext-2-raw/`` for
    raw): ``wiki.{train,valid,test}.tokens`` (raw: ``.raw``) or ``{train,valid,test}.txt``.

    Args:
        version: "2" or "103".
        raw: the raw (untokenised, no ``<unk>``) version.
        data_dir: an explicit folder with the files.
        tokenizer: "word", "char", "sentencepiece" or a tokenizer object.
        cache_dir: the cache root.
        **kwargs: passed on to ``load_text_files`` or ``load_hf``.

    Returns:
        The Corpus, named "wikitext-2" etc.
    """

    version = str(version)
    if version not in ("2", "103"):
        raise CorpusError(f"unknown WikiText version {version!r}; choose '2' or '103'")
    folder = f"wikitext-{version}" + ("-raw" if raw else "")
    if data_dir is not None:
        root = existing_dir(data_dir)
        files = _find_wikitext(root, folder, raw)
        if files is None:
            want = ", ".join(_WIKITEXT_NAMES[raw][0])
            raise CorpusError(f"WikiText-{version} files missing in {root}: put {want} in {root} "
                              f"or {root / folder}")
    else:
        env = env_data_dir()
        files = _find_wikitext(env, folder, raw) if env is not None and env.is_dir() else None
    if files is not None:
        return load_text_files(*files, tokenizer=tokenizer, name=folder, cache_dir=cache_dir,
                               **kwargs)
    config = f"wikitext-{version}{'-raw' if raw else ''}-v1"
    try:
        return load_hf("Salesforce/wikitext", config, tokenizer=tokenizer, cache_dir=cache_dir,
                       **kwargs)
    except CorpusError as e:
        raise CorpusError(f"WikiText-{version} not found locally (set {DATA_DIR_ENV} to a folder "
                          f"with {folder}/ or pass data_dir) and {e}") from None
