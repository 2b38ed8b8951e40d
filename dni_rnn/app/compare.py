"""Truncation sweeps: plain TBPTT against DNI over truncation lengths, on one budget.

    for method in methods, T in truncations, seed in seeds:
        train(recipe with dni.method=method, train.truncation=T, train.seed=seed,
              train.max_tokens=budget)        -> OUT/<method>-T<T>-s<seed>/
    -> OUT/results.md, OUT/results.csv        one row per (method, T), seeds averaged
    -> OUT/runs.csv                           one row per run (docs/RESULTS.md reads these)
    -> OUT/valid_vs_tokens.png, OUT/valid_vs_updates.png
                                              one line per (method, T)

Every run sees the same number of training tokens (so T=2 makes 17x the updates of
T=35) and validates every budget / `points` tokens, so the curves share their x grid.
With `budget_updates` instead, every run makes the same number of updates and validates
as its recipe says (the copy tasks' curriculum needs its frequent checks).
A finished run (summary.json present) is reused, so an interrupted sweep can be rerun.

`jobs` > 1 trains that many runs at once, each in a process of its own with
cores / jobs torch threads (two runs side by side with all threads each crawl: measured,
60% system time); a progress line per running job shows what it trains, where, and when
it should end.
"""
from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import multiprocessing
import os
import signal
import statistics
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from ..metrics import read_records
from .config import Config, ConfigError, METHODS, validate
from .stopping import RunInterrupted, StopSignals, SweepInterrupted
from .tasks import summary_metric
from .training import train



def run_name(method, T, seed):
    """The directory of one run of a sweep, inside the sweep's folder."""
    return f"{method}-T{T}-s{seed}"

