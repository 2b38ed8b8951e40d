"""docs/RESULTS.md is what experiments/results.py makes of the committed CSVs."""
import importlib.util
from pathlib import Path

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
