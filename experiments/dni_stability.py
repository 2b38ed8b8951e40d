"""The stability sweep behind docs/dni.md: shipped recipes x DNI settings x seeds.

Every run is `dni-rnn train RECIPE --set ...` in a process of its own (one torch thread);
finished runs (summary.json present) are reused, so an interrupted sweep resumes.

    python experiments/dni_stability.py --out runs/stability --data-dir ../shared/data \
        --jobs 2 [--only default,plain] [--cases word-T5] [--deadline 540]

Writes OUT/results.csv (one row per run of this invocation) and prints it; `--collect`
trains nothing and writes the rows of every finished run in OUT (several sweeps' worth). The language models run on
train.device=auto (CUDA where present); copy and the demo on the CPU (`--cpu-jobs`). The
demo recipe trains one method per run here (`dni-rnn demo` runs both).
"""
import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dni_rnn.metrics import read_records

# DNI settings; every key set explicitly so that a recipe's own [dni] section (and its
# [method.dni] table: ptb-word-small's cDNI since 2026-12-05) cannot leak in: the state-only
# synthesizer these cases measured
DNI = {"dni.method": "dni", "dni.sg_scale": "0.1", "dni.bootstrap": "none",
       "dni.target_scale": "rms", "dni.sg_cap": "1", "dni.guard": "true",
       "dni.context": "none", "dni.synth_layers": "1", "dni.refit": "0",
       "dni.refit_every": "1", "dni.replay_chunks": "32", "dni.context_code": "onehot",
       "dni.context_steps": "0"}
SETTINGS = {
    "plain": {"dni.method": "bptt"},
    # the recipe as shipped, its own [dni] section included (for ptb-word-small since
    # 2026-12-05: its cDNI; the rows in docs/results were made before)
    "recipe": {"dni.method": "dni"},
    # the shipped default: targets in running-RMS units, cap 1, guard on, beta = lambda = 0.1
    "default": DNI,
    "rms-nocap": {**DNI, "dni.sg_cap": "0"},
    "raw-cap": {**DNI, "dni.target_scale": "raw"},
    "lambda0": {**DNI, "dni.bootstrap": "0"},
    "beta1": {**DNI, "dni.sg_scale": "1"},
    "cap3": {**DNI, "dni.sg_cap": "3"},
    "synth-lr": {**DNI, "dni.synth_lr": "1e-4"},
    "warmup": {**DNI, "dni.warmup": "1000"},
    # the calibration gate (stability.Calibration): inject clamp(c, 0, 1) * g_hat
    "calib": {**DNI, "dni.calibrate": "true"},
    "calib-b1": {**DNI, "dni.calibrate": "true", "dni.sg_scale": "1"},
    "aux": {**DNI, "dni.method": "dni-aux"},
    "calib-aux": {**DNI, "dni.method": "dni-aux", "dni.calibrate": "true"},
    "synth-lr3e-3": {**DNI, "dni.synth_lr": "3e-3"},
    "synth-lr1e-2": {**DNI, "dni.synth_lr": "1e-2"},
    # the settings shipped before: raw targets (LMs) / x1000 with beta = lambda = 1 (copy),
    # no cap, no guard; and the old LM setting with only the guard added
    "old": {**DNI, "dni.target_scale": "raw", "dni.sg_cap": "0", "dni.guard": "false"},
    "old-guard": {**DNI, "dni.target_scale": "raw", "dni.sg_cap": "0"},
    # raw targets, the cap, and beta = lambda = 0.0125 (where the guard left raw-guard's
    # winning runs): a small capped raw injection from the start; dni.method=sg-push since
    # 2026-12-04 (ptb-word-small shipped it as DNI until then)
    "raw-cap-b0125": {**DNI, "dni.target_scale": "raw", "dni.sg_scale": "0.0125"},
    # the same as old-guard, run under the final guard (ptb-word-small shipped it for a day)
    "raw-guard": {**DNI, "dni.target_scale": "raw", "dni.sg_cap": "0"},
    "old-copy": {**DNI, "dni.sg_scale": "1", "dni.bootstrap": "1", "dni.target_scale": "1000",
                 "dni.sg_cap": "0", "dni.guard": "false"},
}

