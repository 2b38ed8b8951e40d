"""Diagnostics: exact future gradients, an oracle scores cosine 1, training is unchanged."""
import json

import pytest
import torch

import dni_rnn as dni
from dni_rnn import checkpoint as ckpt
from dni_rnn.cli import main
from dni_rnn.config import load_recipe
from dni_rnn.diagnostics import compare, diagnose, future_gradients, mean_reports
from dni_rnn.training import train
from helpers import OracleSynthesizer, chunk_loss, full_bptt, make_problem

EXACT = dict(target_scale="raw", sg_cap=None, guard=False, calibrate=False)


def test_future_gradients_are_those_of_full_bptt():
    model, x, y, state = make_problem(n_steps=12)
    _, values, future = full_bptt(model, x, y, state, 4)   # boundaries at steps 4 and 8
    truths = future_gradients(model, chunk_loss, x[4:], y[4:], values[0], 4, [1, 2])
    for g, ref in zip(truths[2], future[0]):  # two chunks: all of the future
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-12)
    assert not all(torch.allclose(a, b) for a, b in zip(truths[1], truths[2]))
    model.zero_grad(set_to_none=True)  # and no parameter gets a .grad
    future_gradients(model, chunk_loss, x[4:], y[4:], values[0], 4, [1, 2])
    assert all(p.grad is None for p in model.parameters())


def test_an_oracle_scores_cosine_one_at_its_horizon():
    model, x, y, state = make_problem(n_steps=12)
    _, values, future = full_bptt(model, x, y, state, 4)
    runner = dni.TBPTTRunner(model, chunk_loss, None, truncation=4,
                             synthesizer=OracleSynthesizer(values, future), **EXACT)
    r = diagnose(runner, x[4:], y[4:], values[0], 4, [1, 2, 4])
    assert r["cos_k2"] == pytest.approx(1.0, abs=1e-12) and r["relerr_k2"] < 1e-10
    assert r["cos_k1"] < 0.999 and "cos_k4" not in r  # 4 chunks do not fit: left out
    plain = dni.TBPTTRunner(model, chunk_loss, None, truncation=4)
    r0 = diagnose(plain, x[4:], y[4:], values[0], 4, [1, 2])
    assert r0["cos_k2"] == 0.0 and r0["relerr_k2"] == 1.0 and r0["synthetic_norm"] == 0.0


def test_a_zero_future_gradient_is_left_out_not_scored_zero():
    # a boundary whose next chunk carries no loss (a copy episode's pattern phase): its g_1
    # is exactly zero, so the cosine there is undefined and must not pull a mean towards 0
    g_hat = (torch.tensor([[1.0, 2.0]]),)
    report = compare(g_hat, {1: (torch.zeros(1, 2),), 2: (torch.tensor([[2.0, 4.0]]),)})
    assert report["true_norm_k1"] == 0.0 and "cos_k1" not in report and "relerr_k1" not in report
    assert report["cos_k2"] == pytest.approx(1.0) and report["relerr_k2"] == pytest.approx(0.5)
    scored = compare(g_hat, {1: (torch.tensor([[1.0, 0.0]]),)})
    mean = mean_reports([report, scored])
    assert mean["cos_k1"] == pytest.approx(scored["cos_k1"])  # not half of it
    assert mean["cos_k2"] == pytest.approx(1.0) and mean["true_norm_k1"] == pytest.approx(0.5)


TINY = ["model.embed_dim=16", "model.hidden_dim=16", "model.dropout=0.2",
        "train.random_truncation=true", "train.truncation=6", "data.train_tokens=2000",
        "data.valid_tokens=600", "data.test_tokens=600", "train.max_steps=12",
        "train.eval_interval=6", "train.log_interval=1", "train.progress=false",
        "train.diagnose_horizons=1,2,3"]


def train_with_and_without_diagnosis(recipe, overrides, tmp_path, data_dir=None):
    """The records of a run with `train.diagnose_every=2` and of the same run without, after
    checking that diagnosis changed nothing: the same losses and the same final weights."""
    runs = {}
    for every in (0, 2):
        out = tmp_path / f"every{every}"
        train(load_recipe(recipe, overrides + [f"train.diagnose_every={every}"]),
              out_dir=out, data_dir=data_dir, quiet=True)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[every] = (recs, ckpt.load(out / "last.pt"))
    (off, c_off), (on, c_on) = runs[0], runs[2]
    losses = lambda recs: [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]
    assert losses(off) == losses(on)
    for part in ("model", "synthesizer"):
        for k, v in c_off[part].items():
            assert torch.equal(v, c_on[part][k]), k
    return off, on


