"""The training loop: one recipe's run, top to bottom, in three phases.

    setup    run directory, device, seeds, task (corpus or copy task), model, synthesizer,
             optimizers, TBPTT runner; on --resume everything is restored from last.pt
    train    for each chunk of T steps of the training streams:
                 runner.train_chunk: forward -> loss (+ beta <g_hat, s_T>) -> backward
                                     -> synthesizer update -> clip -> step
                 every log_interval updates: one fixed-width line + a JSONL record
                 every eval_interval updates (or epoch): validate, decay the lr on a
                 plateau, checkpoint (best.pt, last.pt), maybe stop early
    cleanup  final validation and checkpoint, test split with the best weights, summary

Bit-exact resume (on CPU): a checkpoint holds the model, optimizers, runner, task (the
curriculum and its data generator), the position in the epoch, the carried hidden state
and the torch / python / numpy generator states, all saved right after a validation.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import nest
from .config import ConfigError, target_scale
from .synthesizers import StateSynthesizer, state_dim
from .tasks import build_task
from .tbptt import TBPTTRunner
from .truncation import FixedTruncation, RandomTruncation


# ---- setup helpers ---------------------------------------------------------------------

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
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def prepare_run_dir(run_dir, resume):
    """Create the run directory and make sure it is writable; one-line errors."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable ({e.strerror or e})") from None
    if resume and not (run_dir / "last.pt").is_file():
        raise ckpt.CheckpointError(f"--resume: no last.pt in {run_dir}")
    if not resume and (run_dir / "last.pt").is_file():
        raise ConfigError(f"{run_dir} already holds a run (last.pt); pass --resume to continue "
                          "it or --out for a new directory")
    return run_dir


def build_synthesizers(cfg, model):
    """(synthesizer, aux head) for cfg.dni.method: (None, None) for plain TBPTT.

    The synthesizer sees the whole recurrent state (for an LSTM every layer's (h, c),
    flattened to 2 * layers * H per stream) and its zero-initialised output layer makes
    training start exactly as plain TBPTT.
    """
    if cfg.dni.method == "bptt":
        return None, None
    d = state_dim(model.init_state(1))
    width = cfg.dni.synth_hidden or None

    def mlp():
        return StateSynthesizer.mlp(d, n_hidden=cfg.dni.synth_layers, hidden_dim=width)

    aux = mlp() if cfg.dni.method == "dni-aux" else None
    return mlp(), aux


def build_optimizers(cfg, model, synth, aux):
    """The model's optimizer (which also trains the synthesizer unless dni.synth_lr > 0)."""
    o = cfg.optim
    extra = [p for m in (synth, aux) if m is not None for p in m.parameters()]
    own = cfg.dni.synth_lr > 0 and extra
    params = list(model.parameters()) + ([] if own else extra)
    if o.name == "adam":
        optimizer = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
    synth_optimizer = torch.optim.Adam(extra, lr=cfg.dni.synth_lr) if own else None
    return optimizer, synth_optimizer


@dataclasses.dataclass
class Progress:
    """Where the run is: what a checkpoint needs besides the modules."""

    step: int = 0                 # optimizer updates (chunks) so far
    epoch: int = 0                # completed passes over the training streams
    pos: int = 0                  # steps into the current stream
    tokens: int = 0               # training tokens (steps x streams) seen
    best: float = None            # best validation loss (LMs) or longest length (copy)
    best_step: int = 0
    bad_evals: int = 0            # validations since the last improvement
    plateau_evals: int = 0        # the same, reset when the lr decays
    last_eval_step: int = -1
    next_eval_tokens: int = 0
    stopped_early: bool = False
    elapsed: float = 0.0          # seconds of training, summed over resumes


# ---- logging -------------------------------------------------------------------------------

