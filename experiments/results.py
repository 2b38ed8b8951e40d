"""docs/RESULTS.md from the CSVs committed in docs/results/: one command, no hand-copied numbers.

    python experiments/results.py            # (re)write docs/RESULTS.md
    python experiments/results.py --check    # exit 1 when docs/RESULTS.md and the CSVs disagree

tests/test_results_doc.py runs the check, so the doc cannot drift from its data. Each
section names the command that made its CSV; a section whose CSV is not committed yet says
so instead of showing numbers. Edit this script, not the generated file.
"""
import argparse
import csv
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DOC = ROOT / "docs" / "RESULTS.md"

H200 = ("one NVIDIA H200 (CUDA, torch 2.11.0+cu130), ten runs side by side on the one GPU, "
        "one CPU thread each, 2026-11-28")
CPU = "2 CPU cores, torch 2.13.0+cpu, one thread per run, two runs side by side"


def read(name):
    path = RESULTS / name
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def table(head, rows):
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def gain(plain, dni):
    """How much lower DNI's value is than plain TBPTT's, in percent of plain's."""
    return f"{100 * (plain - dni) / plain:+.1f}%"


def pending(csv_name):
    return f"Not measured yet: `docs/results/{csv_name}` is not committed.\n"


def run_time(rows):
    """'12 runs, 3.4 hours of run time' from a runs.csv's elapsed_s."""
    hours = sum(float(r["elapsed_s"]) for r in rows) / 3600
    return f"{len(rows)} runs, {hours:.1f} hours of run time in all"


# ---- PTB words ------------------------------------------------------------------------

def word_runs(names, setting):
    """(T, seed) -> {"plain": (valid, test), "dni": (valid, test), "recoveries": n} from the
    stability sweeps' CSVs: DNI rows of `setting` and the plain rows beside them."""
    out = {}
    for name in names:
        for r in read(name) or []:
            if r["status"] != "done" or not r["case"].startswith("word-T") or \
                    r["case"].endswith("300k") or r["setting"] not in ("plain", setting):
                continue
            T = int(r["case"][len("word-T"):])
            key = "plain" if r["setting"] == "plain" else "dni"
            cell = out.setdefault((T, int(r["seed"])), {})
            cell[key] = (float(r["best"]), float(r["test"]))
            if key == "dni":
                cell["recoveries"] = int(r["recoveries"] or 0)
    return {k: v for k, v in sorted(out.items()) if "plain" in v and "dni" in v}


def word_table(runs, label="DNI"):
    rows, gains = [], []
    for (T, seed), r in runs.items():
        (pv, pt), (dv, dt) = r["plain"], r["dni"]
        gains.append(100 * (pt - dt) / pt)
        rows.append([f"T={T}", seed, f"{pv:.2f} / {pt:.2f}", f"{dv:.2f} / {dt:.2f}",
                     gain(pt, dt), r["recoveries"]])
    wins = sum(g > 0 for g in gains)
    return (table(["T", "seed", "plain valid / test", f"{label} valid / test", "gain (test)",
                   "recoveries"], rows),
            f"{label}'s test perplexity is lower on {wins} of {len(runs)} runs; the gains run from "
            f"{min(gains):+.1f}% to {max(gains):+.1f}% (mean {statistics.fmean(gains):+.1f}%).")


def section_words():
    text = ["## PTB words: plain TBPTT against DNI, one epoch", "",
            "`ptb-word-small` (2x200 LSTM, batch 20, Adam 1e-3, clip 0.25 on the model; the "
            "setting of dni-pytorch's example), one epoch (929,560 tokens), for each T and "
            "seed, and the same with `--set dni.method=bptt` (plain TBPTT) or `--set "
            "dni.method=sg-push` (the push the recipe shipped as DNI until 2026-12-04):", "",
            "    dni-rnn train ptb-word-small --set train.epochs=1 --set train.truncation=T "
            "--set train.seed=S [--set dni.method=bptt | --set dni.method=sg-push]", "",
            "Perplexity, lower is better; valid is the best validation, test uses the best "
            "checkpoint. Since 2026-12-05 `ptb-word-small`'s DNI reads the next 5 words (cDNI, "
            "below); the DNI rows of this section are the state-only DNI it had before, "
            "`--set dni.context=none --set dni.synth_layers=1 --set dni.refit=0` now.", "",
            "### sg-push (shipped as DNI until 2026-12-04): raw targets, the cap and the "
            "guard, beta = lambda = 0.0125", "",
            "What the recipe shipped as DNI from 2026-11-28 to 2026-12-04, and `--set "
            "dni.method=sg-push` trains now: a synthesizer on raw targets whose output the cap "
            "turns into a push of 1.25% of the real gradient's norm; it does not predict the "
            "future gradient (cosine about 0; docs/dni.md says how it was found, lists the "
            "settings that lost on the way, and why it is no longer called DNI), as run by `python "
            "experiments/dni_stability.py --runs word-T5:raw-cap-b0125:1,word-T5:plain:1,...` "
            "on 2 CPU cores, torch 2.13.0+cpu, one thread per run, two or three runs side by "
            "side, 2026-11-28 (setting `raw-cap-b0125` spells out sg-push's keys under dni). "
            "Rows `raw-cap-b0125` and `plain` of `docs/results/dni-stability-cpu.csv`; T=7 "
            "and T=20 with seed 4 are checks on truncations and a seed that no doc named in "
            "advance (T=20 run on 2026-11-29).", ""]
    runs = word_runs(["dni-stability-cpu.csv"], "raw-cap-b0125")
    if runs:
        body, summary = word_table(runs, "sg-push")
        text += [body, "", summary + " No run diverged.", ""]
    else:
        text.append(pending("dni-stability-cpu.csv"))
    text += ["### DNI, the library defaults (RMS targets, cap 1, guard): the recipe from "
             "2026-12-04 to 2026-12-05", "",
             "`... --set dni.target_scale=rms --set dni.sg_cap=1`, as run by `python "
             "experiments/dni_stability.py --cases word-T5,word-T10,word-T35 --only "
             f"default,plain` on {H200}. Rows: `docs/results/dni-stability-h200*.csv`.", ""]
    runs = word_runs(["dni-stability-h200.csv", "dni-stability-h200-300k.csv"], "default")
    if not runs:
        return "\n".join(text) + "\n" + pending("dni-stability-h200.csv")
    body, summary = word_table(runs)
    text += [body, "", summary + " The spread that the seed alone gives plain TBPTT at one "
             "T is as large (docs/dni.md), so with the defaults DNI is **equal** to plain "
             "TBPTT on PTB words, not better; on the CPU at T=5 (docs/dni.md) it was lower on "
             "3 of 3 seeds, by 1.4-2.7%. Neither it nor sg-push predicts the future gradient "
             "on PTB words (below).", ""]
    return "\n".join(text)


# ---- truncation sweeps (dni-rnn compare) ------------------------------------------------

METHOD_NAMES = {"bptt": "plain TBPTT", "dni": "DNI", "dni-aux": "DNI + Aux", "sg-push": "sg-push",
                "bp-lambda": "BP(lambda)"}


def by_method_T(rows, field):
    out = {}
    for r in rows:
        v = r[field]
        out.setdefault((r["method"], int(r["T"])), {})[int(r["seed"])] = float(v) if v else None
    return out


