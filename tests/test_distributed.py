"""Past one machine, tested on 2 CPU processes (gloo on 127.0.0.1, bounded in time).

W = 2 ranks on a global batch B make the very updates of one process on B: float64
runner problems (plain TBPTT, DNI with the defaults, exact DNI with lambda != beta, DNI +
Aux) to 1e-12, recipes through `training.train` to float32 rounding; a resumed 2-rank run
equals an uninterrupted one bit for bit; another world size is refused on resume.
Decoupled training (`decoupled.py`): the two parts in lock-step equal plain TBPTT of the
whole stack in one process; decoupled, part A learns from synthetic gradients, and the
numbers do not depend on how fast part B is.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import dni_rnn as dni
from dni_rnn import checkpoint as ckpt
from dni_rnn import decoupled, distributed
from dni_rnn.config import ConfigError

import distributed_workers as workers
from helpers import STATE_ONLY_DNI, run_records

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TIMEOUT_S = 120
COPY = ["model.hidden_dim=16", "data.batch_size=4", "task.eval_sequences=8",
        "train.truncation=3", "train.max_steps=16", "train.eval_interval=5",
        "train.log_interval=1", "train.progress=false", "task.threshold=100",
        "train.threads=1"]
# a word LM without dropout (each rank draws its own masks) and with random chunk lengths
WORDS = ["model.embed_dim=16", "model.hidden_dim=16", "train.random_truncation=true",
         "train.truncation=8", "dni.synth_lr=1e-3", "data.train_tokens=2000",
         "data.valid_tokens=600", "data.test_tokens=600", "train.epochs=5",
         "train.max_steps=14", "train.eval_interval=5", "train.log_interval=1",
         "train.progress=false", "data.batch_size=4", "data.eval_batch_size=3",
         "train.threads=1"] + STATE_ONLY_DNI  # torchrun has no refit yet
VOCAB = 12
PAIR = dict(truncation=5, embed_dim=8, hidden_dim=8, lr=1e-2, clip=0.0, dtype="float64",
            return_params=True)
PAIRS = [("lockstep", decoupled.Options(mode="lockstep", **PAIR)),
         ("decoupled", decoupled.Options(mode="decoupled", lag=2, **PAIR)),
         ("decoupled-slow-B", decoupled.Options(mode="decoupled", lag=2, slow_upper_s=0.01,
                                                **PAIR))]


def _runs(root, data_dir):
    runs = [("copy", dict(recipe="copy-smoke", overrides=COPY, out_dir=str(root / "copy-2"))),
            ("copy-cut", dict(recipe="copy-smoke", overrides=COPY,
                              out_dir=str(root / "copy-cut"), kill_at=13)),
            ("copy-again", dict(recipe="copy-smoke", overrides=COPY,
                                out_dir=str(root / "copy-cut"), resume=True))]
    if data_dir is not None:
        runs.append(("words", dict(recipe="ptb-word-small-smoke", overrides=WORDS,
                                   out_dir=str(root / "words-2"), data_dir=data_dir)))
    return runs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Everything the 2-rank side of this file needs, in one launch of 2 processes."""
    from conftest import shared_data_root

    root = tmp_path_factory.mktemp("ranks")
    ptb = shared_data_root() / "ptb"
    data_dir = str(ptb.parent) if (ptb / "ptb.train.txt").exists() else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DNI_RNN_CACHE_DIR", str(root / "cache"))
        mp.setenv("OMP_NUM_THREADS", "1")
        out = distributed.launch(workers.everything, 2,
                                 (list(workers.RUNNER_CASES), _runs(root, data_dir), PAIRS,
                                  VOCAB), timeout_s=TIMEOUT_S)
    return root, data_dir, out


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("case", list(workers.RUNNER_CASES))
def test_runner_on_two_ranks_equals_one_process(case, two_ranks):
    _, _, out = two_ranks
    one = workers.runner_problem(distributed.World(), case)
    rank0, rank1 = out[0]["runner"][case], out[1]["runner"][case]
    assert _max_diff(rank0["params"], rank1["params"]) == 0.0  # the ranks never drift apart
    assert _max_diff(one["params"], rank0["params"]) < 1e-12
    assert rank0["losses"] == pytest.approx(one["losses"], abs=1e-12)  # the global loss
    if case != "plain":  # the trigger statistics are global: same targets, same RMS
        assert rank0["synth_loss"][1:] == pytest.approx(one["synth_loss"][1:], rel=1e-9)
        assert any(v for v in one["synth_loss"][1:])
        if case == "dni":
            # a rank's trigger gradients are W = 2 times those of one process
            assert [2 * v for v in one["target_rms"][1:]] == \
                pytest.approx(rank0["target_rms"][1:], rel=1e-9)


def _check_recipe_equal(root, name, recipe, overrides, data_dir):
    one_dir = root / f"{name}-1"
    one = workers.train_recipe(recipe, overrides, str(one_dir), data_dir)
    a, b = ckpt.load(one_dir / "last.pt"), ckpt.load(root / f"{name}-2" / "last.pt")
    assert a["world_size"] == 1 and b["world_size"] == 2 and len(b["rng_ranks"]) == 2
    for key in ("model", "synthesizer"):
        assert _max_diff(a[key], b[key]) < 1e-6
    if a["hidden"] is not None:  # the gathered state is one process's state, all columns
        assert _max_diff(dict(enumerate(a["hidden"])), dict(enumerate(b["hidden"]))) < 1e-5
    ra, rb = run_records(one_dir), run_records(root / f"{name}-2")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]  # rank 0 alone logged
    assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-5)
    ea, eb = run_records(one_dir, "eval"), run_records(root / f"{name}-2", "eval")
    assert [r["loss"] for r in ea] == pytest.approx([r["loss"] for r in eb], rel=1e-5)
    return one


