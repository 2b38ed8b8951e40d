"""Faults tried and counted (docs/reliability.md): N trials per fault, each run checked
against the same run never disturbed. tests/test_faults.py runs a few of each in CI.

    python experiments/fault_trials.py --trials 50 --data-dir ../shared/data
    python experiments/fault_trials.py --faults sigkill,cache --trials 10 --seed 2
    python experiments/fault_trials.py --trials 50,rank-kill=10     # 10 for that fault

The runs are small copy-task runs (DNI with replay: every state a resume restores; one
torch thread; a checkpoint after every update, `train.checkpoint_every=1`); the cache
trials use the Penn Treebank word corpus of --data-dir. Each trial draws its point from
--seed. The faults:

    sigkill        kill -9 of `python -m dni_rnn train` at a random time of its training,
                   then `--resume` (a kill before the first checkpoint: started again)
    sigkill-write  the same, aimed inside a checkpoint write: DNI_RNN_SAVE_PAUSE=0.5 holds
                   each temporary file 0.5 s before its rename, the kill lands in a random
                   one of the first 12 writes
    enospc         no space left on the device in a random checkpoint write, at a random
                   byte of it or at its fsync (injected: the file object or os.fsync
                   raise OSError(ENOSPC)); then --resume
    readonly       the run directory made read-only (chmod 555; chattr +i for root, whom
                   chmod does not stop) before a random update; made writable, --resume
    vanished       the run directory deleted before a random update
    cache          the tokenised-corpus cache entry truncated, overwritten in part, one
                   random byte flipped, or one id in it changed; then loaded again
    rank-kill      kill -9 of one rank (0 and 1 in turn) of a 2-process torchrun run at a
                   random time; the other must exit within a minute with one line; then
                   the same torchrun command with --resume
    nan-raise      a NaN loss at a random update, train.on_nonfinite=raise; then --resume
    nan-skip       the same under train.on_nonfinite=skip

The in-process faults (enospc, readonly, vanished, nan-*) call the command line's main()
in this process; sigkill and rank-kill start real processes. Writes one row per trial to
--out (default docs/results/fault-trials.csv; rows of faults not run are kept) and prints
the table of docs/reliability.md (`--report`: only the table, of the CSV there). Lost
work: "0 in 35, 1 in 15" = 35 trials lost no update, 15 lost one.
"""
import argparse
import collections
import contextlib
import csv
import errno
import io
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from dni_rnn.app import checkpoint as ckpt
from dni_rnn.app.cli import main as cli_main
from dni_rnn.metrics import read_records
from dni_rnn.tbptt import TBPTTRunner

REPO = Path(__file__).resolve().parent.parent
FAULTS = ["sigkill", "sigkill-write", "enospc", "readonly", "vanished", "cache", "rank-kill",
          "nan-raise", "nan-skip"]
STEPS = 40
COPY = ["model.hidden_dim=16", "data.batch_size=4", "task.eval_sequences=8",
        "train.truncation=3", f"train.max_steps={STEPS}", "train.eval_interval=10",
        "train.log_interval=1", "train.progress=false", "task.threshold=100", "dni.replay=2",
        "train.threads=1", "train.checkpoint_every=1"]
