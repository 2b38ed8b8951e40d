"""One training run of a recipe, in three phases (the shape of a torchtune recipe):

    run = Run(cfg, out_dir)
    run.setup()     run directory, device, seeds, task, model, synthesizer, optimizers,
                    TBPTT runner; on resume everything is restored from last.pt
    run.train()     the runner's chunk walk over the task's training streams:
                        forward -> loss (+ beta <g_hat, s_T>) -> backward -> synthesizer
                        update -> clip -> step   (TBPTTRunner.train_chunk)
                    every log_interval updates a log line and a JSONL record; every
                    eval_interval updates (or epoch) a validation, a plateau lr decay and
                    a checkpoint (best.pt, last.pt), maybe an early stop
    run.cleanup()   final validation and checkpoint, test split with the best weights,
                    summary.json

The run knows no task by name: it asks the task (`tasks.py`) for its streams, metric,
score and whether it is done. Bit-exact resume (on CPU): a checkpoint holds the model,
optimizers, runner, task, the position in the stream, the carried state and every
generator's state, saved at a chunk boundary: after a validation, every
`train.checkpoint_minutes` / `train.checkpoint_every`, and on SIGINT / SIGTERM
(`stopping.py`; `Run.state_dict`).

Under torchrun (`distributed.py`) every rank runs the same Run on its own block of the
streams: the runner averages the gradients, the task reduces the evaluation, the
checkpoint gathers the carried states, and rank 0 alone writes the run directory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .. import diagnostics
from .. import distributed
from .. import nest
from ..streams import forward_with_resets, initial_state
from .config import ConfigError, bootstrap_and_traces, horizons, sg_scale, target_scale
from .logs import Meter, NullLog, RunLog, progress_bar
from .stopping import RunInterrupted, StopSignals
from ..synthesizers import RecurrentSynthesizer, StateSynthesizer, state_dim
from .tasks import build_task, summary_metric
from ..tbptt import TBPTTRunner, window
from ..truncation import FixedTruncation, RandomTruncation


def select_device(name):
    """"auto": CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available; use auto or cpu")
    return torch.device(name)


def seed_everything(seed, deterministic):
    """Seed torch, python and numpy; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


MAX_CONTEXT_FEATURES = 4096  # a linear refit solves over state + context features


def context_width(cfg, task):
    """Features of the synthesizer's context (`dni.context`): the truncation's steps of the
    task's context channels (a language model's coded tokens); None without one."""
    if cfg.dni.context == "none" or cfg.dni.method == "bptt":
        return None
    if not hasattr(task, "context_channels"):
        raise ConfigError(f"dni.context={cfg.dni.context} needs a task with a context "
                          "(copy, repeat-copy, a language model); set dni.context=none")
    width = context_steps(cfg) * task.context_channels(cfg.dni.context)
    if width > MAX_CONTEXT_FEATURES and cfg.dni.refit and not cfg.dni.synth_layers:
        narrower = (cfg.dni.context_code == "onehot" and hasattr(task, "vocab")
                    and cfg.model.hidden_dim < len(task.vocab))
        raise ConfigError(f"dni.context={cfg.dni.context} gives {context_steps(cfg)} steps x "
                          f"{task.context_channels(cfg.dni.context)} = {width} context features, "
                          f"more than the linear refit's {MAX_CONTEXT_FEATURES}; "
                          + ("set dni.context_code=decoder (a language model's tokens as their "
                             "decoder rows) or " if narrower else "")
                          + "lower dni.context_steps")
    return width


def context_steps(cfg):
    """How many steps after a boundary the synthesizer's context covers."""
    return cfg.dni.context_steps or cfg.train.truncation


def context_window(cfg, context, start):
    """What the synthesizer at the boundary before step `start` reads of a `context_stream`
    (None without one)."""
    return None if context is None else window(context, start, context_steps(cfg))


def context_stream(cfg, task, stream, model):
    """The `(N, B, C)` stream a cDNI synthesizer reads (`dni.context`), or None; a language
    model's encodes its tokens with `model` (`dni.context_code`)."""
    if cfg.dni.context == "none" or cfg.dni.method == "bptt":
        return None
    return task.context_stream(stream, cfg.dni.context, model)


