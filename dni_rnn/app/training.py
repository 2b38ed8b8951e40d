"""Training, evaluating and diagnosing a recipe from Python: what the CLI calls.

    summary = train(cfg)                       # Run(cfg).setup().train().cleanup()
    result = evaluate_checkpoint("runs/x")     # a saved model on a split, no optimizer
    report = diagnose_checkpoint("runs/x")     # synthetic vs true future gradients

The run itself is `run.Run` (setup / train / cleanup); this module leaves the process as it
found it (threads, determinism flags, no process group of its own) and loads checkpoints
for evaluation. Under torchrun, `train` joins the ranks (`distributed.from_env`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .. import diagnostics
from .. import distributed
from .cores import CoreShare
from .config import Config, ConfigError, sg_scale, target_scale, validate
from .run import (Run, build_synthesizers, context_stream, context_width, context_window,
                  select_device)
from .stopping import RankLost
from .tasks import Stream, build_task
from ..tbptt import NonFiniteLossError, TBPTTRunner, forward_with_resets


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
        ConfigError, CheckpointError (also a failed write into the run directory: a
            full disk, a read-only or vanished directory), corpora.CorpusError,
            NonFiniteLossError, stopping.RankLost (under torchrun: another rank died).
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    share = None
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    else:  # share the cores with the other runs on this machine (cores.py)
        share = CoreShare()
        share.apply()
    world = distributed.from_env()  # one process alone, or this rank under torchrun
    run = None
    try:
        run = Run(cfg, out_dir, resume, data_dir, quiet, world)
        run.cores = share
        summary = run.setup().train().cleanup()
        world.close(sync=True)  # every rank finished: leave together
        return summary
    except OSError as e:  # a write into the run directory failed: one line says what to do
        if run is None or not e.filename or not _in(e.filename, run.run_dir):
            raise
        raise ckpt.write_error(Path(e.filename), e) from None
    except NonFiniteLossError as e:  # train.on_nonfinite=raise; in the app's words
        what = re.sub(r"^chunk \d+: ", "", str(e).split(";")[0])
        where = f"update {run.step + 1}: " if run is not None else ""
        raise NonFiniteLossError(
            f"{where}{what} (train.on_nonfinite=raise), the run stopped: lower optim.lr or set "
            "optim.clip, or --set train.on_nonfinite=skip to drop such updates; "
            f"{_resume_hint(run)}") from None
    except RuntimeError as e:
        if world.distributed and _in_collective(e):
            raise _rank_lost(world, run, e) from None
        raise
    finally:  # leave the process as we found it (train() also runs inside tests, sweeps)
        if share is not None:
            share.close()
        world.close()  # after an error: no barrier a crashed peer would never reach
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _in(filename, folder):
    return Path(os.path.abspath(filename)).parent == Path(os.path.abspath(folder))


def _in_collective(e):
    """Whether `e` is torch's error from a collective (raised inside torch.distributed or by
    our calls of it in distributed.py, such as the wait on an all-reduce): a peer is gone."""
    if isinstance(e, getattr(torch.distributed, "DistError", ())):
        return True
    if type(e).__module__.split(".")[0] in ("dni_rnn", "corpora"):  # our own errors
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    file = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return (os.path.abspath(file) == os.path.abspath(distributed.__file__)
            or "torch/distributed/" in file.replace(os.sep, "/"))


def _resume_hint(run):
    last = run.run_dir / "last.pt" if run is not None else None
    if last is not None and last.is_file():
        return f"--resume continues from {last}"
    return "no checkpoint was written yet: start it again"


def _rank_lost(world, run, e):
    why = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip() or type(e).__name__).splitlines()[0])
    why = why.split(". ")[0][:160]
    return RankLost(f"rank {world.rank} of {world.size}: another process of this run is gone "
                    f"(a collective failed: {why}); this rank stops too; the same torchrun "
                    f"command with {_resume_hint(run)}")


def evaluate_checkpoint(path, split="test", data_dir=None, device="auto"):
    """Evaluate a run directory's best (else last) checkpoint, or a checkpoint file.

    Returns:
        dict with the split, loss, the task's metric and its words for the result (`text`).
    """
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
    if split not in ("valid", "test"):
        raise ConfigError(f"--split must be valid or test, got {split!r}")
    task.load_state_dict(c["task"])
    result = task.evaluate(model, split, dev)
    return {"checkpoint": str(file), "recipe": cfg.recipe, "split": split,
            "step": c["runner"]["step"], "metric": task.metric.name,
            "text": task.result_text(result), **result}


def diagnose_checkpoint(path, horizons=(1, 2, 4, 8), boundaries=16, split="valid",
                        data_dir=None, device="auto"):
    """Diagnose a saved run: the mean report over `boundaries` boundaries of a split.

    The state is carried from the split's start (no gradients) and the boundaries are spread
    over the split, each with room for the longest horizon. Language models use the
    validation (or test) split; a synthetic task a fresh block of its training episodes.

    Returns:
        dict: the mean report, the boundaries used, the checkpoint, T and the horizons.
    """
    file = ckpt.find(path, prefer=("last.pt", "best.pt"))
    c = ckpt.load(file)
    cfg = validate(Config.from_dict(c["config"], where=f"checkpoint {file.name}"))
    cfg.recipe = c["config"].get("recipe", cfg.recipe)
    dev = select_device(device)
    task = build_task(cfg, data_dir)
    task.load_state_dict(c["task"])
    model = task.build_model().to(dev)
    model.load_state_dict(c["model"])
    synth, _ = build_synthesizers(cfg, model, context_width(cfg, task))
    if synth is not None:
        synth = synth.to(dev)
        synth.load_state_dict(c["synthesizer"])
    runner = TBPTTRunner(model, task.loss_fn, None, truncation=cfg.train.truncation,
                         synthesizer=synth, sg_scale=sg_scale(cfg),
                         target_scale=target_scale(cfg), sg_cap=cfg.dni.sg_cap or None,
                         guard=False)
    runner.load_state_dict(c["runner"])
    inputs, targets, resets = task.diagnosis_stream(split, dev)
    T, K = cfg.train.truncation, max(horizons)
    context = context_stream(cfg, task, Stream(inputs, targets, resets), model)
    N = inputs.shape[0]
    last = N - K * T  # the last boundary with room for the longest horizon
    if last < T:
        raise ConfigError(f"the {split} stream has {N} steps: too short for horizon {K} at "
                         f"T={T}; pass smaller --horizons")
    every = max(1, (last // T) // boundaries)
    starts = [b * T for b in range(1, last // T + 1, every)][:boundaries]
    model.train()  # as in training (dropout draws are forked away); cuDNN's RNN backward
    reports, state, pos = [], model.init_state(inputs.shape[1]), 0
    with torch.no_grad():
        for start in starts:  # carry the state to the boundary without gradients
            for a in range(pos, start, T):
                b = min(a + T, start)
                _, state, _ = forward_with_resets(model, inputs[a:b], state,
                                                  resets[a:b] if resets is not None else None)
            pos = start
            tail = resets[start:] if resets is not None else None
            reports.append(diagnostics.diagnose(runner, inputs[start:], targets[start:], state,
                                                T, horizons, tail,
                                                train_batch=cfg.data.batch_size,
                                                context=context_window(cfg, context, start)))
    return {"checkpoint": str(file), "step": runner.step, "split": split, "T": T,
            "horizons": list(horizons), "boundaries": len(reports),
            **diagnostics.mean_reports(reports)}