# torchrun: no replay (one process only), longer, a checkpoint every 2 updates
RANKS = COPY + ["dni.replay=0", "train.max_steps=80", "train.checkpoint_every=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def args_for(run_dir, overrides=COPY):
    return ["train", "copy-smoke", *(a for o in overrides for a in ("--set", o)),
            "--out", str(run_dir)]


def cli(argv):
    """main(argv) in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings():
        warnings.simplefilter("always")
        status = cli_main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


# ---- what a trial checks --------------------------------------------------------------------

def records(run_dir, kind="train"):
    out = read_records(run_dir, kind) if (Path(run_dir) / "metrics.jsonl").is_file() else []
    for r in out:
        r.pop("tokens_per_s", None)
    return out


def last_update(run_dir):
    """The last update the run logged (log_interval = 1: every completed update)."""
    return max((r["step"] for r in records(run_dir)), default=0)


def saved_update(run_dir):
    """The update last.pt holds (0: none); raises CheckpointError if it does not load."""
    path = Path(run_dir) / "last.pt"
    return ckpt.load(path)["runner"]["step"] if path.is_file() else 0


def difference(a, b, where=""):
    """The first difference of two checkpoints (tensors bit for bit), or ""."""
    if where == ".progress.elapsed":  # the clock
        return ""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                b.contiguous().reshape(-1).view(torch.uint8)))
        return "" if same else where
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return where + " (keys)"
        return next((d for k in a if (d := difference(a[k], b[k], f"{where}.{k}"))), "")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return where + " (length)"
        return next((d for i, (x, y) in enumerate(zip(a, b))
                     if (d := difference(x, y, f"{where}[{i}]"))), "")
    return "" if a == b or (a != a and b != b) else where


def same_run(ref, run_dir):
    """"" when the run ended as the reference did (records and final checkpoint, bit for
    bit, no temporary file left), else what differs."""
    run_dir = Path(run_dir)
    if records(run_dir) != records(ref):
        return "train records differ"
    if records(run_dir, "eval") != records(ref, "eval"):
        return "eval records differ"
    d = difference(ckpt.load(run_dir / "last.pt"), ckpt.load(Path(ref) / "last.pt"))
    if d:
        return f"last.pt differs at {d}"
    if list(run_dir.glob(".*.tmp")):
        return "a temporary file was left"
    return ""


def one_line(err, run_dir=None):
    """The error line of a run that stopped, run directory as RUN ("" if not one line)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if len(lines) != 1 or not lines[0].startswith("dni-rnn: "):
        return ""
    line = lines[0].replace(str(run_dir), "RUN") if run_dir else lines[0]
    return re.sub(r"\]:\d+", "]:PORT", line)


def row(fault, trial, point, recovered, lost, message="", detail="", exit_s=""):
    return {"fault": fault, "trial": trial, "point": point, "recovered": int(bool(recovered)),
            "lost_updates": lost, "exit_s": exit_s, "message": message, "detail": detail}


# ---- hooks (in-process faults) --------------------------------------------------------------

@contextlib.contextmanager
def before_update(k, fn):
    """Call fn(runner, state) before the runner trains update k (1-based)."""
    original = TBPTTRunner.train_chunk

    def chunk(self, inputs, targets, state, *a, **kw):
        if self.step + 1 == k:
            fn(self, state)
        return original(self, inputs, targets, state, *a, **kw)

    TBPTTRunner.train_chunk = chunk
    try:
        yield
    finally:
        TBPTTRunner.train_chunk = original


class FullDisk:
    """A checkpoint's temporary file on a disk that fills up after `limit` bytes."""

    def __init__(self, fh, limit):
        self.fh, self.left = fh, limit

    def write(self, data):
        size = memoryview(data).nbytes
        if size > self.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= size
        return self.fh.write(data)

    def flush(self):
        self.fh.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


@contextlib.contextmanager
def full_disk(n, at, limit):
    """The n-th checkpoint write of this process meets ENOSPC: at byte `limit` of it
    (at == "write") or at its fsync (at == "fsync")."""
    real_open, real_fsync, count = open, os.fsync, [0, 0]

    def fake_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        if "w" in mode and str(path).endswith(".tmp"):
            count[0] += 1
            if at == "write" and count[0] == n:
                return FullDisk(fh, limit)
        return fh

    def fake_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            count[1] += 1
            if at == "fsync" and count[1] == n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    ckpt.open, os.fsync = fake_open, fake_fsync
    try:
        yield
    finally:
        del ckpt.open
        os.fsync = real_fsync


def make_read_only(folder):
    """chmod 555; where that does not bind (root), chattr +i. Returns how, or ""."""
    folder.chmod(0o555)
    if not writable(folder):
        return "chmod"
    if shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    return "" if writable(folder) else "chattr"


def make_writable(folder):
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def writable(folder):
    try:
        (folder / ".probe").write_text("")
        (folder / ".probe").unlink()
        return True
    except OSError:
        return False


# ---- the faults -------------------------------------------------------------------------------

def resume_and_compare(ref, run_dir, argv):
    """Resume (or start again where no checkpoint was written) and compare."""
    again = argv + (["--resume"] if (run_dir / "last.pt").is_file() else [])
    status, _, err = cli(again)
    if status != 0:
        return f"the resume failed ({status}): {err.strip()[-200:]}"
    return same_run(ref, run_dir)


def trial_sigkill(ctx, i, rng, in_write):
    run_dir = ctx.run_dir
    env = {**ENV, **({"DNI_RNN_SAVE_PAUSE": "0.5"} if in_write else {})}
    p = subprocess.Popen([sys.executable, "-m", "dni_rnn", *args_for(run_dir)], cwd=REPO,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if in_write:
            target, seen = rng.randint(1, 12), set()
            while len(seen) < target and p.poll() is None:
                seen |= {t.name for t in run_dir.glob(".*.pt.*.tmp")}
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.4))
        else:
            while not records(run_dir) and p.poll() is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, ctx.train_s))
    finally:
        finished = p.poll() is not None
        p.kill()
        p.wait()
    if finished:
        return None  # the run ended before the kill: not a trial
    in_a_write = bool(list(run_dir.glob(".*.pt.*.tmp")))
    done = last_update(run_dir)
    try:
        saved = saved_update(run_dir)
    except ckpt.CheckpointError as e:
        return row(ctx.fault, i, "kill", False, "", detail=str(e))
    point = (f"after update {done}, " + ("in a checkpoint write" if in_a_write else
                                         "before the first checkpoint" if not saved else
                                         "between checkpoint writes"))
    diff = resume_and_compare(ctx.ref, run_dir, args_for(run_dir))
    return row(ctx.fault, i, point, not diff, done - saved, detail=diff)


