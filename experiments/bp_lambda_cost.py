"""What BP(lambda)'s traces and the recurrent synthesizer cost per chunk (docs/dni.md,
"BP(lambda) and a recurrent synthesizer").

One LSTM layer of H units (state (h, c): D = 2H features per stream), B streams, chunks of
T steps, float32, one CPU thread. For each setting: the median wall time of a training chunk
(forward, backward, step) over 3 chunks, measured once the traces hold HORIZON boundaries;
for BP(lambda) also the time of the chunk's state Jacobian alone (D vector-Jacobian
products) and the memory the traces hold per kept boundary (B x D x D numbers).

    python experiments/bp_lambda_cost.py [--out docs/results/bp-lambda-cost.json]
"""
import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

import dni_rnn as dni


class LSTMTagger(nn.Module):
    def __init__(self, hidden, n_in=10):
        super().__init__()
        self.rnn = nn.LSTM(n_in, hidden)
        self.out = nn.Linear(hidden, n_in)

    def forward(self, x, state):
        y, state = self.rnn(x, state)
        return self.out(y), state


def loss_fn(outputs, targets):
    return (outputs - targets).pow(2).mean()


SETTINGS = {  # name: (synthesizer kind, runner keywords)
    "bptt": (None, {}),
    "dni, linear": ("linear", {}),
    "dni, linear, lambda != beta": ("linear", {"bootstrap": 0.9}),
    "bp-lambda, linear": ("linear", {"bootstrap": 0.9, "trace_decay": 1.0}),
    "dni, gru": ("gru", {}),
    "bp-lambda, gru": ("gru", {"bootstrap": 0.9, "trace_decay": 1.0}),
}


HORIZON = 4


def ms_per_chunk(hidden, batch, T, kind, kw, chunks=3):
    torch.manual_seed(0)
    model = LSTMTagger(hidden)
    D = 2 * hidden
    synth = None
    if kind == "linear":
        synth = dni.StateSynthesizer.mlp(D, n_hidden=0)
    elif kind == "gru":
        synth = dni.RecurrentSynthesizer(D, hidden_dim=hidden)
    params = list(model.parameters()) + (list(synth.parameters()) if synth else [])
    runner = dni.TBPTTRunner(model, loss_fn, torch.optim.Adam(params, lr=1e-3), truncation=T,
                             synthesizer=synth, trace_horizon=HORIZON, **kw)
    warmup = HORIZON + 1
    n = T * (chunks + warmup)
    x = torch.randn(n, batch, 10)
    state = (torch.zeros(1, batch, hidden), torch.zeros(1, batch, hidden))
    times, last = [], time.perf_counter()
    for k, _ in enumerate(runner.walk(x, x, state, final=False)):
        now = time.perf_counter()
        if k >= warmup:
            times.append(1e3 * (now - last))
        last = now
    return statistics.median(times)


def jacobian_ms(hidden, batch, T, repeats=2):
    """The chunk's state Jacobian alone, on a graph like a training chunk's."""
    torch.manual_seed(0)
    model = LSTMTagger(hidden)
    state = tuple(torch.zeros(1, batch, hidden, requires_grad=True) for _ in range(2))
    _, new = model(torch.randn(T, batch, 10), state)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dni.traces.state_jacobian(state, new)
        times.append(1e3 * (time.perf_counter() - start))
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="also write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    # the paper's copy-repeat LSTM (H=100, B=100; T=1, their step) and the copy recipe's
    # (H=256, B=32, T=3), and a small one
    for hidden, batch, T in [(32, 32, 3), (100, 100, 1), (256, 32, 3)]:
        jac = jacobian_ms(hidden, batch, T)
        for name, (kind, kw) in SETTINGS.items():
            ms = ms_per_chunk(hidden, batch, T, kind, kw)
            traces = "trace_decay" in kw
            row = {"hidden": hidden, "D": 2 * hidden, "batch": batch, "T": T, "setting": name,
                   "ms_per_chunk": round(ms, 2), "horizon": HORIZON if traces else 0,
                   "jacobian_ms": round(jac, 2) if traces else 0.0,
                   "trace_MB_per_boundary": round(4 * batch * (2 * hidden) ** 2 / 2**20, 1)
                   if traces else 0.0}
            rows.append(row)
            extra = (f" | of which the Jacobian {jac:8.2f} ms | traces "
                     f"{row['trace_MB_per_boundary']:.1f} MB per boundary kept") if traces else ""
            print(f"H={hidden:4d} D={2 * hidden:4d} B={batch:4d} T={T} | {name:28s} | "
                  f"{ms:9.2f} ms/chunk{extra}", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"torch": torch.__version__, "threads": 1, "device": "cpu",
                       "cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
                       "rows": rows}, fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()