LM = {"train.test": "true", "train.progress": "false"}
CASES = {
    "word-T5": ("ptb-word-small", {**LM, "train.epochs": "1", "train.truncation": "5"}),
    "word-T10": ("ptb-word-small", {**LM, "train.epochs": "1", "train.truncation": "10"}),
    "word-T5-300k": ("ptb-word-small", {**LM, "train.max_tokens": "300000",
                                        "train.truncation": "5", "train.test": "false"}),
    "word-T7": ("ptb-word-small", {**LM, "train.epochs": "1", "train.truncation": "7"}),
    "word-T35": ("ptb-word-small", {**LM, "train.epochs": "1", "train.truncation": "35"}),
    "word-T20": ("ptb-word-small", {**LM, "train.epochs": "1", "train.truncation": "20"}),
    "char-T5": ("ptb-char", {**LM, "train.max_tokens": "1000000", "train.truncation": "5",
                             "train.eval_tokens": "250000"}),
    "char-T6": ("ptb-char", {**LM, "train.max_tokens": "1000000", "train.truncation": "6",
                             "train.eval_tokens": "250000"}),
    "copy": ("copy", {"train.progress": "false"}),
    "repeat-copy": ("repeat-copy", {"train.progress": "false"}),
    # the demo as it was measured here: Adam 1e-2, no replay (the recipe since 2026-12-02 runs
    # Adam 1e-3 with dni.replay = 4; its own runs: docs/results/synth-predicts.csv)
    "demo": ("demo", {"train.progress": "false", "optim.lr": "1e-2", "dni.replay": "0"}),
}
CPU_CASES = ("copy", "repeat-copy", "demo")

# (case, setting, seed) in priority order: the evidence table first, then the candidates
EVIDENCE = (("word-T5", (1, 2, 3)), ("word-T10", (1, 2)), ("char-T5", (1, 2)),
            ("word-T35", (1,)), ("copy", (1,)), ("demo", (1, 2)))
LM_EVIDENCE = [(c, seed) for c, seeds in EVIDENCE if c not in CPU_CASES for seed in seeds]
PLAN = (
    [(c, s, seed) for c, seeds in EVIDENCE for seed in seeds for s in ("default", "plain")]
    + [(c, "raw-cap", seed) for c, seed in LM_EVIDENCE]
    + [("word-T5", "old", 2), ("char-T5", "old", 1), ("copy", "old-copy", 1),
       ("demo", "old-copy", 1), ("demo", "old-copy", 2)]
    + [(c, "beta1", seed) for c, seed in (("copy", 1), ("demo", 1), ("demo", 2),
                                          ("word-T5", 2), ("char-T5", 1))]
    + [(c, s, seed) for s in ("rms-nocap", "lambda0", "cap3")
       for c, seed in (("word-T5", 2), ("char-T5", 1), ("word-T35", 1), ("copy", 1), ("demo", 1))]
    + [(c, s, seed) for s in ("rms-nocap", "lambda0", "raw-cap")
       for c, seed in (("word-T5", 1), ("word-T5", 3), ("char-T5", 2), ("demo", 2), ("copy", 2))]
)
PLAN = list(dict.fromkeys(PLAN))


def run_dir(out, case, setting, seed):
    return Path(out) / f"{case}-{setting}-s{seed}"


def summary_path(out, case, setting, seed):
    return run_dir(out, case, setting, seed) / "summary.json"


