"""Checkpoints: plain dicts of tensors and plain values, written atomically.

    {"format": "dni_rnn-checkpoint", "version": 1,
     "config":   Config.to_dict()            plain str/int/float/bool/None
     "model", "synthesizer", "aux_head":     state_dicts (None where absent)
     "optimizer", "synth_optimizer":         state_dicts (None where absent)
     "runner":   TBPTTRunner.state_dict()    the step count (the run's only one), the
                                             truncation schedule's generator, beta in
                                             force, target RMS, guard
     "vocab":    Vocabulary.state_dict()     (None for synthetic tasks)
     "task":     the task's own state        (curriculum, data generator)
     "progress": epoch, position in the stream, tokens seen, best score, ...
     "hidden":   the carried recurrent state (nested tuple of tensors) or None; under
                 data parallelism every rank's streams, gathered in rank order (B columns)
     "stream":   how the current synthetic block was drawn, or None
     "rng":      torch / CUDA / python / numpy generator states (python's as lists)
     "world_size": processes that trained it (1 alone); "rng_ranks": each rank's "rng"
                 (None alone): a resume needs the same number of processes}

Besides "format" and "version" it is `run.Run.state_dict()`, and `Run.load_state_dict`
restores it; this module writes, reads and checks the files.

Everything is loadable with `torch.load(weights_only=True)`: no pickled classes.
Writes go to a temporary file in the same folder, are fsync'ed, then os.replace'd over
the target, so a kill during a write leaves the old file (or none), never a broken one
(only a stale `.NAME.*.tmp`, which the next start of the run removes). A failed write (a
full disk, a read-only or vanished directory) raises CheckpointError with one line and
leaves the old file as it was. For the fault trials (experiments/fault_trials.py) the
environment variable DNI_RNN_SAVE_PAUSE=SECONDS makes every write wait that long between
writing the temporary file and renaming it, so that a kill can be aimed there.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import random
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from corpora import CorpusError, Vocabulary
from corpora.paths import atomic_write  # one atomic write for corpora caches and checkpoints

from .config import SECTIONS

FORMAT = "dni_rnn-checkpoint"
VERSION = 1
# config sections whose differences make a checkpoint a different model or data stream
IDENTITY_SECTIONS = ("data", "task", "model", "dni")
IDENTITY_EXEMPT = {"data.data_dir", "data.eval_batch_size", "data.valid_tokens",
                   "data.test_tokens", "task.eval_sequences"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to another run; one-line message."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).splitlines()))


def save(obj, path):
    """Write `obj` (a plain dict) to `path` atomically: temp file + fsync + os.replace.

    Raises:
        CheckpointError: the write failed (a full disk, a read-only or vanished folder); the
            file already at `path` is left as it was.
    """
    path = Path(path)

    def write(tmp):
        with open(tmp, "wb") as fh:
            f = _File(fh)
            try:
                torch.save(obj, f)
            except RuntimeError:  # torch's stand-in for the OSError its writes raised
                if f.error is None:
                    raise
                raise f.error from None
        pause = float(os.environ.get("DNI_RNN_SAVE_PAUSE", 0) or 0)
        if pause:  # fault trials only: a window between the write and the rename for a kill
            time.sleep(pause)

    _write(path, write)


def link(src, dst):
    """Make `dst` the same file as the checkpoint `src`, atomically (a hard link; a copy
    where the file system has none). best.pt and last.pt of one step share their bytes."""
    src, dst = Path(src), Path(dst)

    def make(tmp):
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    _write(dst, make)


class _File:
    """The file torch.save writes to, keeping the OSError of a failed write: torch replaces
    it with a RuntimeError that does not say what went wrong (e.g. a full disk)."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data):
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.fh.flush()


def _write(path, write):
    if not path.parent.is_dir():  # atomic_write would make it again, on whatever is there
        raise gone(path.parent)
    try:
        atomic_write(path, write)
    except OSError as e:
        raise write_error(path, e) from None
    _fsync_dir(path.parent)


def gone(run_dir):
    """The error of a run whose directory vanished under it (deleted, unmounted)."""
    return CheckpointError(f"the run directory {run_dir} is gone (deleted or unmounted while "
                           "the run trained); nothing more can be saved there, the run stops")


