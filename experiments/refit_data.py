"""How much data does a cDNI refit need where the model is learning? (issue 19)

A finished cDNI run on a copy task (`dni.context`) is loaded and frozen at the curriculum
length it ended on: the length it was still learning. Fresh boundaries are collected as
training meets them (one block of episodes aligned to the chunks, the state carried), each
with the synthesizer's input there ([state; context window]) and the exact future gradient
g_1 through the next chunk (`diagnostics.future_gradients`). A third of the boundaries is
held out; fits on growing shares of the rest are scored by their mean batch cosine with g_1
on the held-out ones (the in-training diagnosis's `cos_k1`):

  linear  the refit's own solve: standardised ridge on [state; context], `--ridge`;
  mlp     one hidden layer of 256 ReLU units on the same standardised input, Adam 1e-3,
          60 epochs of shuffled minibatches of 256 (offline: an upper bound on what a
          trained nonlinear synthesizer gets from the same data; `--no-mlp` skips it);
  linear@r  with `--ridges r1,r2,...`: the linear solve again at each penalty r;
  rf@w      with `--random-features w1,w2,...`: the linear solve (`--ridge`) on the
          standardised input and w fixed random ReLU features of it (a hidden layer that
          is not trained, so a refit could keep running sums over it).
  prod@r    with `--products r1,r2,...`: the linear solve (`--ridge`) on the standardised
          input and the products of its first r principal components of the state with
          every context feature (a copy gradient's error term is the readout of the state
          minus the target bit, carried back through a state-dependent Jacobian: products
          of state and targets, which a linear map of [state; context] cannot form).

The model is frozen, so the fits see a target that does not move; in training the refit
also chases a moving model. A chunk here is one boundary of the batch's B streams, as one
chunk of the replay buffer (`dni.replay_chunks`).

    python experiments/refit_data.py runs/compare-copy-cdni/dni-T3-s1 \
        --out docs/results/refit-data-copy-T3-s1.json

Prints a table and writes the JSON.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth_ceiling as sc  # noqa: E402

from dni_rnn.app.config import Config  # noqa: E402
from dni_rnn.app.run import Run, context_stream  # noqa: E402
from dni_rnn.app.tasks import Stream  # noqa: E402
from dni_rnn.diagnostics import future_gradients  # noqa: E402
from dni_rnn.tbptt import forward_with_resets, window  # noqa: E402


def load(run_dir):
    cfg = Config.from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
    if cfg.dni.context == "none":
        raise SystemExit(f"{run_dir} is not a cDNI run (dni.context=none)")
    run = Run(cfg, run_dir, resume=True, quiet=True).setup()
    for p in run.model.parameters():
        p.requires_grad_(False)
    return run


@torch.no_grad()
def collect(run, blocks):
    """Boundaries with a nonzero g_1: {"X": [state; context] (B, D + C), 1: g_1 (B, D)}."""
    model, T = run.model, run.cfg.train.truncation
    steps = run.cfg.dni.context_steps or T
    out = []
    for inputs, packed, resets, bounds in sc.streams(run, blocks):
        ctx = context_stream(run.cfg, run.task, Stream(inputs, packed, resets), run.model)
        state, a = model.init_state(inputs.shape[1]), 0
        for b in bounds:
            _, state, _ = forward_with_resets(model, inputs[a:b], state, resets[a:b])
            a = b
            with torch.enable_grad():
                g = future_gradients(model, run.task.loss_fn, inputs[b:], packed[b:], state, T,
                                     (1,), resets[b:])
            rec = {"X": torch.cat([sc.flat(state), window(ctx, b, steps)], 1), 1: sc.flat(g[1])}
            if rec[1].abs().sum() > 0:
                out.append(rec)
    return out


def fit_random_features(train, width, ridge, seed=0):
    """The linear ridge on [z; relu(z R + b)], z the standardised input, R and b random."""
    st = sc.Standard(train, 1)
    g = torch.Generator().manual_seed(seed)
    d = train[0]["X"].shape[1]
    R, b = torch.randn(d, width, generator=g) / d ** 0.5, 0.5 * torch.randn(width, generator=g)

    def lift(rec):
        z = st.x(rec["X"])
        return {"X": torch.cat([z, torch.relu(z @ R + b)], 1), 1: rec[1]}

    return fit_lifted(train, lift, ridge)


def fit_lifted(train, lift, ridge):
    """The linear ridge (the refit's solve) on features `lift(record)`."""
    fit = sc.fit_linear([lift(r) for r in train], 1, ridge)
    return lambda rec: fit(lift(rec))


def fit_products(train, rank, ridge):
    """The linear ridge on [z; (z_s P) x z_c]: z the standardised input, z_s its state part,
    z_c its context part, P the state's first `rank` principal directions (of the fit's rows)."""
    st = sc.Standard(train, 1)
    D = train[0][1].shape[1]
    Z = st.x(torch.cat([r["X"] for r in train]))
    P = torch.linalg.svd(Z[:, :D] - Z[:, :D].mean(0), full_matrices=False).Vh[:rank].T

    def lift(rec):
        z = st.x(rec["X"])
        prod = ((z[:, :D] @ P)[:, :, None] * z[:, None, D:]).flatten(1)
        return {"X": torch.cat([z, prod], 1), 1: rec[1]}

    return fit_lifted(train, lift, ridge)


def fit_mlp(train, width=256, epochs=60, lr=1e-3, seed=0):
    torch.manual_seed(seed)
    st = sc.Standard(train, 1)
    d_in, d_out = train[0]["X"].shape[1], train[0][1].shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(d_in, width), torch.nn.ReLU(),
                              torch.nn.Linear(width, d_out))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    X = st.x(torch.cat([r["X"] for r in train]))
    Y = torch.cat([r[1] for r in train]) / st.g
    for _ in range(epochs):
        for idx in torch.randperm(len(X)).split(256):
            opt.zero_grad()
            (net(X[idx]) - Y[idx]).pow(2).sum(1).mean().backward()
            opt.step()
    return lambda rec: net(st.x(rec["X"])).detach() * st.g


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--blocks", type=int, default=300, help="episode blocks to collect")
    ap.add_argument("--chunks", default="64,256,all", help="training sizes, in chunks")
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--ridges", default="", help="more penalties for the linear fit, "
                                                 "comma-separated (columns linear@r)")
    ap.add_argument("--no-mlp", action="store_true", help="skip the offline MLP fits")
    ap.add_argument("--random-features", default="", help="widths of fixed random ReLU "
                                                          "features, comma-separated (rf@w)")
    ap.add_argument("--products", default="", help="ranks of the state's principal "
                                                   "components multiplied by the context, "
                                                   "comma-separated (prod@r)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sc.HORIZONS = (1,)
    run = load(args.run_dir)
    t0 = time.time()
    data = collect(run, args.blocks)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    held = [data[i] for i in order[:len(data) // 3]]
    pool = [data[i] for i in order[len(data) // 3:]]
    print(f"length {run.task.length}, {len(data)} boundaries ({time.time() - t0:.0f}s), "
          f"{len(held)} held out", file=sys.stderr)
    cos = lambda predict: sum(sc.batch_cos(predict(r), r[1]) for r in held) / len(held)
    rows = []
    for size in args.chunks.split(","):
        n = len(pool) if size == "all" else min(int(size), len(pool))
        train = pool[:n]
        row = {"chunks": n, "linear": cos(sc.fit_linear(train, 1, args.ridge))}
        if not args.no_mlp:
            row["mlp"] = cos(fit_mlp(train))
        for r in filter(None, args.ridges.split(",")):
            row[f"linear@{float(r):g}"] = cos(sc.fit_linear(train, 1, float(r)))
        for w in filter(None, args.random_features.split(",")):
            row[f"rf@{int(w)}"] = cos(fit_random_features(train, int(w), args.ridge))
        for r in filter(None, args.products.split(",")):
            row[f"prod@{int(r)}"] = cos(fit_products(train, int(r), args.ridge))
        rows.append(row)
        print(f"{n:>5} chunks: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()
                                              if k != "chunks"), file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "run": str(args.run_dir), "length": run.task.length, "truncation": run.cfg.train.truncation,
        "boundaries": len(data), "held_out": len(held), "ridge": args.ridge, "rows": rows},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
