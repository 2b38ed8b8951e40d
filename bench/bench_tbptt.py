"""Throughput of the TBPTT runner against a hand-written PyTorch TBPTT loop.

    python bench/bench_tbptt.py                      # 2x200 and 2x650, T in 5, 10, 35
    python bench/bench_tbptt.py --sizes 200 --truncations 5 --seconds 2

A PTB-sized word LM (vocab 10k, batch 20, 2-layer LSTM, random token ids) is trained by:
  loop      the pytorch/examples word_language_model loop (the baseline, 1.00x)
  runner    TBPTTRunner without a synthesizer
  dni-free  TBPTTRunner with DNI, lambda = beta = 0.1 (one backward pass)
  dni-l1    DNI with beta = 0.1, lambda = 1   (second VJP through the core)
  dni-l05   DNI with beta = 0.1, lambda = 0.5 (second VJP through the core)
Variants are interleaved round by round, in a rotated order each round (so none always runs
first); each cell is the median tokens/s over rounds, with the spread (min-max) printed.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dni_rnn as dni  # noqa: E402

VOCAB, BATCH = 10_000, 20


def lm_loss(logits, targets):
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def make_model(hidden, device, seed=0):
    torch.manual_seed(seed)
    return dni.RNNLanguageModel(VOCAB, hidden, hidden, num_layers=2).to(device)


def handwritten_loop(model, data, T, lr=1.0, clip=0.25):
    """word_language_model's train(): repackage, zero_grad, forward, backward, clip, step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    hidden = model.init_state(BATCH)
    for i in range(0, data.shape[0] - 1, T):
        seq = min(T, data.shape[0] - 1 - i)
        x, y = data[i:i + seq], data[i + 1:i + 1 + seq]
        hidden = tuple(h.detach() for h in hidden)
        model.zero_grad()
        out, hidden = model(x, hidden)
        loss = lm_loss(out, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        loss.item()  # the example logs the loss every batch


def runner_loop(model, data, T, synth_hidden, lam=None, use_dni=False, lr=1.0):
    params = list(model.parameters())
    synth = None
    if use_dni:
        dim = dni.state_dim(model.init_state(BATCH))
        synth = dni.StateSynthesizer.mlp(dim, n_hidden=1, hidden_dim=synth_hidden).to(data.device)
        params += list(synth.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    runner = dni.TBPTTRunner(model, lm_loss, opt, truncation=T, synthesizer=synth,
                             sg_scale=0.1, bootstrap=lam, clip=0.25)
    runner.run(data[:-1], data[1:])


def variants(synth_hidden):
    return {
        "loop": handwritten_loop,
        "runner": lambda m, d, T: runner_loop(m, d, T, synth_hidden),
        "dni-free": lambda m, d, T: runner_loop(m, d, T, synth_hidden, use_dni=True),
        "dni-l1": lambda m, d, T: runner_loop(m, d, T, synth_hidden, lam=1.0, use_dni=True),
        "dni-l05": lambda m, d, T: runner_loop(m, d, T, synth_hidden, lam=0.5, use_dni=True),
    }


def measure(fn, hidden, T, steps, device):
    data = torch.randint(0, VOCAB, (steps + 1, BATCH), device=device)
    model = make_model(hidden, device)
    fn(model, data[: 2 * T + 1], T)  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(model, data, T)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * BATCH / (time.perf_counter() - start)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200,650", help="LSTM widths (2 layers each)")
    ap.add_argument("--truncations", default="5,10,35")
    ap.add_argument("--variants", default="loop,runner,dni-free,dni-l1,dni-l05")
    ap.add_argument("--seconds", type=float, default=3.0, help="target seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--synth-hidden", type=int, default=512, help="synthesizer hidden width")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(torch.get_num_threads())
    table = variants(args.synth_hidden)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {sorted(table)}")
    print(f"# device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"vocab {VOCAB}, batch {BATCH}, rounds {args.rounds}")
    rows = []
    for hidden in map(int, args.sizes.split(",")):
        for T in map(int, args.truncations.split(",")):
            # size the run from a quick probe of the baseline so each measurement takes ~seconds
            probe = measure(table["loop"], hidden, T, 4 * T, device)
            steps = max(2 * T, int(probe * args.seconds / BATCH) // T * T)
            results = {n: [] for n in names}
            for r in range(args.rounds):
                for n in names[r % len(names):] + names[:r % len(names)]:
                    results[n].append(measure(table[n], hidden, T, steps, device))
            med = {n: statistics.median(v) for n, v in results.items()}
            base = med.get("loop")
            cells = "  ".join(
                f"{n} {med[n]:6.0f} [{min(results[n]):.0f}-{max(results[n]):.0f}]"
                + (f" ({med[n] / base:.2f}x)" if base else "") for n in names)
            print(f"2x{hidden:<4} T={T:<3} {cells}", flush=True)
            rows.append((hidden, T, med))
    print("\n| model | T | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for hidden, T, med in rows:
        base = med.get("loop")
        cells = " | ".join(
            f"{med[n]:.0f}" + (f" ({med[n] / base:.2f}x)" if base and n != "loop" else "") for n in names)
        print(f"| 2x{hidden} | {T} | {cells} |")


if __name__ == "__main__":
    main()
