import torch
from torch import nn

import dni_rnn as dni
from helpers import OracleSynthesizer, boundaries, full_bptt, make_problem


class Core(nn.Module):
    """The rnn part of helpers.TinyLSTMLM, so that DNI() can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.rnn = model.rnn

    def forward(self, x, state):
        return self.rnn(x, state)


def test_dni_wrapper_with_oracle_equals_full_bptt_with_plain_backward():
    model, x, y, state = make_problem(n_steps=12)
    reference, values, future = full_bptt(model, x, y, state, 4)
    wrapped = dni.DNI(Core(model), synthesizer=OracleSynthesizer(values, future), sg_scale=1.0)
    model.zero_grad()
    s = state
    for a, b in boundaries(len(x), 4):
        if b == len(x):  # the sequence ends: no future gradient after the last chunk
            wrapped.sg_scale = 0.0
        out, s = wrapped(x[a:b], s)
        loss = (model.readout(out) - y[a:b]).pow(2).mean()
        loss.backward()  # no deferred block: the synthetic gradient rides on the outputs
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, r, rtol=0, atol=1e-10)


def test_dni_wrapper_builds_a_synthesizer_for_fused_rnns_and_trains():
    torch.manual_seed(0)
    rnn = dni.DNI(nn.LSTM(3, 8, num_layers=2))
    head = nn.Linear(8, 1)
    opt = torch.optim.Adam(list(rnn.parameters()) + list(head.parameters()), lr=1e-2)
    state = None
    for _ in range(5):
        out, state = rnn(torch.randn(4, 2, 3), state)
        loss = head(out).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert rnn.last_stats.filled
    assert rnn.interface.synthesizer.synthesizer.output.weight.abs().sum() > 0
    rnn.eval()
    out, (h, c) = rnn(torch.randn(4, 2, 3))
    assert h.shape == (2, 2, 8)


def test_dni_wrapper_injects_when_the_loss_uses_only_the_final_state():
    """A classifier on h_n never touches the outputs: the synthetic gradient must still reach
    the chunk (once), as it does for a loss on the outputs."""
    model, x, y, state = make_problem(n_steps=4)
    values = {}
    wrapped = dni.DNI(Core(model), synthesizer=ConstantSynthesizer(state), sg_scale=0.5)
    for use in ("outputs", "h_n", "both"):
        model.zero_grad()
        out, (h, c) = wrapped(x, state)
        loss = {"outputs": lambda: out.pow(2).mean(), "h_n": lambda: h[-1].pow(2).mean(),
                "both": lambda: out.pow(2).mean() + h[-1].pow(2).mean()}[use]()
        loss.backward()
        values[use] = [p.grad.clone() for p in model.rnn.parameters()]
        # the reference: the same loss plus <0.5 g_hat, s_end> through plain autograd
        model.zero_grad()
        out2, (h2, c2) = model.rnn(x, tuple(t.clone() for t in state))
        ref = {"outputs": lambda: out2.pow(2).mean(), "h_n": lambda: h2[-1].pow(2).mean(),
               "both": lambda: out2.pow(2).mean() + h2[-1].pow(2).mean()}[use]()
        g = wrapped.interface.synthesizer.value
        (ref + 0.5 * ((g[0] * h2).sum() + (g[1] * c2).sum())).backward()
        for a, p in zip(values[use], model.rnn.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)


class ConstantSynthesizer(nn.Module):
    """Returns a fixed nonzero message shaped like the state."""

    def __init__(self, state):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.value = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) for t in state)

    def forward(self, trigger, context=None):
        return self.value