def test_training_with_diagnostics_is_bit_identical(ptb_dir, tmp_path):
    off, on = train_with_and_without_diagnosis("ptb-word-small-smoke", TINY, tmp_path,
                                               str(ptb_dir.parent))
    diag = [r for r in on if r["kind"] == "diagnose"]
    assert [r["step"] for r in diag] == [2, 4, 6, 8, 10, 12][:len(diag)] and len(diag) >= 4
    assert all(-1 <= r["cos_k1"] <= 1 and r["true_norm_k1"] > 0 for r in diag)
    assert not [r for r in off if r["kind"] == "diagnose"]


def test_copy_episodes_are_diagnosed_at_every_boundary_without_changing_training(tmp_path):
    # T = 2 and N = 2 (episodes of 6 steps): the boundaries at steps 2 and 4 of fresh
    # episodes, every diagnosis, whatever the current episode's position
    base = ["train.truncation=2", "task.start_length=2", "train.max_steps=8",
            "train.progress=false", "train.log_interval=1", "train.diagnose_horizons=1,2"]
    _, on = train_with_and_without_diagnosis("copy-smoke", base, tmp_path)
    diag = [r for r in on if r["kind"] == "diagnose"]
    assert [r["step"] for r in diag] == [2, 4, 6, 8]
    # 4 blocks x boundaries 2 and 4 (at 4, K = 2 does not fit)
    assert all(r["boundaries"] == 8 and -1 <= r["cos_k1"] <= 1 for r in diag)


def test_diagnose_command_on_a_saved_run(ptb_dir, tmp_path, capsys):
    data = str(ptb_dir.parent)
    run = tmp_path / "run"
    train(load_recipe("ptb-word-small-smoke", TINY[:-1] + ["train.diagnose_every=3"]),
          out_dir=run, data_dir=data, quiet=True)
    assert main(["diagnose", str(run), "--horizons", "1,2", "--boundaries", "3",
                 "--data-dir", data]) == 0
    out = capsys.readouterr().out
    assert "cos(g^, g_K)" in out and "3 boundaries" in out
    r = json.loads((run / "diagnose.json").read_text())
    assert r["boundaries"] == 3 and set(r["horizons"]) == {1, 2}
    assert -1 <= r["cos_k2"] <= 1 and r["true_norm_k2"] > 0


def test_streams_that_restart_at_the_boundary_get_no_synthetic_gradient():
    model, x, y, state = make_problem(n_steps=8, batch=3)
    _, values, future = full_bptt(model, x, y, state, 4)
    runner = dni.TBPTTRunner(model, chunk_loss, None, truncation=4,
                             synthesizer=OracleSynthesizer(values, future), **EXACT)
    resets = torch.zeros(4, 3, dtype=torch.bool)
    resets[0, 1] = True  # stream 1 restarts right at the boundary: its future is not s's
    r = diagnose(runner, x[4:], y[4:], values[0], 4, [1], resets)
    assert r["cos_k1"] == pytest.approx(1.0, abs=1e-12)  # the oracle, masked as in training
    resets[0] = True
    assert diagnose(runner, x[4:], y[4:], values[0], 4, [1], resets) == {}


def test_a_short_last_chunk_is_the_whole_future():
    # 10 steps, T = 4: the boundary at step 8 has 2 steps left, one short chunk, as the walk
    # cuts it; g_1 there is the exact future gradient and no K = 2 is claimed
    model, x, y, state = make_problem(n_steps=10)
    _, values, future = full_bptt(model, x, y, state, 4)
    runner = dni.TBPTTRunner(model, chunk_loss, None, truncation=4,
                             synthesizer=OracleSynthesizer(values, future), **EXACT)
    r = diagnose(runner, x[8:], y[8:], values[1], 4, [1, 2])
    assert r["cos_k1"] == pytest.approx(1.0, abs=1e-12) and r["relerr_k1"] < 1e-10
    assert "cos_k2" not in r
