"""docs/RESULTS.md is what experiments/results.py makes of the committed CSVs."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location("results", ROOT / "experiments" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_doc_matches_the_csvs():
    results = load_generator()
    assert results.main(["--check"]) == 0, "run python experiments/results.py and commit"


def test_the_generator_reads_a_sweep_csv(tmp_path, monkeypatch):
    """A committed runs.csv turns into the per-seed table and the paper's comparison."""
    results = load_generator()
    rows = ["method,T,seed,metric,best,final,test,updates,tokens,tokens_per_s,elapsed_s,recoveries"]
    for m, base in (("bptt", 2.0), ("dni", 1.9)):
        for T in (2, 4):
            for seed in (1, 2):
                rows.append(f"{m},{T},{seed},bpc,{base},{base},{base - T / 100 + seed / 1000},"
                            f"10,100,50,3600,0")
    (tmp_path / "ptb-char-truncations.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    text = results.section_chars()
    assert "| T=2 | 1.981 / 1.982 | 1.881 / 1.882 |" in text
    assert "| T=2 | 2 of 2 seeds | -0.100 | 2 of 2 seeds |" in text  # 1.881 <= plain T=4 1.961
    assert "8 runs, 8.0 hours" in text


def test_run_csv_takes_each_epochs_rate_and_the_runs_test(tmp_path):
    """experiments/run_csv.py: one row per validation, with the lr its updates used (an
    epoch's closing train record already carries the decayed rate) and the run's test."""
    spec = importlib.util.spec_from_file_location("run_csv", ROOT / "experiments" / "run_csv.py")
    run_csv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_csv)
    run = tmp_path / "bptt-T20-s1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "recipe": "ptb-word-zaremba-small", "data": {"corpus": "ptb-word"},
        "dni": {"method": "bptt"}, "train": {"truncation": 20, "seed": 1}}))
    records = [{"kind": "train", "step": 5, "lr": 20.0},
               {"kind": "train", "step": 10, "lr": 10.0},  # closes epoch 1, decayed
               {"kind": "eval", "split": "valid", "step": 10, "epoch": 1, "updates": 10,
                "tokens": 400, "lr": 10.0, "ppl": 150.0},
               {"kind": "train", "step": 15, "lr": 10.0},
               {"kind": "eval", "split": "valid", "step": 20, "epoch": 2, "updates": 20,
                "tokens": 800, "lr": 5.0, "ppl": 140.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({"metric": "ppl", "test_ppl": 130.04,
                                                  "elapsed_s": 3600.0}))
    out = tmp_path / "rows.csv"
    assert run_csv.main([str(run), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["epoch"], r["lr"], r["valid"], r["test"]) for r in rows] == [
        ("1", "20.0", "150.0", "130.04"), ("2", "10.0", "140.0", "130.04")]
    assert run_csv.main([str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_the_zaremba_section_puts_every_run_side_by_side(tmp_path, monkeypatch):
    """zaremba-small.csv: one summary row per run (T=20 first, plain before DNI), an
    epoch-by-run table with gaps where a run has not got that far, and the DNI-vs-plain
    sentence only for a T where both runs finished."""
    results = load_generator()
    head = "recipe,method,T,seed,epoch,updates,tokens,lr,valid,test,metric,elapsed_s,run"
    rows = [head]
    for method, T, epochs, test, elapsed in (("dni", 5, 2, "", ""),
                                             ("bptt", 20, 3, "113.5", "7200"),
                                             ("bptt", 5, 3, "130.0", "3600")):
        for e in range(1, epochs + 1):
            rows.append(f"z,{method},{T},1,{e},{e},{e},{20 / e},{200 - e - (T == 5)},{test},"
                        f"ppl,{elapsed},{method}-T{T}-s1")
    (tmp_path / "zaremba-small.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    text = results.section_zaremba()
    assert "| plain TBPTT T=20 | `bptt-T20-s1` | 3 | 197.00 | **113.50** | -0.9% | 2.0 |" in text
    assert "| DNI T=5 | `dni-T5-s1` | 2 | 197.00 | not finished |  |  |" in text
    assert text.index("bptt-T20-s1") < text.index("bptt-T5-s1") < text.index("dni-T5-s1")
    assert "| epoch | lr | plain TBPTT T=20 | plain TBPTT T=5 | DNI T=5 |" in text
    assert "| 3 | 6.66667 | 197.00 | 196.00 |  |" in text
    assert "a gain of" not in text
    rows = [r.replace(",,ppl,,dni", ",120.0,ppl,3600,dni") for r in rows]
    (tmp_path / "zaremba-small.csv").write_text("\n".join(rows) + "\n")
    text = results.section_zaremba()
    assert "At T=5: test perplexity 120.00 with DNI, 130.00 with plain TBPTT, a gain of +7.7%" in text


def test_run_csv_plots_the_validation_curves(tmp_path):
    """run_csv.py --plot STEM writes compare's two plots next to STEM."""
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("run_csv", ROOT / "experiments" / "run_csv.py")
    run_csv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_csv)
    table = [{"run": f"{m}-T5-s1", "method": m, "T": 5, "tokens": 100 * e, "updates": 10 * e,
              "valid": 200.0 - e - (m == "dni"), "metric": "ppl"}
             for m in ("bptt", "dni") for e in (1, 2, 3)]
    written = run_csv.plot(table, tmp_path / "figs" / "z")
    assert sorted(p.name for p in written) == ["z-valid_vs_tokens.png", "z-valid_vs_updates.png"]
    assert all(p.parent == tmp_path / "figs" and p.stat().st_size > 1000 for p in written)
