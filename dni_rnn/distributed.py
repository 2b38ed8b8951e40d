"""Past one machine: data-parallel TBPTT under `torchrun`, one process per rank.

    torchrun --nproc_per_node=2 -m dni_rnn train ptb-char          # one node
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=2 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m dni_rnn train ptb-char

(replay and the closed-form refit are refused: `ptb-word-small`'s DNI needs
`--set dni.context=none --set dni.synth_layers=1 --set dni.refit=0`, docs/distributed.md)

What is split. The B parallel streams of a recipe are cut into W contiguous blocks of
B / W columns, one per rank; every rank carries the state of its own streams only
(`(layers, B / W, H)` for an LSTM) and draws nothing the others need:

    global streams (N, B):   | rank 0: cols [0, B/W) | rank 1: cols [B/W, 2B/W) | ...

What is synchronised, so that W ranks make the very updates of one process on B:
- the parameters once, at the start (broadcast from rank 0);
- each chunk's mean loss (a mean over ranks = the global mean, since every rank holds
  the same number of tokens): the logs and the NaN check agree on every rank;
- after each backward, one all-reduce of the gradients of model and synthesizer
  (averaged, as DistributedDataParallel does) and one of the synthesizer's trigger
  statistics (`interfaces.TriggerStats`, summed) and of per-rank norms, so the running
  RMS of the targets, the cap and the divergence guard decide alike everywhere;
- evaluation sums (loss x tokens, bit errors), checkpoints (the carried states are
  gathered to rank 0, which alone writes logs, progress and checkpoints).

Why not the `DistributedDataParallel` wrapper: the runner calls the model a rank-dependent
number of times per chunk (it cuts the chunk at every state reset of its own streams, and
DDP runs collectives in each forward), the synthesizer's gradient arrives through a custom
autograd Function at a fresh leaf outside the model's forward, and lambda != beta takes a
second `autograd.grad` through the core. `GradientSync` averages the same gradients DDP
would, once per update, after the deferred backward has produced all of them.

Units. Each rank's loss is the mean over its own B / W streams, so the real gradients that
reach its triggers are W times those of one process on B (only the gradients of the
parameters are averaged). Targets in "rms" or "sum" units are unaffected; a "raw" or
numeric `target_scale` is divided by W (`GradientSync.local_target_scale`), so that the
synthesizer learns the same function as in one process. Reported trigger norms
(`real_norm`, `synthetic_norm`) are in the ranks' units (W x); their ratio is not.
"""
from __future__ import annotations

import datetime
import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import nest
from .errors import ConfigError