def launch(out, data_dir, case, setting, seed, deadline):
    d = run_dir(out, case, setting, seed)
    if summary_path(out, case, setting, seed).is_file():
        return d, "reused"
    left = deadline - time.time()
    if left < 30:
        return d, "skipped"
    recipe, sets = CASES[case]
    sets = {**sets, **SETTINGS[setting], "train.seed": str(seed), "train.threads": "1"}
    if case in CPU_CASES:
        sets["train.device"] = "cpu"
    if d.exists():  # an unfinished run: start again
        for f in d.iterdir():
            if f.is_file():
                f.unlink()
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dni_rnn", "train", recipe, "--out", str(d)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    (d / "command.txt").write_text(" ".join(cmd[1:]) + "\n")
    t0 = time.time()
    with open(d / "log.txt", "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                timeout=max(left, 1)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    (d / "wall.txt").write_text(f"{time.time() - t0:.1f}\n")
    return d, f"rc={rc}"


def row(out, case, setting, seed):
    path = summary_path(out, case, setting, seed)
    d = path.parent
    r = {"case": case, "setting": setting, "seed": seed, "recipe": CASES[case][0]}
    s = json.loads(path.read_text()) if path.is_file() else None
    r["status"] = "done" if s else ("started" if d.exists() else "not run")
    if s is None:
        return r
    m = s["metric"]
    r.update(metric=m, steps=s["steps"], tokens=s["tokens"], elapsed_s=round(s["elapsed_s"], 1),
             recoveries=s.get("recoveries", 0))
    if m == "length":
        r.update(best=s["best_length"], final_error=round(s["final_error"], 3))
    else:
        r.update(best=round(s[f"best_valid_{m}"], 3), test=round(s.get(f"test_{m}", math.nan), 3))
    train = read_records(d, "train")
    if train:
        last = train[-len(train) // 5 or -1:]  # the last fifth of the run

        def mean(key):
            v = [x[key] for x in last if x.get(key) is not None]
            return round(sum(v) / len(v), 4) if v else None
        r.update(cos_end=mean("cosine"), capped_end=mean("capped"),
                 ratio_end=(round(mean("synthetic_norm") / mean("real_norm"), 4)
                            if mean("synthetic_norm") is not None and mean("real_norm") else None),
                 rms_growth=(round(max(x["target_rms"] for x in train if x.get("target_rms"))
                                   / min(x["target_rms"] for x in train if x.get("target_rms")), 1)
                             if any(x.get("target_rms") for x in train) else None))
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/stability")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--jobs", type=int, default=2, help="parallel runs of the language models")
    p.add_argument("--cpu-jobs", type=int, default=0, help="parallel copy / demo runs "
                   "(0: they share --jobs)")
    p.add_argument("--runs", default="", help="explicit runs CASE:SETTING:SEED,... instead "
                   "of the plan")
    p.add_argument("--only", default="", help="comma-separated settings")
    p.add_argument("--cases", default="", help="comma-separated cases")
    p.add_argument("--deadline", type=float, default=0, help="seconds; no run starts later "
                   "and running ones are stopped (0: none)")
    p.add_argument("--collect", action="store_true", help="train nothing: write results.csv "
                   "for every finished run in --out (what several sweeps left there)")
    args = p.parse_args(argv)
    if args.collect:
        found = finished_runs(Path(args.out)) if Path(args.out).is_dir() else []
        if not found:
            sys.exit(f"--collect: no finished run in {args.out}")
        return write_rows(Path(args.out), found)
    only = set(filter(None, args.only.split(",")))
    cases = set(filter(None, args.cases.split(",")))
    explicit = [(c, st, int(seed)) for c, st, seed in
                (r.split(":") for r in filter(None, args.runs.split(",")))]
    plan = [j for j in (explicit or PLAN) if (not only or j[1] in only) and (not cases or j[0] in cases)]
    deadline = time.time() + args.deadline if args.deadline else math.inf
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env_note = f"torch threads 1 per run; jobs {args.jobs} + cpu {args.cpu_jobs}"
    print(f"{len(plan)} runs ({env_note})", flush=True)

    def go(job):
        d, how = launch(out, args.data_dir, *job, deadline)
        print(f"{time.strftime('%H:%M:%S')} {d.name}: {how}", flush=True)

    lm = [j for j in plan if j[0] not in CPU_CASES]
    cpu = [j for j in plan if j[0] in CPU_CASES]
    if args.cpu_jobs:
        with ThreadPoolExecutor(args.jobs) as a, ThreadPoolExecutor(args.cpu_jobs) as b:
            futures = [a.submit(go, j) for j in lm] + [b.submit(go, j) for j in cpu]
            for f in futures:
                f.result()
    else:
        with ThreadPoolExecutor(args.jobs) as a:
            list(a.map(go, plan))
    write_rows(out, plan)


def finished_runs(out):
    """(case, setting, seed) of every run directory in `out` that holds a summary.json."""
    found = []
    for case in CASES:
        for setting in SETTINGS:
            for path in sorted(out.glob(f"{case}-{setting}-s*/summary.json")):
                seed = path.parent.name[len(f"{case}-{setting}-s"):]
                if seed.isdigit():
                    found.append((case, setting, int(seed)))
    return found


def write_rows(out, plan):
    rows = [row(out, *j) for j in plan]
    keys = ["case", "setting", "seed", "recipe", "status", "metric", "best", "test",
            "final_error", "recoveries", "cos_end", "ratio_end", "capped_end", "rms_growth",
            "steps", "tokens", "elapsed_s"]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print((out / "results.csv").read_text())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
