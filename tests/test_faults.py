"""Faults tried and counted (docs/reliability.md; experiments/fault_trials.py runs many more
trials): SIGKILL at random points and inside a checkpoint write, a full disk while saving,
a read-only or vanished run directory, a damaged corpus cache, a killed torchrun rank, a
non-finite loss. A run either resumes and ends bit for bit as the run never disturbed, or
stops with one line that names the problem and what to do."""
import importlib.util
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from dni_rnn import nest
from dni_rnn.app import checkpoint as ckpt
from dni_rnn.app.cli import main
from dni_rnn.config import load_recipe
from dni_rnn.tbptt import TBPTTRunner
from dni_rnn.training import train
from helpers import checkpoint_difference, make_read_only, make_writable, run_records
from conftest import REPO

# the fault injections of experiments/fault_trials.py (the full disk; a rank's process)
_spec = importlib.util.spec_from_file_location("fault_trials",
                                               REPO / "experiments" / "fault_trials.py")
trials = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trials)

# DNI with replay (everything a resume restores), a checkpoint after every update
COPY = ["model.hidden_dim=16", "data.batch_size=4", "task.eval_sequences=8",
        "train.truncation=3", "train.max_steps=24", "train.eval_interval=10",
        "train.log_interval=1", "train.progress=false", "task.threshold=100", "dni.replay=2",
        "train.threads=1", "train.checkpoint_every=1"]


def _args(run_dir, overrides=COPY):
    return ["train", "copy-smoke", *(a for o in overrides for a in ("--set", o)),
            "--out", str(run_dir)]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The run never disturbed."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    train(load_recipe("copy-smoke", COPY), out_dir=run_dir, quiet=True)
    return run_dir


def _resume(run_dir):
    train(load_recipe("copy-smoke", COPY), out_dir=run_dir,
          resume=(run_dir / "last.pt").is_file(), quiet=True)


def _assert_same_run(whole, run_dir):
    assert run_records(run_dir) == run_records(whole)  # every logged number, to the last bit
    assert run_records(run_dir, "eval") == run_records(whole, "eval")
    assert checkpoint_difference(ckpt.load(run_dir / "last.pt"),
                                 ckpt.load(whole / "last.pt")) == ""
    assert not list(run_dir.glob(".*.tmp"))


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dni-rnn: error: "), err
    return err[0]


def _before_update(monkeypatch, k, fn):
    """Call fn() before the runner trains its k-th update."""
    original = TBPTTRunner.train_chunk

    def chunk(self, *a, **kw):
        if self.step + 1 == k:
            fn()
        return original(self, *a, **kw)

    monkeypatch.setattr(TBPTTRunner, "train_chunk", chunk)


def _saved_step(run_dir):
    return ckpt.load(run_dir / "last.pt")["runner"]["step"]


# ---- SIGKILL ----------------------------------------------------------------------------

def _wait(condition, alive, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive() and time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.005)


def _cli(run_dir, env):
    """`dni-rnn train` in a forked process: no interpreter and torch to start again (the
    trials of experiments/fault_trials.py start `python -m dni_rnn` itself)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.environ.update(env)
    os._exit(main(_args(run_dir)))


@pytest.mark.parametrize("when", ["at random", "in a checkpoint write"])
def test_sigkill_then_resume_is_bit_identical(when, whole, tmp_path):
    run_dir, rng = tmp_path / "run", random.Random(when)
    in_write = when == "in a checkpoint write"
    p = multiprocessing.get_context("fork").Process(
        target=_cli, args=(run_dir, {"DNI_RNN_SAVE_PAUSE": "1.0"} if in_write else {}))
    p.start()
    alive = lambda: p.exitcode is None  # noqa: E731
    try:
        if in_write:  # the second write: a last.pt there, the next one on its way
            _wait(lambda: (run_dir / "last.pt").is_file() and any(run_dir.glob(".last.pt.*")),
                  alive)
            time.sleep(rng.uniform(0, 0.3))
        else:  # some update k logged, then a moment later (a write, the next update, ...)
            k = rng.randint(1, 20)
            _wait(lambda: (run_dir / "metrics.jsonl").is_file()
                  and any(r["step"] >= k for r in run_records(run_dir)), alive)
            time.sleep(rng.uniform(0, 0.03))
    finally:
        p.kill()
        p.join()
    assert p.exitcode == -signal.SIGKILL
    if in_write:
        assert list(run_dir.glob(".last.pt.*.tmp")) and _saved_step(run_dir) >= 1
    _resume(run_dir)
    _assert_same_run(whole, run_dir)


# ---- a full disk, a read-only or vanished directory --------------------------------------

def test_a_full_disk_while_saving_keeps_the_last_checkpoint(whole, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with trials.full_disk(7, "write", 2000):  # last.pt of update 7 meets ENOSPC
        assert main(_args(run_dir)) == 2
    line = _one_line(capsys)
    assert "last.pt: No space left on device" in line and "intact" in line
    assert "free some disk space, then resume with --resume" in line
    assert _saved_step(run_dir) == 6 and not list(run_dir.glob(".*.tmp"))
    _resume(run_dir)
    _assert_same_run(whole, run_dir)


def test_a_read_only_run_directory_stops_with_one_line(whole, tmp_path, monkeypatch, capsys):
    run_dir, locked = tmp_path / "run", []
    _before_update(monkeypatch, 8, lambda: locked.append(make_read_only(run_dir)))
    try:
        status = main(_args(run_dir))
    finally:
        make_writable(run_dir)
    if not locked[0]:
        pytest.skip("no way to make a directory read-only here")
    assert status == 2
    line = _one_line(capsys)
    assert "cannot write" in line and "make it writable, then resume with --resume" in line
    assert _saved_step(run_dir) == 7
    monkeypatch.undo()
    _resume(run_dir)
    _assert_same_run(whole, run_dir)


def test_a_vanished_run_directory_stops_with_one_line(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    _before_update(monkeypatch, 8, lambda: shutil.rmtree(run_dir))
    assert main(_args(run_dir)) == 2
    line = _one_line(capsys)
    assert f"the run directory {run_dir} is gone" in line
    assert not run_dir.exists()  # not made again, half empty


# ---- a non-finite loss ------------------------------------------------------------------

def _nan_loss_at_update(monkeypatch, k, seen):
    """The k-th update's loss is NaN; `seen` gets (parameters, state) before k and k + 1."""
    original = TBPTTRunner.train_chunk

    def chunk(self, inputs, targets, state, *a, **kw):
        if self.step + 1 in (k, k + 1):
            seen.append(([p.detach().clone() for p in self.model.parameters()], state))
        if self.step + 1 != k:
            return original(self, inputs, targets, state, *a, **kw)
        loss_fn = self.loss_fn
        self.loss_fn = lambda outputs, targets: loss_fn(outputs, targets) * float("nan")
        try:
            return original(self, inputs, targets, state, *a, **kw)
        finally:
            self.loss_fn = loss_fn

    monkeypatch.setattr(TBPTTRunner, "train_chunk", chunk)


