"""The runner's own synthesizer against a frozen model: is what it reaches in training
limited by the model moving, or by the fit itself? (issue 19)

A finished run is continued from its `last.pt` with the model's learning rate (every group
of its optimizer) set to `--lr`, 1e-12 to freeze it in effect, for `--updates` more updates
with the diagnosis every 10; the synthesizer keeps learning (or refitting) as in training.
Prints the mean diagnosed `cos_k1` and the runner's cosine with its own target per 100
updates. Works on a copy of the run directory (`--out`), never on the run itself.

    python experiments/frozen_probe.py runs/compare-copy-cdni256-lr5e-4-20k/dni-T3-s2 \
        --out runs/frozen-probe/s2 --updates 400
"""
import argparse
import json
import shutil
import statistics
from pathlib import Path

import torch

from dni_rnn.app import checkpoint as ckpt
from dni_rnn.app.config import Config, apply_overrides, validate
from dni_rnn.app.run import Run
from dni_rnn.metrics import read_records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", required=True, help="where the copy of the run goes (new)")
    ap.add_argument("--lr", type=float, default=1e-12)
    ap.add_argument("--updates", type=int, default=400)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists: pass a new --out")
    shutil.copytree(args.run_dir, out)
    start = ckpt.load(out / "last.pt")["runner"]["step"]
    cfg = Config.from_dict(json.loads((out / "config.json").read_text()))
    cfg = validate(apply_overrides(cfg, [f"train.max_steps={start + args.updates}",
                                         "train.diagnose_every=10", "train.progress=false"]))
    run = Run(cfg, out, resume=True, quiet=True).setup()
    for group in run.optimizer.param_groups:
        group["lr"] = args.lr
    run.train().cleanup()
    recs = [r for r in read_records(out) if r.get("step", 0) > start]
    for a in range(start, start + args.updates, 100):
        window = [r for r in recs if a < r["step"] <= a + 100]
        cos = [r["cos_k1"] for r in window if r["kind"] == "diagnose" and "cos_k1" in r]
        own = [r["cosine"] for r in window if r["kind"] == "train" and r.get("cosine") is not None]
        print(f"updates {a + 1}-{a + 100}: cos_k1 {statistics.mean(cos):.3f}, cosine with its "
              f"target {statistics.mean(own) if own else float('nan'):.3f}")


if __name__ == "__main__":
    main()
