"""An interrupted run loses nothing: SIGINT / SIGTERM finish the update, save last.pt and
exit 130 / 143; periodic checkpoints; every resume is bit-identical to a run never stopped."""
import os
import signal
import subprocess
import sys
import time

import pytest

from dni_rnn import checkpoint as ckpt
from dni_rnn.app.stopping import RunInterrupted
from dni_rnn.config import load_recipe
from dni_rnn.tbptt import TBPTTRunner
from dni_rnn.training import train
from helpers import run_records
from conftest import REPO

# DNI with replay: everything a resume must restore, and a validation every 5 updates
COPY = ["model.hidden_dim=16", "data.batch_size=4", "task.eval_sequences=8",
        "train.truncation=3", "train.max_steps=16", "train.eval_interval=5",
        "train.log_interval=1", "train.progress=false", "task.threshold=100", "dni.replay=2"]


def _signal_at(monkeypatch, step, signum):
    """Send `signum` to this process while the runner trains its `step`-th update."""
    original = TBPTTRunner.train_chunk

    def chunk(self, *a, **k):
        if self.step + 1 == step:
            os.kill(os.getpid(), signum)
        return original(self, *a, **k)

    monkeypatch.setattr(TBPTTRunner, "train_chunk", chunk)


def _signal_in_first_validation(monkeypatch, signum):
    from dni_rnn.app.tasks import CopyTask
    original, sent = CopyTask.evaluate, []

    def evaluate(self, *a, **k):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signum)
        return original(self, *a, **k)

    monkeypatch.setattr(CopyTask, "evaluate", evaluate)