def per_seed(values, fmt):
    """A table cell: one seed's value after another ("2 / 3"), "-" when there is none."""
    return " / ".join(fmt(v) for v in values.values()) if values else "-"


def recoveries(rows):
    """One sentence on the divergence guard in a sweep's runs.csv rows."""
    fired = [r for r in rows if r["method"] != "bptt" and int(r["recoveries"] or 0)]
    dni_runs = sum(r["method"] != "bptt" for r in rows)
    if not fired:
        return f"The divergence guard never fired in the {dni_runs} DNI runs."
    where = ", ".join(f"{r['method']} T={r['T']} seed {r['seed']}: {r['recoveries']}"
                      for r in fired)
    return (f"The divergence guard recovered (re-zeroed the synthesizer, halved beta) in "
            f"{len(fired)} of {dni_runs} DNI runs ({where}); no run ended non-finite.")


def section_chars():
    name = "ptb-char-truncations.csv"
    command = ("dni-rnn compare ptb-char --truncations 2,3,4,5,8 --methods bptt,dni,dni-aux "
               "--seeds 1,2 --budget-tokens 1000000 --out runs/compare-ptb-char "
               "--set optim.plateau_factor=1 --set train.threads=1")
    text = ["## PTB characters: truncation sweep (the paper's Table 1, sized for a CPU)", "",
            "`ptb-char` (1x512 LSTM, batch 32, Adam 1e-3, no learning-rate decay, the best "
            "validation's checkpoint tested: early stopping) at T in "
            "{2, 3, 4, 5, 8}, plain TBPTT, DNI and DNI + Aux, seeds 1 and 2, 1M training "
            "characters each (the paper trains to convergence; this is a fixed budget), "
            f"on {CPU}:", "", f"    {command}", "",
            f"then `cp runs/compare-ptb-char/runs.csv docs/results/{name}`. Bits per "
            "character, lower is better.", ""]
    rows = read(name)
    if rows is None:
        return "\n".join(text) + pending(name)
    test, valid = by_method_T(rows, "test"), by_method_T(rows, "best")
    methods = [m for m in ("bptt", "dni", "dni-aux") if any(k[0] == m for k in test)]
    Ts = sorted({k[1] for k in test})
    body = []
    for T in Ts:
        cells = [f"T={T}"]
        for m in methods:
            seeds = test.get((m, T), {})
            vals = [v for v in seeds.values() if v is not None]
            cells.append(" / ".join(f"{v:.3f}" for v in vals) if vals else "-")
        body.append(cells)
    text.append(f"Test bpc per seed (seed 1 / seed 2); {run_time(rows)}:")
    text += ["", table(["T"] + [METHOD_NAMES[m] for m in methods], body), ""]
    claims = []
    for T in Ts:
        plain_T = test.get(("bptt", T), {})
        dni_T = test.get(("dni", T), {})
        plain_2T = test.get(("bptt", 2 * T), {})
        seeds = sorted(set(plain_T) & set(dni_T))
        if not seeds:
            continue
        wins = sum(dni_T[s] < plain_T[s] for s in seeds)
        vs2 = "-"
        common = sorted(set(dni_T) & set(plain_2T))
        if common:
            vs2 = f"{sum(dni_T[s] <= plain_2T[s] for s in common)} of {len(common)} seeds"
        claims.append([f"T={T}", f"{wins} of {len(seeds)} seeds",
                       f"{statistics.fmean(dni_T[s] - plain_T[s] for s in seeds):+.3f}", vs2])
    text += ["The paper's claim, seed by seed: is DNI at T better than plain TBPTT at T, "
             "and as good as plain TBPTT at 2T?", "",
             table(["T", "DNI better than plain at T", "mean bpc difference", "DNI <= plain at 2T"],
                   claims), ""]
    text.append(recoveries(rows))
    worse = [r for r in rows if float(r["final"]) > 1.02 * float(r["best"])]
    if worse:
        text.append("Runs whose last validation ended more than 2% above their best (the test "
                    "uses the best checkpoint, so the table does not show it): "
                    + ", ".join(f"{METHOD_NAMES[r['method']]} T={r['T']} seed {r['seed']} "
                                f"({float(r['best']):.3f} -> {float(r['final']):.3f})"
                                for r in worse) + ".")
    text.append("")
    text += figures("ptb-char-truncations")
    return "\n".join(text)


def section_copy():
    command = ("dni-rnn compare {task} --truncations 2,3,4,5 --methods bptt,dni,dni-aux "
               "--seeds 1,2 --budget-updates 20000 --jobs 2 --out runs/compare-{task} "
               "--set train.device=cpu")
    text = ["## Copy and repeat copy: the longest length solved", "",
            "8-bit patterns, 1x256 LSTM, a length curriculum (a length is solved below 0.15 wrong "
            "bits per sequence), 20,000 updates at every T, plain TBPTT, DNI and DNI + Aux, "
            f"seeds 1 and 2, on {CPU}. Longest length solved, higher is better. The paper "
            "reports DNI solving about twice the length plain TBPTT solves.", ""]
    for task in ("copy", "repeat-copy"):
        name = f"{task}-truncations.csv"
        cmd = command.format(task=task)
        text += [f"### {task}", "", f"    {cmd}", ""]
        rows = read(name)
        if rows is None:
            text.append(pending(name))
            continue
        best = by_method_T(rows, "best")
        methods = [m for m in ("bptt", "dni", "dni-aux") if any(k[0] == m for k in best)]
        body = []
        for T in sorted({k[1] for k in best}):
            cells = [f"T={T}"]
            for m in methods:
                cells.append(per_seed(best.get((m, T), {}), lambda v: str(int(v))))
            body.append(cells)
        text += [f"Longest length solved per seed (seed 1 / seed 2); {run_time(rows)}:", "",
                 table(["T"] + [METHOD_NAMES[m] for m in methods], body), ""]
        for m in methods[1:]:
            pairs = [(best[(m, T)][s], best[("bptt", T)][s]) for (mm, T) in best if mm == m
                     for s in best[(m, T)] if ("bptt", T) in best and s in best[("bptt", T)]]
            won = sum(a > b for a, b in pairs)
            lost = sum(a < b for a, b in pairs)
            text.append(f"{METHOD_NAMES[m]} against plain TBPTT at the same T and seed: longer "
                        f"on {won}, equal on {len(pairs) - won - lost}, shorter on {lost} of "
                        f"{len(pairs)}.")
        text += [recoveries(rows), ""]
        text += figures(f"{task}-truncations")
    return "\n".join(text)


def cdni_sets(chunks):
    return ("--set train.device=cpu --set dni.context=targets --set dni.synth_layers=0 "
            f"--set dni.refit=1e-3 --set dni.replay_chunks={chunks} "
            "--set train.diagnose_every=100")