def trial_enospc(ctx, i, rng):
    run_dir = ctx.run_dir
    n, at = rng.randint(2, STEPS), rng.choice(["write", "fsync"])
    limit = rng.randrange(ctx.checkpoint_bytes)
    with full_disk(n, at, limit):
        status, _, err = cli(args_for(run_dir))
    line = one_line(err, run_dir)
    point = f"write {n}, " + (f"byte {limit}" if at == "write" else "fsync")
    done, saved = last_update(run_dir), saved_update(run_dir)
    ok = status == 2 and "No space left on device" in line and saved == done - 1
    diff = resume_and_compare(ctx.ref, run_dir, args_for(run_dir)) if ok else \
        f"status {status}, last.pt at {saved}: {err.strip()[-200:]}"
    return row(ctx.fault, i, point, not diff, done - saved, line, diff)


def trial_readonly(ctx, i, rng):
    run_dir, k, how = ctx.run_dir, rng.randint(2, STEPS), []
    try:
        with before_update(k, lambda runner, state: how or how.append(
                make_read_only(run_dir))):
            status, _, err = cli(args_for(run_dir))
    finally:
        make_writable(run_dir)
    if not how[0]:
        return row(ctx.fault, i, f"update {k}", False, "", detail="cannot make it read-only")
    line, done, saved = one_line(err, run_dir), last_update(run_dir), saved_update(run_dir)
    ok = status == 2 and "make it writable" in line and saved == k - 1
    diff = resume_and_compare(ctx.ref, run_dir, args_for(run_dir)) if ok else \
        f"status {status}, last.pt at {saved}: {err.strip()[-200:]}"
    return row(ctx.fault, i, f"before update {k} ({how[0]})", not diff, done - saved, line,
               diff)


def trial_vanished(ctx, i, rng):
    run_dir, k = ctx.run_dir, rng.randint(2, STEPS)
    with before_update(k, lambda runner, state: shutil.rmtree(run_dir)):
        status, _, err = cli(args_for(run_dir))
    line = one_line(err, run_dir)
    ok = status == 2 and "is gone" in line and not run_dir.exists()
    return row(ctx.fault, i, f"before update {k}", ok, k - 1, line,
               "" if ok else f"status {status}: {err.strip()[-200:]}")


