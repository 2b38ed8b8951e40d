"""Recipes' wiring: a corpus or synthetic task -> streams, a model, a loss and a metric.

The training loop (`training.py`) knows nothing about language models or copy tasks; it
asks a task for

    train_stream()   -> Stream: inputs (N, B, ...), targets (N, B, ...), resets (N, B) | None
                        the runner cuts it into chunks of T steps and carries the state
    build_model()    -> a module `forward(inputs, state) -> (outputs, state)` with init_state
    loss_fn(outputs, targets) -> the chunk's mean loss
    evaluate(runner, split)   -> {"loss": ..., metric: ...}

Language models (PTB word / char): the training split is one long stream batchified into
B columns (word_language_model's layout); one stream is one epoch, the same every epoch.

Copy / Repeat Copy (Graves et al. 2014, as in Jaderberg et al. 2016 Sec. 3.1): each stream
is a fresh block of episodes at the curriculum's current length N, drawn from the task's
own generator; the mask of the answer steps rides along as the last channel of the
targets, so the runner's `(outputs, targets)` loss sees it. The metric is the longest
length solved: validation error below `task.threshold` wrong bits per sequence.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .config import ConfigError
from .models import RNNLanguageModel, SequenceModel

LN2 = math.log(2.0)


class Stream(NamedTuple):
    """Time-major training streams: one epoch of a corpus, or one block of episodes."""

    inputs: torch.Tensor            # (N, B) ids, or (N, B, D_in) float
    targets: torch.Tensor           # (N, B) ids, or (N, B, D_out + 1) float (mask last)
    resets: Optional[torch.Tensor]  # (N, B) bool: state zeroed before step t; or None


def build_task(cfg, data_dir=None):
    """The task of `cfg.data.corpus` (loads the corpus: may raise corpora.CorpusError)."""
    corpus = cfg.data.corpus
    if corpus in ("ptb-word", "ptb-char"):
        return LanguageModelTask(cfg, data_dir)
    if corpus in ("copy", "repeat-copy"):
        return CopyTask(cfg)
    raise ConfigError(f"data.corpus: unknown corpus {corpus!r}")  # pragma: no cover


def _limit(ids, n):
    return ids[:n] if n and n > 0 else ids


class LanguageModelTask:
    """Penn Treebank language modelling, perplexity (word) or bits per character (char)."""

    higher_is_better = False
    synthetic = False

    def __init__(self, cfg, data_dir=None):
        import corpora

        self.cfg = cfg
        level = "word" if cfg.data.corpus == "ptb-word" else "char"
        self.metric = "ppl" if level == "word" else "bpc"
        directory = data_dir or cfg.data.data_dir or None
        self.corpus = corpora.load_ptb(level, data_dir=directory, progress=False)
        self.vocab = self.corpus.vocab
        B, E = cfg.data.batch_size, cfg.data.eval_batch_size
        # ids -> (N, B) columns; inputs are rows [0, N-1), targets rows [1, N)
        self.train = corpora.batchify(_limit(self.corpus.train, cfg.data.train_tokens), B)
        self.splits = {
            "valid": corpora.batchify(_limit(self.corpus.valid, cfg.data.valid_tokens), E),
            "test": corpora.batchify(_limit(self.corpus.test, cfg.data.test_tokens), E),
        }
        if self.train.shape[0] < 2:
            raise ConfigError(f"data.train_tokens={cfg.data.train_tokens} leaves no training "
                              f"stream for data.batch_size={B}")

    def describe(self):
        return (f"{self.corpus.name}: {len(self.vocab)} types, train {self.corpus.train.numel():,} "
                f"tokens as {tuple(self.train.shape)} streams")

    def build_model(self):
        m = self.cfg.model
        return RNNLanguageModel(len(self.vocab), m.embed_dim, m.hidden_dim, m.num_layers,
                                cell=m.cell, dropout=m.dropout, tie_weights=m.tie_weights)

    @staticmethod
    def loss_fn(outputs, targets):
        # (T, B, V) logits against (T, B) ids: mean cross-entropy in nats per token
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

    def steps_per_stream(self):
        return self.train.shape[0] - 1

    def train_stream(self, device):
        data = self.train.to(device)
        return Stream(data[:-1], data[1:], None)

    def metric_of(self, loss):
        if self.metric == "bpc":
            return loss / LN2
        return math.exp(min(loss, 50.0))

    def evaluate(self, runner, split, device):
        """Mean loss over a whole split, the state carried across chunks of T."""
        data = self.splits[split].to(device)
        loss, _ = runner.evaluate(data[:-1], data[1:], chunk_length=self.cfg.train.truncation)
        return {"loss": loss, self.metric: self.metric_of(loss)}

    # a corpus task has no state of its own: its streams are the same every epoch
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def stream_state(self):
        return None

    def load_stream_state(self, state, device):
        return self.train_stream(device)


class CopyTask:
    """Copy or Repeat Copy with a curriculum on the sequence length N."""

    higher_is_better = True
    synthetic = True
    metric = "length"
    vocab = None

    def __init__(self, cfg):
        import corpora

        self.cfg, self.corpora = cfg, corpora
        t = cfg.task
        self.repeat = cfg.data.corpus == "repeat-copy"
        if t.max_length < t.start_length:
            raise ConfigError(f"task.max_length={t.max_length} is below task.start_length="
                              f"{t.start_length}")
        self.curriculum = corpora.Curriculum(t.start_length, t.length_step, t.threshold,
                                             max_len=t.max_length)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.solved = 0          # the longest length whose error fell below the threshold
        self.last_error = math.nan
        self._stream_seed = None

    @property
    def length(self):
        return self.curriculum.value

    @property
    def done(self):
        """The curriculum reached its last length and solved it: nothing left to learn."""
        return self.solved >= self.cfg.task.max_length

    def describe(self):
        kind = "repeat copy" if self.repeat else "copy"
        return (f"{kind}: {self.cfg.task.bits}-bit patterns, curriculum from N="
                f"{self.cfg.task.start_length} to {self.cfg.task.max_length}, solved below "
                f"{self.cfg.task.threshold} wrong bits per sequence")

    def _dims(self):
        k = self.cfg.task.bits
        return (k + 2 if self.repeat else k + 1), k + 1

    def build_model(self):
        m = self.cfg.model
        d_in, d_out = self._dims()
        return SequenceModel(d_in, d_out, m.hidden_dim, m.num_layers, cell=m.cell)

    @staticmethod
    def loss_fn(outputs, packed):
        # (T, B, D_out) logits against targets (T, B, D_out) + mask (T, B, 1): binary
        # cross-entropy summed over channels and answer steps, per step and stream, so that
        # every chunk weighs each answer bit alike
        targets, mask = packed[..., :-1], packed[..., -1:]
        bce = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
        return (bce * mask).sum() / (outputs.shape[0] * outputs.shape[1])

    def steps_per_stream(self):
        return None

    def _block(self, batch_size, length, generator, device=None):
        t = self.cfg.task
        if self.repeat:
            # the repeat count grows with the curriculum too: R = min(N, max_repeats)
            repeats = min(length, t.max_repeats)
            return self.corpora.repeat_copy_task(batch_size, length, repeats, bits=t.bits,
                                                 max_repeats=t.max_repeats, generator=generator,
                                                 device=device)
        return self.corpora.copy_task(batch_size, length, bits=t.bits, generator=generator,
                                      device=device)

    def train_stream(self, device):
        # remember how this block was drawn, so that a resumed run draws the very same one
        self._stream_seed = {"generator": self.generator.get_state(), "length": self.length}
        return self._pack(self._block(self.cfg.data.batch_size, self.length, self.generator),
                          device)

    @staticmethod
    def _pack(batch, device):
        packed = torch.cat([batch.targets, batch.mask.unsqueeze(-1).to(batch.targets.dtype)], -1)
        return Stream(batch.inputs.to(device), packed.to(device), batch.resets.to(device))

    def stream_state(self):
        return self._stream_seed

    def load_stream_state(self, state, device):
        after = self.generator.get_state()
        self.generator.set_state(state["generator"])
        stream = self._pack(self._block(self.cfg.data.batch_size, state["length"],
                                        self.generator), device)
        self.generator.set_state(after)
        self._stream_seed = state
        return stream

    def metric_of(self, loss):
        return self.solved

    @torch.no_grad()
    def evaluate(self, runner, split, device):
        """Wrong bits per sequence on fixed episodes at the current length; the curriculum
        moves on once it is below the threshold."""
        model = runner.model
        seed = {"valid": 1_000_003, "test": 2_000_003}[split] + self.length
        batch = self._block(self.cfg.task.eval_sequences, self.length,
                            torch.Generator().manual_seed(seed))
        was_training = model.training
        model.eval()
        try:
            inputs = batch.inputs.to(device)
            outputs, _ = model(inputs, model.init_state(inputs.shape[1]))
        finally:
            model.train(was_training)
        outputs = outputs.cpu()
        error = float(self.corpora.bit_errors(outputs, batch.targets, batch.mask)) / inputs.shape[1]
        packed = torch.cat([batch.targets, batch.mask.unsqueeze(-1).float()], -1)
        loss = float(self.loss_fn(outputs, packed))
        at = self.length
        if split == "valid":
            self.last_error = error
            if error < self.cfg.task.threshold:
                self.solved = max(self.solved, at)
            self.curriculum.update(error)
        return {"loss": loss, "error": error, "at_length": at, "length": self.solved}

    def state_dict(self):
        return {"curriculum": self.curriculum.state_dict(), "generator": self.generator.get_state(),
                "solved": self.solved}

    def load_state_dict(self, state):
        self.curriculum.load_state_dict(state["curriculum"])
        self.generator.set_state(state["generator"])
        self.solved = int(state["solved"])
