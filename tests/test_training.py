"""The training loop in-process: bit-exact resume, evaluation, plateau decay, compare."""
import csv as csv_module
import json
import math

import pytest
import torch

from dni_rnn import checkpoint as ckpt
from dni_rnn.compare import sweep
from dni_rnn.config import ConfigError, load_recipe
from dni_rnn.tbptt import TBPTTRunner
from dni_rnn.training import evaluate_checkpoint, train
from helpers import STATE_ONLY_DNI, run_records

# a tiny word LM that still exercises everything a resume must restore: dropout (torch
# RNG), random chunk lengths (the schedule's generator), DNI (synthesizer + its own
# optimizer), an epoch boundary (100 steps per stream, ~12 chunks) and the carried state
TINY_LM = ["model.embed_dim=16", "model.hidden_dim=16", "model.dropout=0.2",
           "train.random_truncation=true", "train.truncation=8", "dni.synth_lr=1e-3",
           "data.train_tokens=2000", "data.valid_tokens=600", "data.test_tokens=600",
           "train.epochs=5", "train.max_steps=16", "train.eval_interval=5",
           "train.log_interval=1", "train.progress=false"]
TINY_COPY = ["model.hidden_dim=16", "data.batch_size=4", "task.eval_sequences=8",
             "train.truncation=3", "train.max_steps=16", "train.eval_interval=5",
             "train.log_interval=1", "train.progress=false", "task.threshold=100"]


class Interrupt(Exception):
    pass


def _kill_at(monkeypatch, step):
    """Make the runner raise KeyboardInterrupt before its `step`-th chunk (a kill)."""
    original = TBPTTRunner.train_chunk

    def chunk(self, *a, **k):
        if self.step + 1 == step:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(TBPTTRunner, "train_chunk", chunk)


@pytest.mark.parametrize("recipe, overrides", [
    ("ptb-word-small-smoke", TINY_LM),
    ("copy-smoke", TINY_COPY),
    ("repeat-copy-smoke", TINY_COPY),
    ("copy-smoke", TINY_COPY + ["dni.replay=2", "dni.replay_chunks=3"]),
    ("copy-smoke", TINY_COPY + ["dni.refit=1e-3", "dni.synth_layers=0", "dni.replay_chunks=3"]),
])
def test_resume_after_a_kill_is_bit_exact(recipe, overrides, ptb_dir, tmp_path, monkeypatch):
    data = str(ptb_dir.parent)
    whole = train(load_recipe(recipe, overrides), out_dir=tmp_path / "whole", data_dir=data,
                  quiet=True)
    _kill_at(monkeypatch, 13)  # killed after the checkpoint of step 10
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe(recipe, overrides), out_dir=tmp_path / "cut", data_dir=data, quiet=True)
    monkeypatch.undo()
    assert ckpt.load(tmp_path / "cut" / "last.pt")["runner"]["step"] == 10
    again = train(load_recipe(recipe, overrides), out_dir=tmp_path / "cut", resume=True,
                  data_dir=data, quiet=True)
    a, b = run_records(tmp_path / "whole"), run_records(tmp_path / "cut")
    assert [r["step"] for r in a] == list(range(1, 17)) == [r["step"] for r in b]
    assert a == b  # losses, synthesizer loss, cosine, norms: equal to the last bit
    assert run_records(tmp_path / "whole", "eval") == run_records(tmp_path / "cut", "eval")
    for key in ("best_step", "steps", "tokens"):
        assert whole[key] == again[key]
    if recipe.startswith("ptb"):
        assert whole["test_ppl"] == again["test_ppl"]
        assert a[-1]["epoch"] >= 1  # the run crossed an epoch boundary


def test_sg_push_trains_exactly_the_raw_capped_dni_it_renames(ptb_dir, tmp_path):
    data = str(ptb_dir.parent)
    base = TINY_LM + ["train.max_steps=6", "dni.synth_lr=0"]  # the model's Adam, as shipped
    push = train(load_recipe("ptb-word-small-smoke", base + ["dni.method=sg-push"]),
                 out_dir=tmp_path / "push", data_dir=data, quiet=True)
    raw = train(load_recipe("ptb-word-small-smoke", base + STATE_ONLY_DNI + [
        "dni.target_scale=raw", "dni.sg_scale=0.0125"]), out_dir=tmp_path / "raw",
        data_dir=data, quiet=True)
    a, b = run_records(tmp_path / "push"), run_records(tmp_path / "raw")
    assert a == b and any(r["synth_loss"] for r in a)  # every loss and norm, to the last bit
    assert (push["method"], raw["method"]) == ("sg-push", "dni")
    assert push["test_ppl"] == raw["test_ppl"]
    pa, pb = ckpt.load(tmp_path / "push" / "last.pt"), ckpt.load(tmp_path / "raw" / "last.pt")
    for key in pa["model"]:
        assert torch.equal(pa["model"][key], pb["model"][key])


