"""A language model's tokens as a synthesizer's context (cDNI).

`TBPTTRunner.walk(..., context=)` hands the synthesizer at each boundary a window of the
`(N, B, C)` context stream: the steps after the boundary (`tbptt.window`). For a language
model those steps are token ids, which are not features. `TokenContext` stands in for the
feature stream: each window's ids are encoded when the window is taken, as their rows of a
code table. With `torch.eye(V)` that is a one-hot code (characters: 5 steps of 50 types are
250 features). With the model's own decoder weight it is each token's output embedding as
the model has it at that moment (words: 10,000 types one-hot would be 10,000 features a
step; their decoder rows are `hidden_dim`). The next token's gradient on the state runs
through that row (`W^T (p - onehot(y))`), which is why it predicts (docs/dni.md, point 16).
"""
import torch


class TokenContext:
    """An `(N, B, k * E)` context stream: token ids `(N, B)` or `(N, B, k)`, each encoded as
    its row of `codes` `(V, E)`, looked up without gradient when rows are taken.

    It offers what the runner and `tbptt.window` use of a tensor: `shape`, `dim()` and
    slicing along the time dimension (which returns a real tensor).
    """

    def __init__(self, ids, codes):
        if ids.is_floating_point() or ids.dim() not in (2, 3):
            raise ValueError(f"TokenContext takes integer token ids (N, B) or (N, B, k), got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        if codes.dim() != 2:
            raise ValueError(f"codes must be a (vocabulary, features) table, got shape "
                             f"{tuple(codes.shape)}")
        self.ids = ids if ids.dim() == 3 else ids.unsqueeze(-1)
        self.codes = codes

    @property
    def shape(self):
        n, b, k = self.ids.shape
        return torch.Size((n, b, k * self.codes.shape[1]))

    def dim(self):
        return 3

    def __getitem__(self, rows):
        if not isinstance(rows, slice):
            raise TypeError("a TokenContext is read by slices of steps, e.g. context[a:b]")
        with torch.no_grad():
            return self.codes[self.ids[rows]].flatten(-2)