def parse_list(text, kind, name):
    """"2,3,5" -> [2, 3, 5]; one-line ConfigError on bad items."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise ConfigError(f"{name}: give a comma-separated list")
    try:
        return [kind(s) for s in items]
    except ValueError:
        raise ConfigError(f"{name}: expected a comma-separated list of {kind.__name__}, "
                          f"got {text!r}") from None


def sweep(cfg, truncations, methods, seeds, budget_tokens, out_dir, data_dir=None, points=10,
          say=print, jobs=1, progress_every=30.0, budget_updates=0, report=False):
    """Run every (method, T, seed) and write the tables and plots: `plan`, then `execute`
    (reusing the runs finished before), then `write_report`.

    Args: those of `plan` and `execute`, and
        say: where progress lines go.
        report: train nothing; write the tables, CSV and plots of the runs finished so far
            (a sweep still running elsewhere, or one cut short), naming those left out.
    Returns:
        list of result rows (dicts), one per (method, T).
    """
    planned = plan(cfg, truncations, methods, seeds, budget_tokens, out_dir, points,
                   budget_updates)
    for run_dir, summary in planned.summaries.items():
        if summary is not None:
            say(f"{planned.label(run_dir)}: done before, reused")
    if report:
        pending = planned.pending
        if pending:
            say(f"--report: {len(pending)} of {len(planned.configs)} runs not finished, "
                "left out: " + ", ".join(d.name for d in pending))
        if len(pending) == len(planned.configs):
            raise ConfigError(f"--report: no finished run in {planned.out}; run the sweep first")
    else:
        execute(planned, data_dir, say, jobs, progress_every)
    return write_report(planned, say)


@dataclass
class Plan:
    """A sweep: its grid and budget, and per run (in grid order: method, then T, then seed)
    its Config and, once finished, its summary."""
    out: Path
    methods: list
    truncations: list
    seeds: list
    budget: int
    unit: str  # what `budget` counts: "tokens" or "updates"
    configs: dict  # run directory -> its Config
    summaries: dict  # run directory -> its summary (None: not finished)

    @property
    def pending(self):
        """The directories of the runs not finished, in grid order."""
        return [d for d, summary in self.summaries.items() if summary is None]

    def label(self, run_dir):
        """'[3/8] dni T=2 seed=1': where the run stands in the sweep, and what it trains."""
        c = self.configs[run_dir]
        k = list(self.configs).index(run_dir) + 1
        return (f"[{k}/{len(self.configs)}] {c.dni.method} T={c.train.truncation} "
                f"seed={c.train.seed}")


def plan(cfg, truncations, methods, seeds, budget_tokens, out_dir, points=10, budget_updates=0):
    """One Config per (method, T, seed) with its directory OUT/<method>-T<T>-s<seed>, and the
    summaries of the runs finished there before. Creates `out_dir`.

    Args:
        cfg: the recipe's Config (its own method, truncation and seed are replaced), or a
            function method -> Config, the recipe loaded for that method (so that its
            `[method.M]` tables apply, as `dni-rnn compare` does).
        truncations, methods, seeds: the grid.
        budget_tokens: training tokens per run (0: the recipe's own budget).
        out_dir: where runs, tables and plots go.
        points: validations per run (evenly spaced in tokens).
        budget_updates: updates per run instead of a token budget (0: none).
    Raises ConfigError on a bad grid or budget, an output directory that is not writable,
    or a run directory holding a run of another configuration.
    """
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"--methods: unknown method {m!r}; known: {', '.join(METHODS)}")
    for T in truncations:
        if T < 1:
            raise ConfigError(f"--truncations: lengths must be >= 1, got {T}")
    if budget_tokens and budget_updates:
        raise ConfigError("compare: give --budget-tokens or --budget-updates, not both")
    by_method = {m: cfg(m) if callable(cfg) else cfg for m in methods}
    budget = budget_updates or budget_tokens or by_method[methods[0]].train.max_tokens
    if not budget:
        raise ConfigError("compare needs a budget: --budget-tokens N or --budget-updates N (or "
                          "train.max_tokens in the recipe)")
    unit = "updates" if budget_updates else "tokens"
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output directory {out} is not writable ({e.strerror or e})") from None
    configs, summaries = {}, {}
    for method, T, seed in itertools.product(methods, truncations, seeds):
        c = copy.deepcopy(by_method[method])
        c.dni.method, c.train.truncation, c.train.seed = method, T, seed
        c.train.epochs = max(c.train.epochs, 10**6)  # the budget decides
        if unit == "updates":
            c.train.max_steps, c.train.max_tokens, c.train.eval_tokens = budget, 0, 0
            c.train.eval_interval = c.train.eval_interval or max(budget // points, 1)
        else:
            c.train.max_tokens, c.train.max_steps = budget, 0
            c.train.eval_interval = 0
            c.train.eval_tokens = max(budget // points, 1)
        c.train.out_dir = ""
        validate(c)
        run_dir = out / run_name(method, T, seed)
        configs[run_dir] = c
        summaries[run_dir] = _finished(run_dir, c)
    return Plan(out, methods, truncations, seeds, budget, unit, configs, summaries)


def execute(plan, data_dir=None, say=print, jobs=1, progress_every=30.0):
    """Train the plan's pending runs (resuming any cut short) and fill in their summaries.

    Args:
        data_dir: the corpus directory (--data-dir).
        jobs: runs trained at once, each in its own process with cores / jobs threads
            (0: as many as there are cores, at most the runs left).
        progress_every: seconds between progress lines of running jobs.
    """
    pending = plan.pending
    jobs = jobs or min(os.cpu_count() or 1, max(len(pending), 1))
    if jobs > 1:
        plan.summaries.update(_parallel(plan, pending, jobs, data_dir, say, progress_every))
    else:
        for d in pending:
            say(f"{plan.label(d)} -> {d}")
            plan.summaries[d] = train(plan.configs[d], out_dir=d,
                                      resume=(d / "last.pt").is_file(), data_dir=data_dir,
                                      quiet=True)


def write_report(plan, say=print):
    """results.md, results.csv, runs.csv and the plots of the plan's finished runs, in OUT.

    Returns the result rows (dicts), one per (method, T) with a finished run."""
    runs = []
    for d, summary in plan.summaries.items():
        if summary is not None:
            c = plan.configs[d]
            runs.append({"method": c.dni.method, "T": c.train.truncation, "seed": c.train.seed,
                         "summary": summary, "curve": _curve(d, summary["metric"])})
    rows = _rows(runs, plan.methods, plan.truncations)
    metric = summary_metric(runs[0]["summary"])
    write_tables(rows, metric, plan.out, plan.budget, plan.seeds, plan.unit)
    write_runs(runs, plan.out)
    plotted = plot(runs, metric, plan.out)
    say(f"wrote {plan.out / 'results.md'} and {plan.out / 'results.csv'}"
        + (f"; plots {', '.join(str(p) for p in plotted)}" if plotted else
           "; no plots (pip install matplotlib)"))
    return rows


_stop_asked = None  # in a worker: the sweep's event, set when the sweep stops


def _init_worker(stop_asked):
    global _stop_asked
    _stop_asked = stop_asked


def _train_job(config, run_dir, data_dir):
    """One sweep run in a worker process (spawned: no state shared with the parent)."""
    c = validate(Config.from_dict(config))
    run_dir = Path(run_dir)
    finished = threading.Event()
    if _stop_asked is not None:
        threading.Thread(target=_relay_stop, args=(finished,), daemon=True).start()
    try:
        return train(c, out_dir=run_dir, resume=(run_dir / "last.pt").is_file(),
                     data_dir=data_dir, quiet=True)
    finally:
        finished.set()


def _relay_stop(finished):
    """In a worker: when the sweep stops, send this process the SIGTERM that stops its run
    (once the run has installed its handler, so one still setting up stops at its first
    update instead of dying)."""
    while not finished.wait(0.2):
        if _stop_asked.is_set() and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _parallel(plan, pending, jobs, data_dir, say, progress_every):
    """Train `pending` runs `jobs` at a time, cores / jobs threads each; progress lines.
    Returns {run directory: summary}.

    At most `jobs` runs are handed to the pool at once, so a stopped sweep starts nothing
    new. SIGINT or SIGTERM to this process (or one that stops a worker's run, as Ctrl-C in
    a terminal does) stops every running run: each finishes its update, saves last.pt and
    stops, and the sweep raises `SweepInterrupted`. A run that fails stops the others the
    same way before its error is raised."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    say(f"{len(pending)} runs, {jobs} at a time, {threads} torch thread(s) each")
    done, queue, running, stopped = {}, list(pending), {}, []
    error, signum = None, None
    context = multiprocessing.get_context("spawn")
    stop_asked = context.Event()
    with StopSignals() as signals, ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_init_worker, initargs=(stop_asked,)) as pool:

        def submit():
            d = queue.pop(0)
            c = copy.deepcopy(plan.configs[d])
            c.train.threads, c.train.progress = threads, False
            running[pool.submit(_train_job, c.to_dict(), str(d), data_dir)] = d

        def stop(sig):
            nonlocal signum
            if signum is None:
                signum = sig
                queue.clear()
                stop_asked.set()

        while queue and len(running) < jobs:
            submit()
        last = time.monotonic()
        while running:
            finished, _ = wait(running, timeout=min(progress_every, 1.0),
                               return_when=FIRST_COMPLETED)
            if signals.signum is not None:
                stop(signals.signum)
            for f in finished:
                d = running.pop(f)
                try:
                    done[d] = f.result()
                except RunInterrupted as e:  # it saved: a signal reached it
                    stopped.append(d)
                    stop(e.signum)
                    continue
                except Exception as e:  # a failed run: stop the others, then raise it
                    error = error or e
                    stop(signal.SIGTERM)
                    continue
                say(f"{plan.label(d)}: done in {done[d]['elapsed_s']:.0f}s -> {d}")
                if queue:
                    submit()
            if time.monotonic() - last >= progress_every:
                last = time.monotonic()
                for d in running.values():
                    line = _progress_line(d, (plan.budget, plan.unit))
                    if line:
                        say(f"{plan.label(d)}: {line} -> {d}")
    if error is not None:
        raise error
    if signum is not None:
        raise SweepInterrupted(signum, stopped)
    return done


