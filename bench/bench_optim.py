"""The optimizer step alone, per `optim.kernel`: torch's default, foreach and fused.

    python bench/bench_optim.py [--models word200,char] [--rounds 7] [--steps 50]

The models and synthesizers are `bench_tbptt.py`'s (word 2x200: SGD as in its recipe and
Adam; char 1x512: Adam), each with one optimizer over the model and the synthesizer, as
`dni-rnn train` builds it when `dni.synth_lr` is 0. Gradients are random and fixed; each
round times `--steps` steps of every kernel in a rotated order, and the ratio is the median
over rounds of kernel / default within the round. The last lines are markdown rows.
"""
import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_tbptt import MODELS, make_model, make_synth  # noqa: E402

KERNELS = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def optimizer(name, params, kernel):
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, **KERNELS[kernel])
    return torch.optim.SGD(params, lr=1.0, **KERNELS[kernel])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="word200,char")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for key in args.models.split(","):
        spec = MODELS[key]
        for name in sorted({spec.optimizer, "adam"}):
            model = make_model(spec)
            params = list(model.parameters()) + list(make_synth(spec, model).parameters())
            g = torch.Generator().manual_seed(0)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * 1e-3
            opts = {k: optimizer(name, params, k) for k in KERNELS}
            times = {k: [] for k in KERNELS}
            for r in range(args.rounds + 1):
                order = list(KERNELS)[r % 3:] + list(KERNELS)[:r % 3]
                for k in order:
                    t = time.perf_counter()
                    for _ in range(args.steps):
                        opts[k].step()
                    if r:  # round 0 warms up
                        times[k].append((time.perf_counter() - t) / args.steps)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["auto"]))
                     for k in KERNELS}
            n = sum(p.numel() for p in params) / 1e6
            print(f"{spec.label:<11} {name:<4} {n:5.2f}M params  " + "  ".join(
                f"{k} {ms[k]:6.2f} ms ({ratio[k]:.2f}x)" for k in KERNELS))
            rows.append(f"| {spec.label} | {name} | {n:.2f}M | {ms['auto']:.2f} ms | "
                        f"{ratio['foreach']:.2f}x | {ratio['fused']:.2f}x |")
    print(f"\n# torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} "
          f"rounds of {args.steps} steps; time relative to the default kernel")
    print("| model | optimizer | parameters | default step | foreach | fused |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
