"""What a run tells: one fixed-width line per interval, a JSONL record of the same numbers,
TensorBoard scalars, a progress bar.

    step    2000 | ep  0 | tok    0.200M | loss  6.0177 | ppl   410.62 | cos +0.003 | ...
    {"kind": "train", "step": 2000, "loss": 6.0177, "ppl": 410.62, "cosine": 0.003, ...}

Records have a `kind`: "train" (one per log interval), "eval" (one per validation and the
final test), "recovery" (the runner's guard acted). Nothing here knows a task: metrics
come as `tasks.Metric` objects and task-specific text from the task.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .config import ConfigError
from ..metrics import read_records
from ..tbptt import read_metrics


class Meter:
    """Sums ChunkMetrics over one log interval.

    The chunks' numbers are read from the device once per interval (`record`, or every
    `READ_EVERY` chunks), not once per chunk: on a GPU each read waits for the queued work
    (a host sync).
    """

    FIELDS = ("grad_norm", "synth_loss", "cosine", "synthetic_norm", "real_norm", "aux_loss",
              "target_rms", "capped", "injected_norm", "sg_scale", "calibration")
    READ_EVERY = 256  # chunks held on the device at most, then read in one sync

    def __init__(self):
        self.reset()

    def reset(self):
        self.chunks, self.tokens, self.loss, self.skipped = 0, 0, 0.0, 0
        self.sums = {f: 0.0 for f in self.FIELDS}
        self.counts = {f: 0 for f in self.FIELDS}
        self.pending = []  # this interval's ChunkMetrics, summed when recorded
        self.t0 = time.perf_counter()

    def add(self, m):
        self.chunks += 1
        self.skipped += int(m.skipped)
        if m.skipped:
            return
        self.tokens += m.tokens
        self.pending.append(m)
        if len(self.pending) >= self.READ_EVERY:  # long intervals: bounded memory
            self._sum_pending()

    def _sum_pending(self):
        for m in read_metrics(self.pending):  # one host sync for the interval
            self.loss += m.loss * m.tokens
            for f in self.FIELDS:
                v = getattr(m, f)
                if v is not None and math.isfinite(v):
                    self.sums[f] += v
                    self.counts[f] += 1
        self.pending = []

    def record(self):
        """The interval's means (and tokens/s), then start a new interval."""
        self._sum_pending()
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        rec = {"loss": self.loss / self.tokens if self.tokens else math.nan,
               "tokens_per_s": self.tokens / seconds, "skipped": self.skipped}
        for f in self.FIELDS:
            rec[f] = self.sums[f] / self.counts[f] if self.counts[f] else None
        self.reset()
        return rec


def _num(v, fmt, width):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{width}}"
    sign = "+" if fmt.startswith("+") else ""
    return f"{v:{sign}{width}{fmt.lstrip('+')}}"


def printer():
    """Print lines above a progress bar, flushed (logs of background runs stay current)."""
    def out(line):
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
    return out


def progress_bar(enabled, total, initial):
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False,
                disable=None if enabled else True, file=sys.stderr)


class RunLog:
    """Fixed-width lines on stdout, metrics.jsonl in the run directory, and TensorBoard.

    Args:
        run_dir: where metrics.jsonl (and tensorboard/) go.
        metric: the task's `Metric`; a metric computed from the loss gets its column.
        tensorboard: also write TensorBoard scalars.
        resume_step: on resume, records after this step (a killed run's tail) are dropped.
        quiet: no lines on stdout (the JSONL is still written).
    """

    def __init__(self, run_dir, metric, tensorboard=False, resume_step=None, quiet=False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.metric, self.quiet = metric, quiet
        self.write_line = (lambda line: None) if quiet else printer()
        if resume_step is None:
            self.path.write_text("")
        else:  # drop what a killed run logged after its last checkpoint, and the test
            # record of a run that ended: the resumed run tests again when it ends
            kept = [r for r in self.read() if r.get("step", 0) <= resume_step
                    and r.get("split") != "test"]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard=true needs tensorboard "
                                  "(pip install tensorboard)") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def read(self):
        return read_records(self.path)

    def emit(self, record):
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def train(self, rec):
        """One interval: the JSONL record and the fixed-width line."""
        self.emit(rec)
        ratio = None
        if rec.get("synthetic_norm") is not None and rec.get("real_norm"):
            ratio = rec["synthetic_norm"] / rec["real_norm"]
        column = ""
        if self.metric.from_loss is not None:
            column = f" | {self.metric.name} {self.metric.format(rec.get(self.metric.name), 8)}"
        self.write_line(
            f"step {rec['step']:>7d} | ep {rec['epoch']:>2d} | tok {rec['tokens'] / 1e6:8.3f}M"
            f" | loss {_num(rec['loss'], '.4f', 7)}{column}"
            f" | cos {_num(rec['cosine'], '+.3f', 6)}"
            f" | synth {_num(rec['synth_loss'], '.2e', 8)}"
            f" | |g^|/|g| {_num(ratio, '.2f', 6)}"
            f" | lr {rec['lr']:.1e} | {rec['tokens_per_s']:7.0f} tok/s")

    def eval(self, rec, text):
        """One validation (or test): the record, and `text` (the task's words for it)."""
        self.emit(rec)
        self.write_line(f"{rec['split']:<5s} step {rec['step']:>7d} | {text}")

    def recovery(self, step, tokens, reason, sg_scale, bootstrap):
        self.emit({"kind": "recovery", "step": step, "tokens": tokens, "reason": reason,
                   "sg_scale": sg_scale, "bootstrap": bootstrap})
        self.write_line(f"recovery: step {step}: {reason}")

    def close(self):
        if self.tb is not None:
            self.tb.close()


class NullLog:
    """The log of a data-parallel rank other than 0: rank 0 alone writes lines and records."""

    def write_line(self, line):
        pass

    def read(self):
        return []

    def emit(self, record):
        pass

    def train(self, rec):
        pass

    def eval(self, rec, text):
        pass

    def recovery(self, step, tokens, reason, sg_scale, bootstrap):
        pass

    def close(self):
        pass