def build_synthesizers(cfg, model, context_dim=None):
    """(synthesizer, aux head) for cfg.dni.method: (None, None) for plain TBPTT.

    The synthesizer sees the whole recurrent state (for an LSTM every layer's (h, c),
    flattened to 2 * layers * H per stream), and with `dni.context` a context of
    `context_dim` features; its zero-initialised output layer makes training start exactly
    as plain TBPTT.
    """
    if cfg.dni.method == "bptt":
        return None, None
    d = state_dim(model.init_state(1))
    width = cfg.dni.synth_hidden or None

    def mlp(products=0):
        return StateSynthesizer.mlp(d, n_hidden=cfg.dni.synth_layers, hidden_dim=width,
                                    context_dim=context_dim, product_rank=products)

    aux = mlp() if cfg.dni.method == "dni-aux" else None  # learnt by SGD: no refit, no products
    if cfg.dni.synthesizer == "gru":
        return RecurrentSynthesizer(d, hidden_dim=width), aux
    return mlp(cfg.dni.products), aux


def build_optimizers(cfg, model, synth, aux):
    """The model's optimizer (which also trains the synthesizer unless dni.synth_lr > 0)."""
    o = cfg.optim
    extra = [p for m in (synth, aux) if m is not None for p in m.parameters()]
    own = cfg.dni.synth_lr > 0 and extra
    params = list(model.parameters()) + ([] if own else extra)
    kernel = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[o.kernel]
    if o.name == "adam":
        optimizer = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, **kernel)
    else:
        optimizer = torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay, **kernel)
    synth_optimizer = torch.optim.Adam(extra, lr=cfg.dni.synth_lr, **kernel) if own else None
    return optimizer, synth_optimizer


def _state_dict_or_none(module):
    return module.state_dict() if module is not None else None


@dataclasses.dataclass
class Progress:
    """Where the run is, besides the runner's step counter: what a checkpoint needs."""

    epoch: int = 0                # completed passes over the training streams
    pos: int = 0                  # steps into the current stream
    tokens: int = 0               # training tokens (steps x streams) seen
    best: float = None            # best validation score (the task's `score`)
    best_step: int = 0
    bad_evals: int = 0            # validations since the last improvement
    plateau_evals: int = 0        # the same, reset when the lr decays
    last_eval_step: int = -1
    next_eval_tokens: int = 0
    stopped_early: bool = False
    elapsed: float = 0.0          # seconds of training, summed over resumes


