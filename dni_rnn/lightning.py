"""TBPTT and DNI for Lightning: a LightningModule base class that runs the runner's chunk
walk under manual optimisation (`pip install "dni-rnn[lightning]"`; docs/lightning.md).

    class LM(TBPTTModule):                                   # was: L.LightningModule
        def __init__(self):
            super().__init__(truncation=35, dni=True)        # dni=None: plain TBPTT
            self.rnn = dni_rnn.RNNLanguageModel(10000, 200, 200, 2)
        def forward(self, tokens, state):                    # time-major (T, B)
            return self.rnn(tokens, state)
        def init_state(self, batch_size):
            return self.rnn.init_state(batch_size)
        def chunk_loss(self, logits, targets):
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    trainer.fit(LM(), StreamLoader.from_ids(train_ids), StreamLoader.from_ids(valid_ids))

A base class, not a callback or a mixin: under manual optimisation the training step *is*
the chunk loop, and only the LightningModule owns its training step and its checkpoint
hooks; a mixin would be the same methods with a second base class to order.

What a batch is (time-major; `batch_first=True` for DataLoader-collated tuples):

    Segment (StreamLoader)       steps [start, start + L) of B streams that go on across
                                 batches: the state carries over from the last segment,
                                 starts afresh where start == 0 and where `resets` says
    (inputs, targets[, resets])  B sequences of their own: the state starts from
                                 init_state and the sequences end with the batch

Each chunk of T steps is one update (`TBPTTRunner.train_chunk`: trigger, forward, loss,
synthetic gradient, one backward, clip, step); the steps go through Lightning's
optimizer wrappers, so `global_step` counts them.

DDP (`Trainer(strategy="ddp")`): every rank reads whole segments and keeps its own B / W
contiguous streams (`distributed.World`); after each backward the gradients are averaged
and the synthesizer's trigger statistics summed by `distributed.GradientSync`, as under
torchrun. Lightning's DDP wrapper syncs nothing here: its reducer only runs for
`manual_backward`, which the runner does not call (it runs one deferred backward).
"""
import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError("dni_rnn.lightning needs Lightning >= 2.2: "
                      'pip install "dni-rnn[lightning]"') from e

from . import nest
from .distributed import World
from .dni_step import DNIStep
from .metrics import read_metrics
from .streams import check_streams, evaluate
from .synthesizers import StateSynthesizer, state_dim
from .tbptt import TBPTTRunner
from .truncation import as_schedule

# the keywords `dni=` takes: DNIStep's settings (its docstring and docs/dni.md say what
# each does), but for the modules this class builds and the state layout it is given
DNI_SETTINGS = tuple(name for name in inspect.signature(DNIStep).parameters
                     if name not in ("synthesizer", "aux_head", "batch_dim"))
METRICS = {"ppl": lambda loss: math.exp(loss) if loss < 700 else math.inf,
           "bpc": lambda loss: loss / math.log(2.0)}
# ChunkMetrics fields logged as dni/<field>, averaged over a batch's chunks
SYNTH_FIELDS = ("synth_loss", "cosine", "real_norm", "synthetic_norm", "injected_norm",
                "target_rms", "sg_scale")


