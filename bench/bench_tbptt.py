"""Throughput of the TBPTT runner against a hand-written PyTorch TBPTT loop.

    python bench/bench_tbptt.py                      # word 2x200 and 2x650, T in 5, 10, 35
    python bench/bench_tbptt.py --models word200 --seconds 2 --rounds 5
    python bench/bench_tbptt.py --models char --truncations 5 --threads 1   # the ptb-char shape

Models (random token ids):
  word200, word650  PTB-sized word LMs: vocab 10k, batch 20, 2x200 / 2x650 LSTM, SGD lr 1,
                    synthesizer: one hidden layer of 512
  char              the ptb-char recipe's shape: vocab 50, embed 64, 1x512 LSTM, batch 32,
                    Adam 1e-3, synthesizer: one hidden layer as wide as the state (1024)
Variants (all clip 0.25):
  loop      the pytorch/examples word_language_model loop (the baseline, 1.00x)
  runner    TBPTTRunner without a synthesizer (plain TBPTT)
  dni-free  TBPTTRunner with DNI, lambda = beta = 0.1 (one backward pass; the defaults)
  dni-l1    DNI with beta = 0.1, lambda = 1   (second VJP through the core)
  dni-l05   DNI with beta = 0.1, lambda = 0.5 (second VJP through the core)
With `--malloc keep` the process runs under glibc settings that keep freed gradients in the
heap (see `keep_malloc`); by default glibc's page faults add up to a quarter to the plain
variants' time on a word LM and blur every ratio.
Variants are interleaved round by round, in a rotated order each round (so none always runs
first). A ratio is the median over rounds of variant / loop within the round (robust to the
slow drifts of a shared machine); tokens/s are medians with the spread (min-max). The last
lines are markdown table rows, ready to paste into docs/benchmarks.md.
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

import dni_rnn as dni  # the installed package (pip install -e .)


@dataclass(frozen=True)
class Spec:
    label: str
    vocab: int
    embed: int
    hidden: int
    layers: int
    batch: int
    optimizer: str      # "sgd" (lr 1) or "adam" (lr 1e-3)
    synth_hidden: int   # 0: the state size


MODELS = {
    "word200": Spec("word 2x200", 10_000, 200, 200, 2, 20, "sgd", 512),
    "word650": Spec("word 2x650", 10_000, 650, 650, 2, 20, "sgd", 512),
    "char": Spec("char 1x512", 50, 64, 512, 1, 32, "adam", 0),
}
MODELS["word"] = MODELS["word200"]


def lm_loss_for(spec):
    def lm_loss(logits, targets):
        return nn.functional.cross_entropy(logits.reshape(-1, spec.vocab), targets.reshape(-1))
    return lm_loss


DEVICE = torch.device("cpu")  # set by --device


def make_model(spec, seed=0):
    torch.manual_seed(seed)
    return dni.RNNLanguageModel(spec.vocab, spec.embed, spec.hidden,
                                num_layers=spec.layers).to(DEVICE)


def make_synth(spec, model):
    dim = dni.state_dim(model.init_state(spec.batch))
    return dni.StateSynthesizer.mlp(dim, n_hidden=1,
                                    hidden_dim=spec.synth_hidden or None).to(DEVICE)


def make_optimizer(spec, params):
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.SGD(params, lr=1.0)


def make_data(spec, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab, (steps + 1, spec.batch), generator=g).to(DEVICE)


def handwritten_loop(spec, model, data, T, clip=0.25):
    """word_language_model's train(): repackage, zero_grad, forward, backward, clip, step."""
    opt = make_optimizer(spec, model.parameters())
    loss_fn = lm_loss_for(spec)
    hidden = model.init_state(spec.batch)
    for i in range(0, data.shape[0] - 1, T):
        seq = min(T, data.shape[0] - 1 - i)
        x, y = data[i:i + seq], data[i + 1:i + 1 + seq]
        hidden = tuple(h.detach() for h in hidden)
        model.zero_grad()
        out, hidden = model(x, hidden)
        loss = loss_fn(out, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        loss.item()  # the example logs the loss every batch


def runner_loop(spec, model, data, T, lam=None, use_dni=False):
    params = list(model.parameters())
    synth = None
    if use_dni:
        synth = make_synth(spec, model)
        params += list(synth.parameters())
    runner = dni.TBPTTRunner(model, lm_loss_for(spec), make_optimizer(spec, params),
                             truncation=T, synthesizer=synth, sg_scale=0.1, bootstrap=lam,
                             clip=0.25)
    _, metrics = runner.run(data[:-1], data[1:])
    metrics[-1].loss  # a user reads the metrics


VARIANTS = {
    "loop": handwritten_loop,
    "runner": runner_loop,
    "dni-free": lambda s, m, d, T: runner_loop(s, m, d, T, use_dni=True),
    "dni-l1": lambda s, m, d, T: runner_loop(s, m, d, T, lam=1.0, use_dni=True),
    "dni-l05": lambda s, m, d, T: runner_loop(s, m, d, T, lam=0.5, use_dni=True),
}


def interleaved(variants, names, spec, T, seconds, rounds, clock):
    """{name: [tokens/s per round]}: every variant once per round, the order rotated each
    round; the run is sized from a quick probe of the hand loop to take ~`seconds`."""
    probe = measure(variants["loop"], spec, T, 4 * T, clock)
    steps = max(2 * T, int(probe * seconds / spec.batch) // T * T)
    results = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            results[n].append(measure(variants[n], spec, T, steps, clock))
    return results


def measure(fn, spec, T, steps, clock):
    data = make_data(spec, steps)
    model = make_model(spec)
    fn(spec, model, data[: 2 * T + 1], T)  # warm-up: allocator, kernels
    sync()
    start = clock()
    fn(spec, model, data, T)
    sync()
    return steps * spec.batch / (clock() - start)


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967295"}


def keep_malloc(mode):
    """With "keep", re-run this process with glibc's malloc keeping freed blocks of up to
    32 MB in the heap. By default glibc returns large freed blocks (a 10k-word decoder's
    gradient is 8 MB) to the OS, and the next chunk's backward page-faults them back in:
    measured 25% of a word LM's chunk on this CPU, for the hand loop and plain TBPTT, while
    DNI's extra allocations happen to avoid it (docs/benchmarks.md)."""
    if mode == "keep" and any(os.environ.get(k) != v for k, v in MALLOC_KEEP.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_KEEP})


def malloc_note():
    kept = all(os.environ.get(k) == v for k, v in MALLOC_KEEP.items())
    return "malloc keep" if kept else "malloc default"


def load():
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="word200,word650", help=f"of {sorted(MODELS)}")
    ap.add_argument("--sizes", default=None, help="word LSTM widths (200, 650): the same as "
                                                  "--models word200,word650")
    ap.add_argument("--truncations", default="5,10,35")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seconds", type=float, default=3.0, help="target seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--synth-hidden", type=int, default=None,
                    help="synthesizer hidden width (default: the model's, see above)")
    ap.add_argument("--clock", default="wall", choices=("wall", "process"),
                    help="wall: tokens per second of wall time; process: per CPU second of "
                         "this process (robust to other processes on a busy machine)")
    ap.add_argument("--malloc", default="default", choices=("default", "keep"),
                    help="keep: run under glibc settings that keep freed memory in the heap "
                         "(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so that no variant "
                         "pays page faults for re-allocating its gradients each chunk")
    args = ap.parse_args(argv)
    keep_malloc(args.malloc)
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    models = args.models.split(",")
    if args.sizes:
        models = [f"word{s}" for s in args.sizes.split(",")]
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS] + [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown {unknown}; variants: {sorted(VARIANTS)}, models: {sorted(MODELS)}")
    print(f"# torch {torch.__version__}, {DEVICE}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"{malloc_note()}, "
          f"{args.rounds} rounds of ~{args.seconds:g} s, {load()}")
    rows = []
    for model in models:
        spec = MODELS[model]
        if args.synth_hidden is not None:
            spec = dataclasses.replace(spec, synth_hidden=args.synth_hidden,
                                       label=f"{spec.label} (synth {args.synth_hidden})")
        for T in map(int, args.truncations.split(",")):
            results = interleaved(VARIANTS, names, spec, T, args.seconds, args.rounds, clock)
            med = {n: statistics.median(v) for n, v in results.items()}

            def ratio(n, base):
                return statistics.median(a / b for a, b in zip(results[n], results[base]))

            cells = "  ".join(
                f"{n} {med[n]:6.0f} [{min(results[n]):.0f}-{max(results[n]):.0f}]"
                + (f" ({ratio(n, 'loop'):.2f}x)" if "loop" in med and n != "loop" else "")
                for n in names)
            print(f"{spec.label:<11} T={T:<3} {cells}", flush=True)
            rows.append((spec, T, med, {n: ratio(n, "loop") for n in names if "loop" in med},
                         {n: ratio(n, "runner") for n in names
                          if "runner" in med and n.startswith("dni")}))
    print(f"\n# {load()}")
    others = [n for n in names if n != "loop"]
    plain = [n for n in others if n.startswith("dni")] if "runner" in names else []
    print("| model | T | loop tok/s | " + " | ".join(others)
          + "".join(f" | {n} / runner" for n in plain) + " |")
    print("|---|---:|---:|" + "---:|" * (len(others) + len(plain)))
    for spec, T, med, to_loop, to_runner in rows:
        base = f"{med['loop']:.0f}" if "loop" in med else "-"
        cells = [f"{to_loop[n]:.2f}x" if n in to_loop else f"{med[n]:.0f}" for n in others]
        cells += [f"{to_runner[n]:.2f}x" for n in plain]
        print(f"| {spec.label} | {T} | {base} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
