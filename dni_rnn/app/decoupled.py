"""Decoupled training across processes: the update unlock of DNI (Jaderberg et al. 2016,
Sec. 2 and Fig. 1) with a stacked recurrent language model cut into two parts, one per
process:

    rank 0, part A (lower):  tokens (T, B) -> embedding -> LSTM layer 1 -> h (T, B, H)
                             h --send--> rank 1
    rank 1, part B (upper):  h -> LSTM layer 2 -> decoder -> loss; dL/dh --send--> rank 0

- lock-step: A waits for dL/dh of the chunk it just sent and backpropagates it: plain
  TBPTT of the whole stack, split over two processes (one of them always idle).
- decoupled: A backpropagates a synthetic gradient g_hat = M(h) / (T B) at once
  (`BackwardInterface.backward`) and steps without waiting for B's backward. The real
  dL/dh of chunk k comes back while A works on later chunks; at update k + lag A regresses
  M onto it (a trigger made from the h it kept, `make_trigger`), waiting only if B is more
  than `lag` chunks behind. Consuming chunk k's gradient exactly at update k + lag makes
  the run independent of timing: the same numbers on a fast or a slow machine.
  B never waits for A's backward, only for A's activations, which A sends ahead of time.

Both parts carry their own recurrent state across chunks (truncated at every chunk) and
clip their own gradients; M is a zero-initialised MLP over the H features of each step,
so A starts by learning nothing until M has learnt from B. M's targets are in summed-loss
units (T B dL/dh: O(1) per element).

    results = launch(train_pair, 2, (inputs, targets, valid, vocab, Options(mode=...)))

Measure both modes in one run (PTB characters; 2 processes on this machine):

    dni-rnn decoupled --data-dir DIR --updates 1500 --json out.json   (or python -m dni_rnn.decoupled)
"""
from __future__ import annotations

import collections
import dataclasses
import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import deferred, nest
from ..interfaces import BackwardInterface
from ..models import SequenceModel, core_init_state
from ..synthesizers import BasicSynthesizer
from ..tbptt import evaluate

ACTIVATION, GRADIENT = 1, 2  # message tags: A -> B, B -> A


@dataclasses.dataclass
class Options:
    """One decoupled (or lock-step) run of the two parts.

    mode: "decoupled" or "lockstep"; lag: chunks A runs ahead of the real gradients
    (decoupled); truncation: T; updates: chunks to train on (0: the whole stream);
    embed_dim, hidden_dim: part sizes; synth_layers: hidden layers of M; lr: Adam's
    learning rate (both parts and M); clip: gradient-norm clip of each part (0: none);
    seed; dtype: "float32" or "float64"; slow_upper_s: B sleeps this long per chunk
    (tests: the numbers must not depend on timing); return_params: send the parameters
    back.
    """

    mode: str = "decoupled"
    lag: int = 1
    truncation: int = 10
    updates: int = 0
    embed_dim: int = 64
    hidden_dim: int = 256
    synth_layers: int = 1
    lr: float = 1e-3
    clip: float = 0.25
    seed: int = 1
    dtype: str = "float32"
    slow_upper_s: float = 0.0
    return_params: bool = False


class LowerPart(nn.Module):
    """Part A: tokens `(T, B)` -> embedding -> one LSTM layer -> h `(T, B, H)`."""

    def __init__(self, vocab_size, embed_dim, hidden_dim):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.core = nn.LSTM(embed_dim, hidden_dim)

    def forward(self, tokens, state):
        return self.core(self.embedding(tokens), state)

    def init_state(self, batch_size):
        return core_init_state(self.core, batch_size)


class StackedLM(nn.Module):
    """Both parts in one module (one process): the reference, and evaluation."""

    def __init__(self, vocab_size, embed_dim, hidden_dim):
        super().__init__()
        self.lower = LowerPart(vocab_size, embed_dim, hidden_dim)
        # part B: h (T, B, H) -> one LSTM layer -> linear readout -> logits (T, B, V)
        self.upper = SequenceModel(hidden_dim, vocab_size, hidden_dim)

    def forward(self, tokens, state):
        h, a = self.lower(tokens, state[0])
        logits, b = self.upper(h, state[1])
        return logits, (a, b)

    def init_state(self, batch_size):
        return self.lower.init_state(batch_size), self.upper.init_state(batch_size)


