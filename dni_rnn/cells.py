"""Recurrent cells `cell(x_t, state) -> state`, and `CellLoop`, which runs them over time
and layers as a core for the runner (`forward(inputs, state) -> (outputs, state)`)."""
import torch
from torch import nn

from . import nest


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


def _first_tensor(state):
    return nest.flatten(state)[0]


class CellLoop(nn.Module):
    """A recurrent core from cells: `forward(inputs (T, B, I), state) -> (outputs (T, B, H), state)`.

    Layer i's cell is called as `cell(x_t, state_i) -> state_i`; its output (the input of
    layer i+1 and, for the last layer, the core's output) is `output_fn(state_i)`, by
    default the first tensor of the state (h of an LSTM cell's `(h, c)`).

    The state is a tuple with one entry per layer, each in the cell's own structure.

    Args:
        cells: one cell or a list of cells (one per layer).
        init_state: optional `init_state(batch_size) -> state` (per-layer tuple); by default
            zeros shaped after each cell's `hidden_size` (an `(h, c)` pair when the cell is an
            LSTM-like cell with `state_size == 2`, else a single tensor).
        output_fn: maps a layer's state to its output.
        dropout: dropout between layers.
    """

    def __init__(self, cells, output_fn=_first_tensor, dropout=0.0, init_state=None):
        super().__init__()
        self.cells = nn.ModuleList(cells if isinstance(cells, (list, tuple)) else [cells])
        self.output_fn = output_fn
        self.drop = nn.Dropout(dropout)
        self._init_state = init_state

    def forward(self, inputs, state):
        if len(state) != len(self.cells):
            raise ValueError(f"CellLoop has {len(self.cells)} layers but the state has {len(state)} entries")
        x, new_state = inputs, []
        for i, (cell, s) in enumerate(zip(self.cells, state)):
            outs = []
            for t in range(x.shape[0]):
                s = cell(x[t], s)
                outs.append(self.output_fn(s))
            x = torch.stack(outs)
            if i + 1 < len(self.cells):
                x = self.drop(x)
            new_state.append(s)
        return x, tuple(new_state)

    def init_state(self, batch_size):
        if self._init_state is not None:
            return self._init_state(batch_size)
        p = next(self.parameters())
        states = []
        for cell in self.cells:
            zeros = p.new_zeros(batch_size, cell.hidden_size)
            pair = isinstance(cell, nn.LSTMCell) or getattr(cell, "state_size", 1) == 2
            states.append((zeros, zeros.clone()) if pair else zeros)
        return tuple(states)
