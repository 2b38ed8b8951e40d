"""Where one TBPTT chunk spends its time: the hand-written loop, the runner, DNI.

    python bench/profile_tbptt.py                        # word 2x200 T=5 and char 1x512 T=5
    python bench/profile_tbptt.py --models word --truncations 5,35 --chunks 300

Each part of a chunk is timed with the process's CPU clock (robust to a busy machine;
torch runs CPU kernels synchronously, so a part's clock is its kernels' time) by wrapping
what the benchmark hands the runner (model, loss, optimizer, synthesizer) and torch's
functions; the hand loop is timed inline. Variants run interleaved in
`--rounds` rounds and each cell is the median over rounds of the mean ms per chunk.

Parts (ms per chunk):
  forward     the model's forward over the chunk
  loss        the loss and its reading (`loss.item()` / the non-finite check)
  synth fwd   the synthesizer's forward passes (trigger message, g_hat)
  backward    the one deferred backward (model, and the synthesizer's regression)
  2nd VJP     lambda != beta: J^T g_hat through the core
  clip        gradient-norm clips
  step        optimizer.step()
  zero_grad   optimizer.zero_grad()
  other       everything else: Python, nest, metrics, statistics, the cap, the guard
"""
import argparse
import contextlib
import statistics
import sys
import time

import torch

import dni_rnn as dni  # the installed package (pip install -e .)
from dni_rnn import deferred  # noqa: E402
from bench_tbptt import (MODELS, keep_malloc, lm_loss_for, make_data, make_model,  # noqa: E402
                         make_optimizer, make_synth, malloc_note)

PARTS = ("forward", "loss", "synth fwd", "backward", "2nd VJP", "clip", "step", "zero_grad",
         "other")


class Clock:
    """Sums CPU seconds per part; nested parts are subtracted from their parents."""

    def __init__(self):
        self.sums = dict.fromkeys(PARTS, 0.0)
        self.stack = []

    @contextlib.contextmanager
    def part(self, name):
        self.stack.append(0.0)
        t0 = time.process_time()
        try:
            yield
        finally:
            dt = time.process_time() - t0
            inner = self.stack.pop()
            self.sums[name] += dt - inner
            if self.stack:
                self.stack[-1] += dt


def timed(clock, name, fn):
    def wrapper(*args, **kwargs):
        with clock.part(name):
            return fn(*args, **kwargs)
    return wrapper


def profile_loop(spec, T, chunks, clock):
    """The hand-written loop of bench_tbptt.py, each part timed."""
    model = make_model(spec)
    opt = make_optimizer(spec, list(model.parameters()))
    loss_fn = lm_loss_for(spec)
    data = make_data(spec, chunks * T)
    hidden = model.init_state(spec.batch)
    t0 = time.process_time()
    for i in range(0, chunks * T, T):
        x, y = data[i:i + T], data[i + 1:i + 1 + T]
        hidden = tuple(h.detach() for h in hidden)
        with clock.part("zero_grad"):
            model.zero_grad()
        with clock.part("forward"):
            out, hidden = model(x, hidden)
        with clock.part("loss"):
            loss = loss_fn(out, y)
        with clock.part("backward"):
            loss.backward()
        with clock.part("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        with clock.part("step"):
            opt.step()
        with clock.part("loss"):
            loss.item()
    return time.process_time() - t0


class TimedModule(torch.nn.Module):
    """`module` with its forward timed as `part` (the runner sees an ordinary model)."""

    def __init__(self, module, clock, part):
        super().__init__()
        self.module, self.clock, self.part = module, clock, part

    def forward(self, *args):
        with self.clock.part(self.part):
            return self.module(*args)

    def init_state(self, batch):
        return self.module.init_state(batch)


def profile_runner(spec, T, chunks, clock, use_dni=False, lam=None):
    # only what the benchmark itself passes in (model, loss, optimizer, synthesizer) and
    # torch's own functions are wrapped; the runner's internals are left alone
    model = make_model(spec)
    params = list(model.parameters())
    synth = make_synth(spec, model) if use_dni else None
    if synth is not None:
        params += list(synth.parameters())
        synth = TimedModule(synth, clock, "synth fwd")
    opt = make_optimizer(spec, params)
    opt.step = timed(clock, "step", opt.step)
    opt.zero_grad = timed(clock, "zero_grad", opt.zero_grad)
    runner = dni.TBPTTRunner(TimedModule(model, clock, "forward"),
                             timed(clock, "loss", lm_loss_for(spec)), opt, truncation=T,
                             synthesizer=synth, sg_scale=0.1, bootstrap=lam, clip=0.25)
    data = make_data(spec, chunks * T)
    originals = (torch.nn.utils.clip_grad_norm_, deferred.DeferredBackward.run,
                 torch.Tensor.backward, torch.autograd.grad)
    torch.nn.utils.clip_grad_norm_ = timed(clock, "clip", originals[0])
    deferred.DeferredBackward.run = timed(clock, "backward", originals[1])
    torch.Tensor.backward = timed(clock, "backward", originals[2])
    torch.autograd.grad = timed(clock, "2nd VJP", originals[3])  # only the bootstrap's VJP
    try:
        t0 = time.process_time()
        runner.run(data[:-1], data[1:])
        return time.process_time() - t0
    finally:
        (torch.nn.utils.clip_grad_norm_, deferred.DeferredBackward.run,
         torch.Tensor.backward, torch.autograd.grad) = originals


VARIANTS = {
    "loop": profile_loop,
    "runner": profile_runner,
    "dni-free": lambda s, T, n, c: profile_runner(s, T, n, c, use_dni=True),
    "dni-l1": lambda s, T, n, c: profile_runner(s, T, n, c, use_dni=True, lam=1.0),
}


def measure(fn, spec, T, chunks):
    fn(spec, T, 3, Clock())  # warm-up
    clock = Clock()
    total = fn(spec, T, chunks, clock)  # the chunks only, not building the model
    clock.sums["other"] = total - sum(clock.sums.values())
    return {k: 1e3 * v / chunks for k, v in clock.sums.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="word,char", help=f"of {sorted(MODELS)}")
    ap.add_argument("--truncations", default="5")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--malloc", default="default", choices=("default", "keep"),
                    help="keep: glibc keeps freed gradients in the heap (bench_tbptt.py)")
    args = ap.parse_args(argv)
    keep_malloc(args.malloc)
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU ms per chunk "
          f"(process time), {malloc_note()}, medians of {args.rounds} rounds of {args.chunks} chunks")
    for model in args.models.split(","):
        spec = MODELS[model]
        for T in map(int, args.truncations.split(",")):
            results = {n: [] for n in names}
            for r in range(args.rounds):
                for n in names[r % len(names):] + names[:r % len(names)]:
                    results[n].append(measure(VARIANTS[n], spec, T, args.chunks))
            print(f"\n{spec.label}, T={T}\n")
            print("| part | " + " | ".join(names) + " |")
            print("|---|" + "---:|" * len(names))
            med = {n: {p: statistics.median(r[p] for r in results[n]) for p in PARTS}
                   for n in names}
            for p in PARTS:
                print(f"| {p} | " + " | ".join(f"{med[n][p]:.2f}" for n in names) + " |")
            print("| **total** | " + " | ".join(
                f"**{sum(med[n].values()):.2f}**" for n in names) + " |", flush=True)


if __name__ == "__main__":
    main()
