import math

import torch

from dni_rnn.logs import Meter
from dni_rnn.tbptt import ChunkMetrics


def test_meter_sums_chunks_read_once_per_interval(monkeypatch):
    chunks = [ChunkMetrics(step=k, length=5, loss=torch.tensor(1.0 + k), tokens=20,
                           cosine=torch.tensor(0.1 * k), real_norm=2.0,
                           synth_loss=torch.tensor(math.nan) if k == 1 else torch.tensor(3.0))
              for k in range(4)]
    skipped = ChunkMetrics(step=4, length=5, loss=math.nan, tokens=20, skipped=True)
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or original(t))
    meter = Meter()
    for m in chunks + [skipped]:
        meter.add(m)
    assert not reads  # nothing read while the interval runs
    rec = meter.record()
    assert len(reads) == 1
    assert rec["loss"] == (1 * 20 + 2 * 20 + 3 * 20 + 4 * 20) / 80 and rec["skipped"] == 1
    assert math.isclose(rec["cosine"], (0.0 + 0.1 + 0.2 + 0.3) / 4, rel_tol=1e-6)
    assert rec["synth_loss"] == 3.0  # the NaN chunk is left out of the mean
    assert rec["real_norm"] == 2.0 and rec["aux_loss"] is None
    assert meter.chunks == 0 and meter.pending == []


def test_a_long_interval_is_read_in_bounded_batches(monkeypatch):
    monkeypatch.setattr(Meter, "READ_EVERY", 3)
    meter = Meter()
    for k in range(7):
        meter.add(ChunkMetrics(step=k, length=1, loss=torch.tensor(float(k)), tokens=1))
    assert len(meter.pending) == 1
    assert meter.record()["loss"] == sum(range(7)) / 7


def test_read_records_skips_a_last_line_a_kill_cut_short_and_names_a_damaged_one(tmp_path):
    from dni_rnn.metrics import read_records
    assert read_records(tmp_path) == []
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"kind": "train", "step": 1}\n\n{"kind": "eval", "step": 1}\n{"kind": "tr')
    assert [r["kind"] for r in read_records(tmp_path)] == ["train", "eval"]
    assert read_records(log, "eval") == [{"kind": "eval", "step": 1}]
    log.write_text('{"kind": "train"}\nnot json\n{"kind": "eval"}\n')
    import pytest
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_records(tmp_path)