def section_cdni(task, budget, out, chunks=64, plain=None, name=None, plain_sweep=False):
    """A cDNI section; `plain`: the run directories of an earlier sweep whose plain TBPTT
    runs are reused (this sweep then runs DNI only); `plain_sweep`: that sweep has no section
    of its own, so its command is shown here too; `name`: the CSV's name."""
    suffix = "" if chunks == 64 else f"-{chunks}"
    name = name or f"{task}-cdni{suffix}.csv"
    sets = cdni_sets(chunks)
    methods = "dni" if plain else "bptt,dni"
    runs = f"{out}/*-T*-s*" + (f" {plain}/bptt-T*-s*" if plain else "")
    text = [f"### {task}, DNI conditioned on the targets after each boundary (cDNI)"
            + (f", {chunks} chunks refitted" if chunks != 64 else ""), "",
            "The same task with a linear synthesizer that also reads the targets of the T steps "
            f"after its boundary, refitted in closed form on the last {chunks} chunks after every "
            f"update (docs/dni.md, {'point 7' if chunks == 64 else 'points 7 and 8'}); "
            f"{budget:,} updates, seeds 1 and 2. `cos_k1`: the mean "
            "cosine of the synthetic gradient with the true future gradient over the second half "
            "of the run."
            + (f" Plain TBPTT's runs are those of `{plain}` (the same budget)." if plain else ""),
            "",
            f"    dni-rnn compare {task} --truncations 2,3,4,5 --methods {methods} "
            f"--seeds 1,2 --budget-updates {budget} --jobs 2 --out {out} {sets}"]
    if plain_sweep:
        text.append(f"    dni-rnn compare {task} --truncations 2,3,4,5 --methods bptt --seeds 1,2 "
                    f"--budget-updates {budget} --jobs 2 --out {plain} {cdni_sets(64)}")
    text += [f"    python experiments/cosine_csv.py {runs} --out docs/results/{name}", ""]
    rows = read(name)
    if rows is None:
        return "\n".join(text + [pending(name)])
    missing = sorted({int(r["T"]) for r in rows} - {int(r["T"]) for r in rows
                                                   if r["method"] == "dni"})
    text += unfinished("cDNI's runs at T=", missing)
    return "\n".join(text + versus_plain(rows, "dni", "cDNI", name))


def unfinished(prefix, truncations):
    """The lines saying which T of a sweep are not finished (none when all are)."""
    if not truncations:
        return []
    return [prefix + ", ".join(map(str, truncations)) + " are not finished yet (the sweep "
            "resumes when its command is run again).", ""]


def section_cdni_variant(title, intro, name, out, method, sets, label):
    """A section on one change to the 20,000-update cDNI setting (256 chunks refitted):
    its runs (`method`, in `name`) beside plain TBPTT and cDNI from copy-cdni-256-20k.csv."""
    text = [f"### copy, {title}", "", intro + " Plain TBPTT and cDNI are the runs of "
            "`copy-cdni-256-20k.csv` (the same budget).", "",
            f"    dni-rnn compare copy --truncations 2,3,4,5 --methods {method} --seeds 1,2 "
            f"--budget-updates 20000 --jobs 2 --out {out} {sets}",
            f"    python experiments/cosine_csv.py {out}/*-T*-s* --out docs/results/{name}", ""]
    rows, base = read(name), read("copy-cdni-256-20k.csv")
    if rows is None or base is None:
        return "\n".join(text + [pending(name)])
    best, cos = by_method_T(base, "best"), by_method_T(base, "cos_k1")
    new_best, new_cos = by_method_T(rows, "best"), by_method_T(rows, "cos_k1")
    length = lambda v: str(int(v))
    cosine = lambda v: f"{v:.2f}" if v is not None else "-"
    body = [[f"T={T}", per_seed(best.get(("bptt", T), {}), length),
             per_seed(best.get(("dni", T), {}), length), per_seed(cos.get(("dni", T), {}), cosine),
             per_seed(new_best.get((method, T), {}), length),
             per_seed(new_cos.get((method, T), {}), cosine)]
            for T in sorted({int(r["T"]) for r in rows})]
    missing = sorted({2, 3, 4, 5} - {int(r["T"]) for r in rows})
    text += unfinished("The runs at T = ", missing)
    return "\n".join(text + [
        "Longest length solved and `cos_k1` per seed (seed 1 / seed 2):", "",
        table(["T", "plain TBPTT", "cDNI", "cDNI cos_k1", label, f"{label} cos_k1"], body), "",
        recoveries(rows) + " cDNI: " + cos_rule("copy-cdni-256-20k.csv") + f" {label}: "
        + cos_rule(name), ""])


def section_cdni_aux():
    return section_cdni_variant(
        "cDNI + Aux", "The cDNI setting of the 20,000-update sweep above (256 chunks "
        "refitted) with the paper's auxiliary loss (`dni.method=dni-aux`), seeds 1 and 2 "
        "(T = 3 and 5 first, the two T where cDNI's `cos_k1` fell short of 0.3 on a seed).",
        "copy-cdni-aux-20k.csv", "runs/compare-copy-cdni256-aux-20k", "dni-aux",
        cdni_sets(256), "cDNI + Aux")


def section_cdni_products():
    return section_cdni_variant(
        "cDNI with products of state and targets", "The cDNI setting of the 20,000-update "
        "sweep above (256 chunks refitted) whose linear synthesizer also reads the products "
        "of the state's first 8 principal components with every target feature "
        "(`dni.products=8`; docs/dni.md, point 15), seeds 1 and 2.",
        "copy-cdni-products8-20k.csv", "runs/compare-copy-cdni256-prod8-20k", "dni",
        cdni_sets(256) + " --set dni.products=8", "cDNI + products")


def section_bplambda(task="copy", out="runs/compare-copy-bplambda",
                     plain="runs/compare-copy-cdni"):
    name = f"{task}-bplambda.csv"
    sets = ("--set train.device=cpu --set dni.synth_layers=0 --set dni.trace_horizon=8 "
            "--set train.diagnose_every=100")
    text = [f"### {task}, BP(lambda) with a linear synthesizer", "",
            "`dni.method=bp-lambda` (gamma 0.9, trace decay 1, traces reaching 8 chunks back, "
            "the library's other DNI defaults) with a linear synthesizer over the state, no "
            "context; 10,000 updates, seeds 1 and 2; plain TBPTT's runs are those of "
            f"`{plain}` (docs/dni.md, \"BP(lambda) and a recurrent synthesizer\").", "",
            f"    dni-rnn compare {task} --truncations 2,3,4 --methods bp-lambda --seeds 1,2 "
            f"--budget-updates 10000 --jobs 2 --out {out} {sets}",
            f"    python experiments/cosine_csv.py {out}/*-T*-s* "
            f"{plain}/bptt-T[234]-s* --out docs/results/{name}", ""]
    rows = read(name)
    if rows is None:
        return "\n".join(text + [pending(name)])
    return "\n".join(text + versus_plain(rows, "bp-lambda", "BP(lambda)", name))