class Meter:
    """Sums ChunkMetrics over one log interval."""

    FIELDS = ("grad_norm", "synth_loss", "cosine", "synthetic_norm", "real_norm", "aux_loss",
              "target_rms", "capped", "sg_scale")

    def __init__(self):
        self.reset()

    def reset(self):
        self.chunks, self.tokens, self.loss, self.skipped = 0, 0, 0.0, 0
        self.sums = {f: 0.0 for f in self.FIELDS}
        self.counts = {f: 0 for f in self.FIELDS}
        self.t0 = time.perf_counter()

    def add(self, m):
        self.chunks += 1
        self.skipped += int(m.skipped)
        if m.skipped:
            return
        self.tokens += m.tokens
        self.loss += m.loss * m.tokens
        for f in self.FIELDS:
            v = getattr(m, f)
            if v is not None and math.isfinite(v):
                self.sums[f] += v
                self.counts[f] += 1

    def record(self):
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        rec = {"loss": self.loss / self.tokens if self.tokens else math.nan,
               "tokens_per_s": self.tokens / seconds, "skipped": self.skipped}
        for f in self.FIELDS:
            rec[f] = self.sums[f] / self.counts[f] if self.counts[f] else None
        return rec


def _num(v, fmt, width):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{width}}"
    sign = "+" if fmt.startswith("+") else ""
    return f"{v:{sign}{width}{fmt.lstrip('+')}}"


class RunLog:
    """Fixed-width lines on stdout, metrics.jsonl in the run directory, and TensorBoard."""

    def __init__(self, run_dir, metric, tensorboard=False, resume_step=None, quiet=False,
                 write=print):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.metric, self.quiet, self.write_line = metric, quiet, write
        if resume_step is None:
            self.path.write_text("")
        else:  # drop what a killed run logged after its last checkpoint
            kept = [line for line in self._read() if line.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard=true needs tensorboard "
                                  "(pip install tensorboard)") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _read(self):
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def emit(self, record):
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None \
                        and math.isfinite(v):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def train(self, rec):
        self.emit(rec)
        if self.quiet:
            return
        metric = rec.get(self.metric)
        mfmt = ".3f" if self.metric == "bpc" else ".2f"
        ratio = None
        if rec.get("synthetic_norm") is not None and rec.get("real_norm"):
            ratio = rec["synthetic_norm"] / rec["real_norm"]
        self.write_line(
            f"step {rec['step']:>7d} | ep {rec['epoch']:>2d} | tok {rec['tokens'] / 1e6:8.3f}M"
            f" | loss {_num(rec['loss'], '.4f', 7)}"
            + (f" | {self.metric} {_num(metric, mfmt, 8)}" if self.metric != "length" else "")
            + f" | cos {_num(rec['cosine'], '+.3f', 6)}"
            f" | synth {_num(rec['synth_loss'], '.2e', 8)}"
            f" | |g^|/|g| {_num(ratio, '.2f', 6)}"
            f" | lr {rec['lr']:.1e} | {rec['tokens_per_s']:7.0f} tok/s")

    def eval(self, rec, best):
        self.emit(rec)
        if self.quiet:
            return
        if self.metric == "length":
            text = (f"N={rec['at_length']:<4d} error {rec['error']:7.3f} bits/seq"
                    f" | longest solved {rec['length']}")
        else:
            fmt = ".3f" if self.metric == "bpc" else ".2f"
            text = (f"loss {rec['loss']:.4f} | {self.metric} {rec[self.metric]:{fmt}}"
                    f" | best {best:{fmt}}")
        self.write_line(f"{rec['split']:<5s} step {rec['step']:>7d} | {text}")

    def close(self):
        if self.tb is not None:
            self.tb.close()


# ---- the run -------------------------------------------------------------------------------

