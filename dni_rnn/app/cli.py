"""`dni-rnn` on the command line: train, evaluate, generate, score, compare, recipes.

    dni-rnn train [RECIPE] [--set section.key=value ...] [--data-dir D] [--out RUN_DIR] [--resume]
    torchrun --nproc_per_node=N -m dni_rnn train RECIPE ...   (data parallel, distributed.py)
    dni-rnn demo [--set section.key=value ...] [--out DIR]
    dni-rnn evaluate RUN_DIR_OR_CHECKPOINT [--split test] [--data-dir D]
    dni-rnn diagnose RUN_DIR [--horizons 1,2,4,8] [--boundaries 16] [--split valid]
    dni-rnn generate RUN_DIR [--prompt TEXT] [--tokens 50] [--temperature 1] [--top-k 0] [--seed S]
    dni-rnn score RUN_DIR FILE... [--json]
    dni-rnn compare RECIPE --truncations 2,3,5 --methods bptt,dni [--budget-tokens N]
                    [--seeds 1,2] [--jobs N] [--out DIR]
    dni-rnn recipes
    dni-rnn decoupled [--updates 1500] [--costs] ...   (app/decoupled.py; --help)

RECIPE is a shipped recipe's name (`dni-rnn recipes`) or a path to a TOML file. `demo`
(also `train` without a recipe) trains the `demo` recipe twice, with plain TBPTT and with
DNI at the same short T, and says which learned the longer dependency.

Problems a user can fix (a bad recipe, key or value, missing data, a corrupt or foreign
checkpoint, an unwritable directory) end the program with one line on stderr and exit
status 2; no traceback. Under torchrun rank 0 alone prints it (every rank stops alike).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
from pathlib import Path

from .stopping import RunInterrupted

PROG = "dni-rnn"
DEMO_RECIPE = "demo"


def _user_errors():
    from corpora import CorpusError

    from .checkpoint import CheckpointError
    from .config import ConfigError
    from ..tbptt import NonFiniteLossError
    return (ConfigError, CheckpointError, CorpusError, NonFiniteLossError)


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description="Truncated BPTT with synthetic "
                                "gradients (DNI): train, evaluate and compare recurrent networks.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(q):
        q.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
        q.add_argument("--data-dir", help="folder holding the corpus files (e.g. shared/data "
                       "with ptb/ inside); default $DNI_RNN_DATA_DIR, the cache, or a download")

    t = sub.add_parser("train", help="train one recipe (no recipe: the copy-task demo)")
    t.add_argument("recipe", nargs="?", default=None,
                   help="shipped recipe name or .toml path (default: the demo)")
    common(t)
    t.add_argument("--out", help="run directory (default runs/<recipe>-<method>-T<T>-s<seed>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="the copy-task demo: plain TBPTT and DNI at the same T")
    common(d)
    d.add_argument("--out", help="output directory (default runs/demo)")
    d.add_argument("--resume", action="store_true", help="continue the demo's runs in --out")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("evaluate", help="evaluate a run's best checkpoint on a split")
    e.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    e.add_argument("--split", default="test", choices=("valid", "test"))
    e.add_argument("--data-dir", help="folder holding the corpus files")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("generate", help="sample text from a language-model run (a copy-task "
                       "run: one episode and the model's answer)")
    s.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    s.add_argument("--prompt", default="", help="text to continue, read with the run's tokenizer")
    s.add_argument("--tokens", type=int, default=50, help="tokens to sample (<eos> counts)")
    s.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits (0: always the most likely token)")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    s.add_argument("--seed", type=int, default=None, help="the same seed gives the same text")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.set_defaults(func=cmd_generate)

    o = sub.add_parser("score", help="perplexity (or bits per character) of text files "
                       "under a language-model run")
    o.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    o.add_argument("files", metavar="FILE", nargs="+", help="text files (UTF-8)")
    o.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    o.add_argument("--json", action="store_true", help="print the result as JSON")
    o.set_defaults(func=cmd_score)

    g = sub.add_parser("diagnose", help="synthetic against true future gradients of a saved run")
    g.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    g.add_argument("--horizons", default="1,2,4,8", help="future chunks K to compare against")
    g.add_argument("--boundaries", type=int, default=16, help="chunk boundaries averaged over")
    g.add_argument("--split", default="valid", choices=("valid", "test"))
    g.add_argument("--data-dir", help="folder holding the corpus files")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g.set_defaults(func=cmd_diagnose)

    c = sub.add_parser("compare", help="sweep truncation lengths x methods on one token budget")
    c.add_argument("recipe")
    c.add_argument("--truncations", default="2,3,4,5,8", help="comma-separated T values")
    c.add_argument("--methods", default="bptt,dni", help="comma-separated: bptt, dni, dni-aux, bp-lambda, sg-push")
    c.add_argument("--seeds", default="1", help="comma-separated seeds")
    c.add_argument("--budget-tokens", type=int, default=0,
                   help="training tokens per run (default: the recipe's train.max_tokens)")
    c.add_argument("--budget-updates", type=int, default=0,
                   help="updates per run instead of tokens (the copy tasks: same updates at each T)")
    c.add_argument("--points", type=int, default=10, help="validations per run")
    c.add_argument("--jobs", type=int, default=0, help="runs trained at once, each with cores / "
                   "jobs torch threads (default 0: one per core, at most the runs left)")
    c.add_argument("--out", help="output directory (default runs/compare-<recipe>)")
    c.add_argument("--report", action="store_true", help="train nothing: tables, CSV and plots "
                   "of the runs finished so far in --out")
    common(c)
    c.set_defaults(func=cmd_compare)

    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(func=cmd_recipes)

    x = sub.add_parser("decoupled", add_help=False,
                       help="lock-step against decoupled training of a two-part stack in two "
                       "local processes (docs/distributed.md; --help for its options)")
    x.add_argument("options", nargs=argparse.REMAINDER)
    x.set_defaults(func=cmd_decoupled)
    return p


def main(argv=None):
    """Entry point of the `dni-rnn` console script and `python -m dni_rnn`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:1] + ["--"] + argv[1:] if argv[:1] == ["decoupled"]
                             else argv)  # decoupled's options are its own parser's
    try:
        errors = _user_errors()
    except ImportError as e:  # pragma: no cover
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except errors as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dni-rnn recipes | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except PermissionError as e:
        print(f"{PROG}: error: permission denied: {e.filename or e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"{PROG}: error:{where} {e.strerror or e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:  # the demo and compare (train says more itself)
        again = ("run the same command again: it resumes unfinished runs"
                 if args.command == "compare" else "run the same command with --resume")
        print(f"{PROG}: {e}. To continue, {again}.", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


# ---- commands -----------------------------------------------------------------------------

def cmd_train(args):
    from .config import load_recipe
    from .training import train

    if args.recipe is None:  # `dni-rnn train` alone: the demo, the README's first command
        return cmd_demo(args)
    cfg = load_recipe(args.recipe, args.overrides)
    try:
        train(cfg, out_dir=args.out, resume=args.resume, data_dir=args.data_dir)
    except RunInterrupted as e:
        if os.environ.get("RANK", "0") == "0":
            command = [PROG, "train", args.recipe, *(a for o in args.overrides for a in ("--set", o))]
            if args.data_dir:
                command += ["--data-dir", args.data_dir]
            command += ["--out", str(e.checkpoint.parent), "--resume"]
            launched = " (under torchrun: the same torchrun command with these arguments)" \
                if os.environ.get("WORLD_SIZE", "1") != "1" else ""
            print(f"{PROG}: {e}. Resume with{launched}: {shlex.join(command)}",
                  file=sys.stderr)
        return e.status
    return 0


def cmd_evaluate(args):
    from .training import evaluate_checkpoint

    r = evaluate_checkpoint(args.path, split=args.split, data_dir=args.data_dir,
                            device=args.device)
    if args.json:
        print(json.dumps(r))
        return 0
    text = r["text"]
    print(f"{r['recipe']} {r['split']}: {text} | {r['checkpoint']} at step {r['step']}")
    return 0


def cmd_generate(args):
    from .config import ConfigError
    from .sampling import copy_episode, generate, prompt_ids
    from .trained import load

    if args.tokens < 0 or args.temperature < 0 or args.top_k < 0:
        raise ConfigError("--tokens, --temperature and --top-k must be >= 0")
    run = load(args.path, device=args.device)
    if not run.is_language_model:
        if args.prompt:
            print(f"{PROG}: note: a {run.config.data.corpus} run reads no prompt",
                  file=sys.stderr)
        print("\n".join(copy_episode(run, seed=args.seed)))
        return 0
    _, unknown = prompt_ids(run.tokenizer, args.prompt)
    if unknown:
        fate = "read as <unk>" if run.vocab.unk is not None else "left out (no <unk>)"
        print(f"{PROG}: note: not in the vocabulary, {fate}: "
              f"{', '.join(map(repr, unknown))}", file=sys.stderr)
    import torch

    # one token a step: on the CPU, threads cost more than they save (measured on 2 busy
    # cores: 15x slower with two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if run.device.type == "cpu" else threads)
    text = ""
    try:
        for text in generate(run, args.prompt, args.tokens, args.temperature, args.top_k,
                             args.seed):
            print(text, end="", flush=True)
    finally:
        torch.set_num_threads(threads)
    if not text.endswith("\n"):
        print()
    return 0


def cmd_score(args):
    from .scoring import score
    from .tasks import METRICS
    from .trained import load

    r = score(load(args.path, device=args.device), args.files)
    if args.json:
        print(json.dumps(r))
        return 0
    m, width = r["metric"], max(len(f["file"]) for f in r["files"] + [{"file": "total"}])
    print(f"{r['checkpoint']} (step {r['step']}), {r['tokenizer']} tokens, "
          f"{r['streams']} streams, T={r['T']}")
    print(f"{'file':<{width}}  {'tokens':>10}  {'<unk>':>8}  {'loss':>7}  {m:>9}")
    digits = METRICS[m].digits
    for f in r["files"] + [{"file": "total", **r["total"]}]:
        print(f"{f['file']:<{width}}  {f['tokens']:>10,}  {f['unk']:>8,}  {f['loss']:>7.4f}  "
              f"{f[m]:>9.{digits}f}")
    return 0


def cmd_diagnose(args):
    from .config import ConfigError, parse_horizons
    from ..diagnostics import format_report, plot
    from .training import diagnose_checkpoint

    horizons = parse_horizons(args.horizons, "--horizons")
    if args.boundaries < 1:
        raise ConfigError(f"--boundaries must be >= 1, got {args.boundaries}")
    r = diagnose_checkpoint(args.path, horizons, args.boundaries, args.split, args.data_dir,
                            args.device)
    run_dir = Path(r["checkpoint"]).parent
    (run_dir / "diagnose.json").write_text(json.dumps(r, indent=2) + "\n")
    picture = plot(run_dir, r, horizons)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['checkpoint']} (step {r['step']}), {r['boundaries']} boundaries of the "
          f"{r['split']} stream, T={r['T']}: synthetic gradient g^ against the true future "
          "gradient g_K through the next K chunks (plain TBPTT's 0: cosine 0, rel err 1)")
    for line in format_report(r, horizons):
        print(line)
    print(f"wrote {run_dir / 'diagnose.json'}" + (f" and {picture}" if picture else ""))
    return 0


def cmd_compare(args):
    from .compare import parse_list, sweep
    from .config import ConfigError, load_recipe
    from ..distributed import launched

    if launched():
        raise ConfigError("compare runs its own processes (--jobs); start it without torchrun")

    cfg = load_recipe(args.recipe, args.overrides)
    out = args.out or str(Path("runs") / f"compare-{cfg.recipe}")
    for_method = lambda m: load_recipe(args.recipe, args.overrides + [f"dni.method={m}"])
    sweep(for_method, parse_list(args.truncations, int, "--truncations"),
          parse_list(args.methods, str, "--methods"), parse_list(args.seeds, int, "--seeds"),
          args.budget_tokens, out, data_dir=args.data_dir, points=args.points, jobs=args.jobs,
          budget_updates=args.budget_updates, report=args.report)
    print((Path(out) / "results.md").read_text(), end="")
    return 0


def cmd_decoupled(args):
    from .decoupled import main as decoupled_main

    options = args.options[1:] if args.options[:1] == ["--"] else args.options
    decoupled_main(options)
    return 0


def cmd_recipes(args):
    from .config import describe_recipe, shipped_recipes

    known = shipped_recipes()
    width = max(len(n) for n in known)
    for name, path in known.items():
        print(f"{name:<{width}}  {describe_recipe(path)}")
    return 0


def _fresh_demo_dir(base, resume):
    """runs/demo, or with an earlier demo there, the next of runs/demo-2, runs/demo-3, ...
    (--resume: the newest one, to continue it)."""
    prefix = f"{base.name}-"
    numbers = sorted(int(p.name[len(prefix):]) for p in base.parent.glob(prefix + "*")
                     if p.name[len(prefix):].isdigit())
    taken = ([base] if base.exists() else []) + [base.with_name(f"{prefix}{n}") for n in numbers]
    if resume or not taken:
        return taken[-1] if taken else base
    return base.with_name(f"{prefix}{numbers[-1] + 1 if numbers else 2}")


def cmd_demo(args):
    """Copy task, plain TBPTT then DNI at the same T: who learns the longer dependency?"""
    from .config import load_recipe
    from .run import format_summary
    from .training import train

    cfg = load_recipe(DEMO_RECIPE, args.overrides)
    out = Path(args.out) if args.out else _fresh_demo_dir(Path("runs/demo"), args.resume)
    T = cfg.train.truncation
    N = cfg.task.start_length
    print(f"demo: the copy task (Graves et al. 2014), {cfg.task.bits}-bit patterns, truncation "
          f"T={T}. An episode shows N patterns and a delimiter, then asks for the patterns "
          f"back: each answer comes N+1 steps after its pattern, so from N+1 >= T on plain "
          f"TBPTT gets no gradient for storing it, while DNI's synthesizer predicts one. The "
          f"curriculum starts at N={N} and grows N once it is solved (< {cfg.task.threshold} "
          f"wrong bits per sequence); {cfg.train.max_steps} updates per method.", flush=True)
    results = {}
    for method in ("bptt", "dni"):
        c = copy.deepcopy(cfg)
        c.dni.method = method
        c.train.progress = False
        print(f"-- {method}", flush=True)
        s = train(c, out_dir=out / method, resume=args.resume and (out / method / "last.pt").exists(),
                  data_dir=args.data_dir, quiet=True)
        results[method] = s
        print(format_summary(s)[1], f"({s['elapsed_s']:.0f}s)", flush=True)
    b, d = results["bptt"]["best_metric"] or 0, results["dni"]["best_metric"] or 0
    if d > b:
        verdict = f"DNI learned the longer dependency: copies of length {d} against {b} for TBPTT"
    elif b > d:
        verdict = f"plain TBPTT learned the longer dependency: length {b} against {d} for DNI"
    else:
        verdict = f"a tie: both solved length {b}"
    print(f"result (T={T}): {verdict}. Runs in {out}.")
    return 0