def section_bplambda_char():
    name = "ptb-char-bplambda.csv"
    out = "runs/compare-ptb-char-bplambda"
    sets = ("--set optim.plateau_factor=1 --set train.threads=1 --set dni.synth_layers=0 "
            "--set dni.trace_horizon=8 --set train.diagnose_every=100")
    text = ["### ptb-char at T=5, BP(lambda) with a linear synthesizer", "",
            "The BP(lambda) setting of the copy tasks on `ptb-char`, 1M training characters, "
            "seeds 1 and 2; plain TBPTT, DNI and DNI + Aux are the T=5 runs of the "
            "truncation sweep above (the same recipe and budget).", "",
            f"    dni-rnn compare ptb-char --truncations 5 --methods bp-lambda --seeds 1,2 "
            f"--budget-tokens 1000000 --jobs 2 --out {out} {sets}",
            f"    python experiments/cosine_csv.py {out}/*-T*-s* --out docs/results/{name}", ""]
    rows, sweep = read(name), read("ptb-char-truncations.csv")
    if rows is None or sweep is None:
        return "\n".join(text + [pending(name)])
    test = {**by_method_T(sweep, "test"), **by_method_T(rows, "test")}
    cos = by_method_T(rows, "cos_k1")
    methods = [m for m in ("bptt", "dni", "dni-aux", "bp-lambda") if (m, 5) in test]
    body = [["T=5"] + [per_seed(test[(m, 5)], lambda v: f"{v:.3f}") for m in methods]
            + [per_seed(cos.get(("bp-lambda", 5), {}), lambda v: f"{v:.2f}")]]
    plain, bpl = test.get(("bptt", 5), {}), test.get(("bp-lambda", 5), {})
    dni = test.get(("dni", 5), {})
    lower = lambda a, b: sum(1 for s in a if s in b and a[s] < b[s])
    return "\n".join(text + [
        "Test bpc per seed (seed 1 / seed 2), lower is better:", "",
        table(["T"] + [METHOD_NAMES[m] for m in methods] + ["BP(lambda) cos_k1"], body), "",
        f"BP(lambda) is below plain TBPTT on {lower(bpl, plain)} of {len(bpl)} seeds and below "
        f"DNI on {lower(bpl, dni)} of {len(bpl)}. " + recoveries(rows), ""])


THEIR_ARMS = [  # (label, which rows of repeat-copy-their.csv)
    ("plain TBPTT, T=1", lambda r: r["method"] == "bptt" and r["T"] == "1"),
    ("DNI, beta 1, bootstrap 1, T=1", lambda r: r["method"] == "dni"),
    ("BP(0) = DNI with bootstrap gamma 0.9, T=1",
     lambda r: r["method"] == "bp-lambda" and r["trace_decay"] == "0.0"),
    ("**BP(1), T=1 (their method)**",
     lambda r: r["method"] == "bp-lambda" and r["trace_decay"] == "1.0"),
    ("full BPTT, the same 4M steps x streams (one update per episode)",
     lambda r: r["method"] == "bptt" and r["T"] == "400" and int(r["updates"]) < 40000),
    ("full BPTT, the same 40,000 updates (122M steps x streams)",
     lambda r: r["method"] == "bptt" and r["T"] == "400" and int(r["updates"]) == 40000),
]


def section_their_copy_repeat():
    name = "repeat-copy-their.csv"
    out = "runs/compare-repeat-copy-their"
    diag = "--set train.diagnose_every=500"
    text = ["### repeat-copy in BP(lambda)'s setting", "",
            "The recipe `repeat-copy-bplambda`: their copy-repeat setting as their public config "
            "has it (1x100 LSTM, batch 100, Adam 1e-3, clip 1, R and N taking turns, a stage "
            "solved below 0.15 bits of cross-entropy per answer bit; BP(lambda) with gamma 0.9, "
            "trace decay 1, beta 1, a linear zero-initialised synthesizer over [h; c] at Adam "
            "1e-5, no cap, no guard), at T=1, 40,000 updates (one per step; 4M steps x streams), "
            "seeds 1 and 2; full BPTT (T=400, longer than any episode: one update per episode) "
            "gets the same steps, and the same updates (docs/dni.md, \"Their copy-repeat setting, "
            "re-created\").", "",
            f"    dni-rnn compare repeat-copy-bplambda --truncations 1 --methods bp-lambda,bptt,dni "
            f"--seeds 1,2 --budget-updates 40000 --jobs 2 --out {out} {diag}",
            f"    dni-rnn compare repeat-copy-bplambda --truncations 1 --methods bp-lambda --seeds 1,2 "
            f"--budget-updates 40000 --jobs 2 --out {out}-bp0 --set dni.trace_decay=0 {diag}",
            f"    dni-rnn compare repeat-copy-bplambda --truncations 400 --methods bptt --seeds 1,2 "
            f"--budget-tokens 4000000 --jobs 2 --out {out}-full --set train.max_steps=0",
            f"    dni-rnn compare repeat-copy-bplambda --truncations 400 --methods bptt --seeds 1,2 "
            f"--budget-updates 40000 --jobs 2 --out {out}-full40k",
            f"    python experiments/cosine_csv.py {out}*/*-T*-s* --out docs/results/{name}", ""]
    rows = read(name)
    if rows is None:
        return "\n".join(text + [pending(name)])
    from dni_rnn.app.config import load_recipe
    from dni_rnn.app.tasks import alternate_stage
    max_repeats = load_recipe("repeat-copy-bplambda").task.max_repeats
    body = []
    for label, chosen in THEIR_ARMS:
        runs = sorted((r for r in rows if chosen(r)), key=lambda r: int(r["seed"]))
        if not runs:
            continue

        def stage(r):
            b = int(float(r["best"]))
            return f"{b} ({'N=%d, R=%d' % alternate_stage(b, max_repeats) if b else '-'})"
        body.append([label, " / ".join(stage(r) for r in runs),
                     " / ".join(r["updates"] for r in runs),
                     " / ".join(f"{float(r['cos_k1']):.2f}" if r["cos_k1"] else "-" for r in runs),
                     " / ".join(r["recoveries"] for r in runs)])
    return "\n".join(text + [
        "Last stage solved per seed (seed 1 / seed 2), higher is better:", "",
        table(["arm", "stage solved (N, R)", "updates", "cos_k1", "recoveries"], body), "",
        cos_rule(name), ""])


def section_char_synth():
    name = "ptb-char-synth.csv"
    sets = "--set optim.plateau_factor=1 --set train.threads=1 --set train.diagnose_every=100"
    command = ("dni-rnn compare ptb-char --truncations 5 --methods dni --seeds 1,2 "
               "--budget-tokens 1000000 --jobs 2")
    outs = {"shipped": "", "128": " --set dni.synth_hidden=128",
            "linear": " --set dni.synth_layers=0"}
    text = ["### ptb-char at T=5: DNI's synthesizer by size, with the cosine", "",
            "DNI with the recipe's synthesizer (one hidden layer as wide as the 1,024-wide "
            "state), one of 128 units, and a linear one; 1M training characters, seeds 1 and 2, "
            "diagnosed every 100 updates. Plain TBPTT is the T=5 runs of the truncation sweep "
            "above (the same recipe and budget). `cos_k1`: the mean cosine of the synthetic "
            "gradient with the true future gradient over the second half of the run.", ""]
    text += [f"    {command} --out runs/compare-ptb-char-synth-{k} {sets}{v}"
             for k, v in outs.items()]
    text += ["    python experiments/cosine_csv.py runs/compare-ptb-char-synth-*/dni-T5-s? "
             f"--out docs/results/{name}", ""]
    rows, sweep = read(name), read("ptb-char-truncations.csv")
    if rows is None or sweep is None:
        return "\n".join(text + [pending(name)])
    bptt = [r for r in sweep if r["method"] == "bptt" and r["T"] == "5"]
    plain = {int(r["seed"]): float(r["test"]) for r in bptt}
    speed = statistics.mean(float(r["tokens_per_s"]) for r in bptt)
    return "\n".join(text + synth_size_table(rows, plain, speed, "test bpc", "{:.3f}",
                                              "1.21M"))


