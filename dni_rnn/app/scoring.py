"""Scoring text under a trained language model: the loss and perplexity (or bits per
character) of one's own files.

A file is read as training read a split of its corpus: each line tokenised by the run's
tokenizer with `<eos>` after it, unknown tokens as `<unk>`, a document start at every line
where the run trained with `data.documents = line`. Then, as `dni-rnn evaluate` scores a
split, its ids are laid out as E = data.eval_batch_size parallel streams (`corpora.batchify`:
each stream's first token and the last n mod E ids are not predicted) and run in chunks of
T = train.truncation with the state carried and zeroed at document starts. The run's own
valid file therefore scores exactly its valid number. A file too short for E streams of two
tokens is cut into fewer.
"""
from __future__ import annotations

import torch

import corpora
from corpora import CorpusError
from corpora.textio import read_text, split_lines

from .config import ConfigError
from .lm_data import metric_name
from .tasks import METRICS, LanguageModelTask
from ..streams import evaluate


def encode_file(codec, path, line_documents=False):
    """A text file's ids as training reads a split.

    Args:
        codec: the run's `TextCodec`.
        path: the file (UTF-8).
        line_documents: mark every line as a document start.
    Returns:
        (ids (n,) int64, starts (n,) bool or None).
    Raises:
        CorpusError: a missing, empty or undecodable file; a token the vocabulary lacks
            when it has no `<unk>` (characters), naming the line.
    """
    vocab, ids, starts = codec.vocab, [], []
    for k, line in enumerate(split_lines(read_text(path))):
        starts.append(len(ids))
        ids += vocab.encode(codec.tokenizer.tokenize(line), source=f"{path} line {k + 1}")
        ids.append(vocab.eos)
    ids = torch.tensor(ids, dtype=torch.int64)
    if not line_documents:
        return ids, None
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    mask[torch.tensor(starts, dtype=torch.int64)] = True
    return ids, mask


def score_file(run, path):
    """Loss and perplexity (or bpc) of one file under a language-model run.

    Returns:
        dict: file, tokens (predicted), unk (`<unk>` among them), loss (nats per token) and
        the run's metric ("ppl" or "bpc").
    """
    cfg, vocab = run.config, run.vocab
    line_documents = cfg.data.corpus in ("text", "hf") and cfg.data.documents == "line"
    ids, starts = encode_file(run.tokenizer, path, line_documents)
    if ids.numel() < 2:
        raise CorpusError(f"{path} holds {ids.numel()} token: too few to score")
    width = min(cfg.data.eval_batch_size, ids.numel() // 2)
    data = corpora.batchify(ids, width).to(run.device)  # (N, E)
    resets = None if starts is None else corpora.batchify_mask(starts, width)[:-1].to(run.device)
    loss, _ = evaluate(run.model, LanguageModelTask.loss_fn, data[:-1], data[1:],
                       resets=resets, chunk_length=cfg.train.truncation)
    metric = METRICS[metric_name(cfg.data)]
    unk = int((data[1:] == vocab.unk).sum()) if vocab.unk is not None else 0
    return {"file": str(path), "tokens": data[1:].numel(), "unk": unk, "loss": loss,
            metric.name: metric.from_loss(loss)}


def score(run, paths):
    """Score files one by one, each from the zero state, and all of them together.

    Args:
        run: a `Trained` language model (`trained.load`).
        paths: text files.
    Returns:
        dict: checkpoint, step, metric, streams, T, files (one `score_file` dict each) and
        total (tokens, unk, the token-weighted mean loss and its metric).
    Raises:
        ConfigError: the run is not a language model.
        CorpusError: a file cannot be read or encoded.
    """
    cfg = run.config
    if not run.is_language_model:
        raise ConfigError(f"score needs a language-model run; {run.checkpoint} is a "
                          f"{cfg.data.corpus} task (dni-rnn generate shows an episode)")
    metric = METRICS[metric_name(cfg.data)]
    files = [score_file(run, p) for p in paths]
    tokens = sum(f["tokens"] for f in files)
    loss = sum(f["loss"] * f["tokens"] for f in files) / max(tokens, 1)
    total = {"tokens": tokens, "unk": sum(f["unk"] for f in files), "loss": loss,
             metric.name: metric.from_loss(loss)}
    return {"checkpoint": str(run.checkpoint), "step": run.step, "metric": metric.name,
            "tokenizer": run.tokenizer.name, "streams": cfg.data.eval_batch_size,
            "T": cfg.train.truncation, "files": files, "total": total}