def trial_nan(ctx, i, rng, policy):
    run_dir, k, seen = ctx.run_dir, rng.randint(2, STEPS), []
    argv = args_for(run_dir, COPY + [f"train.on_nonfinite={policy}"])
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

    TBPTTRunner.train_chunk = chunk
    try:
        status, _, err = cli(argv)
    finally:
        TBPTTRunner.train_chunk = original
    line, done, saved = one_line(err, run_dir), last_update(run_dir), saved_update(run_dir)
    if policy == "raise":
        ok = status == 2 and "loss is nan" in line and saved == k - 1
        diff = resume_and_compare(ctx.ref, run_dir, argv) if ok else \
            f"status {status}, last.pt at {saved}: {err.strip()[-200:]}"
        return row(ctx.fault, i, f"update {k}", not diff, done - saved, line, diff)
    skipped = [r["step"] for r in records(run_dir) if r["skipped"]]
    (before, _), (after, state) = seen
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
    restarted = not any(t.any() for t in _leaves(state))
    ok = status == 0 and done == STEPS and skipped == [k] and unchanged and restarted
    return row(ctx.fault, i, f"update {k}", ok, 1, "",
               "" if ok else f"status {status}, skipped {skipped}, parameters unchanged "
                             f"{unchanged}, state restarted {restarted}")


def _leaves(state):
    return [state] if isinstance(state, torch.Tensor) else [t for s in state for t in _leaves(s)]


# -- the corpus cache

def damage(data, how, rng, ids_at, n_ids):
    """(damaged bytes, what was done)."""
    data = bytearray(data)
    if how == "truncated":
        n = rng.randrange(len(data))
        return data[:n], f"cut to {n} of {len(data)} bytes"
    if how == "overwritten":
        at, n = rng.randrange(len(data)), rng.randint(1, 4096)
        data[at:at + n] = os.urandom(len(data[at:at + n]))
        return data, f"{n} bytes at {at} overwritten"
    if how == "byte flipped":
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
        return data, f"byte {at} flipped"
    at = ids_at + 4 * rng.randrange(n_ids)
    data[at] ^= 1  # one id of the training split, +-1
    return data, f"the id at byte {at} changed by one"


CACHE = {}


def trial_cache(ctx, i, rng):
    from corpora import load_ptb

    entry, pristine, clean = CACHE["entry"], CACHE["bytes"], CACHE["clean"]
    how = ["truncated", "overwritten", "byte flipped", "id changed"][i % 4]
    data, point = damage(pristine, how, rng, CACHE["ids_at"], CACHE["ids"])
    entry.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            again = load_ptb("word", ctx.data_dir, cache_dir=ctx.work / "cache", download=False)
        except Exception as e:  # noqa: BLE001 - a crash is an outcome here
            return row(ctx.fault, i, point, False, "", detail=f"{type(e).__name__}: {e}"[:300])
    said = [str(w.message) for w in caught if "cache entry" in str(w.message)]
    same = all(torch.equal(getattr(again, s), getattr(clean, s))
               for s in ("train", "valid", "test"))
    state = again.info["cache"]
    if state == "miss" and same and said:
        outcome, ok = "", True
    elif state == "hit" and same:
        outcome, ok = "harmless: loaded the same ids", True
    else:
        outcome, ok = f"cache {state}, ids {'equal' if same else 'DIFFERENT'}: trusted", False
    rewritten = entry.read_bytes() != bytes(data) or state == "hit"
    message = said[0].replace(str(entry), "ENTRY").split(": ")[0] if said else ""
    return row(ctx.fault, i, f"{how}: {point}", ok and rewritten, 0, message,
               outcome + ("" if rewritten else " (entry not rewritten)"))


def setup_cache(ctx):
    from corpora import load_ptb

    clean = load_ptb("word", ctx.data_dir, cache_dir=ctx.work / "cache", download=False)
    (entry,) = (ctx.work / "cache" / "tensors").glob("ptb-word-*.pt")
    data = entry.read_bytes()
    ids_at = data.find(clean.train[:64].to(torch.int32).numpy().tobytes())
    assert ids_at > 0, "the training ids were not found in the entry"
    CACHE.update(entry=entry, bytes=data, clean=clean, ids_at=ids_at, ids=len(clean.train))