def section_word_synth():
    name = "ptb-word-synth.csv"
    outs = {"shipped": "", "h128": " --set dni.synth_hidden=128",
            "linear": " --set dni.synth_layers=0"}
    text = ["### ptb-word-small at T=5: sg-push's synthesizer by size, with the cosine", "",
            "sg-push with the recipe's synthesizer (one hidden layer as wide as the 800-wide state), "
            "one of 128 units, and a linear one; one epoch, seeds 1 and 2, diagnosed every 200 "
            "updates, all as sg-push (the recipe's DNI when they ran). Plain TBPTT is the T=5 "
            "rows of the sg-push table above (the same recipe and "
            "epoch; made by an earlier version of the code). `cos_k1`: the mean cosine of the "
            "synthetic gradient with the true future gradient over the second half of the run.",
            ""]
    text += [f"    dni-rnn train ptb-word-small --out runs/word-synth-{k}/dni-T5-sS "
             "--set dni.method=sg-push --set train.epochs=1 --set train.truncation=5 --set train.seed=S "
             f"--set train.threads=1 --set train.diagnose_every=200{v}" for k, v in outs.items()]
    text += ["    python experiments/cosine_csv.py runs/word-synth-*/dni-T5-s? "
             f"--out docs/results/{name}", ""]
    rows = read(name)
    shipped = {seed: r for (T, seed), r in
               word_runs(["dni-stability-cpu.csv"], "raw-cap-b0125").items() if T == 5}
    if rows is None or not shipped:
        return "\n".join(text + [pending(name)])
    plain = {seed: r["plain"][1] for seed, r in shipped.items()}
    published = {seed: r["dni"][1] for seed, r in shipped.items()}
    return "\n".join(text + synth_size_table(
        rows, plain, None, "test perplexity", "{:.2f}", "4.65M",
        ("the recipe's, as published above (earlier code, no diagnosis)", published)))


WORD_PLAIN = "ptb-word-plain.csv"   # plain TBPTT runs on seeds and truncations the sweeps lack
CDNI_LM = ("--set dni.context=targets --set dni.synth_layers=0 --set dni.refit=1e-3 "
           "--set dni.replay_chunks=256")


def section_lm_cdni():
    """cDNI on PTB at T=5: the synthesizer reads the next T tokens (docs/dni.md, point 16)."""
    char, word = "ptb-char-cdni.csv", "ptb-word-cdni.csv"
    char10, word05 = "ptb-char-cdni-every10.csv", "ptb-word-cdni-b005.csv"
    word_fix = "ptb-word-cdni-fix.csv"
    text = ["### PTB at T=5: cDNI, the synthesizer reads the next T tokens", "",
            "DNI whose linear synthesizer also reads the T tokens after each boundary and is "
            "refitted in closed form on the last 256 chunks (the copy tasks' cDNI): on "
            "characters one-hot (1M training characters, as the sweeps above), on words as the "
            "model's own decoder row of each token, refitted after one update in 10 (one "
            "epoch); seeds 1 and 2, diagnosed. Plain TBPTT and the recipes' DNI are the T=5 "
            "runs above (the same recipe and budget; earlier code).", "",
            "    dni-rnn compare ptb-char --truncations 5 --methods dni --seeds 1,2 "
            "--budget-tokens 1000000 --jobs 2 --out runs/compare-ptb-char-cdni --set "
            f"optim.plateau_factor=1 --set train.threads=1 --set train.diagnose_every=100 {CDNI_LM}",
            "    dni-rnn train ptb-word-small --out runs/word-cdni/dni-T5-sS --set train.epochs=1 "
            "--set train.truncation=5 --set train.seed=S --set train.threads=1 --set "
            f"train.diagnose_every=200 {CDNI_LM} --set dni.context_code=decoder --set "
            "dni.refit_every=10",
            "    # and the ptb-char command with --set dni.refit_every=10, out "
            "runs/compare-ptb-char-cdni-every10",
            "    python experiments/cosine_csv.py runs/compare-ptb-char-cdni/dni-T5-s? --out "
            f"docs/results/{char}",
            "    python experiments/cosine_csv.py runs/compare-ptb-char-cdni-every10/dni-T5-s? "
            f"--out docs/results/{char10}",
            "    python experiments/cosine_csv.py runs/word-cdni/dni-T5-s? --out "
            f"docs/results/{word}",
            "    # beta = lambda = 0.05, the recipe since 2026-12-05, and plain TBPTT on seed 4:",
            "    dni-rnn train ptb-word-small-cdni --out runs/word-cdni-b005/dni-T5-sS --set "
            "train.seed=S --set train.threads=1",
            "    dni-rnn train ptb-word-small --out runs/word-T5-plain/s4 --set train.seed=4 "
            "--set train.epochs=1 --set train.truncation=5 --set dni.method=bptt --set "
            "train.threads=1",
            "    python experiments/cosine_csv.py runs/word-cdni-b005/dni-T5-s? --out "
            f"docs/results/{word05}",
            "    # plain TBPTT on seed 4: its CSV is made in the T=35 section below",
            "    # the recipe after the refit fix of 2026-12-05 (docs/dni.md, point 17), seeds 1-3:",
            "    dni-rnn train ptb-word-small-cdni --out runs/word-cdni-fix/dni-T5-sS --set "
            "train.seed=S --set train.threads=1",
            "    python experiments/cosine_csv.py runs/word-cdni-fix/dni-T5-s? --out "
            f"docs/results/{word_fix}", ""]
    body = []
    sweep = read("ptb-char-truncations.csv") or []
    chars = {(r["method"], int(r["seed"])): float(r["test"]) for r in sweep if r["T"] == "5"}
    word_plain = {seed: r["plain"][1] for (T, seed), r in
                  word_runs(["dni-stability-cpu.csv"], "raw-cap-b0125").items() if T == 5}
    word_plain.update({int(r["seed"]): float(r["test"]) for r in read(WORD_PLAIN) or []
                       if r["T"] == "5"})
    word_dni = {int(r["seed"]): float(r["test"]) for r in read("ptb-word-dni-T5.csv") or []}
    char_plain = {s: chars.get(("bptt", s)) for s in (1, 2)}
    char_dni = {s: chars.get(("dni", s)) for s in (1, 2)}
    for name, task, plain, dni, fmt in (
            (char, "ptb-char (test bpc)", char_plain, char_dni, "{:.3f}"),
            (char10, "ptb-char, refit 1 update in 10", char_plain, char_dni, "{:.3f}"),
            (word, "ptb-word-small (test ppl), beta = lambda = 0.1", word_plain, word_dni,
             "{:.2f}"),
            (word05, "ptb-word-small, beta = lambda = 0.05 (the recipe; before the refit fix)",
             word_plain, word_dni, "{:.2f}"),
            (word_fix, "ptb-word-small, the recipe after the refit fix",
             word_plain, word_dni, "{:.2f}")):
        rows = read(name)
        if rows is None:
            body.append([task, "-", "-", "-", "not run yet", "-", "-", "-"])
            continue
        cdni = {int(r["seed"]): r for r in rows}
        cell = lambda d, f: " / ".join(f.format(d[s]) if d.get(s) is not None else "-"
                                       for s in sorted(cdni))
        body.append([task, cell(plain, fmt), cell(dni, fmt),
                     cell({s: float(r["test"]) for s, r in cdni.items()}, fmt),
                     cell({s: float(r["cos_k1"]) for s, r in cdni.items()}, "{:.3f}"),
                     cell({s: float(r["norm_ratio_k1"]) for s, r in cdni.items()}, "{:.2f}"),
                     cell({s: int(r["recoveries"] or 0) for s, r in cdni.items()}, "{}"),
                     f"{statistics.mean(float(r['tokens_per_s']) for r in rows):,.0f}"])
    return "\n".join(text + [
        "Per seed: 1 / 2 (/ 3 / 4 on words: seeds no doc had named, run with the recipe "
        "`ptb-word-small-cdni`; plain TBPTT there is the stability sweep's row for seed 3 and "
        f"`{WORD_PLAIN}` for seed 4; the recipes' DNI was not run on them). `cos_k1`: the "
        "mean cosine of the synthetic gradient with the true future gradient over the "
        "second half of the run; length: the synthetic gradient's "
        f"norm against the future gradient's there; tokens/s with the diagnosis, {CPU}:",
        "", table(["task", "plain TBPTT", "DNI (state only)", "cDNI", "cDNI cos_k1",
                   "length", "recoveries", "tokens/s"], body), ""])


