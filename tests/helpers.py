"""Small float64 reference setups shared by the gradient tests, and what the run tests share."""

import shutil
import subprocess
from pathlib import Path

import torch
from torch import nn

import dni_rnn as dni


class TinyLSTMLM(nn.Module):
    """inputs (T, B, I) -> 2-layer nn.LSTM -> linear readout (T, B, O)."""

    def __init__(self, input_size=3, hidden=4, layers=2, out=2):
        super().__init__()
        self.rnn = nn.LSTM(input_size, hidden, layers)
        self.readout = nn.Linear(hidden, out)

    def forward(self, x, state):
        y, state = self.rnn(x, state)
        return self.readout(y), state


def chunk_loss(outputs, targets):
    return (outputs - targets).pow(2).mean()


def make_problem(n_steps=12, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyLSTMLM().double()
    x = torch.randn(n_steps, batch, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n_steps, batch, 2, generator=g, dtype=torch.float64)
    state = (torch.randn(2, batch, 4, generator=g, dtype=torch.float64),
             torch.randn(2, batch, 4, generator=g, dtype=torch.float64))
    return model, x, y, state


def boundaries(n_steps, T):
    return [(t, min(t + T, n_steps)) for t in range(0, n_steps, T)]


def full_bptt(model, x, y, state, T):
    """Gradients of sum_k L_k by one backward, and d(sum_{j>=k} L_j)/ds_k at every boundary."""
    model.zero_grad()
    s = state
    boundary_states, total = [], 0.0
    for a, b in boundaries(len(x), T):
        if a > 0:
            for t in dni.nest.flatten(s):
                t.retain_grad()
            boundary_states.append(s)
        out, s = model(x[a:b], s)
        total = total + chunk_loss(out, y[a:b])
    total.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    future = [tuple(t.grad.clone() for t in bs) for bs in boundary_states]
    values = [tuple(t.detach().clone() for t in bs) for bs in boundary_states]
    return grads, values, future


class OracleSynthesizer(nn.Module):
    """Returns the true future gradient for a boundary state it was given (matched by value)."""

    def __init__(self, states, grads):
        super().__init__()
        self.states, self.grads = states, grads

    def forward(self, trigger, context=None):
        for s, g in zip(self.states, self.grads):
            if all(torch.equal(a, b) for a, b in zip(s, trigger)):
                return tuple(g)
        return tuple(torch.zeros_like(t) for t in trigger)  # after the last chunk: no future


class BiasSynthesizer(nn.Module):
    """message = a learnable constant per position; its grad reveals the regression target."""

    def __init__(self, state):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.biases = nn.ParameterList(
            nn.Parameter(torch.randn(t.shape, generator=g, dtype=t.dtype)) for t in state
        )

    def forward(self, trigger, context=None):
        return tuple(b + 0 * t for b, t in zip(self.biases, trigger))


def run_records(run_dir, kind="train"):
    """A run's JSONL records of one kind, without the timing field (for bit-exact comparisons)."""
    out = dni.metrics.read_records(run_dir, kind)
    for r in out:
        r.pop("tokens_per_s", None)
    return out


# the stability mechanisms off: targets in gradient units, no cap, no guard (the exact DNI)
EXACT = dict(target_scale="raw", sg_cap=None, guard=False, calibrate=False)


class RecordingOptimizer(torch.optim.Optimizer):
    """Changes nothing; sums the gradients it is asked to apply (to compare with BPTT)."""

    def __init__(self, params):
        super().__init__(params, {})
        self.total = None

    def step(self, closure=None):
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                 for g in self.param_groups for p in g["params"]]
        self.total = grads if self.total is None else [a + b for a, b in zip(self.total, grads)]


# ptb-word-small's DNI before 2026-12-05: the synthesizer reads the state alone (no refit;
# what torchrun can run, and what sg-push's synthesizer is)
STATE_ONLY_DNI = ["dni.context=none", "dni.synth_layers=1", "dni.refit=0"]

# every recipe's smoke variant (tests that run each of them)
SMOKE = ["ptb-word-small-smoke", "ptb-word-medium-smoke", "ptb-char-smoke", "copy-smoke",
         "repeat-copy-smoke", "repeat-copy-cdni-smoke", "repeat-copy-bplambda-smoke"]


def checkpoint_difference(a, b, where="", skip=("progress.elapsed",)):
    """The first difference between two checkpoints read back (tensors to the last bit), as
    a dotted path, or "" when equal; `skip` names fields allowed to differ (the clock)."""
    if where.lstrip(".") in skip:
        return ""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(_bytes(a), _bytes(b)))
        return "" if same else where or "."
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where} (keys)"
        return next((d for k in a if (d := checkpoint_difference(a[k], b[k], f"{where}.{k}",
                                                                skip))), "")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where} (length)"
        return next((d for i, (x, y) in enumerate(zip(a, b))
                     if (d := checkpoint_difference(x, y, f"{where}[{i}]", skip))), "")
    return "" if a == b or (a != a and b != b) else where or "."


def _bytes(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def make_read_only(folder):
    """Make `folder` read-only, also for root (`chattr +i` where chmod does not bind);
    False where neither works (then nothing is changed for good: call make_writable)."""
    folder = Path(folder)
    folder.chmod(0o555)
    if not _writable(folder):
        return True
    if shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    return not _writable(folder)


def make_writable(folder):
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    Path(folder).chmod(0o755)


def _writable(folder):
    probe = folder / ".probe"
    try:
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False
