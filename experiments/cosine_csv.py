"""Does the synthesizer predict? One CSV row per finished run: its result beside the mean
diagnosed cosine of the synthetic gradient with the true future gradient over the second
half of training (issue 19's measure; runs trained with `--set train.diagnose_every=N`).

    python experiments/cosine_csv.py runs/try/* --out docs/results/synth-predicts.csv

Columns: the run's setting (recipe, method, T, seed, model lr, the synthesizer's own lr,
beta, lambda, replay), its best validation metric, its test metric (where the run was
tested), updates and wall time; cos_k1 / cos_k2 (the mean over diagnosed boundaries of the
second half, with their count n_k1), cos_target (the runner's cosine with its own
regression target, same half) and the norm ratio |g^| / |g_1|; the guard's recoveries;
the synthesizer's shape (`linear`, `mlp 1x1024`: hidden layers x units, `gru 64`), its
parameters (counted in the run's checkpoint; 0 for plain TBPTT) and the run's tokens/s;
the closed-form refit (`256 chunks`, `512 chunks, decay 0.997`; empty when off); BP(lambda)'s
trace decay (empty for the other methods); capped: the mean fraction of streams whose
synthetic gradient the cap scaled down, second half (empty without a cap; CSVs written before
2026-12-05 lack the column).
"""
import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

from dni_rnn.app import checkpoint
from dni_rnn.app.config import Config, bootstrap_and_traces, sg_scale
from dni_rnn.metrics import read_records

FIELDS = ["recipe", "method", "T", "seed", "lr", "synth_lr", "beta", "lambda", "replay",
          "metric", "best", "test", "updates", "cos_k1", "n_k1", "cos_k2", "cos_target",
          "norm_ratio_k1", "recoveries", "elapsed_s", "run", "synth", "synth_params", "tokens_per_s",
          "refit", "trace_decay", "capped"]


def synth_name(cfg):
    """The synthesizer's shape: "linear", "linear + products 8" (`dni.products`), "mlp 1x1024"
    (hidden layers x units) or "gru 64"."""
    d, m = cfg["dni"], cfg["model"]
    state = m["hidden_dim"] * m["num_layers"] * (2 if m.get("cell", "lstm") == "lstm" else 1)
    if d.get("synthesizer", "mlp") == "gru":
        return f"gru {d['synth_hidden'] or state}"
    if d["synth_layers"] == 0:
        return f"linear + products {d['products']}" if d.get("products") else "linear"
    return f"mlp {d['synth_layers']}x{d['synth_hidden'] or state}"


def synth_parameters(run_dir):
    """The synthesizer's parameters, counted in the run's last checkpoint."""
    saved = checkpoint.load(checkpoint.find(run_dir, prefer=("last.pt", "best.pt")))
    return sum(t.numel() for k, t in (saved.get("synthesizer") or {}).items()
               if not k.rsplit(".", 1)[-1].startswith("product_"))  # buffers, not parameters


def _mean(values):
    values = [v for v in values if v is not None]
    return round(statistics.mean(values), 4) if values else ""


def _round(value):
    if value is None:
        return ""
    return round(value, 4) if isinstance(value, float) else value


def row(run_dir):
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    recs = read_records(run_dir)
    updates = max((r.get("step", 0) for r in recs), default=0)
    late = [r for r in recs if r.get("step", 0) > updates / 2]
    diag = [r for r in late if r.get("kind") == "diagnose"]
    train = [r for r in late if r.get("kind") == "train"]
    metric = summary.get("metric", "")
    best = summary.get(f"best_{metric}", summary.get(f"best_valid_{metric}", ""))
    d = cfg["dni"]
    c = Config.from_dict(cfg)
    beta = sg_scale(c)
    lam = d["bootstrap"] if d["method"] == "bp-lambda" else bootstrap_and_traces(c)[0]
    lam = beta if lam is None else lam
    return {"recipe": cfg["recipe"], "method": d["method"], "T": cfg["train"]["truncation"],
            "seed": cfg["train"]["seed"], "lr": cfg["optim"]["lr"], "synth_lr": d["synth_lr"],
            "beta": beta, "lambda": lam, "replay": d.get("replay", 0), "metric": metric,
            "best": _round(best),
            "test": _round(summary.get("test_metric")), "updates": updates,
            "cos_k1": _mean([r.get("cos_k1") for r in diag]),
            "n_k1": sum("cos_k1" in r for r in diag),
            "cos_k2": _mean([r.get("cos_k2") for r in diag]),
            "cos_target": _mean([r.get("cosine") for r in train]),
            "norm_ratio_k1": _mean([r["synthetic_norm"] / r["true_norm_k1"] for r in diag
                                    if r.get("true_norm_k1")]),
            "recoveries": sum(r.get("kind") == "recovery" for r in recs),
            "elapsed_s": round(summary.get("elapsed_s", 0.0), 1), "run": run_dir.name,
            "synth": synth_name(cfg) if d["method"] != "bptt" else "",
            "synth_params": synth_parameters(run_dir),
            "tokens_per_s": round(summary.get("tokens_per_s", 0.0)), "refit": refit_name(d),
            "trace_decay": d.get("trace_decay", "") if d["method"] == "bp-lambda" else "",
            "capped": _mean([r.get("capped") for r in train])}


def refit_name(d):
    """The refit's buffer and decay ("256 chunks", "512 chunks, decay 0.997"; "" when off)."""
    if not d.get("refit") or d["method"] == "bptt":
        return ""
    decay = d.get("refit_decay", 1.0)
    return f"{d['replay_chunks']} chunks" + (f", decay {decay:g}" if decay != 1 else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="CSV to write")
    args = p.parse_args(argv)
    done = [d for d in args.runs if (Path(d) / "summary.json").is_file()]
    left = sorted(set(args.runs) - set(done))
    if left:
        print(f"cosine_csv: left out (not finished): {', '.join(left)}", file=sys.stderr)
    table = [row(d) for d in sorted(done)]
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(table)
    print(f"wrote {args.out}: {len(table)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