def train(cfg, out_dir=None, resume=False, data_dir=None, quiet=False):
    """Train one recipe and return its summary (also written to RUN_DIR/summary.json).

    Args:
        cfg: a validated Config.
        out_dir: the run directory (default: cfg.train.out_dir or runs/<run name>).
        resume: continue from RUN_DIR/last.pt, bit-exactly on CPU.
        data_dir: overrides cfg.data.data_dir (the CLI's --data-dir).
        quiet: no log lines (compare runs; the JSONL is still written); the progress bar
            follows cfg.train.progress.
    Returns:
        dict: steps, tokens, best and final validation metric, test metric, run_dir, ...
    Raises:
        ConfigError, CheckpointError, corpora.CorpusError, NonFiniteLossError.
    """
    t = cfg.train
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if t.threads:
        torch.set_num_threads(t.threads)
    try:
        return _train(cfg, out_dir, resume, data_dir, quiet)
    finally:  # leave the process as we found it (train() also runs inside tests, sweeps)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _train(cfg, out_dir, resume, data_dir, quiet):
    # ---- setup ------------------------------------------------------------------------
    t = cfg.train
    if cfg.data.corpus in ("copy", "repeat-copy") and not (t.max_steps or t.max_tokens):
        raise ConfigError("copy tasks need a budget: set train.max_steps or train.max_tokens")
    run_dir = prepare_run_dir(out_dir or t.out_dir or Path("runs") / cfg.run_name(), resume)
    device = select_device(t.device)
    seed_everything(t.seed, t.deterministic)
    task = build_task(cfg, data_dir)
    model = task.build_model().to(device)
    synth, aux = build_synthesizers(cfg, model)
    synth = synth.to(device) if synth is not None else None
    aux = aux.to(device) if aux is not None else None
    optimizer, synth_optimizer = build_optimizers(cfg, model, synth, aux)
    schedule = (RandomTruncation(t.truncation, seed=t.seed) if t.random_truncation
                else FixedTruncation(t.truncation))
    runner = TBPTTRunner(
        model, task.loss_fn, optimizer, truncation=schedule, synthesizer=synth,
        sg_scale=cfg.dni.sg_scale, bootstrap=cfg.dni.bootstrap, clip=cfg.optim.clip or None,
        synth_clip=cfg.dni.synth_clip or None, warmup=cfg.dni.warmup,
        target_scale=target_scale(cfg), sg_cap=cfg.dni.sg_cap or None, guard=cfg.dni.guard,
        aux_head=aux,
        aux_weight=cfg.dni.aux_weight if cfg.dni.method == "dni-aux" else 0.0,
        synth_optimizer=synth_optimizer, on_nonfinite=t.on_nonfinite)
    progress, state, stream = Progress(), None, None
    if resume:
        progress, state, stream = _restore(run_dir / "last.pt", cfg, task, model, synth, aux,
                                           optimizer, synth_optimizer, runner, device)
    else:
        cfg.save(run_dir)
    out = (lambda s: None) if quiet else _printer()
    log = RunLog(run_dir, task.metric, t.tensorboard, progress.step if resume else None,
                 quiet, out)
    if not quiet:
        params = sum(p.numel() for p in model.parameters())
        out(f"{cfg.recipe} | {cfg.dni.method} T={t.truncation} seed={t.seed} | {task.describe()}")
        out(f"model {params / 1e6:.2f}M parameters on {device} | run directory {run_dir}"
            + (f" | resumed at step {progress.step}" if resume else ""))

    def save(name):
        ckpt.save(_checkpoint(cfg, task, model, synth, aux, optimizer, synth_optimizer, runner,
                              progress, state, stream), run_dir / name)

    def validate():
        result = task.evaluate(runner, "valid", device)
        score = result["length"] if task.synthetic else result["loss"]
        better = progress.best is None or (score > progress.best if task.higher_is_better
                                           else score < progress.best)
        if better:
            progress.best, progress.best_step = score, progress.step
            progress.bad_evals = progress.plateau_evals = 0
        else:
            progress.bad_evals += 1
            progress.plateau_evals += 1
        if not task.synthetic and not better and cfg.optim.plateau_factor < 1 \
                and progress.plateau_evals > cfg.optim.plateau_patience:
            for group in optimizer.param_groups:  # plateau: decay the lr
                group["lr"] = max(group["lr"] * cfg.optim.plateau_factor, cfg.optim.min_lr)
            progress.plateau_evals = 0
        if t.early_stop and progress.bad_evals >= t.early_stop and not task.synthetic:
            progress.stopped_early = True
        progress.last_eval_step = progress.step
        rec = {"kind": "eval", "split": "valid", "step": progress.step, "epoch": progress.epoch,
               "tokens": progress.tokens, "updates": progress.step,
               "lr": optimizer.param_groups[0]["lr"], **result}
        best_metric = progress.best if task.synthetic else task.metric_of(progress.best)
        log.eval(rec, best_metric)
        if better:  # one write: last.pt is a hard link to the same bytes
            save("best.pt")
            ckpt.link(run_dir / "best.pt", run_dir / "last.pt")
        else:
            save("last.pt")

    def finished():
        return ((t.max_steps and progress.step >= t.max_steps)
                or (t.max_tokens and progress.tokens >= t.max_tokens)
                or (not task.synthetic and progress.epoch >= t.epochs)
                or progress.stopped_early or (task.synthetic and task.done))

    total = _estimate_steps(cfg, task)
    bar = _progress_bar(t.progress, total, progress.step)
    meter = Meter()
    started = time.perf_counter() - progress.elapsed

    # ---- train ------------------------------------------------------------------------
    try:
        while not finished():
            # a new stream: the next epoch of the corpus, or a fresh block of episodes
            if stream is None:
                stream = task.train_stream(device)
                state = model.init_state(stream.inputs.shape[1])
                progress.pos = 0
            n = stream.inputs.shape[0]
            a = progress.pos
            b = min(a + schedule(), n)
            resets = stream.resets[a:b] if stream.resets is not None else None
            next_resets = stream.resets[b] if stream.resets is not None and b < n else None
            # forward -> backward (+ synthetic gradient) -> synthesizer update -> clip -> step
            state, m = runner.train_chunk(stream.inputs[a:b], stream.targets[a:b], state,
                                          resets=resets, future=b < n, next_resets=next_resets)
            progress.step += 1
            progress.pos = b
            progress.tokens += m.tokens
            meter.add(m)
            if m.recovery:  # the runner's guard acted: say so on the terminal and in the JSONL
                log.emit({"kind": "recovery", "step": progress.step, "tokens": progress.tokens,
                          "reason": m.recovery, "sg_scale": runner.sg_scale,
                          "bootstrap": runner.bootstrap})
                log.write_line(f"recovery: step {progress.step}: {m.recovery}")
            epoch_end = b >= n
            if epoch_end:
                stream, state = None, None
                progress.epoch += 0 if task.synthetic else 1
            bar.update(1)
            if progress.step % t.log_interval == 0:
                _log_interval(log, meter, progress, optimizer, task, bar)
            # validate (and checkpoint) every eval_interval updates / eval_tokens tokens,
            # else at the end of each epoch
            due = (t.eval_interval and progress.step % t.eval_interval == 0) \
                or (t.eval_tokens and progress.tokens >= progress.next_eval_tokens + t.eval_tokens) \
                or (not t.eval_interval and not t.eval_tokens and epoch_end and not task.synthetic)
            if due:
                if t.eval_tokens:
                    progress.next_eval_tokens = progress.tokens - progress.tokens % t.eval_tokens
                if meter.chunks:
                    _log_interval(log, meter, progress, optimizer, task, bar)
                progress.elapsed = time.perf_counter() - started
                validate()
    except KeyboardInterrupt:
        bar.close()
        out(f"interrupted at step {progress.step}; resume from the last checkpoint with --resume")
        raise
    bar.close()

    # ---- cleanup ----------------------------------------------------------------------
    if meter.chunks:
        _log_interval(log, meter, progress, optimizer, task, bar)
    progress.elapsed = time.perf_counter() - started
    if progress.last_eval_step != progress.step:
        validate()
    summary = _summary(cfg, task, progress, run_dir, optimizer)
    summary["recoveries"] = runner.recoveries
    if t.test and not task.synthetic:
        best = ckpt.load(run_dir / "best.pt", map_location=device)
        model.load_state_dict(best["model"])
        result = task.evaluate(runner, "test", device)
        summary["test_loss"] = result["loss"]
        summary[f"test_{task.metric}"] = result[task.metric]
        log.emit({"kind": "eval", "split": "test", "step": progress.step,
                  "tokens": progress.tokens, "updates": progress.step, **result})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.close()
    if not quiet:
        for line in format_summary(summary):
            out(line)
    return summary


