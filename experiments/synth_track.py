"""Could a synthesizer refitted in closed form keep up with the moving model? (issue 19)

Trains a recipe with replay's buffer on (`dni.replay`), so that the runner keeps every
chunk's trigger states with the real gradient that reached them. Every `--every` chunks, a
ridge regression of that gradient on the trigger state ([h; c], standardised, and a bias) is
fitted in closed form on the W chunks before the current one, and scored on the current
chunk: the cosine over its streams of prediction and real gradient, as the runner's own
`cosine` metric scores its synthesizer. The runner's synthesizer is scored on the same
chunks. With `dni.sg_scale=0` nothing is injected, the model trains as plain TBPTT, and the
target is exactly the one-chunk future gradient of the chunk before.

    python experiments/synth_track.py copy --out runs/track-copy --set dni.sg_scale=0 \\
        --set train.max_steps=4000 --set train.threads=1
"""
import argparse
import json
import statistics

import torch

from dni_rnn import nest
from dni_rnn.config import load_recipe, validate
from dni_rnn.run import Run


def flat(tensors, dims):
    """(streams, features) from per-stream state tensors (batch dimension `dims`)."""
    return torch.cat([t.movedim(d, 0).reshape(t.shape[d], -1) for t, d in zip(tensors, dims)],
                     1).double()


def ridge_predict(X, Y, Xq, alpha):
    """Fit Y ~ standardised(X) W + b by ridge (alpha x the mean diagonal), predict at Xq."""
    mu, sd = X.mean(0), X.std(0) + 1e-8
    Z, Zq = (X - mu) / sd, (Xq - mu) / sd
    ym = Y.mean(0)
    A = Z.T @ Z
    A += alpha * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype)
    W = torch.linalg.solve(A, Z.T @ (Y - ym))
    return Zq @ W + ym


def cosine(P, G):
    return float((P * G).sum() / (P.norm() * G.norm() + 1e-30))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--out", required=True)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--windows", default="4,16,64")
    ap.add_argument("--alphas", default="1e-3,1e-1")
    ap.add_argument("--context", choices=["none", "targets", "inputs", "both"], default="none",
                    help="also fit ridge on [state; the chunk's targets and/or inputs] (cDNI: "
                         "the data of the chunk that starts at the trigger)")
    ap.add_argument("--json")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args(argv)
    windows = [int(w) for w in args.windows.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    cfg = load_recipe(args.recipe, args.overrides + [
        "train.progress=false", "dni.replay=1", f"dni.replay_chunks={max(windows) + 1}"])
    validate(cfg)
    torch.set_num_threads(cfg.train.threads or 1)
    run = Run(cfg, args.out, quiet=True).setup()
    buf, after = run.runner.dni.replay, run._after_chunk
    rows = []
    contexts, pending = {}, {}
    if args.context != "none":
        width_t = cfg.train.truncation
        train_chunk, add = run.runner.train_chunk, buf.add

        def chunk_features(t):
            t = t.float()
            if t.shape[0] < width_t:  # a stream's last, shorter chunk
                t = torch.cat([t, t.new_zeros((width_t - t.shape[0],) + tuple(t.shape[1:]))])
            return t.movedim(1, 0).reshape(t.shape[1], -1)

        def recording_chunk(inputs, targets, *a, **k):
            parts = []
            if args.context in ("inputs", "both"):
                parts.append(chunk_features(inputs))
            if args.context in ("targets", "both"):
                parts.append(chunk_features(targets))
            pending["ctx"] = torch.cat(parts, 1).double()
            return train_chunk(inputs, targets, *a, **k)

        def recording_add(state, gradient, context=None):
            contexts[buf.slot] = pending["ctx"]
            return add(state, gradient, context)

        run.runner.train_chunk, buf.add = recording_chunk, recording_add

    def hook(m):
        out = after(m)
        if run.step % args.every or buf.filled < 2:
            return out
        n, width = buf.filled, buf.width
        newest = (buf.slot - 1) % buf.chunks
        order = [(newest - k) % buf.chunks for k in range(n)]  # newest first
        X = flat(buf.states, buf._dims)
        G = flat(buf.grads, buf._dims)
        chunk = lambda j: slice(j * width, (j + 1) * width)
        Xq, Gq = X[chunk(order[0])], G[chunk(order[0])]
        if Gq.norm() == 0:
            return out
        row = {"step": run.step, "length": getattr(run.task, "length", None)}
        with torch.no_grad():
            state = nest.unflatten(buf.structure, [
                s.index_select(d, torch.arange(order[0] * width, (order[0] + 1) * width))
                for s, d in zip(buf.states, buf._dims)])
            own = run.runner.dni.interface.synthesize(state, target_scale=1.0)
        row["runner"] = cosine(flat(nest.flatten(own), buf._dims), Gq)
        for w in windows:
            past = order[1:w + 1]
            if len(past) < w:
                continue
            rows_idx = torch.cat([torch.arange(j * width, (j + 1) * width) for j in past])
            for a in alphas:
                P = ridge_predict(X[rows_idx], G[rows_idx], Xq, a)
                row[f"ridge_w{w}_a{a:g}"] = cosine(P, Gq)
                if contexts:
                    C = torch.cat([contexts[j] for j in past])
                    P = ridge_predict(torch.cat([X[rows_idx], C], 1), G[rows_idx],
                                      torch.cat([Xq, contexts[order[0]]], 1), a)
                    row[f"ctx_w{w}_a{a:g}"] = cosine(P, Gq)
        rows.append(row)
        return out

    run._after_chunk = hook
    run.train()
    half = rows[len(rows) // 2:]
    keys = [k for k in rows[-1] if k not in ("step", "length")]
    print(f"{args.recipe}: {len(rows)} chunks scored, mean cosine with the real gradient over "
          f"the second half ({len(half)} chunks):")
    for k in keys:
        vals = [r[k] for r in half if k in r]
        print(f"  {k:<22} {statistics.mean(vals):+.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh)


if __name__ == "__main__":
    main()
