"""Is the synthesizer any good? Its synthetic gradient against the true future gradient.

At a chunk boundary with state s, the synthetic gradient g_hat = M(s) stands in for the
gradient that the future chunks would send back to s. This module computes that future
gradient exactly, by BPTT through the next K chunks of the stream (each chunk's loss a mean
over its tokens, as in training):

    g_K = d(L_1 + ... + L_K) / ds            stream:  s | chunk 1 | chunk 2 | ... | chunk K

and compares g_hat with it for K in a few horizons: cosine, relative error
||g_hat - g_K|| / ||g_K|| (plain TBPTT's zero has relative error 1 and cosine 0 by
definition), and ||g_K|| by K: how far ahead the future still matters. Where g_K is exactly
zero (no loss in the next K chunks, as in a copy episode's pattern phase) the cosine and the
relative error are undefined and left out, so that a mean over boundaries scores the
synthesizer only where there is a future gradient to predict, not the episode's phases.

Nothing changes: no parameter is updated or gets a .grad, the random generators are forked
and restored (dropout draws as in training, then forgotten), the carried state is copied.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from . import nest
from .metrics import read_records
from .tbptt import forward_with_resets, zero_streams


def future_gradients(model, loss_fn, inputs, targets, state, T, horizons, resets=None,
                     batch_dim=None):
    """The true future gradient at `state` for each horizon K (in chunks of T steps).

    Args:
        model: `forward(inputs, state) -> (outputs, state)`.
        loss_fn: the chunk loss (mean over the chunk).
        inputs, targets: `(N, B, ...)` time-major, starting right after the boundary.
        state: the state at the boundary (not modified).
        T: chunk length.
        horizons: the K to report, each with (K - 1) * T < N (the last chunk may be short).
        resets: optional `(N, B)` bool.
    Returns:
        {K: g_K} with g_K structured like `state`.
    """
    horizons = sorted(set(horizons))
    leaves = [t.detach().clone().requires_grad_() for t in nest.flatten(state)]
    s = nest.unflatten(state, leaves)
    losses, out = [], {}
    devices = [t.device for t in leaves if t.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        for k in range(horizons[-1]):
            a, b = k * T, (k + 1) * T
            outputs, s, _ = forward_with_resets(model, inputs[a:b], s,
                                                resets[a:b] if resets is not None else None,
                                                batch_dim)
            losses.append(loss_fn(outputs, targets[a:b]))
        total = 0.0
        for k, loss in enumerate(losses, start=1):
            total = total + loss
            if k in horizons:
                grads = torch.autograd.grad(total, leaves, retain_graph=k < horizons[-1],
                                            allow_unused=True)
                out[k] = nest.unflatten(state, [g if g is not None else torch.zeros_like(t)
                                                for g, t in zip(grads, leaves)])
    return out


def _flat(state):
    return torch.cat([t.detach().reshape(-1).double() for t in nest.flatten(state)])


def compare(g_hat, truths):
    """Cosine and relative error of g_hat against each g_K, and the norms."""
    h = _flat(g_hat)
    report = {"synthetic_norm": float(h.norm())}
    for K, g in truths.items():
        t = _flat(g)
        tn = float(t.norm())
        report[f"true_norm_k{K}"] = tn
        if tn > 0:  # a zero g_K has no direction to score (module docstring)
            report[f"cos_k{K}"] = float(h @ t) / (float(h.norm()) * tn) if h.norm() > 0 else 0.0
            report[f"relerr_k{K}"] = float((h - t).norm()) / tn
    return report


def diagnose(runner, inputs, targets, state, T, horizons, resets=None, train_batch=None,
             context=None):
    """One boundary: the runner's synthetic gradient for `state` against the true ones.
    `context`: the synthesizer's context at this boundary (cDNI), as in training.

    With a mean-reduced loss a stream's gradient scales as 1 / (streams x T); the
    synthesizer learnt it on `train_batch` streams, so on a stream set of another width
    (a validation split) its output is rescaled by train_batch / width before comparing.

    Returns:
        a flat dict (cos_k{K}, relerr_k{K}, true_norm_k{K}, synthetic_norm, seconds); the
        horizons whose K-th chunk would start past the end of `inputs` are left out.
    """
    t0 = time.perf_counter()
    # K fits when its K-th chunk starts inside the stream; the last one may be shorter, as
    # the walk cuts a stream's (or an episode's) last chunk
    fits = [K for K in horizons if (K - 1) * T < inputs.shape[0]]
    if not fits or (resets is not None and bool(resets[0].all())):
        return {}  # nothing fits, or every stream restarts here: no future to compare
    truths = future_gradients(runner.model, runner.loss_fn, inputs, targets, state, T, fits,
                              resets, runner.batch_dim)
    width = inputs.shape[1]
    g_hat = runner.synthetic_gradient(state, tokens=T * (train_batch or width), context=context)
    if train_batch and train_batch != width:
        g_hat = nest.map_state(lambda g: g * (train_batch / width), g_hat)
    if resets is not None:  # as in training: streams that restart get no synthetic gradient
        g_hat = zero_streams(g_hat, resets[0], runner.batch_dim)
    report = compare(g_hat, truths)
    report["seconds"] = time.perf_counter() - t0
    return report


def mean_reports(reports):
    keys = sorted({k for r in reports for k in r})
    out = {}
    for k in keys:
        vals = [r[k] for r in reports if k in r and r[k] is not None and math.isfinite(r[k])]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out


def format_report(r, horizons):
    """A table: one line per horizon K."""
    lines = [f"{'K':>3} | {'cos(g^, g_K)':>12} | {'rel err g^':>10} | {'rel err 0':>9} | "
             f"{'|g_K|':>9}"]
    for K in horizons:
        if f"cos_k{K}" not in r:
            continue
        lines.append(f"{K:>3} | {r[f'cos_k{K}']:>+12.4f} | {r[f'relerr_k{K}']:>10.4f} | "
                     f"{1.0:>9.4f} | {r[f'true_norm_k{K}']:>9.3e}")
    lines.append(f"|g^| = {r['synthetic_norm']:.3e}; {r.get('seconds', math.nan):.2f}s per "
                 "boundary")
    return lines


def plot(run_dir, report=None, horizons=(1, 2, 4, 8)):
    """diagnose.png: cosine by K against the training step (from the run's JSONL), or, for a
    run trained without diagnostics, the checkpoint's cosine by K. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    run_dir = Path(run_dir)
    recs = read_records(run_dir, "diagnose")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if recs:
        for K in horizons:
            pts = [(r["step"], r[f"cos_k{K}"]) for r in recs if f"cos_k{K}" in r]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=f"K={K} chunks")
        ax.set_xlabel("training step")
    elif report is not None:
        ks = [K for K in horizons if f"cos_k{K}" in report]
        ax.bar([str(K) for K in ks], [report[f"cos_k{K}"] for K in ks])
        ax.set_xlabel("horizon K (chunks)")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_ylabel("cosine(synthetic, true future gradient)")
    ax.grid(alpha=0.3)
    if recs:
        ax.legend()
    fig.tight_layout()
    path = run_dir / "diagnose.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
