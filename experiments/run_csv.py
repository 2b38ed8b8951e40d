"""One CSV row per validation of finished runs: the per-epoch record behind a docs table.

    python experiments/run_csv.py runs/zaremba/bptt-T20-s1 [RUN_DIR ...] \
        --out docs/results/zaremba-small.csv [--plot docs/figures/zaremba-small]

Each row: the run's recipe, method, T and seed (from its config.json), the validation's
epoch, updates, tokens, the learning rate its last updates used, and its metric; the run's test metric and wall time on
every row (empty while the run has not finished). Reads metrics.jsonl and summary.json only.
`--plot STEM` also draws the validation curves (`dni-rnn compare`'s plots, one line per
method and T): STEM-valid_vs_tokens.png and STEM-valid_vs_updates.png.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

from dni_rnn.metrics import read_records

FIELDS = ["recipe", "method", "T", "seed", "epoch", "updates", "tokens", "lr", "valid",
          "test", "metric", "elapsed_s", "run"]


def rows(run_dir):
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    metric = summary.get("metric") or ("bpc" if cfg["data"]["corpus"] == "ptb-char" else "ppl")
    test = summary.get(f"test_{metric}", "")
    out, trained = [], []  # trained: (step, lr) of the train records so far
    for rec in read_records(run_dir):
        if rec.get("kind") == "train":
            trained.append((rec["step"], rec["lr"]))
        if rec.get("kind") != "eval" or rec.get("split") != "valid":
            continue
        # the rate of the updates before this validation (an epoch's closing record already
        # shows the next epoch's rate)
        lr = next((r for s, r in reversed(trained) if s < rec["step"]), None)
        out.append({"recipe": cfg["recipe"], "method": cfg["dni"]["method"],
                    "T": cfg["train"]["truncation"], "seed": cfg["train"]["seed"],
                    "epoch": rec["epoch"], "updates": rec["updates"], "tokens": rec["tokens"],
                    "lr": lr if lr is not None else rec["lr"], "valid": round(rec[metric], 3),
                    "test": round(test, 3) if test != "" else "", "metric": metric,
                    "elapsed_s": round(summary["elapsed_s"], 1) if summary else "",
                    "run": run_dir.name})
    return out


def plot(table, stem):
    """compare's two plots of the rows' validation curves; the paths written ([] without
    matplotlib)."""
    from dni_rnn import compare, tasks
    runs = {}
    for r in table:
        run = runs.setdefault(r["run"], {"method": r["method"], "T": r["T"], "curve": []})
        run["curve"].append((r["tokens"], r["updates"], r["valid"]))
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    return compare.plot(list(runs.values()), tasks.METRICS[table[0]["metric"]], stem.parent,
                        prefix=f"{stem.name}-")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--plot", metavar="STEM", help="also write STEM-valid_vs_tokens.png and "
                   "STEM-valid_vs_updates.png")
    args = p.parse_args(argv)
    table = []
    for d in args.runs:
        if not (Path(d) / "metrics.jsonl").is_file():
            print(f"run_csv: {d} holds no metrics.jsonl; pass a run directory", file=sys.stderr)
            return 2
        table += rows(d)
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(table)
    print(f"wrote {args.out}: {len(table)} rows from {len(args.runs)} runs")
    if args.plot and table:
        written = plot(table, args.plot)
        print("wrote " + ", ".join(map(str, written)) if written else
              "run_csv: no plots (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