class Segment(NamedTuple):
    """Steps [start, start + L) of B time-major streams that go on across batches.

    inputs, targets: `(L, B, ...)`; resets: `(L, B)` bool, stream b restarts before step t
    (or None); start: where the segment begins in the streams (0: they all start here);
    last: the streams end with it (no synthetic gradient past it); next_resets: `(B,)`
    bool, the streams that restart right after it (they get no synthetic gradient).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    resets: Optional[torch.Tensor] = None
    start: int = 0
    last: bool = True
    next_resets: Optional[torch.Tensor] = None


class StreamLoader:
    """Time-major streams as Lightning batches: consecutive `Segment`s of `length` steps.

    Pass it where Lightning takes a DataLoader. It is sized and resumable: Lightning keeps
    its position in checkpoints, so a resumed fit reads the segment after the last one
    trained on. Every rank reads all B streams (a TBPTTModule keeps its share under DDP).

    Args:
        inputs, targets: `(N, B, ...)` time-major streams.
        resets: optional `(N, B)` bool, stream b restarts before step t.
        length: steps per segment; a multiple of the truncation T cuts the chunks of one
            walk over the whole streams (`TBPTTRunner.run`), T makes a batch one update.
    """

    def __init__(self, inputs, targets, resets=None, length=35):
        check_streams(inputs, targets, resets)
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be an int >= 1 (steps per segment), got {length!r}")
        self.inputs, self.targets, self.resets, self.length = inputs, targets, resets, length
        self._resume_at = 0  # the segment the next pass starts from (`load_state_dict`)
        self._handed_out = 0  # segments of this pass handed out so far

    @classmethod
    def from_ids(cls, ids, resets=None, length=35):
        """A language model's `(N + 1, B)` id streams (`corpora.batchify`): inputs are rows
        [0, N), targets rows [1, N + 1), resets (document starts) rows [0, N)."""
        return cls(ids[:-1], ids[1:], resets[:-1] if resets is not None else None, length)

    def __len__(self):
        return math.ceil(self.inputs.shape[0] / self.length)

    def __iter__(self):
        first, self._resume_at = self._resume_at, 0
        for i in range(first, len(self)):
            # counted as handed out: Lightning fetches a sized loader's next batch only
            # after the step, so a checkpoint taken after a step resumes after it
            self._handed_out = i + 1
            yield self.segment(i)

    def segment(self, i):
        """The i-th Segment."""
        n, r = self.inputs.shape[0], self.resets
        a = i * self.length
        b = min(a + self.length, n)
        return Segment(self.inputs[a:b], self.targets[a:b], r[a:b] if r is not None else None,
                       a, b == n, r[b] if r is not None and b < n else None)

    def state_dict(self):
        return {"segment": self._handed_out}

    def load_state_dict(self, state):
        self._resume_at = int(state["segment"])


@dataclass
class _Carry:
    """The state carried between batches: after step `position` of the streams."""

    state: object = None
    position: int = 0
    from_checkpoint: bool = False  # the state is a checkpoint's: all B streams, on the CPU
    total: float = 0.0             # evaluation: loss x tokens so far
    tokens: int = 0


class TBPTTModule(pl.LightningModule):
    """A LightningModule trained by truncated BPTT, with or without synthetic gradients.

    Subclasses define `forward(inputs, state) -> (outputs, state)` (time-major),
    `init_state(batch_size)`, `chunk_loss(outputs, targets)` (a chunk's mean loss) and
    `configure_optimizers` (over `self.parameters()`, which hold the synthesizer; or two
    optimizers: the model's, then the synthesizer's). Lightning's own `training_step`,
    `validation_step` and `test_step` are this class's.

    Args:
        truncation: T, steps per chunk: an int or a schedule (`dni_rnn.RandomTruncation`).
        dni: None or False: plain TBPTT; True: DNI with the library's stable defaults; a
            dict of DNI settings (`DNI_SETTINGS`, e.g. `dict(sg_scale=0.0125,
            target_scale="raw")`). The synthesizer is `configure_synthesizer()`'s.
        clip: max norm of the model's gradients in each chunk (None: the Trainer's
            `gradient_clip_val`, else none). The synthesizer is never clipped with it.
        synth_clip: the synthesizer's own clip (None: none).
        metric: "ppl" or "bpc" to log exp(loss) or loss / ln 2 beside each loss; None.
        batch_first: tuple batches are `(B, L, ...)` (Segments are always time-major).
        batch_dim: batch dimension of the state tensors (None: the one before the features).
        on_nonfinite: "raise" or "skip" a chunk with a NaN / inf loss (`TBPTTRunner`).
    """

    def __init__(self, truncation=35, dni=None, clip=None, synth_clip=None, metric=None,
                 batch_first=False, batch_dim=None, on_nonfinite="raise"):
        super().__init__()
        if metric is not None and metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)} or None, got {metric!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.automatic_optimization = False  # one update per chunk, made by the runner
        self.schedule = as_schedule(truncation)
        self.dni_settings = _dni_settings(dni)
        self.clip, self.synth_clip, self.metric = clip, synth_clip, metric
        self.batch_first, self.batch_dim, self.on_nonfinite = batch_first, batch_dim, on_nonfinite
        self.synthesizer = self.aux_head = None  # built by configure_model (init_state's shape)
        self._runner = None        # built at the first training step of a fit
        self._runner_state = None  # a checkpoint's or the last fit's, for the next runner
        self._runner_world_size = 1  # the number of processes that wrote it
        self._trainer_clip = None  # Trainer(gradient_clip_val), held during a fit
        self._train_carry, self._eval_carry = _Carry(), _Carry()

    # ---- what a subclass defines -------------------------------------------------------

    def init_state(self, batch_size):
        """The state of `batch_size` fresh streams (e.g. `self.rnn.init_state(batch_size)`)."""
        raise NotImplementedError(f"{type(self).__name__} must define init_state(batch_size)")

    def chunk_loss(self, outputs, targets):
        """The mean loss of a chunk: outputs and targets `(T, B, ...)`."""
        raise NotImplementedError(f"{type(self).__name__} must define chunk_loss(outputs, targets)")

    def configure_synthesizer(self):
        """The synthesizer of `dni=`: an MLP with one hidden layer on a stream's whole state
        (for an LSTM every layer's h and c) whose zero output layer makes training start
        as plain TBPTT. Override it for another."""
        return StateSynthesizer.mlp(state_dim(self.init_state(1), self.batch_dim), n_hidden=1,
                                    batch_dim=self.batch_dim)

    # ---- Lightning's hooks -------------------------------------------------------------

    def configure_model(self):
        """Build the synthesizer (and DNI + Aux's head) once the network exists; Lightning
        calls this before configure_optimizers and before it restores a checkpoint."""
        if self.dni_settings is None or self.synthesizer is not None:
            return
        self.synthesizer = self.configure_synthesizer()
        if self.dni_settings.get("aux_weight"):
            self.aux_head = self.configure_synthesizer()

    def configure_callbacks(self):
        """Lightning calls this before it checks its configuration, which refuses
        `Trainer(gradient_clip_val=c)` under manual optimisation: c becomes this module's
        clip of the model's gradient norm, the Trainer's own until teardown. An override
        must call `super().configure_callbacks()`."""
        trainer = self.trainer
        value = trainer.gradient_clip_val
        if value:
            if trainer.gradient_clip_algorithm not in (None, "norm"):
                raise ValueError("TBPTTModule clips the gradient norm only; drop "
                                 "Trainer(gradient_clip_algorithm='value')")
            if self.clip is not None and self.clip != value:
                raise ValueError(f"Trainer(gradient_clip_val={value}) and TBPTTModule(clip="
                                 f"{self.clip}) disagree; set one of them")
            self._trainer_clip, trainer.gradient_clip_val = value, None
        return super().configure_callbacks()

    def teardown(self, stage):
        super().teardown(stage)
        if self._runner is not None:  # a later fit goes on from it
            self._runner_state, self._runner = self._runner.state_dict(), None
        if self._trainer_clip is not None:
            self.trainer.gradient_clip_val, self._trainer_clip = self._trainer_clip, None

    def training_step(self, batch, batch_idx):
        if self._runner is None:
            self._runner = self._build_runner()
        carry = self._train_carry
        segment = self._segment(batch, evaluation=False)
        state = self._state_entering(segment, carry)
        carry.state, history = self._walk(segment, state)
        carry.position = segment.start + segment.inputs.shape[0]
        self._log_training(history)

    def on_validation_epoch_start(self):
        self._eval_carry = _Carry()

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch)

    def on_validation_epoch_end(self):
        self._log_evaluation("val")

    def on_test_epoch_start(self):
        self._eval_carry = _Carry()

    def test_step(self, batch, batch_idx):
        self._evaluate(batch)

    def on_test_epoch_end(self):
        self._log_evaluation("test")

    def on_save_checkpoint(self, checkpoint):
        """Lightning's checkpoint also holds the carried state (every rank's streams, in
        rank order) and the runner's (update count, truncation schedule, the synthesizer's
        units and guard): a fit resumed from it goes on with the stream."""
        carry = self._train_carry
        state = carry.state if carry.from_checkpoint else \
            self._world().gather_state(carry.state, self.batch_dim)
        runner = self._runner.state_dict() if self._runner is not None else self._runner_state
        checkpoint["dni_rnn"] = {"state": state, "position": carry.position, "runner": runner,
                                 "world_size": self._world().size}

    def on_load_checkpoint(self, checkpoint):
        saved = checkpoint.get("dni_rnn")
        if saved is None:  # a checkpoint written by another module: nothing carried
            return
        self._runner, self._runner_state = None, saved["runner"]
        self._runner_world_size = int(saved.get("world_size", 1))
        self._train_carry = _Carry(saved["state"], int(saved["position"]),
                                   from_checkpoint=saved["state"] is not None)

    # ---- training ----------------------------------------------------------------------

    def _build_runner(self):
        """The runner of this fit, stepping the optimizers through Lightning."""
        trainer = self.trainer
        if trainer.precision == "16-mixed":
            raise ValueError("TBPTTModule does not support precision='16-mixed' (its backward "
                             "bypasses the gradient scaler); use 'bf16-mixed', '32-true' or "
                             "'64-true'")
        strategy = trainer.strategy
        if not (isinstance(strategy, SingleDeviceStrategy) or type(strategy) is DDPStrategy):
            raise ValueError(f"TBPTTModule runs on one device or with strategy='ddp', not "
                             f"{type(strategy).__name__}")
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        if len(optimizers) > 2:
            raise ValueError(f"configure_optimizers gave {len(optimizers)} optimizers; give one, "
                             "or two: the model's and the synthesizer's")
        steps = [_LightningStep(o) for o in optimizers]
        world, dni = self._world(), None
        if self.dni_settings is not None:
            if self.synthesizer is None:
                raise ValueError(f"{type(self).__name__}.configure_model must call "
                                 "super().configure_model(): it builds the synthesizer")
            per_stream = [key for key in ("replay", "refit", "trace_decay")
                          if self.dni_settings.get(key)]
            if getattr(self.synthesizer, "recurrent", False):
                per_stream.append("a recurrent synthesizer")
            if world.distributed and per_stream:  # as under torchrun (app/run.py)
                raise ValueError(f"DNI with {', '.join(per_stream)} is not supported under DDP "
                                 "(a checkpoint would keep one rank's streams)")
            dni = DNIStep(self.synthesizer, aux_head=self.aux_head, batch_dim=self.batch_dim,
                          **self.dni_settings)
        runner = TBPTTRunner(
            _Network(self), self.chunk_loss, steps[0], truncation=self.schedule,
            clip=self.clip if self.clip is not None else self._trainer_clip,
            synth_clip=self.synth_clip, synth_optimizer=steps[1] if len(steps) > 1 else None,
            batch_dim=self.batch_dim, on_nonfinite=self.on_nonfinite,
            sync=world.gradient_sync(), dni=dni)
        if self._runner_state is not None:
            if dni is not None and self._runner_world_size != world.size:
                # a rank's trigger gradients are W x one process's (distributed.py, "Units")
                raise ValueError(f"this checkpoint was written by {self._runner_world_size} "
                                 f"processes, this fit runs {world.size}: DNI's running "
                                 "statistics are per rank; resume it with as many")
            runner.load_state_dict(self._runner_state)
        self._runner_world_size = world.size
        return runner

    def _walk(self, segment, state):
        """`TBPTTRunner.walk` over one segment, with the resets right after it: chunks of the
        runner's schedule, one update each. Returns (the carried state, the chunks'
        ChunkMetrics)."""
        s, history = segment, []
        for _, state, metrics in self._runner.walk(s.inputs, s.targets, state, s.resets,
                                                   final=s.last, next_resets=s.next_resets):
            history.append(metrics)
        return state, history

    def _log_training(self, history):
        chunks = [m for m in read_metrics(history) if not m.skipped]  # one host sync
        for m in chunks:
            if m.recovery:
                rank_zero_warn(f"dni_rnn: after update {m.step}: {m.recovery}")
        if not chunks:
            return
        tokens = sum(m.tokens for m in chunks)
        loss = sum(m.loss * m.tokens for m in chunks) / tokens
        self.log("train_loss", loss, prog_bar=True, batch_size=tokens)
        values = {"grad_norm": sum(m.grad_norm for m in chunks) / len(chunks)}
        if self.metric is not None:
            values[f"train_{self.metric}"] = METRICS[self.metric](loss)
        for field in SYNTH_FIELDS if self.dni_settings is not None else ():
            known = [getattr(m, field) for m in chunks if getattr(m, field) is not None]
            if known:
                values[f"dni/{field}"] = sum(known) / len(known)
        self.log_dict(values, batch_size=tokens)

    # ---- evaluation --------------------------------------------------------------------

    def _evaluate(self, batch):
        """Add one segment's loss x tokens, the state carried across segments."""
        carry, segment = self._eval_carry, self._segment(batch, evaluation=True)
        length, width = segment.inputs.shape[:2]
        if width:  # under DDP a rank may hold none of the evaluation streams
            state = self._state_entering(segment, carry)
            chunk = getattr(self.schedule, "length", 35)
            loss, carry.state = evaluate(self, self.chunk_loss, segment.inputs, segment.targets,
                                         state, segment.resets, chunk, self.batch_dim)
            carry.total += loss * length * width
            carry.tokens += length * width
        carry.position = segment.start + length

    def _log_evaluation(self, split):
        total, tokens = self._world().sum([self._eval_carry.total, self._eval_carry.tokens])
        if not tokens:
            return
        loss = total / tokens
        # the same number on every rank already; sync_dist keeps Lightning from warning
        self.log(f"{split}_loss", loss, prog_bar=split == "val", sync_dist=True)
        if self.metric is not None:
            self.log(f"{split}_{self.metric}", METRICS[self.metric](loss), sync_dist=True)

    # ---- batches and states ------------------------------------------------------------

    def _segment(self, batch, evaluation):
        """The batch as a Segment of this rank's streams."""
        if isinstance(batch, Segment):
            check_streams(batch.inputs, batch.targets, batch.resets)
            return self._share(batch, evaluation)
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise TypeError("a TBPTTModule batch is a Segment (see StreamLoader) or a tuple "
                            f"(inputs, targets[, resets]), got {type(batch).__name__}")
        inputs, targets, resets = (*batch, None)[:3]
        if self.batch_first:
            inputs, targets = inputs.transpose(0, 1), targets.transpose(0, 1)
            resets = resets.transpose(0, 1) if resets is not None else None
        check_streams(inputs, targets, resets)
        return Segment(inputs, targets, resets)  # sequences of their own: start 0, last

    def _share(self, segment, evaluation):
        """Under DDP this rank's streams of a Segment: B / W contiguous columns in training
        (`World.streams`), an uneven share of the evaluation streams."""
        world = self._world()
        if not world.distributed:
            return segment
        width = segment.inputs.shape[1]
        if not evaluation and width % world.size:
            raise ValueError(f"{width} streams cannot be split evenly over {world.size} "
                             f"processes; use a multiple of {world.size}")
        take = world.eval_columns if evaluation else world.streams
        return segment._replace(inputs=take(segment.inputs), targets=take(segment.targets),
                                resets=take(segment.resets),
                                next_resets=take(segment.next_resets, dim=0))

    def _state_entering(self, segment, carry):
        """The state entering `segment`: fresh where the streams start, else the carried one."""
        inputs = segment.inputs
        if segment.start == 0:
            if carry is self._train_carry and self._runner.dni is not None:
                self._runner.dni.restart()  # no BP(lambda) trace or synthesizer memory of
                # a stream left unfinished (a fit stopped mid-epoch) reaches the new one
            return nest.map_state(lambda t: t.to(inputs.device), self.init_state(inputs.shape[1]))
        if segment.start != carry.position:
            raise ValueError(f"a segment starts at step {segment.start} but the carried state is "
                             f"at step {carry.position}: streams must come in order (no "
                             "shuffling, no DistributedSampler; StreamLoader does it)")
        if carry.from_checkpoint:  # every rank's streams, on the CPU: this rank's, here
            share = self._world().local_state(carry.state, self.batch_dim)
            carry.state = nest.map_state(lambda t: t.to(inputs.device), share)
            carry.from_checkpoint = False
        return carry.state

    def _world(self):
        """This process among the trainer's ranks (one process alone)."""
        trainer = self.trainer
        if trainer.world_size == 1:
            return World()
        return World(trainer.global_rank, trainer.world_size, trainer.local_rank,
                     dist.get_backend())


