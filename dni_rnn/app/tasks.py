"""Recipes' wiring: a corpus or synthetic task -> streams, a model, a loss and a metric.

The task contract. A run (`run.py`) knows nothing about language models or copy tasks;
it asks a task for

    train_stream(device) -> Stream: inputs (N, B, ...), targets (N, B, ...), resets (N, B)
                            | None; the runner walks it in chunks of T, carrying the state
    build_model()        -> a module `forward(inputs, state) -> (outputs, state)`
    loss_fn(outputs, targets) -> the chunk's mean loss
    evaluate(model, split, device) -> {"loss": ..., metric.name: ..., ...}
    diagnosis_stream(split, device) -> (inputs, targets, resets) for `dni-rnn diagnose`
    metric               a `Metric`: name, label, digits, direction, from_loss
    score(result), higher_is_better   what "best" means (checkpoints, early stopping)
    epoch_based, decays_lr, has_test, done   how the run is budgeted and finished
    result_text(result), summary(best), postfix(record)   the task's own words

Language models (PTB, WikiText, text files, HF datasets): the training split is one long stream batchified into
B columns (word_language_model's layout); one stream is one epoch, the same every epoch.

Copy / Repeat Copy (Graves et al. 2014, as in Jaderberg et al. 2016 Sec. 3.1): each stream
is a fresh block of episodes at the curriculum's current length N, drawn from the task's
own generator; the mask of the answer steps rides along as the last channel of the
targets, so the runner's `(outputs, targets)` loss sees it. The metric is the longest
length solved: validation error below `task.threshold` wrong bits per sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

import corpora

from .config import LM_CORPORA, ConfigError
from ..distributed import World
from .lm_data import load_lm_data
from ..models import RNNLanguageModel, SequenceModel
from ..tbptt import evaluate
from ..token_context import TokenContext

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Metric:
    """What a task reports: its name in logs and JSONL, a label for sentences and plots, a
    short column heading, the digits shown, its direction, and how it follows from the mean
    loss (None: the task measures it itself)."""

    name: str
    label: str
    column: str
    digits: int
    higher_is_better: bool
    from_loss: Optional[Callable[[float], float]] = None
    log_scale: bool = False  # plots read better on a log axis

    def format(self, value, width=0):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return f"{'-':>{width}}"
        if isinstance(value, int):
            return f"{value:{width}d}"
        return f"{value:{width}.{self.digits}f}"


PERPLEXITY = Metric("ppl", "perplexity", "ppl", 2, False, lambda loss: math.exp(min(loss, 50.0)),
                    log_scale=True)
BITS_PER_CHAR = Metric("bpc", "bits per character", "bpc", 3, False, lambda loss: loss / LN2)
LENGTH_SOLVED = Metric("length", "longest length solved", "longest solved", 0, True)
# repeat-copy with R and N taking turns (`task.repeat_schedule=alternate`) counts stages
STAGE_SOLVED = Metric("length", "last stage solved", "stage solved", 0, True)
METRICS = {m.name: m for m in (PERPLEXITY, BITS_PER_CHAR, LENGTH_SOLVED)}


def alternate_stage(stage, max_repeats):
    """(N, R) of stage s = 1, 2, 3, ... when R and N take turns (`task.repeat_schedule =
    alternate`): (1, 1), (2, 1), (2, 2), (3, 2), ..., R capped at `max_repeats`."""
    return stage // 2 + 1, min((stage + 1) // 2, max_repeats)


def summary_metric(summary):
    """The Metric a run's summary.json reports (its name, and its label where two share a
    name: a staged curriculum's stages are counted as its lengths are)."""
    m = METRICS[summary["metric"]]
    return STAGE_SOLVED if summary.get("metric_label") == STAGE_SOLVED.label else m


class Stream(NamedTuple):
    """Time-major training streams: one epoch of a corpus, or one block of episodes."""

    inputs: torch.Tensor            # (N, B) ids, or (N, B, D_in) float
    targets: torch.Tensor           # (N, B) ids, or (N, B, D_out + 1) float (mask last)
    resets: Optional[torch.Tensor]  # (N, B) bool: state zeroed before step t; or None


def context_parts(stream, kind):
    """The streams a cDNI context of `kind` (`dni.context`) is made of."""
    return {"inputs": [stream.inputs], "targets": [stream.targets],
            "both": [stream.inputs, stream.targets]}[kind]


