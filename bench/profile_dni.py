"""The fixed costs of a DNI chunk: each of DNI's mechanisms turned off in turn (issue 24).

    python bench/profile_dni.py                          # char 1x512, T=5, 128-unit synthesizer
    python bench/profile_dni.py --truncations 5,35 --synth linear --seconds 1 --rounds 5

The ptb-char recipe's model shape (bench_tbptt.py's `char`) with a small synthesizer
(`--synth 128`: one hidden layer of 128 units; `--synth linear`: none). Variants, timed in
interleaved rounds in one process (bench_tbptt.py's `measure`):

  loop       the hand-written PyTorch TBPTT loop (the baseline, 1.00x)
  runner     TBPTTRunner without a synthesizer
  dni        DNI as the library defaults it: lambda = beta = 0.1, RMS targets, the cap
             (sg_cap=1), the guard, no calibration, one optimizer for model and synthesizer
  no-cap     sg_cap=None
  raw        target_scale="raw" instead of "rms"
  no-guard   guard=False
  bare       all three off (what is left: the synthesizer, its trigger, the statistics)
  synth-opt  a second optimizer for the synthesizer (synth_optimizer)
  calibrate  calibrate=True
  l1         lambda = 1 != beta (the second VJP through the core)

Then, for one chunk of each variant: the aten operations it runs (counted, exact) and
torch.profiler's self CPU time by operation of a DNI chunk against a plain one (the
profiler's own overhead inflates small operations; the counts are exact).
"""
import argparse
import dataclasses
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

import dni_rnn as dni  # the installed package (pip install -e .)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tbptt import (MODELS, handwritten_loop, interleaved, keep_malloc,  # noqa: E402
                         load, lm_loss_for, make_data, make_model, make_optimizer,
                         malloc_note, runner_loop)

DNI_VARIANTS = {
    "dni": {},
    "no-cap": {"sg_cap": None},
    "raw": {"target_scale": "raw"},
    "no-guard": {"guard": False},
    "bare": {"sg_cap": None, "target_scale": "raw", "guard": False},
    "synth-opt": {"synth_optimizer": True},
    "calibrate": {"calibrate": True},
    "l1": {"bootstrap": 1.0},
}


def make_synth(spec, model):
    """`spec.synth_hidden` units in one hidden layer; 0: linear."""
    dim = dni.state_dim(model.init_state(spec.batch))
    if spec.synth_hidden == 0:
        return dni.StateSynthesizer.mlp(dim, n_hidden=0)
    return dni.StateSynthesizer.mlp(dim, n_hidden=1, hidden_dim=spec.synth_hidden)


def make_runner(spec, model, T, settings):
    """TBPTTRunner with DNI (None: plain) as bench_tbptt.py builds it, with `settings`."""
    if settings is None:
        return dni.TBPTTRunner(model, lm_loss_for(spec), make_optimizer(spec, model.parameters()),
                               truncation=T, clip=0.25)
    settings = dict(settings)
    synth = make_synth(spec, model)
    params = list(model.parameters())
    if settings.pop("synth_optimizer", False):
        settings["synth_optimizer"] = make_optimizer(spec, synth.parameters())
    else:
        params += list(synth.parameters())
    return dni.TBPTTRunner(model, lm_loss_for(spec), make_optimizer(spec, params), truncation=T,
                           synthesizer=synth, sg_scale=0.1, clip=0.25, **settings)


def dni_loop(settings):
    def run(spec, model, data, T):
        _, metrics = make_runner(spec, model, T, settings).run(data[:-1], data[1:])
        metrics[-1].loss  # a user reads the metrics
    return run


VARIANTS = {"loop": handwritten_loop, "runner": runner_loop,
            **{name: dni_loop(s) for name, s in DNI_VARIANTS.items()}}