def write_error(path, e):
    """One line for an OSError while writing `path` into a run directory: what failed, why,
    that the checkpoints there are intact, and what to do."""
    if not path.parent.is_dir():
        return gone(path.parent)
    fix = ("free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
           "make it writable" if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else
           "fix that")
    return CheckpointError(f"cannot write {path}: {e.strerror or e}; the checkpoints already "
                           f"in that directory are intact: {fix}, then resume with --resume")


def _fsync_dir(folder):
    """Make a rename in `folder` itself durable (where the platform allows it)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load(path, map_location="cpu"):
    """Read a checkpoint with `weights_only=True`.

    Raises:
        CheckpointError: missing, unreadable, corrupt, or not a dni_rnn checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable "
                              f"({type(e).__name__}: {first[:160]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dni_rnn checkpoint")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {obj.get('version')}, "
                              f"this dni_rnn reads version {VERSION}")
    return obj


def find(run_dir_or_file, prefer=("best.pt", "last.pt")):
    """A checkpoint file: the path itself, or the first of `prefer` inside a run directory."""
    p = Path(run_dir_or_file)
    if p.is_dir():
        for name in prefer:
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"no checkpoint ({' or '.join(prefer)}) in {p}")
    if not p.exists():
        raise CheckpointError(f"no such run directory or checkpoint: {p}")
    return p


# ---- what must match ---------------------------------------------------------------------

def _flat(config):
    return {f"{s}.{k}": v for s in IDENTITY_SECTIONS for k, v in config.get(s, {}).items()}


def check_compatible(saved_config, config, path):
    """Refuse a checkpoint of another recipe, model, task or DNI setting.

    Args:
        saved_config: the checkpoint's `config` (a plain dict).
        config: this run's `Config.to_dict()`.
        path: the checkpoint (for the message).
    Raises:
        CheckpointError naming the first differing key.
    """
    if saved_config.get("recipe") != config.get("recipe"):
        raise CheckpointError(f"checkpoint {path} is from recipe {saved_config.get('recipe')!r}, "
                              f"not {config.get('recipe')!r}; use another --out")
    old, new = _flat(saved_config), _flat(config)
    # a key the checkpoint predates ran with its default (e.g. dni.replay = 0)
    defaults = _flat({name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()})
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
    diffs = [k for k in sorted(set(old) | set(new))
             if k not in IDENTITY_EXEMPT and old.get(k) != new.get(k)]
    if diffs:
        k = diffs[0]
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise CheckpointError(f"checkpoint {path} was trained with {k}={old.get(k)!r}, this "
                              f"config has {new.get(k)!r}{more}; refusing to mix them "
                              "(use another --out)")


def check_vocab(saved_vocab, vocab, path):
    """Refuse a checkpoint whose vocabulary differs from the corpus's."""
    if saved_vocab is None and vocab is None:
        return
    if saved_vocab is None or vocab is None:
        raise CheckpointError(f"checkpoint {path}: vocabulary present on one side only")

    try:
        vocab.check_same(Vocabulary.from_state_dict(saved_vocab), what="checkpoint")
    except CorpusError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None


# ---- random number generators -------------------------------------------------------------

def rng_state():
    """Every global generator's state, as tensors and plain lists."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "python": [version, list(internal), gauss],
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state):
    """Restore `rng_state()`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("numpy") is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- a training run ------------------------------------------------------------------------

def run_state(run):
    """A `run.Run` as a checkpoint: the format header and `run.state_dict()`. Under data
    parallelism every rank must call it (the carried states and generators are gathered)."""
    return {"format": FORMAT, "version": VERSION, **run.state_dict()}


def check_world_size(saved, size, path):
    """A run resumes with the number of processes that wrote its checkpoint."""
    if saved != size:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved} process{'es' if saved > 1 else ''}, "
            f"this run has {size}; resume with {saved} (torchrun --nproc_per_node x --nnodes "
            f"= {saved}{', or without torchrun' if saved == 1 else ''}), or start a new run "
            "with another --out")


def restore_run(run, path):
    """Load `path` into a set-up `run.Run` (its modules built, nothing trained), once it is
    known to be this run's: the same number of processes, config and vocabulary."""
    world = run.world
    # on the CPU: generator states must stay CPU ByteTensors; rank 0 reads, all receive
    c = world.on_main(lambda: load(path))
    check_world_size(int(c.get("world_size", 1)), world.size, path)
    check_compatible(c["config"], run.cfg.to_dict(), path)
    check_vocab(c["vocab"], run.task.vocab, path)
    run.load_state_dict(c, path)