def section_word_T35_cdni():
    """ptb-word-small's DNI since 2026-12-05 at its own T=35 (docs/dni.md, point 17)."""
    name = "ptb-word-cdni-T35.csv"
    text = ["### ptb-word-small at T=35: cDNI, the recipe's DNI since 2026-12-05", "",
            "`ptb-word-small` as shipped (its DNI reads the next 5 words' decoder rows beside "
            "the state, a linear synthesizer refitted on the last 256 chunks after one update "
            "in 10, beta = lambda = 0.1), one epoch, seeds 1-3, diagnosed every 25 updates; "
            "made with the refitted layer left where the refit put it (docs/dni.md, point 17). "
            "Plain TBPTT and sg-push are the stability sweep's T=35 rows above (the same recipe "
            f"and budget; earlier code); plain TBPTT on seed 1 again, on this code, is in "
            f"`{WORD_PLAIN}`.", "",
            "    dni-rnn train ptb-word-small-cdni --out runs/word-cdni-T35-fix/dni-T35-sS "
            "--set train.truncation=35 --set dni.context_steps=5 --set dni.sg_scale=0.1 --set "
            "train.diagnose_every=25 --set train.seed=S --set train.threads=1",
            "    # which is `dni-rnn train ptb-word-small --set train.epochs=1 --set "
            "train.diagnose_every=25` (tested); plain TBPTT on seed 1, and on seed 4 at T=5:",
            "    dni-rnn train ptb-word-small --out runs/word-T35-plain/s1 --set train.seed=1 "
            "--set train.epochs=1 --set dni.method=bptt --set train.threads=1",
            "    python experiments/cosine_csv.py runs/word-cdni-T35-fix/dni-T35-s? --out "
            f"docs/results/{name}",
            "    python experiments/cosine_csv.py runs/word-T5-plain/s4 runs/word-T35-plain/s1 "
            f"--out docs/results/{WORD_PLAIN}", ""]
    rows = read(name)
    if rows is None:
        return "\n".join(text + [pending(name)])
    sweep = word_runs(["dni-stability-cpu.csv"], "raw-cap-b0125")
    again = {int(r["seed"]): float(r["test"]) for r in read(WORD_PLAIN) or [] if r["T"] == "35"}
    body, wins = [], 0
    for r in sorted(rows, key=lambda r: int(r["seed"])):
        seed, test = int(r["seed"]), float(r["test"])
        plain = sweep.get((35, seed), {}).get("plain", (None, None))[1]
        push = sweep.get((35, seed), {}).get("dni", (None, None))[1]
        wins += plain is not None and test < plain and (seed not in again or test < again[seed])
        body.append([seed, f"{plain:.2f}" if plain else "-",
                     f"{again[seed]:.2f}" if seed in again else "-",
                     f"{push:.2f}" if push else "-", f"{test:.2f}",
                     gain(plain, test) if plain else "-", f"{float(r['cos_k1']):.3f}",
                     f"{float(r['norm_ratio_k1']):.2f}",
                     f"{100 * float(r['capped']):.0f}%" if r.get("capped") else "-",
                     int(r["recoveries"] or 0), f"{float(r['tokens_per_s']):,.0f}"])
    return "\n".join(text + [
        "Test perplexity per seed; `cos_k1`, length (the synthetic gradient's norm against the "
        "future gradient's) and the streams the cap scaled down are means over the second "
        "half; tokens/s with the diagnosis, 2 CPU cores, torch 2.13.0+cpu, one thread per "
        "run, three or four runs side by side:", "",
        table(["seed", "plain TBPTT", "plain, this code", "sg-push", "DNI (cDNI)",
               "gain", "cos_k1", "length", "capped", "recoveries", "tokens/s"], body), "",
        f"DNI's test perplexity is lower than plain TBPTT's on {wins} of {len(rows)} seeds.",
        ""])


def section_word_6_epochs():
    """ptb-word-small as shipped, its whole 6 epochs, DNI against plain TBPTT (one seed)."""
    name = "ptb-word-6-epochs.csv"
    text = ["### ptb-word-small as shipped: 6 epochs at T=35", "",
            "The recipe's whole budget, seed 1 only (about an hour a run here), DNI (cDNI) "
            "diagnosed every 100 updates, and plain TBPTT beside it:", "",
            "    dni-rnn train ptb-word-small --out runs/word6-cdni/s1 --set train.seed=1 --set "
            "train.threads=1 --set train.diagnose_every=100",
            "    dni-rnn train ptb-word-small --out runs/word6-plain/s1 --set train.seed=1 --set "
            "train.threads=1 --set dni.method=bptt",
            "    python experiments/cosine_csv.py runs/word6-cdni/s1 runs/word6-plain/s1 --out "
            f"docs/results/{name}", ""]
    rows = read(name)
    if rows is None:
        return "\n".join(text + [pending(name)])
    body = []
    for r in sorted(rows, key=lambda r: r["method"]):
        dni = r["method"] != "bptt"
        body.append(["DNI (cDNI)" if dni else "plain TBPTT", f"{float(r['best']):.2f}",
                     f"{float(r['test']):.2f}",
                     f"{float(r['cos_k1']):.3f}" if dni else "-",
                     f"{float(r['norm_ratio_k1']):.2f}" if dni else "-",
                     f"{100 * float(r['capped']):.0f}%" if dni and r.get("capped") else "-",
                     int(r["recoveries"] or 0) if dni else "-",
                     f"{float(r['tokens_per_s']):,.0f}"])
    return "\n".join(text + [
        "Perplexity (best validation, test on the best checkpoint); `cos_k1`, length and the "
        "streams the cap scaled down are means over the second half; tokens/s with two or "
        "three runs on 2 CPU cores, torch 2.13.0+cpu, one thread each:", "",
        table(["method", "valid", "test", "cos_k1", "length", "capped", "recoveries",
               "tokens/s"], body), "",
        "Plain TBPTT's best checkpoint (epoch 4; without dropout it overfits after) scores "
        "358.33 on the test split against 172.88 on valid; its last checkpoint (epoch 6, valid "
        "178.28) scores 177.95 on test (`dni-rnn evaluate runs/word6-plain/s1/last.pt`). No "
        "other run shows a gap between valid and test of that size; not investigated. DNI's "
        "validation perplexity was still falling at the 6th epoch (248.56, 191.01, 166.92, "
        "155.07, 149.54, 146.73); plain TBPTT's was 265.73, 207.85, 181.83, 172.88, 189.18, "
        "178.28.", ""])


