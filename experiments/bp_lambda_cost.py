"""What BP(lambda)'s traces and the recurrent synthesizer cost per chunk (docs/dni.md,
"BP(lambda) and a recurrent synthesizer").

One LSTM layer of H units (state (h, c): D = 2H features per stream), B streams, chunks of
T steps, float32, one CPU thread. For each setting: the median wall time of a training chunk
(forward, backward, step) over 3 chunks, measured once the traces hold their `horizon`
boundaries. Per size also: a kept chunk's cost (running it again once, then one
vector-Jacobian product through it) against the chunk's state Jacobian (D products), and
what a kept boundary holds in either form: the Jacobian's B x D x D numbers, or the kept
chunk's weights and the tensors its graph saves (in memory) and its checkpoint entry.

    python experiments/bp_lambda_cost.py [--out docs/results/bp-lambda-cost.json]
"""
import argparse
import io
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


HORIZON = 4
BP = {"bootstrap": 0.9, "trace_decay": 1.0, "trace_horizon": HORIZON}
SETTINGS = {  # name: (synthesizer kind, runner keywords; "jacobians": SynthTraces' choice)
    "bptt": (None, {}),
    "dni, linear": ("linear", {}),
    "dni, linear, lambda != beta": ("linear", {"bootstrap": 0.9}),
    "bp-lambda, linear": ("linear", BP),
    "bp-lambda, linear, Jacobians": ("linear", {**BP, "jacobians": True}),
    "bp-lambda, linear, horizon 32": ("linear", {**BP, "trace_horizon": 32}),
    "dni, gru": ("gru", {}),
    "bp-lambda, gru": ("gru", BP),
}


def chunk_cost(hidden, batch, T, kind, kw, chunks=3):
    """(median ms per chunk, how the traces kept their boundaries)."""
    torch.manual_seed(0)
    model = LSTMTagger(hidden)
    D = 2 * hidden
    synth = None
    if kind == "linear":
        synth = dni.StateSynthesizer.mlp(D, n_hidden=0)
    elif kind == "gru":
        synth = dni.RecurrentSynthesizer(D, hidden_dim=hidden)
    kw = dict(kw)
    jacobians = kw.pop("jacobians", None)
    params = list(model.parameters()) + (list(synth.parameters()) if synth else [])
    runner = dni.TBPTTRunner(model, loss_fn, torch.optim.Adam(params, lr=1e-3), truncation=T,
                             synthesizer=synth, **kw)
    traces = runner.dni.traces if runner.dni is not None else None
    if traces:
        traces.jacobians = jacobians
    warmup = kw.get("trace_horizon", 0) + 1
    n = T * (chunks + warmup)
    x = torch.randn(n, batch, 10)
    state = (torch.zeros(1, batch, hidden), torch.zeros(1, batch, hidden))
    times, last = [], time.perf_counter()
    for k, _ in enumerate(runner.walk(x, x, state, final=False)):
        now = time.perf_counter()
        if k >= warmup:
            times.append(1e3 * (now - last))
        last = now
    if not traces:
        return statistics.median(times), ""
    return statistics.median(times), ("chunks" if traces.keeps_chunks(state) else "Jacobians")


def per_size(hidden, batch, T, repeats=2):
    """A kept chunk against the Jacobian, on a chunk like a training one: ms of running it
    again (with its first product), of one more product, of the Jacobian; MB it holds in
    memory and in a checkpoint."""
    torch.manual_seed(0)
    model = LSTMTagger(hidden)
    state = tuple(torch.zeros(1, batch, hidden) for _ in range(2))
    x = torch.randn(T, batch, 10)
    u = torch.randn(batch, 2 * hidden)
    rerun, vjp, jac = [], [], []
    for _ in range(repeats):
        chunk = dni.traces.KeptChunk.record(model, x)
        held = {}

        def pack(t):
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            chunk.pull_back(u, state, model)
        rerun.append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        chunk.pull_back(u, state, model)
        vjp.append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        dni.traces.state_jacobian(*chunk.graph)
        jac.append(1e3 * (time.perf_counter() - start))
    for t in chunk.weights.values():
        held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    torch.save(chunk.state_dict(), saved := io.BytesIO())
    return (min(rerun), min(vjp), min(jac), sum(held.values()) / 2**20,
            len(saved.getvalue()) / 2**20)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="also write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    # the paper's copy-repeat LSTM (H=100, B=100; T=1, their step) and the copy recipe's
    # (H=256, B=32, T=3), and a small one
    for hidden, batch, T in [(32, 32, 3), (100, 100, 1), (256, 32, 3)]:
        D = 2 * hidden
        rerun, vjp, jac, chunk_mb, saved_mb = per_size(hidden, batch, T)
        jac_mb = 4 * batch * D ** 2 / 2**20
        print(f"H={hidden:4d} D={D:4d} B={batch:4d} T={T} | a kept chunk: run again "
              f"{rerun:.2f} ms, a product {vjp:.2f} ms, {chunk_mb:.2f} MB ({saved_mb:.2f} MB "
              f"saved) | its Jacobian: {jac:.1f} ms, {jac_mb:.1f} MB", flush=True)
        for name, (kind, kw) in SETTINGS.items():
            ms, kept = chunk_cost(hidden, batch, T, kind, kw)
            row = {"hidden": hidden, "D": D, "batch": batch, "T": T, "setting": name,
                   "ms_per_chunk": round(ms, 2), "horizon": kw.get("trace_horizon", 0),
                   "kept_as": kept, "rerun_ms": round(rerun, 2) if kept else 0.0,
                   "vjp_ms": round(vjp, 2) if kept else 0.0,
                   "jacobian_ms": round(jac, 2) if kept else 0.0,
                   "trace_MB_per_boundary": (round(chunk_mb if kept == "chunks" else jac_mb, 2)
                                             if kept else 0.0),
                   "checkpoint_MB_per_boundary": (round(saved_mb if kept == "chunks" else jac_mb,
                                                        2) if kept else 0.0)}
            rows.append(row)
            extra = (f" | horizon {row['horizon']:2d}, kept as {kept}: "
                     f"{row['trace_MB_per_boundary']:.2f} MB per boundary") if kept else ""
            print(f"H={hidden:4d} D={D:4d} B={batch:4d} T={T} | {name:29s} | "
                  f"{ms:9.2f} ms/chunk{extra}", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"torch": torch.__version__, "threads": 1, "device": "cpu",
                       "cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
                       "rows": rows}, fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()
