"""Training and evaluating a recipe from Python: what the CLI calls.

    summary = train(cfg)                       # Run(cfg).setup().train().cleanup()
    result = evaluate_checkpoint("runs/x")     # a saved model on a split, no optimizer

The run itself is `run.Run` (setup / train / cleanup); this module leaves the process as it
found it (threads, determinism flags) and loads checkpoints for evaluation.
"""
from __future__ import annotations

import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError, validate
from .run import Run, select_device
from .tasks import build_task


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
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return Run(cfg, out_dir, resume, data_dir, quiet).setup().train().cleanup()
    finally:  # leave the process as we found it (train() also runs inside tests, sweeps)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


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