# torchrun sets these for every worker (torch.distributed.run)
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A local launch (`launch`) failed: a rank raised, died or ran out of time."""


@dataclass
class World:
    """This process's place among the data-parallel ranks; one process alone by default.

    rank / size: this process's index and the number of processes (W); local_rank: its
    index on this node (its GPU); backend: "gloo" or "nccl" (None alone); owns_group:
    this object created the process group and `close()` destroys it.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = None
    owns_group: bool = False

    @property
    def distributed(self):
        return self.size > 1

    @property
    def main(self):
        """Rank 0: the one that writes logs, progress and checkpoints."""
        return self.rank == 0

    def describe(self):
        return f"{self.size} processes ({self.backend})" if self.distributed else "1 process"

    def close(self, sync=False):
        """Destroy the process group if this world created it; with `sync` (every rank got
        here without an error) after a barrier: a rank that tore gloo down while its peer
        was still finishing aborted at exit ("terminate called without an active
        exception"), about one torchrun in twelve on 2 busy cores."""
        if self.owns_group and dist.is_initialized():
            if sync:
                dist.barrier()
            dist.destroy_process_group()
        self.owns_group = False

    # ---- devices and streams ----------------------------------------------------------

    def device(self, device):
        """Each rank's own GPU (cuda:LOCAL_RANK) when the run is on CUDA."""
        device = torch.device(device)
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def check_batch(self, batch_size, key="data.batch_size"):
        """Every rank must hold the same number of streams (the loss is a mean over them)."""
        if self.distributed and batch_size % self.size:
            raise ConfigError(f"{key}={batch_size} streams cannot be split evenly over "
                                   f"{self.size} processes; make it a multiple of {self.size}")

    def streams(self, tensor, dim=1):
        """This rank's contiguous block of B / W columns of `(N, B, ...)` streams."""
        if tensor is None or not self.distributed:
            return tensor
        self.check_batch(tensor.shape[dim])
        n = tensor.shape[dim] // self.size
        return tensor.narrow(dim, self.rank * n, n)

    def eval_columns(self, tensor, dim=1):
        """This rank's share of evaluation columns (uneven shares allowed; maybe empty)."""
        if tensor is None or not self.distributed:
            return tensor
        return torch.tensor_split(tensor, self.size, dim=dim)[self.rank]

    def local_state(self, state, batch_dim=None):
        """This rank's block of a global carried state (the inverse of `gather_state`)."""
        if state is None or not self.distributed:
            return state
        return nest.map_state(lambda t: self.streams(t, nest.batch_dimension(t, batch_dim)),
                              state)

    def gather_state(self, state, batch_dim=None):
        """Every rank's carried state, concatenated in rank order along the batch dimension:
        the state one process on all B streams would carry (on the CPU)."""
        local = None if state is None else nest.map_state(lambda t: t.detach().cpu(), state)
        if not self.distributed:
            return local
        parts = self.gather_objects(local)
        if parts[0] is None:
            return None
        columns = [nest.flatten(p) for p in parts]
        merged = [torch.cat(ts, dim=nest.batch_dimension(ts[0], batch_dim))
                  for ts in zip(*columns)]
        return nest.unflatten(parts[0], merged)

    # ---- collectives ------------------------------------------------------------------

    def sum(self, values, device=None):
        """Sum a list of numbers over the ranks (float64); returns floats."""
        if device is None and self.backend == "nccl":  # NCCL reduces CUDA tensors only
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; for checkpoints)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_parameters(self, *modules):
        """Make every rank start from rank 0's parameters and buffers."""
        if not self.distributed:
            return
        with torch.no_grad():
            for m in modules:
                if m is None:
                    continue
                for t in list(m.parameters()) + list(m.buffers()):
                    dist.broadcast(t.data, src=0)

    def on_main(self, fn):
        """Run `fn` on rank 0 only and return its result on every rank; an exception
        there is raised on every rank (so that a user error ends all of them alike)."""
        if not self.distributed:
            return fn()
        result = error = None
        if self.main:
            try:
                result = fn()
            except Exception as e:  # re-raised below, on every rank
                error = e
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error
        return result

    def main_first(self, fn):
        """Run `fn` on rank 0, then (if it succeeded) on the others: rank 0 fills the
        caches (tokenised corpora) that the others then read."""
        if not self.distributed:
            return fn()
        result = None

        def first():
            nonlocal result
            result = fn()

        self.on_main(first)  # broadcasts only an error, never the (large) result
        return result if self.main else fn()

    def gradient_sync(self):
        """The runner's `sync` for this world (None alone)."""
        return GradientSync(self) if self.distributed else None


class GradientSync:
    """Data parallelism inside `TBPTTRunner`: what it calls after each loss and backward.

    Args:
        world: a distributed `World`.
    """

    def __init__(self, world):
        self.world = world

    def mean(self, loss):
        """The mean over ranks of a per-rank 0-d tensor, as a float (the global chunk loss)."""
        t = loss.detach().to(torch.float64).reshape(1).clone()
        dist.all_reduce(t)
        return float(t) / self.world.size

    def local_target_scale(self, target_scale):
        """A rank's gradients at the triggers are W times one process's: "raw" and numeric
        target scales are divided by W ("rms" and "sum" carry their own units)."""
        if target_scale in ("rms", "sum"):
            return target_scale
        return (1.0 if target_scale == "raw" else float(target_scale)) / self.world.size

    def after_backward(self, params, stats=None, norms=()):
        """Average the gradients of `params` over the ranks; sum the trigger statistics.

        Args:
            params: every parameter the update steps (model and synthesizer); those with a
                gradient must be the same on every rank.
            stats: a `TriggerStats` (or None): every numeric field is summed over the ranks
                (booleans or-ed), so derived values (loss, cosine, mean square) are global.
            norms: per-rank norms (0-d tensors or None) to combine as sqrt(sum of squares).
        Returns:
            the combined norms, a list (None stays None).
        """
        grads = [p.grad for p in params if p.grad is not None]
        pending = []
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            pending.append(dist.all_reduce(flat, async_op=True))
        fields = _numeric_fields(stats)
        device = grads[0].device if grads else None
        extra = [_as_float(getattr(stats, k)) for k in fields]
        extra += [0.0 if n is None else float(n) ** 2 for n in norms]
        small = torch.tensor(extra, dtype=torch.float64, device=device)
        if extra:
            pending.append(dist.all_reduce(small, async_op=True))
        for work in pending:
            work.wait()
        if grads:
            flat /= self.world.size
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        values = small.tolist()
        if stats is not None:
            _write_fields(stats, fields, values[:len(fields)])
        out = values[len(fields):]
        return [None if n is None else math.sqrt(v) for n, v in zip(norms, out)]


