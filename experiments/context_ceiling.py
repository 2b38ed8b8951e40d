"""Does the next chunk's tokens make a language model's future gradient predictable? (issue 19)

On a frozen language model the future gradient g_1 at a chunk boundary is nearly
unpredictable from the state alone (docs/dni.md, point 1: held-out cosine 0.05-0.06 on PTB
characters at T=5): most of it is the next tokens' own error, W^T (p - onehot(y)), carried
back one step, and those tokens are not in the state. cDNI gives the synthesizer the tokens
after the boundary (`dni.context=targets`). This measures what that buys before any
training: a recipe's network is trained once (or loaded from OUT/net), frozen, and walked
along its training stream; at each boundary the state, the context window the runner would
hand the synthesizer (`task.context_stream`: one-hot or decoder rows, `dni.context_code`)
and the exact g_1 are kept. Ridge fits on the standardised features of the first 80% of the
boundaries are scored on the last 20% by the mean batch cosine with g_1 (the in-training
diagnosis's `cos_k1`), and on as many training boundaries:

  state                 the state alone (the synthesizer without a context)
  state + context       [state; the next T tokens]: the cDNI refit's solve
  first token only      the next token's code alone
  + products r          also the products of the state's first r principal components
                        with every context feature (`dni.products`)

    python experiments/context_ceiling.py ptb-char --out runs/ctx-ceiling/char-T5 \\
        --data-dir ../shared/data --set train.max_tokens=1000000 --set train.truncation=5 \\
        --set dni.method=bptt --set train.threads=1

Writes OUT/context-ceiling.json and prints a table. The network is trained into OUT/net.
"""
import json
import sys
import time
from pathlib import Path

import torch

from dni_rnn.app.run import context_steps, context_window
from dni_rnn.app.tasks import Stream
from dni_rnn.diagnostics import future_gradients
from dni_rnn.tbptt import forward_with_resets
from synth_ceiling import batch_cos, flat, recipe_parser, train_or_load


@torch.no_grad()
def collect(run, n_boundaries, code):
    """Boundaries of the training stream, state carried: X (state), C (context), G (g_1)."""
    cfg, model, task = run.cfg, run.model, run.task
    T = cfg.train.truncation
    cfg.dni.context, cfg.dni.context_code = "targets", code  # how the runner would read them
    s = task.train_stream(next(model.parameters()).device)
    N = min(s.inputs.shape[0], (n_boundaries + 2) * T)
    inputs, targets = s.inputs[:N], s.targets[:N]
    resets = s.resets[:N] if s.resets is not None else None
    context = task.context_stream(Stream(inputs, targets, resets), "targets", model)
    state, a, rows = model.init_state(inputs.shape[1]), 0, []
    for b in range(T, N - T, T):
        _, state, _ = forward_with_resets(model, inputs[a:b], state,
                                          resets[a:b] if resets is not None else None)
        a = b
        with torch.enable_grad():
            g = future_gradients(model, task.loss_fn, inputs[b:b + T + 1], targets[b:b + T + 1],
                                 state, T, (1,),
                                 resets[b:b + T + 1] if resets is not None else None)
        rows.append({"X": flat(state), "C": context_window(cfg, context, b), "G": flat(g[1])})
    return rows


def fit(train, features, ridge):
    """Ridge regression of g_1 (in units of its RMS) on standardised features, with a bias."""
    X = torch.cat([features(r) for r in train]).double()
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    X = torch.cat([(X - mu) / sd, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    Y = torch.cat([r["G"] for r in train]).double()
    rms = float(Y.pow(2).mean().sqrt()) or 1.0
    W = torch.linalg.solve(X.T @ X + ridge * len(X) * torch.eye(X.shape[1], dtype=X.dtype),
                           X.T @ (Y / rms))

    def predict(r):
        x = (features(r).double() - mu) / sd
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ W * rms
    return predict


def main(argv=None):
    ap = recipe_parser(__doc__)
    ap.add_argument("--boundaries", type=int, default=600)
    ap.add_argument("--code", choices=("onehot", "decoder"), default="onehot")
    ap.add_argument("--products", default="4,8", help="ranks r of the products (comma list)")
    ap.add_argument("--ridge", type=float, default=1e-3)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = train_or_load(args.recipe, args.overrides, out, args.data_dir)
    t0 = time.time()
    data = collect(run, args.boundaries, args.code)
    cut = int(0.8 * len(data))
    train, held = data[:cut], data[cut:]
    steps = context_steps(run.cfg)
    print(f"{len(data)} boundaries ({time.time() - t0:.0f}s): state {data[0]['X'].shape[1]}, "
          f"context {data[0]['C'].shape[1]} features, B = {data[0]['X'].shape[0]}",
          file=sys.stderr)
    X = torch.cat([r["X"] for r in train])
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    directions = torch.linalg.svd((X - mu) / sd - ((X - mu) / sd).mean(0),
                                  full_matrices=False).Vh

    def products(r, rank):
        z = ((r["X"] - mu) / sd) @ directions[:rank].T
        return (z[:, :, None] * r["C"][:, None, :]).flatten(1)

    fits = {"state": lambda r: r["X"],
            "state + context": lambda r: torch.cat([r["X"], r["C"]], 1),
            "first token only": lambda r: r["C"][:, :r["C"].shape[1] // steps]}
    for rank in (int(k) for k in args.products.split(",") if k):
        fits[f"state + context + products {rank}"] = \
            lambda r, rank=rank: torch.cat([r["X"], r["C"], products(r, rank)], 1)
    rows = []
    for name, features in fits.items():
        predict = fit(train, features, args.ridge)
        row = {"fit": name,
               "cos_k1": sum(batch_cos(predict(r), r["G"]) for r in held) / len(held),
               "train_cos_k1": sum(batch_cos(predict(r), r["G"]) for r in train[-len(held):])
               / len(held)}
        rows.append(row)
        print(f"{name:<34} held-out cos_k1 {row['cos_k1']:+.3f}   on training boundaries "
              f"{row['train_cos_k1']:+.3f}", file=sys.stderr)
    (out / "context-ceiling.json").write_text(json.dumps({
        "recipe": args.recipe, "overrides": args.overrides, "code": args.code,
        "boundaries": len(data), "held_out": len(held), "ridge": args.ridge, "rows": rows},
        indent=1))


if __name__ == "__main__":
    main()