def test_resume_refuses_another_model(ptb_dir, tmp_path):
    data = str(ptb_dir.parent)
    overrides = TINY_LM + ["train.max_steps=5"]
    train(load_recipe("ptb-word-small-smoke", overrides), out_dir=tmp_path, data_dir=data,
          quiet=True)
    with pytest.raises(ckpt.CheckpointError, match="model.hidden_dim=16"):
        train(load_recipe("ptb-word-small-smoke", overrides + ["model.hidden_dim=24"]),
              out_dir=tmp_path, resume=True, data_dir=data, quiet=True)
    from dni_rnn.config import ConfigError
    with pytest.raises(ConfigError, match="already holds a run"):
        train(load_recipe("ptb-word-small-smoke", overrides), out_dir=tmp_path, data_dir=data,
              quiet=True)


def test_summary_evaluate_and_plateau(ptb_dir, tmp_path):
    data = str(ptb_dir.parent)
    # lr so large that validation gets worse: the plateau rule must halve it, early stop
    cfg = load_recipe("ptb-word-small-smoke", TINY_LM + [
        "optim.lr=0.5", "optim.plateau_factor=0.5", "train.early_stop=2", "train.max_steps=40",
        "train.eval_interval=2", "train.random_truncation=false"])
    s = train(cfg, out_dir=tmp_path, data_dir=data, quiet=True)
    evals = run_records(tmp_path, "eval")
    valid = [r for r in evals if r["split"] == "valid"]
    assert s["stopped_early"] and s["steps"] < 40
    assert any(b["lr"] < a["lr"] for a, b in zip(valid, valid[1:]))
    best = min(valid, key=lambda r: r["loss"])
    assert s["best_valid_loss"] == best["loss"] and s["best_step"] == best["step"]
    assert s["best_valid_ppl"] == pytest.approx(math.exp(best["loss"]))
    test = [r for r in evals if r["split"] == "test"][0]
    r = evaluate_checkpoint(tmp_path, split="test", data_dir=data)
    assert r["loss"] == pytest.approx(test["loss"], rel=1e-6) == pytest.approx(s["test_loss"])
    r = evaluate_checkpoint(tmp_path / "best.pt", split="valid", data_dir=data)
    assert r["loss"] == pytest.approx(best["loss"], rel=1e-6)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == cfg.to_dict()
    blob = torch.load(tmp_path / "last.pt", weights_only=True)
    assert blob["vocab"]["tokens"][0] == "<eos>" and blob["synthesizer"] is not None