def synth_size_table(rows, plain, plain_speed, metric, fmt, model_params, earlier=None):
    """Lines of a synthesizer-size table: plain TBPTT's test metric on seeds 1 and 2 (and an
    `earlier` (label, {seed: metric}) row), then each synthesizer by its parameter count:
    test metric, cos_k1 and mean tokens/s."""
    speed = lambda rs: f"{statistics.mean(float(r['tokens_per_s']) for r in rs):,.0f}"
    by_seed = lambda values, form: " / ".join(form(values[s]) if s in values else "-"
                                              for s in (1, 2))
    seeds = lambda rs, f, form: by_seed({int(r["seed"]): float(r[f]) for r in rs}, form)
    body = [["plain TBPTT", "-", by_seed(plain, fmt.format), "-",
             f"{plain_speed:,.0f}" if plain_speed else "-"]]
    if earlier:
        body.append([earlier[0], "-", by_seed(earlier[1], fmt.format), "-", "-"])
    sizes = {r["synth"]: int(r["synth_params"]) for r in rows}
    for synth in sorted(sizes, key=sizes.get):
        rs = [r for r in rows if r["synth"] == synth]
        body.append([synth, f"{sizes[synth] / 1e6:.2f}M", seeds(rs, "test", fmt.format),
                     seeds(rs, "cos_k1", "{:.3f}".format), speed(rs)])
    return [f"{metric[0].upper() + metric[1:]} and `cos_k1` per seed (seed 1 / seed 2); "
            "tokens/s is the mean of the two runs, the diagnosis included (plain TBPTT's runs "
            f"had none; compare speeds in docs/benchmarks.md instead). The model has "
            f"{model_params} parameters; {CPU}:", "",
            table(["synthesizer", "parameters", metric, "cos_k1", "tokens/s"], body), "",
            recoveries(rows), ""]


# copy-task sweeps whose cos_k1 was measured at the boundaries with a future gradient only
REDIAGNOSED = {"copy-cdni-256-20k.csv", "copy-cdni-products8-20k.csv"}


def cos_rule(name):
    """How a copy-task CSV's cos_k1 was measured (docs/dni.md, point 14)."""
    if name in REDIAGNOSED:
        return ("`cos_k1` is the mean over the boundaries with a future gradient (the "
                "diagnosis since 2026-12-04).")
    return ("`cos_k1` here counts the boundaries without a future gradient (no answer in the "
            "next chunk) as 0, as the diagnosis did before 2026-12-04, and is biased low by "
            "their share (docs/dni.md, point 14).")


def versus_plain(rows, method, label, name):
    """Lines under a copy-task section: the longest length per seed over T, plain TBPTT
    against `method` (with its cos_k1), and the count of wins."""
    best = by_method_T(rows, "best")
    cos = by_method_T(rows, "cos_k1")
    body, pairs = [], []
    for T in sorted({k[1] for k in best}):
        plain, other = best.get(("bptt", T), {}), best.get((method, T), {})
        body.append([f"T={T}", per_seed(plain, lambda v: str(int(v))),
                     per_seed(other, lambda v: str(int(v))),
                     per_seed(cos.get((method, T), {}),
                              lambda v: f"{v:.2f}" if v is not None else "-")])
        pairs += [(other[s], plain[s]) for s in other if s in plain]
    won, lost = sum(a > b for a, b in pairs), sum(a < b for a, b in pairs)
    return ["Longest length solved per seed (seed 1 / seed 2):", "",
            table(["T", "plain TBPTT", label, f"{label} cos_k1"], body), "",
            f"{label} against plain TBPTT at the same T and seed: longer on {won}, equal on "
            f"{len(pairs) - won - lost}, shorter on {lost} of {len(pairs)}. "
            + recoveries(rows) + " " + cos_rule(name), ""]


ZAREMBA = {"valid": 120.7, "test": 114.5}  # Zaremba et al. 2014, Table 1, small, non-regularized


def zaremba_label(run):
    return f"{METHOD_NAMES[run['method']]} T={run['T']}"


def section_zaremba():
    name = "zaremba-small.csv"
    text = ["## A published number: Zaremba et al. 2014, small", "",
            "`ptb-word-zaremba-small`: the paper's small model and schedule (2x200 LSTM, no "
            "dropout, batch 20, T=20, SGD halving the learning rate each epoch after the 4th, "
            "13 epochs, uniform init 0.1, tested with one stream; lr 20 and clip 0.25 on our "
            "mean loss are the paper's lr 1 and clip 5 on the summed loss), seed 1, on "
            f"{CPU}. Plain TBPTT at the paper's T=20, and plain TBPTT and DNI (the "
            "library's DNI defaults, the synthesizer on its own Adam at 1e-3) at T=5 and "
            "T=10 in the same recipe:", "",
            "    dni-rnn train ptb-word-zaremba-small --set train.threads=1 --out "
            "runs/zaremba/bptt-T20-s1",
            "    dni-rnn train ptb-word-zaremba-small --set train.truncation=5 "
            "--set train.threads=1 --out runs/zaremba/bptt-T5-s1",
            "    dni-rnn train ptb-word-zaremba-small --set dni.method=dni "
            "--set train.truncation=5 --set train.threads=1 --out runs/zaremba/dni-T5-s1",
            "    # and the same two with train.truncation=10, out runs/zaremba/*-T10-s1",
            "    python experiments/run_csv.py runs/zaremba/*-s1 --out docs/results/" + name
            + " --plot docs/figures/zaremba-small", "",
            f"The paper: {ZAREMBA['valid']} valid / {ZAREMBA['test']} test perplexity "
            "(TensorFlow's reproduction: 115.9 test). `ptb-word-small` (Adam, T=35, 6 epochs) "
            "is not that recipe: with sg-push (its DNI until 2026-12-04) it reached test 143.90 "
            "(docs/dni.md), and "
            "plain TBPTT with it, on the code of issue 10's report, best valid 172.88.", ""]
    rows = read(name)
    if rows is None:
        return "\n".join(text) + "\n" + pending(name)
    runs = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    order = sorted(runs, key=lambda k: (-int(runs[k][0]["T"]), runs[k][0]["method"] != "bptt"))
    body, tests = [], {}
    for run in order:
        rs, first = runs[run], runs[run][0]
        best = min(float(r["valid"]) for r in rs)
        if first["test"]:
            test = float(first["test"])
            tests[(first["method"], int(first["T"]))] = test
            hours = f"{float(first['elapsed_s']) / 3600:.1f}"
            vs = f"{100 * (test - ZAREMBA['test']) / ZAREMBA['test']:+.1f}%"
            test = f"**{test:.2f}**"
        else:
            test, hours, vs = "not finished", "", ""
        body.append([zaremba_label(first), f"`{run}`", len(rs), f"{best:.2f}", test, vs, hours])
    text += [table(["run", "directory", "epochs", "best valid ppl", "test ppl",
                    "test against the paper", "hours"], body)]
    paired = sorted(T for m, T in tests if m == "dni" and ("bptt", T) in tests)
    for T in paired:
        text.append(f"\nAt T={T}: test perplexity {tests[('dni', T)]:.2f} with DNI, "
                    f"{tests[('bptt', T)]:.2f} with plain TBPTT, a gain of "
                    f"{gain(tests[('bptt', T)], tests[('dni', T)])} for DNI (one seed).")
    if len(paired) > 1:
        text.append("\nOne seed per run, and the seed alone moves a PTB word model's test "
                    "perplexity by several percent (the tables above): in this SGD recipe DNI "
                    "with the library's defaults is equal to plain TBPTT, not better. Its "
                    "injection stays at 2-7% of the real gradient's norm (`|g^|/|g|` in the "
                    "logs), with a cosine of -0.01 to +0.06 with its target.")
    epochs = sorted({int(r["epoch"]) for r in rows})
    lr = {int(r["epoch"]): f"{float(r['lr']):g}" for r in rows}
    valid = {(run, int(r["epoch"])): f"{float(r['valid']):.2f}" for run in order for r in runs[run]}
    text += ["", "Validation perplexity after each epoch:", "",
             table(["epoch", "lr"] + [zaremba_label(runs[run][0]) for run in order],
                   [[e, lr[e]] + [valid.get((run, e), "") for run in order] for e in epochs]),
             ""]
    text += figures("zaremba-small")
    return "\n".join(text)