@pytest.fixture(autouse=True)
def _signals_as_in_a_terminal():
    """Ctrl-C raises KeyboardInterrupt, whatever the test runner was started under (nohup
    and background jobs ignore SIGINT, and the run keeps an ignored signal ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _assert_same_run(whole_dir, cut_dir):
    a, b = run_records(whole_dir), run_records(cut_dir)
    assert [r["step"] for r in a] == list(range(1, 17)) == [r["step"] for r in b]
    assert a == b  # losses, synthesizer loss, cosine, norms: equal to the last bit
    assert run_records(whole_dir, "eval") == run_records(cut_dir, "eval")


@pytest.mark.parametrize("where, signum, stopped_at", [
    (3, signal.SIGINT, 3),             # between validations
    (5, signal.SIGTERM, 5),            # the update whose validation writes a checkpoint
    (12, signal.SIGINT, 12),
    ("first validation", signal.SIGTERM, 5),
])
def test_a_signal_saves_at_the_update_and_the_resumed_run_is_bit_identical(
        where, signum, stopped_at, tmp_path, monkeypatch):
    whole = train(load_recipe("copy-smoke", COPY), out_dir=tmp_path / "whole", quiet=True)
    if where == "first validation":
        _signal_in_first_validation(monkeypatch, signum)
    else:
        _signal_at(monkeypatch, where, signum)
    with pytest.raises(RunInterrupted) as stop:
        train(load_recipe("copy-smoke", COPY), out_dir=tmp_path / "cut", quiet=True)
    monkeypatch.undo()
    assert stop.value.step == stopped_at and stop.value.status == 128 + signum
    assert ckpt.load(tmp_path / "cut" / "last.pt")["runner"]["step"] == stopped_at
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    again = train(load_recipe("copy-smoke", COPY), out_dir=tmp_path / "cut", resume=True,
                  quiet=True)
    _assert_same_run(tmp_path / "whole", tmp_path / "cut")
    assert whole["best_step"] == again["best_step"] and whole["steps"] == again["steps"]


def test_periodic_checkpoints_by_updates_limit_what_a_kill_loses(tmp_path, monkeypatch):
    cfg = COPY + ["train.eval_interval=100", "train.checkpoint_every=3"]
    train(load_recipe("copy-smoke", cfg), out_dir=tmp_path / "whole", quiet=True)
    original = TBPTTRunner.train_chunk

    def killed(self, *a, **k):  # a hard kill: nothing runs after it
        if self.step + 1 == 11:
            raise SystemExit(137)
        return original(self, *a, **k)

    monkeypatch.setattr(TBPTTRunner, "train_chunk", killed)
    with pytest.raises(SystemExit):
        train(load_recipe("copy-smoke", cfg), out_dir=tmp_path / "cut", quiet=True)
    monkeypatch.undo()
    assert ckpt.load(tmp_path / "cut" / "last.pt")["runner"]["step"] == 9  # every 3 updates
    train(load_recipe("copy-smoke", cfg), out_dir=tmp_path / "cut", resume=True, quiet=True)
    _assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_the_command_line_stops_on_sigterm_with_143_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    args = ["train", "copy-smoke", *(a for o in COPY + ["train.max_steps=100000",
                                                          "train.eval_interval=1000"]
                                     for a in ("--set", o)), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "dni_rnn", *args], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(1.0)  # some updates in
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    line = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM after update" in line and "--resume" in line, err
    step = ckpt.load(out / "last.pt")["runner"]["step"]
    assert f"after update {step};" in line
    assert "Traceback" not in err


def test_an_ignored_sigint_stays_ignored_and_handlers_come_back():
    from dni_rnn.app.stopping import StopSignals
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup
    term = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == term


def _children(pid):
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(c) for c in open(path).read().split()] if os.path.exists(path) else []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_a_sweep_stopped_by_sigterm_to_its_parent_alone_stops_its_workers_and_resumes(tmp_path):
    """A scheduler's SIGTERM reaches `dni-rnn compare` but not its workers: the two runs in
    progress still save last.pt, the runs not begun are not started, no worker outlives the
    sweep, it exits 143 naming what it saved, and the same command finishes the sweep."""
    out = tmp_path / "sweep"
    args = ["compare", "copy-smoke", "--truncations", "2,3", "--methods", "bptt", "--seeds",
            "1,2", "--budget-updates", "1000", "--jobs", "2", "--out", str(out),
            *(a for o in ["model.hidden_dim=16", "data.batch_size=4", "task.eval_sequences=8",
                          "task.threshold=100"] for a in ("--set", o))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "dni_rnn", *args], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = [out / "bptt-T2-s1", out / "bptt-T2-s2"]
    deadline = time.time() + 120
    while time.time() < deadline and not all((d / "metrics.jsonl").is_file() for d in first):
        time.sleep(0.2)
    time.sleep(0.5)
    workers = [c for c in _children(p.pid) if "spawn_main" in open(f"/proc/{c}/cmdline").read()]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    line = err.strip().splitlines()[-1]
    assert "sweep stopped by SIGTERM" in line and "run the same command again" in line, err
    for d in first:
        assert str(d / "last.pt") in line and not (d / "summary.json").exists()
        assert ckpt.load(d / "last.pt")["runner"]["step"] < 1000
    assert not (out / "bptt-T3-s1").exists() and not (out / "bptt-T3-s2").exists()
    assert len(workers) == 2
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)
    again = subprocess.run([sys.executable, "-m", "dni_rnn", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    for name in ("bptt-T2-s1", "bptt-T2-s2", "bptt-T3-s1", "bptt-T3-s2"):
        assert (out / name / "summary.json").is_file()


def test_a_sweep_whose_run_fails_stops_the_others_before_the_error(tmp_path):
    """One run of a sweep cannot start (its directory is a file): the run beside it stops on
    the SIGTERM the sweep sends and saves last.pt (one still setting up stops at its first
    update), the runs not begun never start, and the command exits 2 with the failed run's
    one-line error at once (before, the sweep trained every other run first)."""
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "bptt-T2-s2").touch()
    args = ["compare", "copy-smoke", "--truncations", "2,3", "--methods", "bptt", "--seeds",
            "1,2", "--budget-updates", "100000", "--jobs", "2", "--out", str(out),
            *(a for o in ["model.hidden_dim=16", "data.batch_size=4", "task.eval_sequences=8",
                          "task.threshold=100"] for a in ("--set", o))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "dni_rnn", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "error: run directory" in done.stderr and "bptt-T2-s2" in done.stderr
    assert ckpt.load(out / "bptt-T2-s1" / "last.pt")["runner"]["step"] < 100000
    assert not (out / "bptt-T2-s1" / "summary.json").exists()
    assert not (out / "bptt-T3-s1").exists() and not (out / "bptt-T3-s2").exists()
