"""What a training chunk reports (`ChunkMetrics`), read from the device lazily and in batches,
and the one reader of a run's records (`read_records`: RUN_DIR/metrics.jsonl)."""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class ChunkMetrics:
    """What one training chunk did. Synthesizer fields are None for plain TBPTT.

    loss: the chunk's mean loss; tokens: steps x streams; grad_norm: model gradient norm
    before clipping; synth_loss: the synthesizer's regression loss at the trigger;
    cosine: cosine between synthetic and real gradient at the trigger; synthetic_norm /
    real_norm: their norms (gradient units); aux_loss: the DNI + Aux loss; target_rms: the
    running RMS of the real gradients at the triggers; capped: fraction of streams whose
    synthetic gradient `sg_cap` scaled down; injected_norm: the norm of what was injected at
    the chunk's end (beta * gate * capped g_hat); sg_scale: beta in force; calibration:
    the gate in force at the chunk's end (`stability.Calibration`); recovery: why the
    guard reset the synthesizer after this chunk (else None).

    The runner reads one batch of numbers from the device per chunk (what it decides on:
    the non-finite checks, the target RMS, the guard); the other fields are kept as 0-d
    tensors and read when first accessed (a field always reads as a Python number).
    `read_metrics(list)` reads many chunks' fields with one host sync, as `logs.Meter` does
    once per log interval.
    """

    step: int
    length: int
    loss: float
    tokens: int
    grad_norm: float = None
    synth_loss: float = None
    cosine: float = None
    synthetic_norm: float = None
    real_norm: float = None
    aux_loss: float = None
    target_rms: float = None
    capped: float = None
    injected_norm: float = None
    sg_scale: float = None
    calibration: float = None
    recovery: str = None
    skipped: bool = False

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if isinstance(value, torch.Tensor):  # a value still on the device: read it once
            value = value.item()
            object.__setattr__(self, name, value)
        return value

    def as_dict(self):
        return asdict(self)


def read_metrics(metrics):
    """Read every field still held as a tensor, of all `metrics`, with one host sync.

    Args:
        metrics: an iterable of ChunkMetrics.
    Returns:
        the same ChunkMetrics, every field a Python number.
    """
    metrics = list(metrics)
    held = [(m, k, v) for m in metrics for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
    for (m, k, _), value in zip(held, read_values([v for _, _, v in held])):
        object.__setattr__(m, k, value)
    return metrics


def read_values(values):
    """Python numbers of `values` (0-d tensors and numbers); the tensors in one host sync."""
    tensors = [v if v.dim() == 0 else v.reshape(()) for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return list(values)
    if len({t.device for t in tensors}) > 1:
        tensors = [t.to(tensors[0].device) for t in tensors]
    with torch.no_grad():  # instead of a detach per value
        stacked = torch.stack(tensors)
    read = iter(stacked.tolist())  # dtypes promote: float32 -> float64 is exact
    return [next(read) if isinstance(v, torch.Tensor) else v for v in values]


def read_records(run_dir, kind=None):
    """The records of a run directory's metrics.jsonl, oldest first ([] before the first).

    Args:
        run_dir: the run directory (or the metrics.jsonl file itself).
        kind: only records of this kind ("train", "eval", "diagnose", "recovery", ...).
    A last line cut short by a killed process is left out; any other unreadable line is an
    error naming the file and line.
    """
    path = Path(run_dir)
    path = path if path.suffix == ".jsonl" else path / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the write a kill interrupted
            raise ValueError(f"{path}:{number} is not a JSON record; the run log is damaged") \
                from None
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records