def build(vocab_size, opts):
    """The stacked model and A's synthesizer, the same on every rank (seeded)."""
    torch.manual_seed(opts.seed)
    model = StackedLM(vocab_size, opts.embed_dim, opts.hidden_dim).to(getattr(torch, opts.dtype))
    synth = BasicSynthesizer(opts.hidden_dim, n_hidden=opts.synth_layers)
    return model, synth.to(getattr(torch, opts.dtype))


def lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class Link:
    """Messages to the other part: non-blocking sends and receives (torch.distributed)."""

    def __init__(self, peer):
        self.peer, self.sends, self.waited = peer, [], 0.0

    def send(self, tensor, tag):
        tensor = tensor.detach().contiguous()
        self.sends.append((dist.isend(tensor, self.peer, tag=tag), tensor))
        self.sends = [(w, t) for w, t in self.sends if not w.is_completed()]

    def post(self, shape, dtype, tag):
        """Start receiving; returns (work, buffer) to `wait` for later."""
        buf = torch.empty(shape, dtype=dtype)
        return dist.irecv(buf, self.peer, tag=tag), buf

    def wait(self, pending):
        work, buf = pending
        t0 = time.perf_counter()
        work.wait()
        self.waited += time.perf_counter() - t0
        return buf

    def flush(self):
        for work, _ in self.sends:
            work.wait()
        self.sends = []


class _Arrived:
    def wait(self):
        return True

    def is_completed(self):
        return True


class LocalLink(Link):
    """No peer: every message has already arrived (small random numbers) and sends go
    nowhere; to time one part's own work (`part_costs`)."""

    def __init__(self):
        super().__init__(peer=None)
        self.generator = torch.Generator().manual_seed(0)

    def send(self, tensor, tag):
        pass

    def post(self, shape, dtype, tag):
        return _Arrived(), 1e-3 * torch.randn(shape, dtype=dtype, generator=self.generator)


def part_costs(inputs, targets, vocab_size, opts):
    """Seconds per update of each part's own work, in this process (no messages): part A
    in lock-step (backpropagates a given gradient), part A decoupled (with its
    synthesizer's forward and regression) and part B.

    Returns:
        {"A_lockstep": s, "A_decoupled": s, "B": s}
    """
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as each part has in its own process
    try:
        _time_parts(inputs, targets, vocab_size, opts, out)
    finally:
        torch.set_num_threads(threads)
    return out


def _time_parts(inputs, targets, vocab_size, opts, out):
    for name, mode in (("A_lockstep", "lockstep"), ("A_decoupled", "decoupled")):
        model, synth = build(vocab_size, opts)
        o = dataclasses.replace(opts, mode=mode)
        r = train_lower(model.lower, synth, inputs, o, LocalLink())
        out[name] = r["seconds"] / _chunks(inputs, o)
    model, _ = build(vocab_size, opts)
    r = train_upper(model.upper, targets, opts, LocalLink(), opts.hidden_dim,
                    getattr(torch, opts.dtype))
    out["B"] = r["seconds"] / _chunks(targets, opts)


def _clip(params, clip):
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)