class Run:
    """A recipe's training run: owns the config, task, model, synthesizer, optimizers,
    runner, progress and log.

    Args:
        cfg: a validated Config.
        out_dir: the run directory (default: cfg.train.out_dir or runs/<run name>).
        resume: continue from RUN_DIR/last.pt, bit-exactly on CPU.
        data_dir: overrides cfg.data.data_dir (the CLI's --data-dir).
        quiet: no log lines (the JSONL is still written); the progress bar follows
            cfg.train.progress.
        world: this process's `distributed.World` (default: from torchrun's environment,
            or one process alone).
    """

    def __init__(self, cfg, out_dir=None, resume=False, data_dir=None, quiet=False,
                 world=None):
        self.cfg, self.resume, self.data_dir, self.quiet = cfg, resume, data_dir, quiet
        self.world = world if world is not None else distributed.from_env()
        self.run_dir = Path(out_dir or cfg.train.out_dir or Path("runs") / cfg.run_name())
        self.progress = Progress()
        self.state = None        # the carried recurrent state
        self.stream = None       # the current training streams (an epoch, a block)
        self.cores = None        # a cores.CoreShare when train.threads = 0 (training.train)

    @property
    def step(self):
        """Optimizer updates so far: the runner's counter, the run's only one."""
        return self.runner.step

    # ---- setup ------------------------------------------------------------------------

    def setup(self):
        cfg, t, w = self.cfg, self.cfg.train, self.world
        w.check_batch(cfg.data.batch_size)
        if w.distributed and (cfg.dni.replay or cfg.dni.refit) and cfg.dni.method != "bptt":
            # each rank's replay buffer holds its own streams; checkpoints keep rank 0's
            raise ConfigError("dni.replay and dni.refit are not supported under torchrun yet (a "
                              "checkpoint would keep one rank's replay buffer); set them to 0 "
                              "or run one process")
        if w.distributed and cfg.dni.method != "bptt" and (
                cfg.dni.synthesizer == "gru" or bootstrap_and_traces(cfg)[1]):
            raise ConfigError("dni.synthesizer=gru and bp-lambda traces are not supported under "
                              "torchrun yet (a checkpoint would keep one rank's streams); use "
                              "dni.synthesizer=mlp and dni.trace_decay=0, or run one process")
        # the task (data) first: a failed start leaves no run directory behind
        self.task = w.main_first(lambda: build_task(cfg, self.data_dir, w))
        if not self.task.epoch_based and not (t.max_steps or t.max_tokens):
            raise ConfigError(f"{cfg.data.corpus} needs a budget: set train.max_steps or "
                              "train.max_tokens")
        w.on_main(self._prepare_run_dir)
        w.on_main(self._keep_tokenizer_model)
        self.device = w.device(select_device(t.device))
        seed_everything(t.seed, t.deterministic)
        self.model = self.task.build_model().to(self.device)
        synth, aux = build_synthesizers(cfg, self.model, context_width(cfg, self.task))
        self.synth = synth.to(self.device) if synth is not None else None
        self.aux = aux.to(self.device) if aux is not None else None
        w.broadcast_parameters(self.model, self.synth, self.aux)
        if w.distributed:  # each rank its own dropout masks
            torch.manual_seed(t.seed + 1_000_003 * w.rank)
        self.optimizer, self.synth_optimizer = build_optimizers(cfg, self.model, self.synth,
                                                                self.aux)
        self.schedule = (RandomTruncation(t.truncation, seed=t.seed) if t.random_truncation
                         else FixedTruncation(t.truncation))
        bootstrap, trace_decay = bootstrap_and_traces(cfg)
        self.runner = TBPTTRunner(
            self.model, self.task.loss_fn, self.optimizer, truncation=self.schedule,
            synthesizer=self.synth, sg_scale=sg_scale(cfg), bootstrap=bootstrap,
            clip=cfg.optim.clip or None, synth_clip=cfg.dni.synth_clip or None,
            warmup=cfg.dni.warmup, target_scale=target_scale(cfg),
            sg_cap=cfg.dni.sg_cap or None, guard=cfg.dni.guard,
            calibrate=cfg.dni.calibrate, aux_head=self.aux,
            aux_weight=cfg.dni.aux_weight if cfg.dni.method == "dni-aux" else 0.0,
            synth_optimizer=self.synth_optimizer, on_nonfinite=t.on_nonfinite,
            sync=w.gradient_sync(), replay=cfg.dni.replay, replay_chunks=cfg.dni.replay_chunks,
            refit=cfg.dni.refit, refit_every=cfg.dni.refit_every,
            refit_decay=cfg.dni.refit_decay, trace_decay=trace_decay,
            trace_horizon=cfg.dni.trace_horizon)
        if self.resume:
            ckpt.restore_run(self, self.run_dir / "last.pt")
        if w.main:  # rank 0 alone writes the run directory
            cfg.save(self.run_dir)  # on resume too: config.toml runs again what this run is
            self.log = RunLog(self.run_dir, self.task.metric, t.tensorboard,
                              self.step if self.resume else None, self.quiet)
        else:
            self.log = NullLog()
        params = sum(p.numel() for p in self.model.parameters())
        self.log.write_line(f"{cfg.recipe} | {cfg.dni.method} T={t.truncation} seed={t.seed} | "
                            f"{self.task.describe()}")
        where = f"{self.device}" + (f" x {w.describe()}, {cfg.data.batch_size // w.size} "
                                    "streams each" if w.distributed else "")
        self.log.write_line(f"model {params / 1e6:.2f}M parameters on {where} | run "
                            f"directory {self.run_dir}"
                            + (f" | resumed at step {self.step}" if self.resume else ""))
        return self

    def _keep_tokenizer_model(self):
        """A sentencepiece model next to the checkpoints: the run is usable (`dni_rnn.load`)
        without the corpus cache it was trained with."""
        tokenizer = getattr(getattr(self.task, "corpus", None), "tokenizer", None)
        model_file = getattr(tokenizer, "model_path", None)
        if model_file is not None:
            shutil.copyfile(model_file, self.run_dir / "sentencepiece.model")

    def _prepare_run_dir(self):
        """Create the run directory and make sure it is writable; one-line errors."""
        d = self.run_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"run directory {d} is not writable ({e.strerror or e})") from None
        for tmp in d.glob(".*.pt.*.tmp"):  # a checkpoint write a kill cut short
            tmp.unlink(missing_ok=True)
        if self.resume and not (d / "last.pt").is_file():
            raise ckpt.CheckpointError(f"--resume: no last.pt in {d} (a run stopped before "
                                       "its first checkpoint starts again without --resume)")
        if not self.resume and (d / "last.pt").is_file():
            raise ConfigError(f"{d} already holds a run (last.pt); pass --resume to continue "
                              "it or --out for a new directory")

    # ---- train ------------------------------------------------------------------------

    def train(self):
        t, p = self.cfg.train, self.progress
        self.bar = progress_bar(t.progress and self.world.main, self._estimate_steps(),
                                self.step)
        self.meter = Meter()
        self.started = time.perf_counter() - p.elapsed
        self._saved_at = (self.step, time.perf_counter())  # the last checkpoint written
        try:
            with StopSignals() as self.signals:
                while not self.finished():
                    # a new stream: the next epoch of the corpus, or a fresh block of episodes
                    if self.stream is None:
                        self.stream = self.task.train_stream(self.device)
                        self.state = self.model.init_state(self.stream.inputs.shape[1])
                        p.pos = 0
                    s = self.stream
                    walk = self.runner.walk(s.inputs, s.targets, self.state, s.resets,
                                            start=p.pos, context=self._context(s),
                                            context_steps=context_steps(self.cfg))
                    for p.pos, self.state, m in walk:
                        if self._after_chunk(m):
                            break
        finally:
            self.bar.close()
        return self

    def _stop_or_save(self):
        """(signal number or 0, whether a periodic checkpoint is due). Under torchrun the
        ranks decide together: any rank's signal or clock counts, so every rank stops or
        saves at the same update."""
        signum, due = self.signals.signum or 0, self._checkpoint_due()
        if self.world.distributed:
            votes = self.world.gather_objects((signum, due))
            signum, due = max(v[0] for v in votes), any(v[1] for v in votes)
        return signum, due

    def _checkpoint_due(self):
        t = self.cfg.train
        step, when = self._saved_at
        return bool((t.checkpoint_every and self.step - step >= t.checkpoint_every)
                    or (t.checkpoint_minutes
                        and time.perf_counter() - when >= 60 * t.checkpoint_minutes))

    def _after_chunk(self, m):
        """Account for one chunk; log, validate and checkpoint when due. True: leave the walk
        (the stream ended, or the run is finished)."""
        t, p = self.cfg.train, self.progress
        if self.world.distributed:  # the update saw every rank's tokens
            m = dataclasses.replace(m, tokens=m.tokens * self.world.size)
        p.tokens += m.tokens
        self.meter.add(m)
        if m.recovery:  # the runner's guard acted
            self.log.recovery(self.step, p.tokens, m.recovery, self.runner.sg_scale,
                              self.runner.bootstrap)
        if t.diagnose_every and self.step % t.diagnose_every == 0 and self.world.main:
            self.diagnose()
        stream_end = p.pos >= self.stream.inputs.shape[0]
        if stream_end:
            self.stream = self.state = None
            p.epoch += 1 if self.task.epoch_based else 0
            decay = self.cfg.optim.decay_after
            if decay and self.task.epoch_based and p.epoch >= decay:  # a fixed schedule
                for group in self.optimizer.param_groups:
                    group["lr"] *= self.cfg.optim.decay_factor
        self.bar.update(1)
        if self.step % t.log_interval == 0:
            self.log_interval()
        due = (t.eval_interval and self.step % t.eval_interval == 0) \
            or (t.eval_tokens and p.tokens >= p.next_eval_tokens + t.eval_tokens) \
            or (not t.eval_interval and not t.eval_tokens and stream_end
                and self.task.epoch_based)
        if due:
            if t.eval_tokens:
                p.next_eval_tokens = p.tokens - p.tokens % t.eval_tokens
            if self.meter.chunks:
                self.log_interval()
            p.elapsed = time.perf_counter() - self.started
            self.validate()
        signum, due = self._stop_or_save()
        if (signum or due) and self._saved_at[0] != self.step:
            p.elapsed = time.perf_counter() - self.started
            self.save("last.pt")  # at this chunk boundary: a resumed run goes on from here
        if signum:
            self.log.write_line(f"stopped by signal {signum} after update {self.step}; "
                                f"saved {self.run_dir / 'last.pt'}")
            raise RunInterrupted(signum, self.step, self.run_dir / "last.pt")
        return stream_end or self.finished()

    def _context(self, stream):
        return context_stream(self.cfg, self.task, stream, self.model)

    def diagnose(self):
        """The synthetic gradient at the current boundary against the true future gradient
        through the next chunks of the stream (`diagnostics.py`); changes nothing. A task
        of short episodes (`diagnosis_blocks`) is diagnosed at every chunk boundary of a few
        fresh episodes instead: its current episode has few boundaries, often none."""
        s, p = self.stream, self.progress
        if self.synth is not None and hasattr(self.task, "diagnosis_blocks"):
            return self._diagnose_episodes()
        if self.synth is None or p.pos >= s.inputs.shape[0]:
            return
        resets = s.resets[p.pos:] if s.resets is not None else None
        ctx = self._context(s)
        report = diagnostics.diagnose(self.runner, s.inputs[p.pos:], s.targets[p.pos:],
                                      self.state, self.cfg.train.truncation,
                                      horizons(self.cfg), resets,
                                      context=context_window(self.cfg, ctx, p.pos))
        if report:
            self.log.emit({"kind": "diagnose", "step": self.step, "tokens": p.tokens,
                           **report})

    def _diagnose_episodes(self):
        T, reports = self.cfg.train.truncation, []
        # their own generator: training draws the same episodes with or without diagnosis
        for s in self.task.diagnosis_blocks(self.device, seed=self.cfg.train.seed * 1_000_003
                                            + self.step):
            state = initial_state(self.model, s.inputs)
            ctx = self._context(s)
            for a in range(0, s.inputs.shape[0] - 1, T):
                if a:  # the state at boundary a, then the future after it
                    reports.append(diagnostics.diagnose(
                        self.runner, s.inputs[a:], s.targets[a:], state, T,
                        horizons(self.cfg), s.resets[a:],
                        context=context_window(self.cfg, ctx, a)))
                with torch.no_grad():
                    _, state, _ = forward_with_resets(self.model, s.inputs[a:a + T], state,
                                                      s.resets[a:a + T], self.runner.batch_dim)
        reports = [r for r in reports if r]
        if reports:
            self.log.emit({"kind": "diagnose", "step": self.step, "tokens": self.progress.tokens,
                           "boundaries": len(reports), **diagnostics.mean_reports(reports)})

    def finished(self):
        t, p = self.cfg.train, self.progress
        return bool((t.max_steps and self.step >= t.max_steps)
                    or (t.max_tokens and p.tokens >= t.max_tokens)
                    or (self.task.epoch_based and p.epoch >= t.epochs)
                    or p.stopped_early or self.task.done)

    def log_interval(self):
        p, metric = self.progress, self.task.metric
        if self.cores is not None:  # another run may have started or ended
            self.cores.apply()
        rec = {"kind": "train", "step": self.step, "epoch": p.epoch, "tokens": p.tokens,
               "lr": self.optimizer.param_groups[0]["lr"], **self.meter.record()}
        if metric.from_loss is not None:
            rec[metric.name] = metric.from_loss(rec["loss"]) if math.isfinite(rec["loss"]) \
                else None
        self.log.train(rec)
        self.bar.set_postfix({**self.task.postfix(rec), "tok/s": f"{rec['tokens_per_s']:.0f}"},
                             refresh=False)

    def validate(self):
        """Validate; track the best score, decay the lr on a plateau, checkpoint."""
        cfg, p, task = self.cfg, self.progress, self.task
        result = task.evaluate(self.model, "valid", self.device)
        score = task.score(result)
        better = p.best is None or (score > p.best if task.higher_is_better else score < p.best)
        if better:
            p.best, p.best_step = score, self.step
            p.bad_evals = p.plateau_evals = 0
        else:
            p.bad_evals += 1
            p.plateau_evals += 1
        if task.decays_lr and not better and cfg.optim.plateau_factor < 1 \
                and p.plateau_evals > cfg.optim.plateau_patience:
            for group in self.optimizer.param_groups:  # plateau: decay the lr
                group["lr"] = max(group["lr"] * cfg.optim.plateau_factor, cfg.optim.min_lr)
            p.plateau_evals = 0
        if cfg.train.early_stop and p.bad_evals >= cfg.train.early_stop:
            p.stopped_early = True
        p.last_eval_step = self.step
        rec = {"kind": "eval", "split": "valid", "step": self.step, "epoch": p.epoch,
               "tokens": p.tokens, "updates": self.step,
               "lr": self.optimizer.param_groups[0]["lr"], **result}
        self.log.eval(rec, task.result_text(result, best=p.best))
        if better:  # one write: last.pt is a hard link to the same bytes
            self.save("best.pt")
            if self.world.main:
                ckpt.link(self.run_dir / "best.pt", self.run_dir / "last.pt")
        else:
            self.save("last.pt")

    def save(self, name):
        state = ckpt.run_state(self)  # all ranks: it gathers their carried states
        if self.world.main:
            ckpt.save(state, self.run_dir / name)
        self._saved_at = (self.step, time.perf_counter())

    def _estimate_steps(self):
        t = self.cfg.train
        bounds = [t.max_steps] if t.max_steps else []
        if t.max_tokens:
            bounds.append(math.ceil(t.max_tokens / (t.truncation * self.cfg.data.batch_size)))
        n = self.task.steps_per_stream()
        if n is not None and self.task.epoch_based:
            bounds.append(t.epochs * math.ceil(n / t.truncation))
        return min(bounds) if bounds else None

    # ---- state (what a checkpoint holds) ----------------------------------------------

    def state_dict(self):
        """The run as plain dicts of tensors and values: a checkpoint without its format
        header (`checkpoint.run_state`). Under data parallelism every rank must call it: the
        carried states and generators are gathered."""
        w, batch_dim = self.world, self.runner.batch_dim
        runner = self.runner.state_dict()
        if w.distributed and runner.get("reference") is not None:
            # per-stream state of the runner (the calibration gate's last g_hat): gathered
            # like the carried state; every rank agrees on whether there is one
            runner["reference"] = w.gather_state(runner["reference"], batch_dim)
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "synthesizer": _state_dict_or_none(self.synth),
            "aux_head": _state_dict_or_none(self.aux),
            "optimizer": self.optimizer.state_dict(),
            "synth_optimizer": _state_dict_or_none(self.synth_optimizer),
            "runner": runner,
            "vocab": self.task.vocab.state_dict() if self.task.vocab is not None else None,
            "task": self.task.state_dict(),
            "progress": dataclasses.asdict(self.progress),
            "hidden": w.gather_state(self.state, batch_dim),
            "stream": self.task.stream_state() if self.stream is not None else None,
            "rng": ckpt.rng_state(),
            "world_size": w.size,
            "rng_ranks": w.gather_objects(ckpt.rng_state()) if w.distributed else None,
        }

    def load_state_dict(self, state_dict, path=None):
        """Restore `state_dict()` into this set-up run (its modules built, nothing trained);
        the caller has checked that it is this run's (`checkpoint.restore_run`).

        Args:
            state_dict: what `state_dict()` returned, or a checkpoint read back.
            path: the checkpoint it was read from, for the error message.
        Raises:
            CheckpointError: the model, synthesizer, aux head or an optimizer does not fit.
        """
        w, batch_dim = self.world, self.runner.batch_dim
        try:
            self.model.load_state_dict(state_dict["model"])
            for module, key in ((self.synth, "synthesizer"), (self.aux, "aux_head"),
                                (self.optimizer, "optimizer"),
                                (self.synth_optimizer, "synth_optimizer")):
                if module is not None:
                    module.load_state_dict(state_dict[key])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            source = f"checkpoint {path}" if path is not None else "the state"
            raise ckpt.CheckpointError(f"{source} does not fit this model ({first[:200]})") \
                from None
        runner = dict(state_dict["runner"])
        if runner.get("reference") is not None:  # this rank's streams of a per-stream tensor
            runner["reference"] = w.local_state(runner["reference"], batch_dim)
        self.runner.load_state_dict(runner)
        self.task.load_state_dict(state_dict["task"])
        progress = dict(state_dict["progress"])
        progress.pop("step", None)  # checkpoints before the runner's counter was the only one
        self.progress = Progress(**progress)
        self.state = self.stream = None
        if state_dict["hidden"] is not None:
            hidden = w.local_state(state_dict["hidden"], batch_dim)  # this rank's columns
            self.state = nest.map_state(lambda t: t.to(self.device), hidden)
            self.stream = self.task.load_stream_state(state_dict["stream"], self.device)
        ckpt.set_rng_state(state_dict["rng_ranks"][w.rank] if state_dict.get("rng_ranks")
                           else state_dict["rng"])

    # ---- cleanup ----------------------------------------------------------------------

    def cleanup(self):
        """Last validation and checkpoint, the test split with the best weights, summary."""
        p, task = self.progress, self.task
        if self.meter.chunks:
            self.log_interval()
        p.elapsed = time.perf_counter() - self.started
        if p.last_eval_step != self.step:
            self.validate()
        summary = self.summary()
        if self.cfg.train.test and task.has_test:
            best = self.world.on_main(lambda: ckpt.load(self.run_dir / "best.pt")["model"])
            self.model.load_state_dict(best)
            result = task.evaluate(self.model, "test", self.device)
            summary["test_loss"] = result["loss"]
            summary["test_metric"] = summary[f"test_{task.metric.name}"] = \
                result[task.metric.name]
            self.log.emit({"kind": "eval", "split": "test", "step": self.step,
                           "tokens": p.tokens, "updates": self.step, **result})
        if self.world.main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.log.close()
        for line in format_summary(summary):
            self.log.write_line(line)
        return summary

    def summary(self):
        cfg, p = self.cfg, self.progress
        return {"recipe": cfg.recipe, "method": cfg.dni.method,
                "truncation": cfg.train.truncation, "seed": cfg.train.seed,
                "metric": self.task.metric.name, "metric_label": self.task.metric.label,
                "steps": self.step, "tokens": p.tokens,
                "epochs": p.epoch, "elapsed_s": p.elapsed,
                "tokens_per_s": p.tokens / max(p.elapsed, 1e-9),
                "stopped_early": p.stopped_early, "best_step": p.best_step,
                "lr": self.optimizer.param_groups[0]["lr"], "run_dir": str(self.run_dir),
                "recoveries": self.runner.recoveries, "processes": self.world.size,
                "best_metric": self.task.metric_of_score(p.best),
                **self.task.summary(p.best)}


def format_summary(s):
    """Human lines of a run's summary."""
    head = (f"done: {s['recipe']} {s['method']} T={s['truncation']} seed={s['seed']} | "
            f"{s['steps']} updates, {s['tokens']:,} tokens in {s['elapsed_s']:.1f}s "
            f"({s['tokens_per_s']:.0f} tok/s)" + (" | stopped early" if s["stopped_early"] else ""))
    m = summary_metric(s)
    if m.from_loss is None:  # a task-measured metric: the task's own words
        body = f"{m.label}: {m.format(s['best_metric'])}" + (f" ({s['detail']})"
                                                            if s.get("detail") else "")
    else:
        body = f"best valid {m.name} {m.format(s['best_metric'])}"
        if "test_metric" in s:
            body += (f" | test {m.name} {m.format(s['test_metric'])} (best checkpoint, step "
                     f"{s['best_step']})")
    return [head, body, f"run directory: {s['run_dir']}"]