class _LightningStep:
    """The runner's optimizer: a step goes through Lightning's wrapper (its hooks, precision
    plugin and global_step); the rest reads the wrapped optimizer, whose state and
    param_groups Lightning replaces when it restores a checkpoint."""

    def __init__(self, lightning_optimizer):
        self._wrapper = lightning_optimizer

    def step(self):
        self._wrapper.step()

    def __getattr__(self, name):
        return getattr(self._wrapper.optimizer, name)


class _Network(nn.Module):
    """The runner's model: the module's forward and init_state, its parameters without the
    synthesizer's (the runner clips them apart and keeps them out of the model's)."""

    def __init__(self, module):
        super().__init__()
        self.__dict__["module"] = module  # not a child: `parameters` says what it holds

    def forward(self, inputs, state):
        return self.module(inputs, state)

    def init_state(self, batch_size):
        return self.module.init_state(batch_size)

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        """The module's but the synthesizer's, named as reached from here ("module.<name>"):
        `parameters()` and `torch.func.functional_call` (BP(lambda)'s kept chunks) read
        them."""
        return self._without_synthesizer("parameters", prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix="", recurse=True, remove_duplicate=True):
        return self._without_synthesizer("buffers", prefix, recurse, remove_duplicate)

    def _without_synthesizer(self, kind, prefix, recurse, remove_duplicate):
        synth = {id(t) for m in (self.module.synthesizer, self.module.aux_head)
                 if m is not None for t in getattr(m, kind)()}
        named = getattr(self.module, f"named_{kind}")(_joined(prefix, "module"), recurse,
                                                      remove_duplicate)
        return ((name, t) for name, t in named if id(t) not in synth)


def _joined(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _dni_settings(dni):
    """`dni=` as DNIStep keywords (None: plain TBPTT), checked."""
    if dni is None or dni is False:
        return None
    if dni is True:
        return {}
    if not isinstance(dni, dict):
        raise TypeError(f"dni must be None, True or a dict of DNI settings, got "
                        f"{type(dni).__name__}")
    unknown = sorted(set(dni) - set(DNI_SETTINGS))
    if unknown:
        raise ValueError(f"unknown DNI setting {unknown[0]!r}; known: {', '.join(DNI_SETTINGS)}")
    DNIStep.check_settings(dni.get("sg_scale", 0.1), dni.get("bootstrap"),
                           dni.get("target_scale", "rms"), dni.get("sg_cap", 1.0))
    return dict(dni)