def _printer():
    from tqdm import tqdm

    def out(line):
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
    return out


def _progress_bar(enabled, total, initial):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False,
                disable=None if enabled else True, file=sys.stderr)


def _estimate_steps(cfg, task):
    t = cfg.train
    bounds = []
    if t.max_steps:
        bounds.append(t.max_steps)
    per_chunk = t.truncation * cfg.data.batch_size
    if t.max_tokens:
        bounds.append(math.ceil(t.max_tokens / per_chunk))
    n = task.steps_per_stream()
    if n is not None:
        bounds.append(t.epochs * math.ceil(n / t.truncation))
    return min(bounds) if bounds else None


def _log_interval(log, meter, progress, optimizer, task, bar):
    rec = meter.record()
    meter.reset()
    rec = {"kind": "train", "step": progress.step, "epoch": progress.epoch,
           "tokens": progress.tokens, "lr": optimizer.param_groups[0]["lr"], **rec}
    if task.metric != "length":
        rec[task.metric] = task.metric_of(rec["loss"]) if math.isfinite(rec["loss"]) else None
    log.train(rec)
    if task.metric != "length":
        bar.set_postfix({task.metric: f"{rec[task.metric] or math.nan:.2f}",
                         "tok/s": f"{rec['tokens_per_s']:.0f}"}, refresh=False)
    else:
        bar.set_postfix({"N": task.length, "solved": task.solved,
                         "tok/s": f"{rec['tokens_per_s']:.0f}"}, refresh=False)