def section_speed():
    name = "bench-cpu-quiet.csv"
    command = ("python bench/bench_tbptt.py --models word200,char --seconds 2 --rounds 5 "
               "--malloc keep --threads 2")
    text = ["## Throughput", "",
            "Tokens per second against the pytorch/examples TBPTT loop, interleaved in one run "
            "(medians of 5 rounds); 2 CPU cores, torch 2.13.0+cpu, 2 threads, every other job "
            "on the machine paused, 2026-11-28; profile and caveats in docs/benchmarks.md:",
            "", f"    {command}", ""]
    rows = read(name)
    if rows is None:
        return "\n".join(text) + pending(name)
    body = [[r["model"], r["T"], r["loop_tok_s"], f"{r['runner']}x", f"{r['dni_free']}x",
             f"{r['dni_l1']}x", f"{r['dni_l05']}x"] for r in rows]
    text += [table(["model", "T", "loop tok/s", "runner", "DNI lambda = beta",
                    "DNI lambda = 1", "DNI lambda = 0.5"], body), ""]
    return "\n".join(text)


def figures(stem):
    """Links to the committed plots of a sweep (docs/figures/STEM-*.png)."""
    found = sorted((ROOT / "docs" / "figures").glob(f"{stem}-*.png"))
    if not found:
        return []
    return ["Plots: " + ", ".join(f"[{f.stem[len(stem) + 1:].replace('_', ' ')}](figures/{f.name})"
                                  for f in found) + ".", ""]


def render():
    head = ["# Results", "",
            "Generated by `python experiments/results.py` from the CSVs in `docs/results/`; "
            "`python experiments/results.py --check` (run by the test suite) fails when this "
            "file and the CSVs disagree. Every table sits under the command that made it.", "",
            "What DNI buys, as measured here: on PTB words an equal test perplexity with the "
            "library's state-only defaults (`ptb-word-small` from 2026-12-04 to 2026-12-05), "
            "and a lower one at T = 5 to 20 on every seed and an equal one at T = 35 with the "
            "capped raw push the recipe shipped as DNI until 2026-12-04 (now `dni.method=sg-push`: it does not predict the "
            "future gradient); on PTB characters a slightly lower bpc at every T on both seeds; "
            "on the 1-bit demo a longer solved length on every seed; on the 8-bit copy tasks "
            "mostly the same length or less with the recipes' DNI; a longer one on both seeds "
            "when the synthesizer also reads the targets after each boundary (cDNI; below; "
            "why: docs/dni.md): at T = 3 to 5 on repeat copy and at every T on copy with "
            "20,000 updates (there two to five times plain TBPTT's length at T = 3 to 5), with the "
            "synthetic gradient's cosine with the true future gradient at 0.27 to 0.45 on copy "
            "(0.37 to 0.45 at T = 2 and 3; at least 0.30 on both seeds at T = 2, 3 and 5 when it "
            "also reads products of state and targets, `dni.products=8`) and 0.39 to 0.43 on "
            "repeat copy (there under the "
            "diagnosis before 2026-12-04, which biased it low); and with "
            "BP(lambda) a longer one at T = 4 on both seeds, on copy and on repeat copy, and in "
            "BP(lambda)'s own copy-repeat setting at T = 1 the longest stage of every online "
            "method on both seeds. Plain "
            "TBPTT reproduces Zaremba et al.'s small model. On PTB, cDNI reading the next five "
            "tokens predicts the future gradient (cosine 0.27 on characters and 0.37-0.41 on "
            "words at T = 5, 0.29-0.35 on words at T = 35) and beats plain TBPTT on every seed "
            "measured: both character seeds at T = 5, four word seeds at T = 5 with beta 0.05, "
            "and three word seeds at `ptb-word-small`'s T = 35, where it is the recipe's DNI "
            "now (6-17% lower test perplexity after one epoch). No run diverged.", ""]
    parts = [section_words(), section_chars(), section_copy(),
             section_cdni("copy", 10000, "runs/compare-copy-cdni"),
             section_cdni("copy", 10000, "runs/compare-copy-cdni256", chunks=256,
                          plain="runs/compare-copy-cdni"),
             section_cdni("copy", 20000, "runs/compare-copy-cdni256-20k", chunks=256,
                          plain="runs/compare-copy-cdni-20k", name="copy-cdni-256-20k.csv",
                          plain_sweep=True),
             section_cdni("repeat-copy", 20000, "runs/compare-repeat-copy-cdni-20k"),
             section_cdni("repeat-copy", 20000, "runs/compare-repeat-copy-cdni256-20k",
                          chunks=256, plain="runs/compare-repeat-copy-cdni-20k"),
             section_cdni_aux(), section_cdni_products(), section_bplambda(),
             section_bplambda("repeat-copy", "runs/compare-repeat-copy-bplambda",
                              "runs/compare-repeat-copy-cdni"),
             section_bplambda_char(), section_their_copy_repeat(), section_char_synth(),
             section_word_synth(), section_lm_cdni(), section_word_T35_cdni(),
             section_word_6_epochs(),
             section_zaremba(), section_speed()]
    return "\n".join(head) + "\n" + "\n".join(parts).rstrip() + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} differs from what the CSVs give; run python experiments/results.py",
                  file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
