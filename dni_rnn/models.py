"""Models for the runner: `forward(inputs, state) -> (outputs, state)`, time-major.

- `RNNLanguageModel`: embedding -> stacked LSTM / GRU (fused nn.LSTM / nn.GRU kernels, or
  any core such as a `CellLoop`) -> decoder, with dropout and optional tied weights.
- `CellLoop` (in cells.py) turns cells `cell(x_t, state) -> state` into such a core.
- `SequenceModel`: a core plus a linear readout for real-valued tasks (copy, repeat copy).
"""
from torch import nn


def core_init_state(core, batch_size):
    """Zero state of a recurrent core for `batch_size` streams.

    An nn.LSTM / nn.GRU / nn.RNN gets `(layers * dirs, B, H)` zeros (`(h, c)` for an LSTM);
    any other core is asked through its own `init_state(batch_size)`.
    """
    if not isinstance(core, nn.RNNBase):
        return core.init_state(batch_size)
    p = next(core.parameters())
    dirs = 2 if core.bidirectional else 1
    h = p.new_zeros(core.num_layers * dirs, batch_size, core.hidden_size)
    return (h, h.clone()) if isinstance(core, nn.LSTM) else h


class RNNLanguageModel(nn.Module):
    """Embedding -> recurrent core -> decoder, word_language_model style.

    tokens `(T, B)` -> embeddings `(T, B, E)` -> core -> `(T, B, H)` -> logits `(T, B, V)`

    Args:
        vocab_size: number of token ids.
        embed_dim: embedding size (must equal hidden_dim when weights are tied).
        hidden_dim: core output size.
        num_layers: stacked layers of the fused core.
        cell: "lstm" or "gru" (fused kernels), ignored when `core` is given.
        dropout: dropout on embeddings, between layers and before the decoder.
        tie_weights: share the embedding and decoder weights (Press & Wolf 2017).
        core: a custom core `(inputs, state) -> (outputs, state)` such as a `CellLoop`.
    """

    def __init__(self, vocab_size, embed_dim=200, hidden_dim=200, num_layers=2, cell="lstm",
                 dropout=0.0, tie_weights=False, core=None):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        if core is None:
            kinds = {"lstm": nn.LSTM, "gru": nn.GRU}
            if cell not in kinds:
                raise ValueError(f"unknown cell {cell!r}; choose one of {sorted(kinds)}")
            core = kinds[cell](embed_dim, hidden_dim, num_layers,
                               dropout=dropout if num_layers > 1 else 0.0)
        self.core = core
        self.decoder = nn.Linear(hidden_dim, vocab_size)
        if tie_weights:
            if embed_dim != hidden_dim:
                raise ValueError(f"tied weights need embed_dim == hidden_dim, got {embed_dim} and {hidden_dim}")
            self.decoder.weight = self.embedding.weight
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not tie_weights:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, tokens, state):
        x = self.drop(self.embedding(tokens))
        y, state = self.core(x, state)
        return self.decoder(self.drop(y)), state

    def init_state(self, batch_size):
        return core_init_state(self.core, batch_size)


class SequenceModel(nn.Module):
    """A recurrent core with a linear readout, for real-valued sequence tasks.

    inputs `(T, B, I)` -> core -> `(T, B, H)` -> readout `(T, B, O)` (logits for bit targets)
    """

    def __init__(self, input_dim, output_dim, hidden_dim=256, num_layers=1, cell="lstm", core=None):
        super().__init__()
        if core is None:
            kinds = {"lstm": nn.LSTM, "gru": nn.GRU}
            if cell not in kinds:
                raise ValueError(f"unknown cell {cell!r}; choose one of {sorted(kinds)}")
            core = kinds[cell](input_dim, hidden_dim, num_layers)
        self.core = core
        self.readout = nn.Linear(hidden_dim, output_dim)

    def forward(self, inputs, state):
        y, state = self.core(inputs, state)
        return self.readout(y), state

    def init_state(self, batch_size):
        return core_init_state(self.core, batch_size)
