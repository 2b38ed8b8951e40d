"""Example recurrent cells for `CellLoop`: `cell(x_t, state) -> state`."""
import torch
from torch import nn


class LayerNormLSTMCell(nn.Module):
    """An LSTM cell with layer normalisation on the gate pre-activations and the cell
    (Ba et al. 2016). State: `(h, c)`, each `(B, hidden_size)`.
    """

    state_size = 2

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.ln_ih = nn.LayerNorm(4 * hidden_size)
        self.ln_hh = nn.LayerNorm(4 * hidden_size)
        self.ln_c = nn.LayerNorm(hidden_size)

    def forward(self, x, state):
        h, c = state
        gates = self.ln_ih(self.ih(x)) + self.ln_hh(self.hh(h))
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
        return h, c


class MinimalGRUCell(nn.Module):
    """A GRU cell written out (same equations and weight layout as nn.GRUCell), as a
    template for custom cells. State: `h` of shape `(B, hidden_size)`.
    """

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 3 * hidden_size)
        self.hh = nn.Linear(hidden_size, 3 * hidden_size)

    def forward(self, x, h):
        r_i, z_i, n_i = self.ih(x).chunk(3, dim=-1)
        r_h, z_h, n_h = self.hh(h).chunk(3, dim=-1)
        r = torch.sigmoid(r_i + r_h)
        z = torch.sigmoid(z_i + z_h)
        n = torch.tanh(n_i + r * n_h)
        return (1 - z) * n + z * h