def test_recipe_on_two_ranks_equals_one_process(two_ranks, tmp_path):
    root, data_dir, out = two_ranks
    one = _check_recipe_equal(root, "copy", "copy-smoke", COPY, None)
    assert out[0]["runs"]["copy"]["processes"] == 2
    assert out[0]["runs"]["copy"]["best_metric"] == one["best_metric"]  # curriculum alike
    if data_dir is None:
        pytest.skip("Penn Treebank files not found: the word LM half was not run")
    one = _check_recipe_equal(root, "words", "ptb-word-small-smoke", WORDS, data_dir)
    assert out[0]["runs"]["words"]["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    assert out[1]["runs"]["words"]["test_loss"] == out[0]["runs"]["words"]["test_loss"]


def test_resumed_two_rank_run_equals_uninterrupted(two_ranks):
    root, _, out = two_ranks
    assert out[0]["runs"]["copy-cut"] == out[1]["runs"]["copy-cut"] == "killed"
    whole, again = root / "copy-2", root / "copy-cut"
    assert run_records(whole) == run_records(again)  # every loss and statistic, to the last bit
    assert run_records(whole, "eval") == run_records(again, "eval")
    a, b = ckpt.load(whole / "last.pt"), ckpt.load(again / "last.pt")
    assert _max_diff(a["model"], b["model"]) == 0.0
    assert _max_diff(a["synthesizer"], b["synthesizer"]) == 0.0


def test_resume_with_another_world_size_is_refused(two_ranks):
    root, _, _ = two_ranks
    with pytest.raises(ckpt.CheckpointError,
                       match="written by 2 processes, this run has 1; resume with 2"):
        workers.train_recipe("copy-smoke", COPY + ["train.max_steps=20"],
                             str(root / "copy-2"), resume=True)


def test_streams_split_evenly_or_not_at_all():
    world = distributed.World(rank=1, size=2)
    x = torch.arange(12).reshape(2, 6)
    assert world.streams(x).tolist() == [[3, 4, 5], [9, 10, 11]]
    state = (torch.zeros(2, 6, 5), torch.ones(2, 6, 5))
    assert world.local_state(state)[1].shape == (2, 3, 5)
    assert world.eval_columns(torch.arange(5).reshape(1, 5)).tolist() == [[3, 4]]
    with pytest.raises(ConfigError, match="data.batch_size=5 streams cannot be split evenly "
                                          "over 2 processes"):
        world.check_batch(5)


def test_torchrun_command_line(tmp_path):
    """`torchrun --nproc_per_node=2 -m dni_rnn train RECIPE` just works."""
    env = {**os.environ, "DNI_RNN_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(workers.REPO),
                                                        os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dni_rnn", "train", "copy-smoke", "--out", str(tmp_path / "run")]
    cmd += [a for kv in COPY[:-1] + ["train.max_steps=4"] for a in ("--set", kv)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert p.stdout.count("done: copy-smoke") == 1  # rank 0 alone prints
    assert "x 2 processes (gloo), 2 streams each" in p.stdout


def test_two_parts_in_lock_step_equal_tbptt_of_the_whole_stack(two_ranks):
    _, _, out = two_ranks
    a, b = out[0]["pairs"]["lockstep"], out[1]["pairs"]["lockstep"]
    opts = PAIRS[0][1]
    data = workers.markov_streams(vocab=VOCAB)
    model, _ = decoupled.build(VOCAB, opts)
    runner = dni.TBPTTRunner(model, decoupled.lm_loss, torch.optim.Adam(model.parameters(),
                             lr=opts.lr), truncation=opts.truncation, clip=None)
    n = a["updates"] * opts.truncation
    _, history = runner.run(data[:-1][:n], data[1:][:n])
    assert _max_diff(model.lower.state_dict(), a["params"]) < 1e-12
    assert _max_diff(model.upper.state_dict(), b["params"]) < 1e-12
    assert b["losses"] == pytest.approx([m.loss for m in history], abs=1e-12)


def test_decoupled_part_learns_from_synthetic_gradients(two_ranks):
    _, _, out = two_ranks
    opts = PAIRS[1][1]
    a, b = out[0]["pairs"]["decoupled"], out[1]["pairs"]["decoupled"]
    fits = a["fits"]
    assert fits[:opts.lag] == [None] * opts.lag and all(f is not None for f in fits[opts.lag:])
    assert max(cos for _, cos in fits[opts.lag + 1:]) > 0.3  # M learnt from B's gradients
    start, _ = decoupled.build(VOCAB, opts)
    assert _max_diff(start.lower.state_dict(), a["params"]) > 1e-3  # A moved on g_hat alone
    lock = out[1]["pairs"]["lockstep"]
    assert math.isfinite(b["valid_loss"]) and b["valid_loss"] < math.log(VOCAB)
    assert b["losses"] != lock["losses"]
    # consuming chunk k's real gradient exactly at update k + lag: timing changes nothing
    slow_a, slow_b = out[0]["pairs"]["decoupled-slow-B"], out[1]["pairs"]["decoupled-slow-B"]
    assert _max_diff(a["params"], slow_a["params"]) == 0.0
    assert _max_diff(b["params"], slow_b["params"]) == 0.0
    assert slow_b["losses"] == b["losses"]