def train_lower(part, synth, inputs, opts, link):
    """Part A's loop (rank 0). Returns its numbers: seconds, waits, M's fit."""
    T, B, K = opts.truncation, inputs.shape[1], _chunks(inputs, opts)
    interface = BackwardInterface(synth)
    optimizer = torch.optim.Adam([*part.parameters(), *synth.parameters()], lr=opts.lr)
    scale = float(T * B)  # M predicts T B dL/dh: the gradient of the summed loss
    state, kept, fits = part.init_state(B), collections.deque(), []
    start = time.perf_counter()
    for k in range(K):
        optimizer.zero_grad(set_to_none=True)
        h, new_state = part(inputs[k * T:(k + 1) * T], state)
        link.send(h, ACTIVATION)
        incoming = link.post(h.shape, h.dtype, GRADIENT)
        if opts.mode == "lockstep":  # wait for B's real gradient of this very chunk
            h.backward(link.wait(incoming))
        else:
            kept.append((h.detach(), incoming))
            arrived = len(kept) > opts.lag
            with deferred.defer_backward():
                interface.backward(h, factor=1.0, target_scale=scale)  # g_hat, now
                if arrived:  # the real gradient of chunk k - lag trains M
                    h_old, old = kept.popleft()
                    trigger = interface.make_trigger(h_old, target_scale=scale)
                    deferred.backward(trigger, link.wait(old))
            stats = interface.last_stats
            fits.append((float(stats.loss), float(stats.cosine)) if arrived else None)
        _clip(list(part.parameters()), opts.clip)
        optimizer.step()
        state = nest.detach(new_state)
    seconds = time.perf_counter() - start
    for _, pending in kept:  # B answers every chunk: collect what is still under way
        link.wait(pending)
    link.flush()
    return {"part": "A", "seconds": seconds, "waited_s": link.waited, "fits": fits}


def train_upper(part, targets, opts, link, hidden_dim, dtype):
    """Part B's loop (rank 1). Returns its numbers: seconds, waits, training losses."""
    T, B, K = opts.truncation, targets.shape[1], _chunks(targets, opts)
    optimizer = torch.optim.Adam(part.parameters(), lr=opts.lr)
    state, losses = part.init_state(B), []
    shape = (T, B, hidden_dim)
    incoming = link.post(shape, dtype, ACTIVATION)
    start = time.perf_counter()
    for k in range(K):
        h = link.wait(incoming).requires_grad_()
        if k + 1 < K:  # receive the next chunk's activations while this one trains
            incoming = link.post(shape, dtype, ACTIVATION)
        optimizer.zero_grad(set_to_none=True)
        logits, new_state = part(h, state)
        loss = lm_loss(logits, targets[k * T:(k + 1) * T])
        loss.backward()
        link.send(h.grad, GRADIENT)  # A's real gradient, sent back without waiting
        _clip(list(part.parameters()), opts.clip)
        optimizer.step()
        state = nest.detach(new_state)
        losses.append(loss.item())
        if opts.slow_upper_s:
            time.sleep(opts.slow_upper_s)
    seconds = time.perf_counter() - start
    link.flush()
    return {"part": "B", "seconds": seconds, "waited_s": link.waited, "losses": losses}


def _chunks(streams, opts):
    K = streams.shape[0] // opts.truncation  # whole chunks only: fixed message shapes
    return min(K, opts.updates) if opts.updates else K


def train_pair(inputs, targets, valid, vocab_size, opts):
    """Run under 2 processes (torchrun or `distributed.launch`): rank 0 trains part A,
    rank 1 part B, then rank 1 evaluates the whole stack on `valid`.

    Args:
        inputs, targets: `(N, B)` token ids (both ranks get both; each uses its own).
        valid: `(N_valid, E)` ids for the final validation loss (None: none).
        vocab_size: number of token ids.
        opts: an `Options`.
    Returns:
        this rank's numbers: seconds, seconds spent waiting, updates per second, and for
        B the training losses and the stack's validation loss (nats per token).
    """
    from ..distributed import from_env

    world = from_env()
    if world.size != 2:
        raise ValueError(f"the two parts need 2 processes, got {world.size}")
    if opts.mode not in ("decoupled", "lockstep") or opts.lag < 0:
        raise ValueError(f"mode must be decoupled or lockstep (lag >= 0), got {opts}")
    model, synth = build(vocab_size, opts)
    dtype = getattr(torch, opts.dtype)
    link = Link(peer=1 - world.rank)
    dist.barrier()
    if world.rank == 0:
        out = train_lower(model.lower, synth, inputs, opts, link)
        dist.send_object_list([model.lower.state_dict()], dst=1)
        params = model.lower.state_dict()
    else:
        out = train_upper(model.upper, targets, opts, link, opts.hidden_dim, dtype)
        box = [None]
        dist.recv_object_list(box, src=0)
        model.lower.load_state_dict(box[0])
        if valid is not None:
            out["valid_loss"], _ = evaluate(model, lm_loss, valid[:-1], valid[1:],
                                            chunk_length=opts.truncation)
        params = model.upper.state_dict()
    dist.barrier()
    out["updates"] = _chunks(inputs, opts)
    out["updates_per_s"] = out["updates"] / out["seconds"]
    if opts.return_params:
        out["params"] = {k: v.clone() for k, v in params.items()}
    return out


