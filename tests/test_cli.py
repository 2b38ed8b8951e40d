"""`python -m dni_rnn` end to end: every recipe's smoke variant, evaluate, compare, and the
one-line errors for what a user gets wrong."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, shared_data_root
from dni_rnn.cli import main

from helpers import SMOKE  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One corpus cache for all runs of this module: PTB is tokenised once per level."""
    return tmp_path_factory.mktemp("cli-cache")


def cli(*args, cache=None, env=None, timeout=180):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if cache is not None:
        e["DNI_RNN_CACHE_DIR"] = str(cache)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "dni_rnn", *map(str, args)], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(p, *words):
    assert p.returncode != 0, p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dni-rnn: error: "), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    for w in words:
        assert w in lines[0], lines[0]


def data_dir():
    d = shared_data_root()
    if not (d / "ptb" / "ptb.train.txt").exists():
        pytest.skip(f"Penn Treebank files not found in {d}")
    return d


def test_decoupled_is_a_command_with_its_own_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["decoupled", "--help"])
    assert e.value.code == 0 and "--updates" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["decoupled", "--no-such-option"])
    assert e.value.code == 2 and "--no-such-option" in capsys.readouterr().err


def test_recipes_lists_every_shipped_recipe():
    p = cli("recipes")
    assert p.returncode == 0, p.stderr
    names = [line.split()[0] for line in p.stdout.splitlines()]
    for name in SMOKE + ["ptb-word-small", "ptb-word-medium", "ptb-char", "copy",
                         "repeat-copy", "demo"]:
        assert name in names
    assert all(len(line.split(None, 1)) == 2 for line in p.stdout.splitlines())