class OpCounter(TorchDispatchMode):
    """Counts the aten operations run inside it (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def chunks(spec, T, settings, warm=20):
    """A runner past its first chunks (the target RMS known, the guard judging) and a
    function that trains it on its next chunk."""
    model = make_model(spec)
    runner = make_runner(spec, model, T, settings)
    data = make_data(spec, 10_000 * T)
    state, pos = model.init_state(spec.batch), [0]

    def chunk():
        nonlocal state
        a = pos[0]
        state, metrics = runner.train_chunk(data[a:a + T], data[a + 1:a + 1 + T], state)
        pos[0] = a + T
        return metrics

    for _ in range(warm):
        chunk()
    return chunk


def count_ops(spec, T, settings, n=5):
    chunk = chunks(spec, T, settings)
    with OpCounter() as counter:
        for _ in range(n):
            chunk()
    return {k: v / n for k, v in counter.ops.items()}


def self_cpu(spec, T, variants, n):
    """Self CPU ms by operation, per chunk: the variants' chunks interleaved in one profiler
    session, and the median over chunks of each operation's time (a chunk that the
    machine's other processes preempted charges the wait to whichever operation was
    running; the median leaves it out)."""
    runs = {name: chunks(spec, T, settings) for name, settings in variants.items()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            for name, chunk in runs.items():
                with record_function(f"chunk {name}"):
                    chunk()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    times, current = {name: [] for name in variants}, None
    for e in events:
        if e.name.startswith("chunk "):
            current = {}
            times[e.name[len("chunk "):]].append(current)
        elif current is not None:  # an operation of the chunk opened last
            current[e.key] = current.get(e.key, 0.0) + e.self_cpu_time_total / 1e3
    return {name: {k: statistics.median(c.get(k, 0.0) for c in ts) for k in set().union(*ts)}
            for name, ts in times.items()}


def timing_table(spec, T, names, args, clock):
    results = interleaved(VARIANTS, names, spec, T, args.seconds, args.rounds, clock)

    def ratio(n, base):
        return statistics.median(a / b for a, b in zip(results[n], results[base]))

    print(f"\n{spec.label}, T={T}: tokens/s (median [min-max] of {args.rounds} rounds), "
          "ratios: median over rounds of variant / baseline in the same round\n")
    print("| variant | tok/s | / loop | / runner | / dni |")
    print("|---|---:|---:|---:|---:|")
    for n in names:
        med = statistics.median(results[n])
        cells = [f"{ratio(n, b):.2f}x" if b in results else "-" for b in ("loop", "runner", "dni")]
        print(f"| {n} | {med:.0f} [{min(results[n]):.0f}-{max(results[n]):.0f}] | "
              + " | ".join(cells) + " |", flush=True)


def ops_table(spec, T, names):
    counts = {n: count_ops(spec, T, DNI_VARIANTS.get(n)) for n in names}
    print(f"\n{spec.label}, T={T}: aten operations per chunk (forward, backward, optimizer)\n")
    print("| variant | ops | - runner | - dni |")
    print("|---|---:|---:|---:|")
    total = {n: sum(c.values()) for n, c in counts.items()}
    for n in names:
        cells = [f"{total[n] - total[b]:+.0f}" if b in total else "-" for b in ("runner", "dni")]
        print(f"| {n} | {total[n]:.0f} | " + " | ".join(cells) + " |")
    if "runner" in counts and "dni" in counts:
        extra = {k: counts["dni"].get(k, 0) - counts["runner"].get(k, 0)
                 for k in counts["dni"].keys() | counts["runner"].keys()}
        print("\nDNI's extra operations per chunk, by kind: " + ", ".join(
            f"{k} {v:+.0f}" for k, v in sorted(extra.items(), key=lambda kv: -abs(kv[1])) if v))


def profile_table(spec, T, n, top):
    med = self_cpu(spec, T, {"runner": None, "dni": {}}, n)
    plain, synth = med["runner"], med["dni"]
    keys = sorted(plain.keys() | synth.keys(),
                  key=lambda k: -abs(synth.get(k, 0) - plain.get(k, 0)))
    print(f"\n{spec.label}, T={T}: self CPU ms by operation, medians over {n} "
          f"chunks (torch.profiler), the {top} largest differences\n")
    print("| operation | runner | dni | difference |")
    print("|---|---:|---:|---:|")
    for k in keys[:top]:
        p, s = plain.get(k, 0.0), synth.get(k, 0.0)
        print(f"| {k} | {p:.3f} | {s:.3f} | {s - p:+.3f} |")
    rest = sum(synth.get(k, 0) - plain.get(k, 0) for k in keys[top:])
    print(f"| (the others) | | | {rest:+.3f} |")
    print(f"| **total** | **{sum(plain.values()):.2f}** | **{sum(synth.values()):.2f}** | "
          f"**{sum(synth.values()) - sum(plain.values()):+.2f}** |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="char", help=f"of {sorted(MODELS)}")
    ap.add_argument("--synth", default="128", help="hidden units of the synthesizer's one "
                                                   "hidden layer, or 'linear'")
    ap.add_argument("--truncations", default="5")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seconds", type=float, default=1.0, help="target seconds per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile-chunks", type=int, default=100)
    ap.add_argument("--top", type=int, default=15, help="rows of the profile table")
    ap.add_argument("--skip", default="", help="parts to leave out: time,ops,profile")
    ap.add_argument("--clock", default="process", choices=("wall", "process"),
                    help="process (default): CPU seconds of this process, robust to other "
                         "processes on a busy machine; wall: wall time")
    ap.add_argument("--malloc", default="keep", choices=("default", "keep"),
                    help="keep (default): glibc keeps freed gradients in the heap "
                         "(bench_tbptt.py)")
    args = ap.parse_args(argv)
    keep_malloc(args.malloc)
    torch.set_num_threads(1)
    hidden = 0 if args.synth == "linear" else int(args.synth)
    spec = dataclasses.replace(MODELS[args.model], synth_hidden=hidden,
                               label=f"{MODELS[args.model].label}, synth {args.synth}")
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; of {list(VARIANTS)}")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    skip = set(args.skip.split(","))
    print(f"# torch {torch.__version__}, 1 thread, {args.clock} clock, {malloc_note()}, "
          f"{load()}")
    for T in map(int, args.truncations.split(",")):
        if "time" not in skip:
            timing_table(spec, T, names, args, clock)
        if "ops" not in skip:
            ops_table(spec, T, [n for n in names if n != "loop"])
        if "profile" not in skip:
            profile_table(spec, T, args.profile_chunks, args.top)
    print(f"\n# {load()}")


if __name__ == "__main__":
    main()