def test_a_nan_loss_under_raise_stops_with_one_line_and_resumes(whole, tmp_path, monkeypatch,
                                                                 capsys):
    run_dir = tmp_path / "run"
    _nan_loss_at_update(monkeypatch, 9, [])
    assert main(_args(run_dir)) == 2
    line = _one_line(capsys)
    assert "update 9: loss is nan" in line and "--set train.on_nonfinite=skip" in line
    assert f"--resume continues from {run_dir / 'last.pt'}" in line
    assert _saved_step(run_dir) == 8
    monkeypatch.undo()  # the NaN was a one-off: the resumed run is the undisturbed one
    _resume(run_dir)
    _assert_same_run(whole, run_dir)


def test_a_nan_loss_under_skip_drops_that_update_and_goes_on(tmp_path, monkeypatch):
    run_dir, seen = tmp_path / "run", []
    _nan_loss_at_update(monkeypatch, 9, seen)
    summary = train(load_recipe("copy-smoke", COPY + ["train.on_nonfinite=skip"]),
                    out_dir=run_dir, quiet=True)
    assert summary["steps"] == 24
    (before, _), (after, state) = seen
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # update 9 changed nothing
    assert not any(t.any() for t in nest.flatten(state))  # the streams restarted
    assert [r["step"] for r in run_records(run_dir) if r["skipped"]] == [9]


# ---- a damaged corpus cache -------------------------------------------------------------

def _damage(path, how, ids):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "garbage":
        data[100:400] = os.urandom(300)
    else:  # one id changed in place: the file still loads
        at = bytes(data).find(ids.to(torch.int32).numpy().tobytes())
        assert at > 0
        data[at + 4 * (len(ids) // 2)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "garbage", "an id flipped"])
def test_a_damaged_corpus_cache_is_rebuilt_not_trusted(how, tmp_path):
    from corpora import load_text_files

    for split, n in (("train", 300), ("valid", 60), ("test", 60)):
        words = [f"w{(i * 7) % 23}" for i in range(n)]
        (tmp_path / f"{split}.txt").write_text(
            "\n".join(" ".join(words[i:i + 10]) for i in range(0, n, 10)) + "\n")
    files = [tmp_path / f"{s}.txt" for s in ("train", "valid", "test")]
    cache = tmp_path / "cache"
    clean = load_text_files(*files, cache_dir=cache)
    (entry,) = (cache / "tensors").glob("*.pt")
    _damage(entry, how, clean.train)
    with pytest.warns(UserWarning, match="cache entry"):
        again = load_text_files(*files, cache_dir=cache)
    assert again.info["cache"] == "miss"  # rebuilt from the text
    for split in ("train", "valid", "test"):
        assert torch.equal(getattr(again, split), getattr(clean, split))
    assert load_text_files(*files, cache_dir=cache).info["cache"] == "hit"  # and written again


# ---- a killed torchrun rank -------------------------------------------------------------

@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()
                         and os.path.isdir("/proc")),
                    reason="needs torch.distributed with gloo and /proc")
def test_a_killed_rank_stops_the_other_with_one_line_and_no_hang(tmp_path):
    alive = lambda: p.poll() is None  # noqa: E731
    run_dir = tmp_path / "run"
    sets = COPY + ["dni.replay=0", "train.max_steps=100000", "train.checkpoint_every=5",
                   "train.eval_interval=1000"]  # replay: one process only
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "dni_rnn", *_args(run_dir, sets)],
                         cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    try:
        _wait(lambda: (run_dir / "last.pt").is_file(), alive)
        (rank1,) = [c for c in trials.children(p.pid) if trials.rank_of(c) == 1]
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        _, err = p.communicate(timeout=90)
    finally:
        p.kill()
        p.communicate()
    assert time.monotonic() - killed < 60
    assert "dni-rnn: error: rank 0 of 2: another process of this run is gone" in err, err
    assert "[rank0]: Traceback" not in err
    assert ckpt.load(run_dir / "last.pt")["world_size"] == 2
