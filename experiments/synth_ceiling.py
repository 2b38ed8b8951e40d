"""How well can a synthesizer predict the future gradient of a frozen, trained network?

Issue 19's upper bound. A recipe's network is trained once (or an existing run directory is
loaded), frozen, and boundaries are collected: the recurrent state at chunk boundaries, as
training sees them, with the exact future gradients g_K through the next K chunks
(`diagnostics.future_gradients`). Fresh synthesizers are then fitted to it:

  supervised   regress onto g_1 or g_4 directly: a linear map (least squares), the shipped
               MLP, a wide MLP; offline with shuffled minibatches, and online in the order
               training meets the boundaries (B examples per update, one pass);
  bootstrapped the runner's own training (TBPTTRunner with the model frozen, beta = 0,
               lambda in {0, 0.5, 1}), on fresh training streams.

Each is scored on held-out boundaries against g_1, g_4 and g_8: the batch cosine (as
`diagnostics.compare`, averaged over boundaries) and the fraction of |g_K|^2 explained
(1 - |g^ - g_K|^2 / |g_K|^2; the zero synthesizer scores 0). The same fits on their own
training boundaries give the other side of the noise ceiling (a language model's future
gradient holds the noise of tokens not yet seen).

    python experiments/synth_ceiling.py demo --out runs/ceiling/demo --set train.seed=9
    python experiments/synth_ceiling.py copy --out runs/ceiling/copy-T3 \
        --set train.max_steps=6000 --set train.truncation=3
    python experiments/synth_ceiling.py ptb-char --out runs/ceiling/char-T5 \
        --data-dir ../shared/data --set train.max_tokens=1000000 --set train.truncation=5

Writes OUT/ceiling.json and prints a table. The network is trained into OUT/net (reused).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from dni_rnn import nest
from dni_rnn.config import load_recipe, validate
from dni_rnn.diagnostics import future_gradients
from dni_rnn.run import Run
from dni_rnn.synthesizers import BasicSynthesizer, StateSynthesizer, state_dim
from dni_rnn.tbptt import TBPTTRunner, forward_with_resets

HORIZONS = (1, 4, 8)


def train_or_load(recipe, overrides, out, data_dir):
    net = out / "net"
    cfg = load_recipe(recipe, overrides + ["train.progress=false"])
    validate(cfg)
    done = (net / "summary.json").is_file()
    run = Run(cfg, net, resume=done, data_dir=data_dir, quiet=True).setup()
    if not done:
        t0 = time.time()
        run.train().cleanup()
        print(f"trained {recipe} in {time.time() - t0:.0f}s", file=sys.stderr)
    for p in run.model.parameters():
        p.requires_grad_(False)
    run.model.eval()  # frozen; the recipes measured here have no dropout at these sizes
    return run


def flat(state):
    """(B, D) per-example features of a nested state (StateSynthesizer's layout)."""
    tensors = nest.flatten(state)
    return torch.cat([t.movedim(nest.batch_dimension(t), 0).reshape(t.shape[nest.batch_dimension(t)], -1)
                      for t in tensors], 1)


def streams(run, n_blocks):
    """Blocks of training-like streams: (inputs, targets, resets, boundaries to use)."""
    task, T = run.task, run.cfg.train.truncation
    if hasattr(task, "curriculum"):  # copy tasks: one episode per block, as in training,
        # followed by enough episodes that g_8 fits (the reset stops their gradient)
        import corpora
        t = run.cfg.task
        n = task.length
        ep = corpora.episode_length(n, min(n, t.max_repeats) if task.repeat else None)
        extra = math.ceil(max(HORIZONS) * T / ep) + 1
        g = torch.Generator().manual_seed(12345)
        for _ in range(n_blocks):
            if task.repeat:
                b = corpora.repeat_copy_task(run.cfg.data.batch_size, n, min(n, t.max_repeats),
                                             1 + extra, bits=t.bits, max_repeats=t.max_repeats,
                                             generator=g)
            else:
                b = corpora.copy_task(run.cfg.data.batch_size, n, 1 + extra, bits=t.bits,
                                      generator=g)
            packed = torch.cat([b.targets, b.mask.unsqueeze(-1).float()], -1)
            yield b.inputs, packed, b.resets, range(T, ep, T)
    else:  # a language model: the training stream from its start, state carried
        s = task.train_stream("cpu")
        N = min(s.inputs.shape[0], (n_blocks + max(HORIZONS) + 1) * T)
        yield s.inputs[:N], s.targets[:N], s.resets[:N] if s.resets is not None else None, \
            range(T, N - max(HORIZONS) * T, T)


@torch.no_grad()
def collect(run, n_blocks):
    """Boundaries: dicts of state (nested), X (B, D), G_K (B, D), in training order."""
    model, T = run.model, run.cfg.train.truncation
    out = []
    for inputs, targets, resets, bounds in streams(run, n_blocks):
        state = model.init_state(inputs.shape[1])
        a = 0
        for b in bounds:
            r = resets[a:b] if resets is not None else None
            _, state, _ = forward_with_resets(model, inputs[a:b], state, r)
            a = b
            keep = ~resets[b] if resets is not None else torch.ones(inputs.shape[1], dtype=torch.bool)
            if not keep.any():
                continue
            with torch.enable_grad():
                g = future_gradients(model, run.task.loss_fn, inputs[b:], targets[b:], state, T,
                                     HORIZONS, resets[b:] if resets is not None else None)
            rec = {"state": nest.map_state(lambda t: t.clone(), state), "X": flat(state)}
            for K in HORIZONS:
                rec[K] = flat(g[K])
            if rec[1].abs().sum() == 0 and rec[8].abs().sum() == 0:
                continue  # no future loss reaches this boundary
            out.append(rec)
    return out


def batch_cos(P, G):
    n = float(P.norm() * G.norm())
    return float((P * G).sum()) / n if n > 0 else 0.0


def score(predict, data):
    """Mean batch cosine and fraction of |g_K|^2 explained, against each horizon."""
    rep = {}
    for K in HORIZONS:
        cos, err, tot = [], 0.0, 0.0
        for rec in data:
            P, G = predict(rec), rec[K]
            cos.append(batch_cos(P, G))
            err += float((P - G).pow(2).sum())
            tot += float(G.pow(2).sum())
        rep[f"cos_k{K}"] = sum(cos) / len(cos)
        rep[f"explained_k{K}"] = 1 - err / tot if tot > 0 else math.nan
    return rep


class Standard:
    """Per-feature standardisation of inputs, targets in units of their RMS."""

    def __init__(self, data, K):
        X = torch.cat([r["X"] for r in data])
        self.mu, self.sd = X.mean(0), X.std(0).clamp_min(1e-6)
        self.g = float(torch.cat([r[K] for r in data]).pow(2).mean().sqrt()) or 1.0

    def x(self, X):
        return (X - self.mu) / self.sd


def fit_linear(train, K, ridge=1e-3):
    st = Standard(train, K)
    X = torch.cat([st.x(r["X"]) for r in train]).double()
    X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    Y = torch.cat([r[K] for r in train]).double() / st.g
    W = torch.linalg.solve(X.T @ X + ridge * len(X) * torch.eye(X.shape[1], dtype=X.dtype), X.T @ Y)

    def predict(rec):
        x = torch.cat([st.x(rec["X"]).double(), torch.ones(len(rec["X"]), 1, dtype=torch.double)], 1)
        return (x @ W).float() * st.g
    return predict


def fit_mlp(train, K, n_hidden, width, standardise, online, lr, epochs=60, batch=256, seed=0):
    """An MLP (BasicSynthesizer) onto g_K in RMS units; offline (shuffled minibatches) or
    online (one pass in training order, one boundary = one update)."""
    torch.manual_seed(seed)
    st = Standard(train, K)
    D = train[0]["X"].shape[1]
    net = BasicSynthesizer(D, n_hidden=n_hidden, hidden_dim=width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    inp = (lambda X: st.x(X)) if standardise else (lambda X: X)

    def step(X, Y):
        opt.zero_grad()
        loss = (net(inp(X)) - Y / st.g).pow(2).sum(1).mean()
        loss.backward()
        opt.step()

    if online:
        for rec in train:
            step(rec["X"], rec[K])
    else:
        X = torch.cat([r["X"] for r in train])
        Y = torch.cat([r[K] for r in train])
        for _ in range(epochs):
            for idx in torch.randperm(len(X)).split(batch):
                step(X[idx], Y[idx])
    net.eval()

    def predict(rec):
        with torch.no_grad():
            return net(inp(rec["X"])) * st.g
    return predict


def bootstrapped(run, lam, steps, lr, width):
    """The runner's own synthesizer training on the frozen model: beta = 0, lambda = lam."""
    torch.manual_seed(0)
    model = run.model
    state = model.init_state(run.cfg.data.batch_size)
    synth = StateSynthesizer.mlp(state_dim(state), n_hidden=1, hidden_dim=width)
    runner = TBPTTRunner(model, run.task.loss_fn, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0),
                         truncation=run.cfg.train.truncation, synthesizer=synth, sg_scale=0.0,
                         bootstrap=lam, clip=None, sg_cap=None, guard=False,
                         synth_optimizer=torch.optim.Adam(synth.parameters(), lr=lr))
    runner.model_params = []
    done = 0
    with torch.enable_grad():
        while done < steps:
            s = run.task.train_stream("cpu")
            for _, _, _ in runner.walk(s.inputs, s.targets, None, s.resets):
                done += 1
                if done >= steps:
                    break
    T, B = run.cfg.train.truncation, run.cfg.data.batch_size

    def predict(rec):
        return flat(runner.synthetic_gradient(rec["state"], T * B))
    return predict


def recipe_parser(doc):
    """The arguments of a script that trains (or loads) a recipe's net into OUT/net."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--data-dir")
    return ap


def main(argv=None):
    ap = recipe_parser(__doc__)
    ap.add_argument("--blocks", type=int, default=600, help="copy: episodes blocks; LM: boundaries")
    ap.add_argument("--boot-steps", type=int, default=3000)
    ap.add_argument("--wide", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = train_or_load(args.recipe, args.overrides, out, args.data_dir)
    cfg = run.cfg
    shipped_width = cfg.dni.synth_hidden or None
    lr = cfg.dni.synth_lr or cfg.optim.lr
    t0 = time.time()
    data = collect(run, args.blocks)
    cut = int(0.8 * len(data))
    train, held = data[:cut], data[cut:]
    print(f"{len(data)} boundaries ({time.time() - t0:.0f}s), D = {data[0]['X'].shape[1]}, "
          f"B = {data[0]['X'].shape[0]}", file=sys.stderr)
    rows = []

    def add(name, target, predict):
        r = {"fit": name, "target": target, **score(predict, held)}
        r.update({f"train_{k}": v for k, v in score(predict, train).items() if k.startswith("cos")})
        rows.append(r)
        print(f"{name:<40} {target:<6} " + " ".join(f"{k}={v:+.3f}" for k, v in r.items()
                                                       if k.startswith(("cos", "expl"))),
              file=sys.stderr)

    for K in (1, 4):
        add("linear (standardised)", f"g_{K}", fit_linear(train, K))
        add("shipped MLP, offline", f"g_{K}", fit_mlp(train, K, cfg.dni.synth_layers, shipped_width,
                                                       standardise=False, online=False, lr=1e-3))
        add("shipped MLP, offline, standardised", f"g_{K}",
            fit_mlp(train, K, cfg.dni.synth_layers, shipped_width, standardise=True, online=False,
                    lr=1e-3))
        add(f"wide MLP ({args.wide}), offline, std.", f"g_{K}",
            fit_mlp(train, K, 1, args.wide, standardise=True, online=False, lr=1e-3))
        add(f"shipped MLP, online lr {lr:g}", f"g_{K}",
            fit_mlp(train, K, cfg.dni.synth_layers, shipped_width, standardise=False, online=True,
                    lr=lr))
        add("shipped MLP, online lr 1e-3, std.", f"g_{K}",
            fit_mlp(train, K, cfg.dni.synth_layers, shipped_width, standardise=True, online=True,
                    lr=1e-3))
    for lam in (0.0, 0.5, 1.0):
        add(f"runner, bootstrapped, {args.boot_steps} chunks", f"lam={lam:g}",
            bootstrapped(run, lam, args.boot_steps, lr, shipped_width))
    (out / "ceiling.json").write_text(json.dumps({
        "recipe": args.recipe, "overrides": args.overrides, "boundaries": len(data),
        "held_out": len(held), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