# -- torchrun

def children(pid):
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(name))
    return out


def rank_of(pid):
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)


def torchrun(run_dir, resume=False):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "-m", "dni_rnn",
                             *args_for(run_dir, RANKS), *(["--resume"] if resume else [])],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def trial_rank_kill(ctx, i, rng):
    run_dir, victim = ctx.run_dir, i % 2
    p = torchrun(run_dir)
    try:
        while not records(run_dir) and p.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, ctx.ranks_s))
        pids = [c for c in children(p.pid) if rank_of(c) == victim]
        if p.poll() is not None or not pids:
            return None  # ended before the kill: not a trial
        os.kill(pids[0], signal.SIGKILL)
        killed = time.monotonic()
        _, err = p.communicate(timeout=120)
        exit_s = time.monotonic() - killed
    except subprocess.TimeoutExpired:
        return row(ctx.fault, i, f"rank {victim}", False, "", detail="HANG: no exit in 120 s")
    finally:
        p.kill()
        p.communicate()
    survivor = 1 - victim
    lines = [ln for ln in err.splitlines() if ln.startswith("dni-rnn: error: rank ")]
    line = one_line(lines[0], run_dir) if lines else ""
    done, saved = last_update(run_dir), saved_update(run_dir)
    point = f"rank {victim} after update {done}" + (
        ", in a checkpoint write" if list(run_dir.glob(".*.pt.*.tmp")) else "")
    ok = exit_s < 60 and f"rank {survivor} of 2" in line and f"[rank{survivor}]: Traceback" \
        not in err
    if not ok:
        return row(ctx.fault, i, point, False, done - saved, line,
                   f"exit after {exit_s:.1f}s: {err.strip()[-300:]}", f"{exit_s:.1f}")
    q = torchrun(run_dir, resume=saved > 0)
    _, err = q.communicate()
    diff = same_run(ctx.ranks_ref, run_dir) if q.returncode == 0 else \
        f"the resume failed ({q.returncode}): {err.strip()[-300:]}"
    return row(ctx.fault, i, point, not diff, done - saved, line, diff, f"{exit_s:.1f}")


# ---- driver -------------------------------------------------------------------------------------

def parse_trials(text, faults):
    """"50" or "50,rank-kill=10": trials per fault."""
    out, default = {}, None
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, n = part.rpartition("=")
        if name:
            out[name] = int(n)
        else:
            default = int(n)
    return {f: out.get(f, default if default is not None else 10) for f in faults}


def summary(rows):
    """The table of docs/reliability.md: one line per fault."""
    by = collections.defaultdict(list)
    for r in rows:
        by[r["fault"]].append(r)
    lines = ["| fault | trials | recovered | lost work (updates) | message |",
             "|---|---|---|---|---|"]
    for fault in FAULTS:
        rs = by.get(fault)
        if not rs:
            continue
        lost = [int(r["lost_updates"]) for r in rs if str(r["lost_updates"]) != ""]
        hist = collections.Counter(lost)
        lost_text = ("-" if not lost else f"{min(lost)}-{max(lost)}" if len(hist) > 4 else
                     ", ".join(f"{n} in {hist[n]}" for n in sorted(hist)))
        messages = collections.Counter(r["message"] for r in rs if r["message"])
        message = messages.most_common(1)[0][0] if messages else "-"
        exits = [float(r["exit_s"]) for r in rs if r["exit_s"] not in ("", None)]
        if exits:
            message += f" (exit after at most {max(exits):.1f} s)"
        recovered = sum(int(r["recovered"]) for r in rs)
        lines.append(f"| {fault} | {len(rs)} | {recovered} | {lost_text} | "
                     f"{message.replace('|', '/')} |")
    return lines