def test_compare_writes_table_csv_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = load_recipe("copy-smoke", TINY_COPY)
    lines = []
    rows = sweep(cfg, [2, 3], ["bptt", "dni"], [1, 2], 240, tmp_path, points=3, say=lines.append)
    assert [(r["method"], r["T"]) for r in rows] == [("bptt", 2), ("bptt", 3), ("dni", 2), ("dni", 3)]
    assert all(r["seeds"] == 2 and r["tokens"] >= 240 for r in rows)
    # same tokens, so shorter chunks make more updates (chunks also end at episode ends)
    assert rows[0]["updates"] == 240 // (2 * 4) and rows[1]["updates"] < rows[0]["updates"]
    assert rows[0]["tokens"] == rows[2]["tokens"] and rows[1]["tokens"] == rows[3]["tokens"]
    md = (tmp_path / "results.md").read_text()
    assert "| dni | 3 | 2 |" in md and "longest solved" in md
    csv = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv) == 5 and csv[0].startswith("metric,method,T")
    for name in ("valid_vs_tokens.png", "valid_vs_updates.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert len(list(tmp_path.glob("*-T*-s*/summary.json"))) == 8
    runs = list(csv_module.DictReader(open(tmp_path / "runs.csv")))
    assert [(r["method"], r["T"], r["seed"]) for r in runs][:3] == [
        ("bptt", "2", "1"), ("bptt", "2", "2"), ("bptt", "3", "1")]
    assert len(runs) == 8 and all(r["metric"] == "length" and int(r["tokens"]) >= 240 for r in runs)
    lines.clear()
    sweep(cfg, [2], ["dni"], [1], 240, tmp_path, points=3, say=lines.append)  # reused
    assert "reused" in lines[0]
    # how a run was executed (threads, progress bar) does not make it another run ...
    lines.clear()
    cfg.train.threads, cfg.train.progress = 1, not cfg.train.progress
    sweep(cfg, [2], ["dni"], [1], 240, tmp_path, points=3, say=lines.append)
    assert "reused" in lines[0]
    # --report trains nothing: the finished runs' tables, and the others named
    lines.clear()
    rows = sweep(cfg, [2, 3, 5], ["dni"], [1, 2], 240, tmp_path, points=3, say=lines.append,
                 report=True)
    assert [(r["T"], r["seeds"]) for r in rows] == [(2, 2), (3, 2)]
    left_out = next(x for x in lines if x.startswith("--report"))
    assert "2 of 6 runs not finished" in left_out and "dni-T5-s1" in left_out
    assert not (tmp_path / "dni-T5-s1").exists()
    with pytest.raises(ConfigError, match="no finished run"):
        sweep(cfg, [7], ["dni"], [1], 240, tmp_path, points=3, say=lines.append, report=True)
    # ... but what it computes does
    cfg.optim.lr *= 2
    with pytest.raises(ConfigError, match="another configuration"):
        sweep(cfg, [2], ["dni"], [1], 240, tmp_path, points=3, say=lines.append)


def test_compare_on_an_update_budget_gives_every_T_the_same_updates(tmp_path):
    cfg = load_recipe("copy-smoke", TINY_COPY)
    rows = sweep(cfg, [2, 3], ["bptt"], [1], 0, tmp_path, points=3, say=lambda _: None,
                 budget_updates=12)
    assert [r["updates"] for r in rows] == [12, 12]
    assert "training updates per run" in (tmp_path / "results.md").read_text()
    with pytest.raises(ConfigError, match="not both"):
        sweep(cfg, [2], ["bptt"], [1], 100, tmp_path, budget_updates=12)


def test_compare_in_parallel_jobs_equals_one_at_a_time(tmp_path, monkeypatch):
    """--jobs 2: two runs at once in spawned processes, one thread each; the same summaries
    as one run at a time with one thread, and a progress line per finished job."""
    monkeypatch.setattr("dni_rnn.compare.os.cpu_count", lambda: 2)  # 2 cores / 2 jobs: 1 thread
    cfg = load_recipe("copy-smoke", TINY_COPY + ["train.threads=1"])
    one, two = [], []
    rows1 = sweep(cfg, [2], ["bptt", "dni"], [1], 240, tmp_path / "one", points=3,
                  say=one.append)
    rows2 = sweep(cfg, [2], ["bptt", "dni"], [1], 240, tmp_path / "two", points=3,
                  say=two.append, jobs=2, progress_every=0.5)
    strip = lambda r: {k: v for k, v in r.items() if k != "tokens_per_s"}
    assert [strip(r) for r in rows1] == [strip(r) for r in rows2]
    assert "2 at a time" in two[0] and sum("done in" in x for x in two) == 2


def test_zaremba_recipe_halves_the_lr_each_epoch_and_initialises_uniformly(ptb_dir, tmp_path):
    """ptb-word-zaremba-small: SGD, plain TBPTT, the lr halved after each epoch from
    optim.decay_after on (the smoke variant: from the 1st), every weight in [-0.1, 0.1]."""
    from dni_rnn.tasks import build_task
    cfg = load_recipe("ptb-word-zaremba-small-smoke", ["train.progress=false",
                                                       "data.train_tokens=2000"])
    cfg.data.data_dir = str(ptb_dir.parent)
    task = build_task(cfg)
    model = task.build_model()
    assert all(float(p.detach().abs().max()) <= 0.1 for p in model.parameters())
    assert max(float(p.detach().abs().max()) for p in model.parameters()) > 0.09
    s = train(cfg, out_dir=tmp_path, quiet=True)
    assert s["method"] == "bptt" and s["epochs"] == 3
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in evals if r.get("split") == "valid"] == [10.0, 5.0, 2.5]
