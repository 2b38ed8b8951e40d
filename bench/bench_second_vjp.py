"""The second VJP of DNI with lambda != beta: can it share the chunk's backward?

    python bench/bench_second_vjp.py [--models word200,char] [--truncations 5,35] [--rounds 7]

With lambda != beta the synthesizer's target at a chunk's start needs J^T g_hat (the
synthetic gradient pulled back through the recurrent core) apart from the backward that
gives the weights beta * g_hat. The runner takes it with a second `autograd.grad` through
the core (`DNIStep._bootstrap_correction`). Timed per chunk on `bench_tbptt.py`'s models
(forward and backward; no optimizer step), each round in a rotated order, the median over
rounds of each variant / `one` within the round:

  one      the chunk's backward alone (lambda = beta: what the second VJP adds to)
  two      the backward and a separate VJP for J^T g_hat (the runner)
  batched  one `autograd.grad(..., is_grads_batched=True)` over both cotangents
           ([1, beta g_hat] and [0, g_hat]): torch's vmap over the backward

Before timing, `batched` is checked against `two` in float64 (the largest difference).
The last lines are markdown rows.
"""
import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_tbptt import MODELS, lm_loss_for, make_data, make_model  # noqa: E402

BETA, LAMBDA = 0.1, 1.0


def chunk(spec, model, data, T, state0):
    state = tuple(s.detach().requires_grad_() for s in state0)
    logits, new_state = model(data[:T], state)
    return state, new_state, lm_loss_for(spec)(logits, data[1:T + 1])


def one(spec, model, data, T, state0, g_hat):
    _, new_state, loss = chunk(spec, model, data, T, state0)
    torch.autograd.backward([loss, *new_state], [None, *(BETA * g for g in g_hat)])


def two(spec, model, data, T, state0, g_hat):
    state, new_state, loss = chunk(spec, model, data, T, state0)
    pulled = torch.autograd.grad(new_state, state, g_hat, retain_graph=True)
    torch.autograd.backward([loss, *new_state], [None, *(BETA * g for g in g_hat)])
    target = [s.grad + (LAMBDA - BETA) * p for s, p in zip(state, pulled)]
    return target, [p.grad for p in model.parameters()]


def batched(spec, model, data, T, state0, g_hat):
    state, new_state, loss = chunk(spec, model, data, T, state0)
    params = list(model.parameters())
    cotangents = [torch.tensor([1.0, 0.0], dtype=loss.dtype)]
    cotangents += [torch.stack([BETA * g, g]) for g in g_hat]
    grads = torch.autograd.grad([loss, *new_state], [*state, *params], cotangents,
                                is_grads_batched=True, allow_unused=True)
    n = len(state)
    target = [g[0] + (LAMBDA - BETA) * g[1] for g in grads[:n]]
    return target, [g[0] for g in grads[n:]]


def largest_difference(spec, T):
    model = make_model(spec).double()
    data = make_data(spec, T)
    state0 = tuple(s.double() for s in model.init_state(spec.batch))
    g_hat = tuple(torch.randn_like(s) for s in state0)
    model.zero_grad()
    a = two(spec, model, data, T, state0, g_hat)
    b = batched(spec, model, data, T, state0, g_hat)
    return max((x - y).abs().max().item() for x, y in zip(a[0] + a[1], b[0] + b[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="word200,char")
    ap.add_argument("--truncations", default="5,35")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = {"one": one, "two": two, "batched": batched}
    rows = []
    for key in args.models.split(","):
        spec = MODELS[key]
        for T in map(int, args.truncations.split(",")):
            diff = largest_difference(spec, T)
            model, data = make_model(spec), make_data(spec, T)
            state0 = model.init_state(spec.batch)
            g_hat = tuple(torch.randn_like(s) for s in state0)
            ms = {k: [] for k in variants}
            for r in range(args.rounds):
                order = list(variants)[r % 3:] + list(variants)[:r % 3]
                for k in order:
                    start = time.process_time()
                    for _ in range(args.chunks):
                        model.zero_grad(set_to_none=True)
                        variants[k](spec, model, data, T, state0, g_hat)
                    ms[k].append((time.process_time() - start) / args.chunks * 1e3)
            base = statistics.median(ms["one"])
            ratio = {k: statistics.median(a / b for a, b in zip(ms[k], ms["one"])) for k in ms}
            print(f"{spec.label} T={T}: one {base:.2f} ms, two {ratio['two']:.2f}x, "
                  f"batched {ratio['batched']:.2f}x; batched vs two in float64: {diff:.1e}",
                  flush=True)
            rows.append(f"| {spec.label} | {T} | {base:.2f} ms | {ratio['two']:.2f}x | "
                        f"{ratio['batched']:.2f}x | {diff:.1e} |")
    print("| model | T | one backward | two (the runner) | batched | max diff, float64 |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