def _numeric_fields(stats):
    if stats is None:
        return []
    return sorted(k for k, v in vars(stats).items()
                  if isinstance(v, (bool, int, float)) or torch.is_tensor(v) and v.dim() == 0)


def _as_float(v):
    return float(v.detach()) if torch.is_tensor(v) else float(v)


def _write_fields(stats, fields, values):
    like = next((v for v in vars(stats).values() if torch.is_tensor(v)), None)
    for k, v in zip(fields, values):
        old = getattr(stats, k)
        if isinstance(old, bool):
            setattr(stats, k, v > 0)
        elif isinstance(old, int):
            setattr(stats, k, int(round(v)))
        elif like is not None:  # a field still 0.0 here but filled on another rank
            setattr(stats, k, torch.tensor(v, dtype=like.dtype, device=like.device))
        else:
            setattr(stats, k, torch.tensor(v, dtype=torch.float64))


# ---- setting up -----------------------------------------------------------------------------

def launched():
    """Whether this process runs under torchrun (or anything that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_env(backend=None, timeout_s=1800):
    """The `World` of this process: from torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else alone.

    Initialises the default process group (env://) unless one exists already; the backend
    is NCCL when CUDA is available, else gloo.

    Args:
        backend: "gloo" or "nccl" (None: by device).
        timeout_s: how long a collective may wait for a missing rank.
    """
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())
    if not launched():
        return World()
    missing = [k for k in ENV_KEYS if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} not: start the "
                               "processes with torchrun")
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, backend, owns_group=True)


def free_port(host="127.0.0.1"):
    """A TCP port that is free on `host` now (for MASTER_PORT of a local launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(fn, nprocs=2, args=(), timeout_s=300, threads=1):
    """Run `fn(*args)` in `nprocs` fresh processes on 127.0.0.1, as torchrun would start them
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT set), and collect the results.

    For tests and examples on one machine; `fn` must be importable (a module-level function)
    and its result picklable. A process that fails or a launch that outlives `timeout_s`
    ends them all.

    Returns:
        [result of rank 0, result of rank 1, ...]
    Raises:
        DistributedError: with the failing rank's traceback, or on the timeout.
    """
    import multiprocessing
    import pickle
    import queue as queue_module
    import time

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(rank, nprocs, port, threads, fn, args, results),
                         daemon=True) for rank in range(nprocs)]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(out) < nprocs:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DistributedError(f"launch of {nprocs} processes ran past {timeout_s}s "
                                       f"(finished: ranks {sorted(out)})")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue_module.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and i not in out]
                if dead:
                    raise DistributedError(f"rank {dead[0]} died with exit code "
                                           f"{procs[dead[0]].exitcode}") from None
                continue
            if not ok:
                raise DistributedError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [out[r] for r in range(nprocs)]


def _entry(rank, nprocs, port, threads, fn, args, results):
    import pickle
    import traceback

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(nprocs)})
    torch.set_num_threads(threads)
    try:
        # pickled here, by value: tensors must not travel as handles to this process's memory
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: B902 - the parent reports it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