@pytest.mark.parametrize("recipe", SMOKE)
def test_smoke_recipe_trains_end_to_end(recipe, tmp_path, cache):
    extra = ["--data-dir", data_dir()] if recipe.startswith("ptb") else []
    p = cli("train", recipe, "--out", tmp_path / "run", "--set", "train.progress=false", *extra,
            cache=cache)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    run = tmp_path / "run"
    for name in ("best.pt", "last.pt", "config.toml", "config.json", "metrics.jsonl",
                 "summary.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] > 0 and summary["recipe"] == recipe
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(r["cosine"] is not None for r in train[1:])  # DNI is on
    assert any(r["kind"] == "eval" for r in records)
    assert "step" in p.stdout and "run directory" in p.stdout
    if recipe.startswith("ptb-word"):
        assert "test ppl" in p.stdout and summary["test_ppl"] > 1
    elif recipe == "ptb-char-smoke":
        assert "test bpc" in p.stdout and 0 < summary["test_bpc"] < 10
    elif recipe.startswith("repeat-copy-bplambda"):  # R and N take turns: stages
        assert "last stage solved" in p.stdout and "stage 1 (N=1, R=1)" in p.stdout
    else:
        assert "longest length solved" in p.stdout


def test_bptt_is_one_set_away_then_evaluate(tmp_path, capsys, cache, monkeypatch):
    monkeypatch.setenv("DNI_RNN_CACHE_DIR", str(cache))
    run = tmp_path / "run"
    assert main(["train", "ptb-word-small-smoke", "--set", "dni.method=bptt", "--set",
                 "train.max_steps=2", "--set", "train.eval_interval=2", "--out", str(run),
                 "--data-dir", str(data_dir())]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "bptt"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("cosine") is None for r in records if r["kind"] == "train")
    capsys.readouterr()
    p = cli("evaluate", run, "--json", "--data-dir", data_dir())  # the real console path
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["split"] == "test" and abs(r["ppl"] - summary["test_ppl"]) < 1e-6 * summary["test_ppl"]
    assert main(["evaluate", str(run / "last.pt"), "--split", "valid", "--data-dir",
                 str(data_dir())]) == 0
    assert "valid: ppl" in capsys.readouterr().out


def test_resume_continues_a_stopped_run(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "copy-smoke", "--out", str(run), "--set", "train.eval_interval=3"]
    assert main(base + ["--set", "train.max_steps=6"]) == 0
    assert main(base + ["--set", "train.max_steps=9", "--resume"]) == 0
    assert "resumed at step 6" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert steps == sorted(set(steps)) and steps[-1] == 9


def test_compare_writes_results_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep"
    p = cli("compare", "copy-smoke", "--truncations", "2,3", "--methods", "bptt,dni",
            "--budget-tokens", "512", "--seeds", "1", "--points", "2", "--out", out,
            "--set", "task.eval_sequences=8")
    assert p.returncode == 0, p.stderr
    assert "| dni | 3 |" in p.stdout
    for name in ("results.md", "results.csv", "valid_vs_tokens.png", "valid_vs_updates.png"):
        assert (out / name).is_file(), name


def test_demo_runs_both_methods_and_names_a_winner(tmp_path):
    p = cli("train", "--set", "train.max_steps=30", "--set", "train.eval_interval=10",
            "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    assert "-- bptt" in p.stdout and "-- dni" in p.stdout and "result (T=" in p.stdout
    assert (tmp_path / "bptt" / "summary.json").is_file()
    assert (tmp_path / "dni" / "summary.json").is_file()


# ---- what a user gets wrong: one line on stderr, non-zero exit, no traceback --------------
# Two through the real console entry point; the rest through main() in-process (an uncaught
# exception there fails the test just as a traceback would).

def test_unknown_recipe_in_a_subprocess():
    assert_one_line_error(cli("train", "ptb-word-smal"), "unknown recipe 'ptb-word-smal'",
                          "ptb-word-small")


def test_corrupt_checkpoint_in_a_subprocess(tmp_path):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    assert_one_line_error(cli("evaluate", tmp_path), "corrupt", "best.pt")


def run_main(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.mark.parametrize("args, words", [
    (["train", "copy-smoke", "--set", "model.hiden=3"], ["model.hiden", "hidden_dim"]),
    (["train", "copy-smoke", "--set", "train.truncation=three"], ["train.truncation", "int"]),
    (["train", "copy-smoke", "--set", "dni.method=magic"], ["dni.method", "bptt"]),
    (["train", "copy-smoke", "--set", "truncation=3"], ["section.key"]),
    (["train", "missing.toml"], ["recipe file not found"]),
    (["compare", "copy-smoke", "--truncations", "2,x"], ["--truncations"]),
    (["compare", "copy-smoke", "--methods", "bptt,magic", "--budget-tokens", "10"], ["magic"]),
    (["evaluate", "no/such/run"], ["no such run directory"]),
])
def test_bad_input_gives_one_line(args, words, capsys):
    assert_one_line_error(run_main(capsys, *args), *words)


def test_missing_data_directory(tmp_path, capsys):
    assert_one_line_error(run_main(capsys, "train", "ptb-word-small-smoke", "--data-dir",
                                   tmp_path / "nope", "--out", tmp_path / "run"),
                          "data directory not found")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_main(capsys, "train", "ptb-char-smoke", "--data-dir",
                                   tmp_path / "empty", "--out", tmp_path / "run2"),
                          "ptb.char.train.txt")


def test_corrupt_or_missing_checkpoint(tmp_path, capsys):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 truncated zip")
    assert_one_line_error(run_main(capsys, "evaluate", tmp_path / "last.pt"), "corrupt")
    assert_one_line_error(run_main(capsys, "train", "copy-smoke", "--out", tmp_path, "--resume"),
                          "corrupt")
    (tmp_path / "run").mkdir()
    assert_one_line_error(run_main(capsys, "train", "copy-smoke", "--out", tmp_path / "run",
                                   "--resume"), "no last.pt")


def test_run_directory_not_writable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    assert_one_line_error(run_main(capsys, "train", "copy-smoke", "--out", blocker / "run"),
                          "not writable")
    assert_one_line_error(run_main(capsys, "compare", "copy-smoke", "--budget-tokens", "10",
                                   "--out", blocker / "sweep"), "not writable")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        assert_one_line_error(run_main(capsys, "train", "copy-smoke", "--out", locked / "run"),
                              "not writable")


def test_the_demo_run_twice_starts_afresh_beside_the_first(tmp_path):
    from dni_rnn.app.cli import _fresh_demo_dir
    base = tmp_path / "runs" / "demo"
    assert _fresh_demo_dir(base, resume=False) == base
    base.mkdir(parents=True)
    assert _fresh_demo_dir(base, resume=False) == tmp_path / "runs" / "demo-2"
    (tmp_path / "runs" / "demo-2").mkdir()
    assert _fresh_demo_dir(base, resume=False) == tmp_path / "runs" / "demo-3"
    assert _fresh_demo_dir(base, resume=True) == tmp_path / "runs" / "demo-2"
    env = {"HOME": str(tmp_path)}
    work = tmp_path / "work"
    work.mkdir()
    for _ in range(2):  # through the command, in a fresh working directory
        p = subprocess.run([sys.executable, "-m", "dni_rnn", "demo", "--set",
                            "train.max_steps=10", "--set", "train.eval_interval=5"],
                           cwd=work, capture_output=True, text=True, timeout=180,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                                **env})
        assert p.returncode == 0, p.stderr
    assert "Runs in runs/demo-2." in p.stdout