def _progress_line(run_dir, budget):
    """'45% of the tokens, 1,234 tok/s, ETA 3m20s' from the run's JSONL (None: not begun).

    `budget`: (amount, "tokens" or "updates")."""
    budget, unit = budget
    if not (Path(run_dir) / "metrics.jsonl").is_file():
        return None
    recs = read_records(run_dir, "train")
    if not recs:
        return "starting"
    r = recs[-1]
    speed = r.get("tokens_per_s") or 0.0
    if unit == "updates":  # in tokens, at this run's tokens per update so far
        left = max(budget - r["step"], 0) * r["tokens"] / max(r["step"], 1)
        done = f"{100 * r['step'] / budget:.0f}% of the updates"
    else:
        left = max(budget - r["tokens"], 0)
        done = f"{100 * r['tokens'] / budget:.0f}% of the tokens"
    eta = f"ETA {int(left / speed) // 60}m{int(left / speed) % 60:02d}s" if speed else "ETA ?"
    return f"{done}, {speed:,.0f} tok/s, {eta}"


# How a run was executed, not what it computes: a finished run is reused whatever these were.
_EXECUTION_KEYS = {("train", "threads"), ("train", "progress"), ("train", "tensorboard"),
                   ("train", "out_dir"), ("data", "data_dir")}


def _identity(config_dict):
    return {section: ({k: v for k, v in values.items() if (section, k) not in _EXECUTION_KEYS}
                      if isinstance(values, dict) else values)
            for section, values in config_dict.items()}


def _finished(run_dir, cfg):
    path = run_dir / "summary.json"
    if not path.is_file() or not (run_dir / "config.json").is_file():
        return None
    if _identity(json.loads((run_dir / "config.json").read_text())) != _identity(cfg.to_dict()):
        raise ConfigError(f"{run_dir} holds a run of another configuration; use another --out")
    return json.loads(path.read_text())


def _curve(run_dir, metric):
    """[(tokens, updates, value)] of the run's validations; value: the task's metric."""
    return [(rec["tokens"], rec["updates"], rec[metric]) for rec in read_records(run_dir, "eval")
            if rec.get("split") == "valid"]