def summarize(results):
    """One line of numbers for a pair's results (rank 0's, rank 1's)."""
    a, b = results
    seconds = max(a["seconds"], b["seconds"])
    tail = b["losses"][-max(1, len(b["losses"]) // 10):]
    return {"updates": a["updates"], "seconds": seconds, "updates_per_s": a["updates"] / seconds,
            "train_loss_last_10pct": sum(tail) / len(tail),
            "valid_loss": b.get("valid_loss", math.nan),
            "A_waited_s": a["waited_s"], "B_waited_s": b["waited_s"]}


def main(argv=None):
    """Lock-step against decoupled on a recipe's corpus, 2 local processes each."""
    import argparse
    import json

    from .config import load_recipe
    from ..distributed import launch
    from .tasks import build_task

    p = argparse.ArgumentParser(prog="dni-rnn decoupled", description=main.__doc__)
    p.add_argument("--recipe", default="ptb-char", help="where the data comes from")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--data-dir")
    p.add_argument("--modes", default="lockstep,decoupled")
    p.add_argument("--updates", type=int, default=1500)
    p.add_argument("--truncation", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lag", type=int, default=1)
    p.add_argument("--synth-layers", type=int, default=1, help="hidden layers of M (0: linear)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--valid-tokens", type=int, default=50_000)
    p.add_argument("--costs", action="store_true", help="first time each part's own work "
                   "in this process (no messages): the bound with two free cores")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    T, B = args.truncation, args.batch
    cfg = load_recipe(args.recipe, args.overrides + [
        f"data.batch_size={B}", f"data.train_tokens={(args.updates * T + 1) * B}",
        f"data.valid_tokens={args.valid_tokens}", "data.test_tokens=1000"])
    task = build_task(cfg, args.data_dir)
    train = task.train
    valid, _ = task.data.split("valid")
    rows = {}
    if args.costs:
        opts = Options(truncation=T, updates=min(args.updates, 300), embed_dim=args.embed,
                       hidden_dim=args.hidden, lr=args.lr, synth_layers=args.synth_layers,
                       lag=args.lag)
        c = rows["costs_s_per_update"] = part_costs(train[:-1], train[1:], len(task.vocab), opts)
        bound = (c["A_lockstep"] + c["B"]) / max(c["A_decoupled"], c["B"])
        rows["two_free_cores_bound"] = bound
        print(f"own work per update, one process: A lock-step {1e3 * c['A_lockstep']:.1f} ms, "
              f"A decoupled {1e3 * c['A_decoupled']:.1f} ms, B {1e3 * c['B']:.1f} ms; with two "
              f"free cores decoupled / lock-step <= {bound:.2f}x", flush=True)
    for mode in args.modes.split(","):
        opts = Options(mode=mode, lag=args.lag, truncation=T, updates=args.updates,
                       embed_dim=args.embed, hidden_dim=args.hidden, lr=args.lr,
                       synth_layers=args.synth_layers)
        results = launch(train_pair, 2, (train[:-1], train[1:], valid, len(task.vocab), opts),
                         timeout_s=3600)
        rows[mode] = summarize(results)
        r = rows[mode]
        print(f"{mode:<10s} {r['updates']} updates in {r['seconds']:.1f}s: "
              f"{r['updates_per_s']:.1f} updates/s | train loss (last 10%) "
              f"{r['train_loss_last_10pct']:.4f} | valid {r['valid_loss']:.4f} nats "
              f"({r['valid_loss'] / math.log(2):.3f} bpc) | A waited {r['A_waited_s']:.1f}s, "
              f"B waited {r['B_waited_s']:.1f}s", flush=True)
    if "lockstep" in rows and "decoupled" in rows:
        ratio = rows["decoupled"]["updates_per_s"] / rows["lockstep"]["updates_per_s"]
        print(f"decoupled / lock-step: {ratio:.2f}x updates per second")
        rows["ratio"] = ratio
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": rows}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