class Context:
    pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, of: "
                   + ", ".join(FAULTS))
    p.add_argument("--trials", default="50,rank-kill=10",
                   help="trials per fault: N, and FAULT=N for one (default 50,rank-kill=10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "fault-trials.csv"))
    p.add_argument("--data-dir", default=os.environ.get("DNI_RNN_DATA_DIR",
                                                        str(REPO.parent / "shared" / "data")))
    p.add_argument("--work", help="folder for the runs (default: a temporary one, removed)")
    p.add_argument("--report", action="store_true", help="run nothing: the table of --out")
    a = p.parse_args(argv)
    if a.report:
        print("\n".join(summary(read_csv(Path(a.out)))))
        return 0
    faults = [f.strip() for f in a.faults.split(",") if f.strip()]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        p.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    trials = parse_trials(a.trials, faults)
    torch.set_num_threads(1)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="fault-trials-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context()
    ctx.work, ctx.data_dir = work, a.data_dir
    rows = []
    try:
        if set(faults) - {"cache", "rank-kill"}:
            ctx.ref = work / "reference"
            shutil.rmtree(ctx.ref, ignore_errors=True)
            t0 = time.perf_counter()
            status, _, err = cli(args_for(ctx.ref))
            assert status == 0, err
            ctx.train_s = min(float(json_field(ctx.ref, "elapsed_s")),
                              time.perf_counter() - t0) * 0.9
            ctx.checkpoint_bytes = (ctx.ref / "last.pt").stat().st_size
        if "rank-kill" in faults:
            ctx.ranks_ref = work / "ranks-reference"
            shutil.rmtree(ctx.ranks_ref, ignore_errors=True)
            q = torchrun(ctx.ranks_ref)
            _, err = q.communicate()
            assert q.returncode == 0, err[-2000:]
            ctx.ranks_s = float(json_field(ctx.ranks_ref, "elapsed_s")) * 0.9
        if "cache" in faults:
            setup_cache(ctx)
        run = {"sigkill": lambda c, i, r: trial_sigkill(c, i, r, False),
               "sigkill-write": lambda c, i, r: trial_sigkill(c, i, r, True),
               "enospc": trial_enospc, "readonly": trial_readonly, "vanished": trial_vanished,
               "cache": trial_cache, "rank-kill": trial_rank_kill,
               "nan-raise": lambda c, i, r: trial_nan(c, i, r, "raise"),
               "nan-skip": lambda c, i, r: trial_nan(c, i, r, "skip")}
        for fault in faults:
            ctx.fault, rng, i, tries = fault, random.Random(f"{a.seed}-{fault}"), 0, 0
            while i < trials[fault] and tries < 3 * trials[fault]:
                tries += 1
                ctx.run_dir = work / f"{fault}-{tries}"
                t0 = time.perf_counter()
                r = run[fault](ctx, i, rng)
                if r is None or r["recovered"]:  # keep the disk small; a failure stays
                    shutil.rmtree(ctx.run_dir, ignore_errors=True)
                if r is None:
                    continue
                rows.append(r)
                i += 1
                print(f"{fault} {i}/{trials[fault]} ({time.perf_counter() - t0:.1f}s): "
                      f"{'ok' if r['recovered'] else 'NOT RECOVERED'} | {r['point']} | lost "
                      f"{r['lost_updates']} | {r['detail'] or r['message']}", flush=True)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    write_csv(Path(a.out), rows, faults)
    print("\n".join(summary(read_csv(Path(a.out)))))
    return 0 if all(r["recovered"] for r in rows) else 1


def json_field(run_dir, key):
    import json
    return json.loads((Path(run_dir) / "summary.json").read_text())[key]


FIELDS = ["fault", "trial", "point", "recovered", "lost_updates", "exit_s", "message",
          "detail"]


def read_csv(path):
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv(path, rows, faults):
    """Replace the rows of the faults run; keep the others."""
    kept = [r for r in read_csv(path) if r["fault"] not in faults]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for r in sorted(kept + rows, key=lambda r: (FAULTS.index(r["fault"]), int(r["trial"]))):
            w.writerow(r)


if __name__ == "__main__":
    sys.exit(main())