def build_task(cfg, data_dir=None, world=None):
    """The task of `cfg.data.corpus` (loads the corpus: may raise corpora.CorpusError).

    Under data parallelism (`world`, see distributed.py) a task gives each rank its own
    block of the training streams and its share of the evaluation, whose sums it reduces.
    """
    corpus = cfg.data.corpus
    world = world or World()
    if corpus in LM_CORPORA:
        return LanguageModelTask(cfg, data_dir, world)
    if corpus in ("copy", "repeat-copy"):
        return CopyTask(cfg, world)
    raise ConfigError(f"data.corpus: unknown corpus {corpus!r}")  # pragma: no cover


def language_model(m, vocab_size):
    """The language model of `cfg.model` (`m`, a ModelConfig) over `vocab_size` ids; no data
    needed, so a saved run can be rebuilt without its corpus (`trained.py`)."""
    model = RNNLanguageModel(vocab_size, m.embed_dim, m.hidden_dim, m.num_layers,
                             cell=m.cell, dropout=m.dropout, tie_weights=m.tie_weights)
    if m.init_range:
        for p in model.parameters():
            torch.nn.init.uniform_(p, -m.init_range, m.init_range)
    return model


class LanguageModelTask:
    """Language modelling (PTB, WikiText, text files, HF datasets; `lm_data.py`), perplexity
    (words, subwords) or bits per character (characters)."""

    epoch_based = True       # one stream is one epoch; train.epochs counts them
    decays_lr = True         # optim.plateau_* lowers the lr when validation stalls
    has_test = True
    done = False
    higher_is_better = False  # of the score: the validation loss

    def __init__(self, cfg, data_dir=None, world=None):

        self.cfg, self.world = cfg, world or World()
        # ids (N, B) train / (N, E) valid, test; inputs rows [0, N-1), targets rows [1, N);
        # resets (N, B) / (N, E) bool document starts, or None
        self.data = load_lm_data(cfg.data, data_dir)
        self.corpus, self.vocab = self.data.corpus, self.data.vocab
        self.metric = METRICS[self.data.metric]
        self.train = self.data.train
        self.splits = {"valid": self.data.valid, "test": self.data.test}

    def describe(self):
        docs = self.data.resets
        return (f"{self.data.name}: {len(self.vocab)} types, train {self.corpus.train.numel():,} "
                f"tokens as {tuple(self.train.shape)} streams"
                + (f", {int(docs.sum()):,} document starts" if docs is not None else ""))

    def build_model(self):
        return language_model(self.cfg.model, len(self.vocab))

    @staticmethod
    def loss_fn(outputs, targets):
        # (T, B, V) logits against (T, B) ids: mean cross-entropy in nats per token
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

    def steps_per_stream(self):
        return self.train.shape[0] - 1

    def context_channels(self, kind):
        """Features per step of `context_stream` (`dni.context`, `dni.context_code`)."""
        onehot = self.cfg.dni.context_code == "onehot"
        code = len(self.vocab) if onehot else self.cfg.model.hidden_dim
        return code * (2 if kind == "both" else 1)

    def context_stream(self, stream, kind, model):
        """What a cDNI synthesizer reads of each step after a boundary: the tokens to
        predict, the inputs, or both (`dni.context`), each as a one-hot code or as its row
        of `model`'s decoder at the time it is read (`dni.context_code`)."""
        ids = torch.stack(context_parts(stream, kind), -1)
        if self.cfg.dni.context_code == "decoder":
            return TokenContext(ids, model.decoder.weight)
        return TokenContext(ids, torch.eye(len(self.vocab), device=ids.device))

    def train_stream(self, device):
        # (N, B) -> this rank's (N, B / W) block of streams (all of them alone)
        data, resets = self.world.streams(self.train).to(device), self.world.streams(self.data.resets)
        return Stream(data[:-1], data[1:], resets[:-1].to(device) if resets is not None else None)

    def evaluate(self, model, split, device):
        """Mean loss over a whole split, the state carried across chunks of T (each rank
        its share of the split's streams, the sums reduced over the ranks)."""
        data, resets = self.data.split(split)
        data, resets = self.world.eval_columns(data), self.world.eval_columns(resets)
        tokens = (data.shape[0] - 1) * data.shape[1]
        loss = 0.0
        if tokens:
            resets = resets[:-1].to(device) if resets is not None else None
            data = data.to(device)
            loss, _ = evaluate(model, self.loss_fn, data[:-1], data[1:], resets=resets,
                               chunk_length=self.cfg.train.truncation)
        if self.world.distributed:
            total, tokens = self.world.sum([loss * tokens, tokens])
            loss = total / max(tokens, 1)
        return {"loss": loss, self.metric.name: self.metric.from_loss(loss)}

    def diagnosis_stream(self, split, device):
        """(inputs, targets, resets) of a split, for `dni-rnn diagnose`."""
        data, resets = self.data.split(split)
        data = data.to(device)
        return data[:-1], data[1:], resets[:-1].to(device) if resets is not None else None

    @staticmethod
    def score(result):
        return result["loss"]

    def metric_of_score(self, score):
        return None if score is None else self.metric.from_loss(score)

    def result_text(self, result, best=None):
        """`ppl 123.45 (loss 4.8158)`; during training `loss ... | ppl ... | best ...`."""
        m = self.metric
        value = m.format(result[m.name])
        if best is None:
            return f"{m.name} {value} (loss {result['loss']:.4f})"
        return (f"loss {result['loss']:.4f} | {m.name} {value} | best "
                f"{m.format(self.metric_of_score(best))}")

    def postfix(self, rec):
        return {self.metric.name: self.metric.format(rec.get(self.metric.name))}

    def summary(self, best):
        return {"best_valid_loss": best,
                f"best_valid_{self.metric.name}": self.metric_of_score(best)}

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

    epoch_based = False      # fresh blocks of episodes until the budget or the curriculum ends
    decays_lr = False        # the paper's curriculum runs without learning-rate decay
    has_test = False
    higher_is_better = True  # of the score: the longest length solved
    metric = LENGTH_SOLVED
    vocab = None

    def __init__(self, cfg, world=None):

        self.cfg, self.world = cfg, world or World()
        t = cfg.task
        self.repeat = cfg.data.corpus == "repeat-copy"
        if self._staged:
            self.metric = STAGE_SOLVED
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

    @property
    def _staged(self):
        return self.repeat and self.cfg.task.repeat_schedule == "alternate"

    def _where(self, length):
        """`N=3` or, when the curriculum counts stages, `stage 5 (N=3, R=3)`."""
        if not self._staged:
            return f"N={length}"
        n, r = self.shape(length)
        return f"stage {length} (N={n}, R={r})"

    def _measure_words(self):
        return ("bits of cross-entropy per answer bit" if self.cfg.task.solve_measure == "loss"
                else "wrong bits per sequence")

    def describe(self):
        t = self.cfg.task
        kind = "repeat copy" if self.repeat else "copy"
        counted = "stage" if self._staged else "N"
        return (f"{kind}: {t.bits}-bit patterns, curriculum from {counted}={t.start_length} to "
                f"{t.max_length}" + (" (R and N take turns)" if self._staged else "")
                + f", solved below {t.threshold} {self._measure_words()}")

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

    def shape(self, length):
        """(N, R) of the curriculum's value `length` (R None for copy). `task.repeat_schedule`
        min: N = length, R = min(N, max_repeats); alternate: `length` is a stage s = 1, 2,
        3, ... and (N, R) = (1, 1), (2, 1), (2, 2), (3, 2), ...: R and N take turns."""
        t = self.cfg.task
        if not self.repeat:
            return length, None
        if t.repeat_schedule == "alternate":
            return alternate_stage(length, t.max_repeats)
        return length, min(length, t.max_repeats)

    def episodes(self, batch_size, length, generator, n_episodes=1, device=None):
        """`batch_size` streams of `n_episodes` episodes at the curriculum's value `length`
        (`shape`; `corpora.TaskBatch`)."""
        t = self.cfg.task
        n, repeats = self.shape(length)
        if self.repeat:
            return corpora.repeat_copy_task(batch_size, n, repeats, n_episodes, bits=t.bits,
                                            max_repeats=t.max_repeats, generator=generator,
                                            device=device)
        return corpora.copy_task(batch_size, n, n_episodes, bits=t.bits, generator=generator,
                                 device=device)

    def train_stream(self, device):
        # remember how this block was drawn, so that a resumed run draws the very same one
        self._stream_seed = {"generator": self.generator.get_state(), "length": self.length}
        return self._pack(self._training_block(self.length, self.generator), device)

    def _training_block(self, length, generator):
        """B streams of `task.episodes` episodes, each delayed by a random offset when
        `task.random_offsets` (`corpora.offset_streams`)."""
        t = self.cfg.task
        batch = self.episodes(self.cfg.data.batch_size, length, generator, t.episodes)
        if not t.random_offsets:
            return batch
        return corpora.offset_streams(batch, batch.mask.shape[0] // t.episodes, generator)

    def _pack(self, batch, device):
        # every rank draws the whole block (B episodes) and keeps its own B / W columns
        packed = torch.cat([batch.targets, batch.mask.unsqueeze(-1).to(batch.targets.dtype)], -1)
        w = self.world
        return Stream(w.streams(batch.inputs).to(device), w.streams(packed).to(device),
                      w.streams(batch.resets).to(device))

    def context_channels(self, kind):
        """Channels per step of `context_stream` (`dni.context`)."""
        d_in, d_out = self._dims()
        return {"inputs": d_in, "targets": d_out + 1, "both": d_in + d_out + 1}[kind]

    @staticmethod
    def context_stream(stream, kind, model=None):
        """`(N, B, C)`: what a cDNI synthesizer reads of each step after a boundary: the
        targets with their mask, the inputs, or both (`dni.context`)."""
        return torch.cat([p.float() for p in context_parts(stream, kind)], -1)

    def stream_state(self):
        return self._stream_seed

    def load_stream_state(self, state, device):
        after = self.generator.get_state()
        self.generator.set_state(state["generator"])
        stream = self._pack(self._training_block(state["length"], self.generator), device)
        self.generator.set_state(after)
        self._stream_seed = state
        return stream

    def diagnosis_blocks(self, device, seed, n=4):
        """`n` fresh blocks of episodes at the current length, drawn from a generator of
        their own, for the in-training diagnosis (`Run.diagnose`)."""
        g = torch.Generator().manual_seed(seed)
        return [self._pack(self._training_block(self.length, g), device) for _ in range(n)]

    def diagnosis_stream(self, split, device):
        """A fresh block of training episodes at the current length (any split)."""
        stream = self.train_stream(device)
        return stream.inputs, stream.targets, stream.resets

    @staticmethod
    def score(result):
        return result["length"]

    @staticmethod
    def metric_of_score(score):
        return score

    def _measure_text(self, result=None):
        if self.cfg.task.solve_measure == "loss":
            return f"loss {result['bits'] if result else self.last_error:.3f} bits/bit"
        return f"error {result['error'] if result else self.last_error:7.3f} bits/seq"

    def result_text(self, result, best=None):
        return (f"{self._where(result['at_length']):<4s} {self._measure_text(result)}"
                f" | {'last stage' if self._staged else 'longest'} solved {result['length']}")

    def postfix(self, rec):
        return {("stage" if self._staged else "N"): self.length, "solved": self.solved}

    def summary(self, best):
        out = {"best_length": best, "final_length": self.length,
               "final_error": self.last_error,
               "detail": f"curriculum at {self._where(self.length)}, {self._measure_text()}"}
        if self._staged:
            (n, r), (fn, fr) = self.shape(best) if best else (0, 0), self.shape(self.length)
            out.update(best_N=n, best_R=r, final_N=fn, final_R=fr)
        return out

    @torch.no_grad()
    def evaluate(self, model, split, device):
        """Wrong bits per sequence on fixed episodes at the current length; the curriculum
        moves on once it is below the threshold."""
        seed = {"valid": 1_000_003, "test": 2_000_003}[split] + self.length
        batch = self.episodes(self.cfg.task.eval_sequences, self.length,
                              torch.Generator().manual_seed(seed))
        w = self.world  # each rank its share of the sequences; the sums are reduced
        inputs, targets, mask = (w.eval_columns(t) for t in (batch.inputs, batch.targets,
                                                               batch.mask))
        steps, count = inputs.shape[0], inputs.shape[1]
        errors = loss_sum = answer_bits = 0.0
        if count:
            was_training = model.training
            model.eval()
            try:
                outputs, _ = model(inputs.to(device), model.init_state(count))
            finally:
                model.train(was_training)
            outputs = outputs.cpu()
            errors = float(corpora.bit_errors(outputs, targets, mask))
            packed = torch.cat([targets, mask.unsqueeze(-1).float()], -1)
            loss_sum = float(self.loss_fn(outputs, packed)) * steps * count
            answer_bits = float(mask.sum()) * targets.shape[-1]
        if w.distributed:
            errors, loss_sum, count, answer_bits = w.sum([errors, loss_sum, count, answer_bits])
        error = errors / count
        loss = loss_sum / (steps * count)
        # the cross-entropy per answer bit, in bits (`task.solve_measure=loss`)
        bits = loss_sum / max(answer_bits, 1.0) / LN2
        measure = bits if self.cfg.task.solve_measure == "loss" else error
        at = self.length
        if split == "valid":
            self.last_error = measure
            if measure < self.cfg.task.threshold:
                self.solved = max(self.solved, at)
            self.curriculum.update(measure)
        return {"loss": loss, "error": error, "bits": bits, "at_length": at,
                "length": self.solved}

    def state_dict(self):
        return {"curriculum": self.curriculum.state_dict(), "generator": self.generator.get_state(),
                "solved": self.solved, "last_error": self.last_error}

    def load_state_dict(self, state):
        self.curriculum.load_state_dict(state["curriculum"])
        self.generator.set_state(state["generator"])
        self.solved = int(state["solved"])
        self.last_error = float(state.get("last_error", math.nan))