def _summary(cfg, task, progress, run_dir, optimizer):
    s = {"recipe": cfg.recipe, "method": cfg.dni.method, "truncation": cfg.train.truncation,
         "seed": cfg.train.seed, "metric": task.metric, "steps": progress.step,
         "tokens": progress.tokens, "epochs": progress.epoch, "elapsed_s": progress.elapsed,
         "tokens_per_s": progress.tokens / max(progress.elapsed, 1e-9),
         "stopped_early": progress.stopped_early, "best_step": progress.best_step,
         "lr": optimizer.param_groups[0]["lr"], "run_dir": str(run_dir)}
    if task.synthetic:
        s["best_length"] = progress.best
        s["final_length"] = task.length
        s["final_error"] = task.last_error
    else:
        s["best_valid_loss"] = progress.best
        s[f"best_valid_{task.metric}"] = task.metric_of(progress.best)
    return s


def format_summary(s):
    """Human lines of a run's summary."""
    head = (f"done: {s['recipe']} {s['method']} T={s['truncation']} seed={s['seed']} | "
            f"{s['steps']} updates, {s['tokens']:,} tokens in {s['elapsed_s']:.1f}s "
            f"({s['tokens_per_s']:.0f} tok/s)" + (" | stopped early" if s["stopped_early"] else ""))
    m = s["metric"]
    if m == "length":
        body = (f"longest length solved: {s['best_length']} (curriculum at N={s['final_length']}, "
                f"error {s['final_error']:.3f} bits/seq)")
    else:
        fmt = ".3f" if m == "bpc" else ".2f"
        body = f"best valid {m} {s[f'best_valid_{m}']:{fmt}}"
        if f"test_{m}" in s:
            body += f" | test {m} {s[f'test_{m}']:{fmt}} (best checkpoint, step {s['best_step']})"
    return [head, body, f"run directory: {s['run_dir']}"]


