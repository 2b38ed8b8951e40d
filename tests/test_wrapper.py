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