def _mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _rows(runs, methods, truncations):
    rows = []
    for method in methods:
        for T in truncations:
            group = [r for r in runs if r["method"] == method and r["T"] == T]
            if not group:  # --report before any seed of it finished
                continue
            s = [r["summary"] for r in group]
            row = {"method": method, "T": T, "seeds": len(group),
                   "updates": s[0]["steps"], "tokens": s[0]["tokens"]}
            row["best"], row["best_std"] = _mean_std([x["best_metric"] for x in s])
            row["final"], row["final_std"] = _mean_std([r["curve"][-1][2] for r in group])
            row["test"], row["test_std"] = _mean_std([x.get("test_metric") for x in s])
            row["tokens_per_s"], _ = _mean_std([x["tokens_per_s"] for x in s])
            rows.append(row)
    return rows


def _fmt(v, sd, metric):
    if v is None or math.isnan(v):
        return "-"
    digits = max(metric.digits, 1)  # means over seeds of a whole-number metric need one
    text = f"{v:.{digits}f}"
    return text + (f" ± {sd:.{digits}f}" if sd else "")


def write_runs(runs, out):
    """runs.csv: one row per run (method, T, seed and what it reached)."""
    keys = ["method", "T", "seed", "metric", "best", "final", "test", "updates", "tokens",
            "tokens_per_s", "elapsed_s", "recoveries"]
    with open(out / "runs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in runs:
            s = r["summary"]
            test = s.get("test_metric")
            w.writerow({"method": r["method"], "T": r["T"], "seed": r["seed"],
                        "metric": s["metric"], "best": _round(s["best_metric"]),
                        "final": _round(r["curve"][-1][2]) if r["curve"] else "",
                        "test": "" if test is None else _round(test),
                        "updates": s["steps"], "tokens": s["tokens"],
                        "tokens_per_s": round(s["tokens_per_s"]),
                        "elapsed_s": round(s["elapsed_s"], 1),
                        "recoveries": s.get("recoveries", 0)})


def _round(v):
    return round(v, 4) if isinstance(v, float) else v


def write_tables(rows, metric, out, budget, seeds, unit="tokens"):
    """results.md (Markdown) and results.csv (one row per method and T)."""
    measured = metric.from_loss is None  # by the task itself, at validation only
    head = ["method", "T", "seeds", "updates", "tokens"]
    if measured:
        head += [metric.column]
    else:
        head += [f"final valid {metric.column}", f"best valid {metric.column}",
                 f"test {metric.column}"]
    head += ["tokens/s"]
    direction = "higher" if metric.higher_is_better else "lower"
    lines = [f"# Truncation sweep: {metric.label} ({direction} is better)", "",
             f"Budget {budget:,} training {unit} per run; seeds {', '.join(map(str, seeds))} "
             "(mean ± standard deviation).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["method"], str(r["T"]), str(r["seeds"]), f"{r['updates']:,}", f"{r['tokens']:,}"]
        if measured:
            cells += [_fmt(r["best"], r["best_std"], metric)]
        else:
            cells += [_fmt(r["final"], r["final_std"], metric), _fmt(r["best"], r["best_std"], metric),
                      _fmt(r.get("test"), r.get("test_std"), metric)]
        cells += [f"{r['tokens_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    keys = ["method", "T", "seeds", "updates", "tokens", "final", "final_std", "best", "best_std",
            "test", "test_std", "tokens_per_s"]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["metric"] + keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({"metric": metric.name, **{k: r.get(k, "") for k in keys}})


def plot(runs, metric, out, prefix=""):
    """Validation metric against tokens seen and against updates, one line per (method, T):
    OUT/PREFIXvalid_vs_tokens.png and OUT/PREFIXvalid_vs_updates.png.

    Seeds are averaged point by point. Returns the written paths ([] without matplotlib).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    label = metric.label if metric.from_loss is None else f"validation {metric.label}"
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["T"]), []).append(r["curve"])
    methods = list(dict.fromkeys(k[0] for k in groups))
    styles = ["-", "--", ":", "-."]
    cmap = plt.get_cmap("tab10")
    ts = sorted({k[1] for k in groups})
    paths = []
    for x_index, x_label, name in ((0, "training tokens", "valid_vs_tokens.png"),
                                   (1, "optimizer updates", "valid_vs_updates.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (method, T), curves in groups.items():
            n = min(len(c) for c in curves)
            if n == 0:
                continue
            xs = [curves[0][i][x_index] for i in range(n)]
            ys = [statistics.fmean(c[i][2] for c in curves) for i in range(n)]
            color = cmap(ts.index(T) % 10)  # one colour per T, one line style per method
            ax.plot(xs, ys, styles[methods.index(method) % len(styles)], color=color, marker=".",
                    label=f"{method} T={T}")
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        if metric.log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out / f"{prefix}{name}", dpi=110)
        plt.close(fig)
        paths.append(out / f"{prefix}{name}")
    return paths