def _checkpoint(cfg, task, model, synth, aux, optimizer, synth_optimizer, runner, progress,
                state, stream):
    cpu = (lambda s: None if s is None else nest.map_state(lambda t: t.detach().cpu(), s))
    return {
        "format": ckpt.FORMAT, "version": ckpt.VERSION,
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "synthesizer": synth.state_dict() if synth is not None else None,
        "aux_head": aux.state_dict() if aux is not None else None,
        "optimizer": optimizer.state_dict(),
        "synth_optimizer": synth_optimizer.state_dict() if synth_optimizer is not None else None,
        "runner": runner.state_dict(),
        "vocab": task.vocab.state_dict() if task.vocab is not None else None,
        "task": task.state_dict(),
        "progress": dataclasses.asdict(progress),
        "hidden": cpu(state),
        "stream": task.stream_state() if stream is not None else None,
        "rng": ckpt.rng_state(),
    }


def _restore(path, cfg, task, model, synth, aux, optimizer, synth_optimizer, runner, device):
    """Load last.pt into the freshly built objects; returns (progress, hidden state, stream)."""
    c = ckpt.load(path, map_location=device)
    ckpt.check_compatible(c["config"], cfg.to_dict(), path)
    ckpt.check_vocab(c["vocab"], task.vocab, path)
    try:
        model.load_state_dict(c["model"])
        if synth is not None:
            synth.load_state_dict(c["synthesizer"])
        if aux is not None:
            aux.load_state_dict(c["aux_head"])
        optimizer.load_state_dict(c["optimizer"])
        if synth_optimizer is not None:
            synth_optimizer.load_state_dict(c["synth_optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model ({first[:200]})") \
            from None
    runner.load_state_dict(c["runner"])
    task.load_state_dict(c["task"])
    progress = Progress(**c["progress"])
    state = None
    if c["hidden"] is not None:
        state = nest.map_state(lambda t: t.to(device), c["hidden"])
    stream = None
    if state is not None:
        stream = task.load_stream_state(c["stream"], device)
    ckpt.set_rng_state(c["rng"])
    return progress, state, stream


def evaluate_checkpoint(path, split="test", data_dir=None, device="auto"):
    """Evaluate a run directory's best (else last) checkpoint, or a checkpoint file.

    Returns:
        dict with the split, loss and metric (ppl / bpc / wrong bits per sequence).
    """
    from .config import Config, validate

    file = ckpt.find(path)
    c = ckpt.load(file)
    cfg = validate(Config.from_dict(c["config"], where=f"checkpoint {file.name}"))
    cfg.recipe = c["config"].get("recipe", cfg.recipe)
    dev = select_device(device)
    task = build_task(cfg, data_dir)
    ckpt.check_vocab(c["vocab"], task.vocab, file)
    model = task.build_model().to(dev)
    try:
        model.load_state_dict(c["model"])
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"checkpoint {file} does not fit its own config "
                                   f"({str(e).splitlines()[0][:200]})") from None
    if task.synthetic:
        task.load_state_dict(c["task"])
    runner = TBPTTRunner(model, task.loss_fn, torch.optim.SGD(model.parameters(), lr=0.0),
                         truncation=cfg.train.truncation)
    if task.synthetic:
        result = task.evaluate(runner, "test" if split == "test" else "valid", dev)
    else:
        if split not in task.splits:
            raise ConfigError(f"--split must be valid or test, got {split!r}")
        result = task.evaluate(runner, split, dev)
    return {"checkpoint": str(file), "recipe": cfg.recipe, "split": split,
            "step": c["progress"]["step"], "metric": task.metric, **result}
