"""The fixed costs removed from a DNI chunk (issue 24 item 2) change no result.

Each removal is checked twice: the runner trained with the library as it is and with the
bookkeeping as it was before (kept below, patched in) gives bit-identical parameters and
metrics; and the operations it saves stay saved (counted with a dispatch mode).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dni_rnn as dni
from dni_rnn import dni_step, interfaces, metrics, stability, tbptt
from helpers import TinyLSTMLM


# ---- the bookkeeping before the removals -------------------------------------------------

def old_add(self, message, target, gradient, error=None):
    self.squared_error = self.squared_error + (message - target).pow(2).sum()
    self.dot = self.dot + (message * target).sum()
    self.message_sq = self.message_sq + message.pow(2).sum()
    self.target_sq = self.target_sq + target.pow(2).sum()
    self.gradient_sq = self.gradient_sq + gradient.pow(2).sum()
    self.elements += gradient.numel()
    self.filled = True


def old_add_reference(self, reference, gradient):
    self.reference_dot = self.reference_dot + (reference * gradient).sum()
    self.reference_sq = self.reference_sq + reference.pow(2).sum()
    self.has_reference = True


def old_value(self):
    return (self.mean_square / (1 - self.decay ** self.updates)).sqrt()


def old_scale(self, tokens):
    if self.target_scale == "rms":
        return 1.0 / self.target_rms.value() if self.target_rms.known else 0.0
    if self.target_scale == "raw":
        return 1.0
    if self.target_scale == "sum":
        return float(tokens)
    return float(self.target_scale)


def old_cap_norm(state, max_norm, batch_dim=None):
    norms = stability.per_example_norm(state, batch_dim)
    factor = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-30),
                         torch.ones_like(norms))
    capped = (norms > max_norm).to(norms.dtype).mean()

    def scale(t):
        d = dni.nest.batch_dimension(t, batch_dim)
        shape = [1] * t.dim()
        shape[d] = -1
        return t * factor.reshape(shape)

    return dni.nest.map_state(scale, state), capped


def old_read_values(values):
    tensors = [v.detach().reshape(()) for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return list(values)
    read = iter(torch.stack(tensors).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else v for v in values]


def patch_old(monkeypatch):
    monkeypatch.setattr(interfaces.TriggerStats, "add", old_add)
    monkeypatch.setattr(interfaces.TriggerStats, "add_reference", old_add_reference)
    monkeypatch.setattr(stability.TargetRMS, "value", old_value)
    monkeypatch.setattr(dni_step.DNIStep, "scale", old_scale)
    monkeypatch.setattr(dni_step, "cap_norm", old_cap_norm)
    monkeypatch.setattr(tbptt, "read_values", old_read_values)


# ---- the same updates ----------------------------------------------------------------------

CONFIGS = {
    "defaults": {},
    "cap binds": {"sg_cap": 0.05},
    "raw targets": {"target_scale": "raw"},
    "no cap, no guard": {"sg_cap": None, "guard": False},
    "lambda 0.5": {"bootstrap": 0.5},
    "calibrate": {"calibrate": True},
    "replay": {"replay": 2, "refit": 1e-3},
    "guard fires": {"sg_scale": 1.0, "bootstrap": 1.0, "sg_cap": None},
}


def train(settings, seed=0, chunks=12, T=3, batch=4):
    torch.manual_seed(seed)
    model = TinyLSTMLM(input_size=3, hidden=8, layers=2, out=2)
    state = tuple(torch.zeros(2, batch, 8) for _ in range(2))
    synth = dni.StateSynthesizer.mlp(dni.state_dim(state), n_hidden=1, hidden_dim=16)
    with torch.no_grad():  # a synthesizer that says something from the first chunk
        synth.synthesizer.output.weight.normal_(0, 0.3)
    opt = torch.optim.Adam(list(model.parameters()) + list(synth.parameters()), lr=3e-2)
    runner = dni.TBPTTRunner(model, lambda o, y: (o - y).pow(2).mean(), opt, truncation=T,
                             synthesizer=synth, clip=1.0, **settings)
    if settings.get("sg_scale") == 1.0:  # judge from the start, so that the guard fires
        runner.dni.guard.burn_in, runner.dni.guard.ratio = 2, 0.05
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(chunks * T, batch, 3, generator=g)
    y = torch.randn(chunks * T, batch, 2, generator=g) * 3
    _, history = runner.run(x, y, state)
    return ([p.detach().clone() for p in list(model.parameters()) + list(synth.parameters())],
            [m.as_dict() for m in history], runner)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_updates_bit_identical_to_the_bookkeeping_before(monkeypatch, name):
    params, history, runner = train(CONFIGS[name])
    with monkeypatch.context() as m:
        patch_old(m)
        old_params, old_history, old_runner = train(CONFIGS[name])
    for p, q in zip(params, old_params):
        assert torch.equal(p, q)
    assert history == old_history
    assert runner.dni.target_rms.rms == old_runner.dni.target_rms.rms
    if name == "guard fires":
        assert runner.recoveries > 0 and runner.recoveries == old_runner.recoveries
    if name == "cap binds":
        assert any(h["capped"] for h in history)


def test_cached_rms_equals_its_formula_after_a_checkpoint():
    rms = stability.TargetRMS()
    for ms in (2.0, 0.5, 3.0):
        rms.update(torch.tensor(ms))
        assert torch.equal(rms.value(), old_value(rms))
    fresh = stability.TargetRMS()
    fresh.load_state_dict(rms.state_dict())
    assert torch.equal(fresh.value(), rms.value())
    assert fresh.rms == rms.rms == float(old_value(rms))


# ---- the operations saved ------------------------------------------------------------------

class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_trigger_stats_start_without_adding_to_zero():
    stats = interfaces.TriggerStats(batch_size=4)
    m, t = torch.randn(4, 5), torch.randn(4, 5)
    error = m - t
    with Ops() as ops:
        stats.add(m, t, t, error)
    assert "add" not in ops.names and "sub" not in ops.names
    assert ops.names.count("sum") == 5


def test_target_rms_is_computed_once_per_update():
    rms = stability.TargetRMS()
    proposal, value = rms.propose(torch.tensor(2.0))
    rms.commit(proposal, float(value), value)
    with Ops() as ops:
        rms.value(), rms.value()
    assert ops.names == []


def test_read_values_stacks_without_a_detach_per_value():
    values = [torch.tensor(1.5, requires_grad=True) * 2, torch.tensor(2.0), 3]
    with Ops() as ops:
        assert metrics.read_values(values) == [3.0, 2.0, 3]
    assert "detach" not in ops.names and "view" not in ops.names
