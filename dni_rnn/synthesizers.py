"""Synthesizers: regression models that estimate a message (a gradient or an activation)
from a trigger, optionally conditioned on a context (cDNI).

Any `nn.Module` with `forward(trigger, context) -> message` is a synthesizer; the message
has the trigger's structure and shapes.
"""
import contextlib
import contextvars

import torch
from torch import nn
import torch.nn.functional as F

from . import nest

_context = contextvars.ContextVar("dni_rnn_synthesizer_context", default=None)


@contextlib.contextmanager
def synthesizer_context(context):
    """Condition every synthesizer called inside the block on `context` (cDNI).

    Args:
        context: passed as the `context` argument to synthesizers, e.g. labels `(B,)` or
            features `(B, C)`; `None` outside any block.
    """
    token = _context.set(context)
    try:
        yield
    finally:
        _context.reset(token)


def current_context():
    """The context set by the innermost `synthesizer_context` block, or None."""
    return _context.get()


class BasicSynthesizer(nn.Module):
    """An MLP with ReLU that maps a trigger `(..., trigger_dim)` to a message `(..., output_dim)`.

    The output layer is zero-initialised (weights and bias): the first synthetic gradients
    are exactly zero, so training starts as plain TBPTT.

    Args:
        output_dim: size of the message's last dimension.
        n_hidden: number of hidden layers; 0 makes the synthesizer linear.
        hidden_dim: width of hidden layers (default: output_dim).
        trigger_dim: size of the trigger's last dimension (default: output_dim).
        context_dim: size of the context; a LongTensor context of class labels is one-hot
            encoded to this size. None: the synthesizer ignores any context.
        product_rank: a linear synthesizer with a context also reads the products of the
            trigger's coordinates along `product_rank` directions with every context
            feature (`product_features`); the directions start at zero (no products) and are
            set by `set_product_basis`, which a refit calls. 0: off.
    """

    def __init__(self, output_dim, n_hidden=0, hidden_dim=None, trigger_dim=None, context_dim=None,
                 product_rank=0):
        super().__init__()
        if n_hidden < 0:
            raise ValueError(f"n_hidden must be >= 0, got {n_hidden}")
        if product_rank < 0 or (product_rank and (n_hidden or not context_dim)):
            raise ValueError(f"product_rank={product_rank} needs a linear synthesizer "
                             "(n_hidden=0) with a context_dim, and must be >= 0")
        self.output_dim = output_dim
        self.trigger_dim = trigger_dim or output_dim
        self.context_dim = context_dim
        hidden_dim = hidden_dim or output_dim
        first_dim = hidden_dim if n_hidden > 0 else output_dim
        self.input_trigger = nn.Linear(self.trigger_dim, first_dim)
        # the context enters the first layer additively: the same as concatenating it
        self.input_context = nn.Linear(context_dim, first_dim, bias=False) if context_dim else None
        self.product_rank = int(product_rank)
        self.input_products = None
        if product_rank:
            self.input_products = nn.Linear(product_rank * context_dim, first_dim, bias=False)
            self.register_buffer("product_mean", torch.zeros(self.trigger_dim))
            self.register_buffer("product_scale", torch.ones(self.trigger_dim))
            self.register_buffer("product_basis", torch.zeros(self.trigger_dim, product_rank))
        self.hidden = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(n_hidden - 1))
        self.output = nn.Linear(hidden_dim, output_dim) if n_hidden > 0 else None
        self.zero_output_()

    @torch.no_grad()
    def zero_output_(self):
        """Zero the output layer (weights and bias): the message becomes exactly zero."""
        for p in self.refitted_parameters():  # everything that writes the message directly
            nn.init.zeros_(p)

    def forward(self, trigger, context=None):
        if self.output is None:
            return self._first(trigger, context)
        return self.output(self.features(trigger, context))

    @property
    def last_layer(self):
        """The linear layer that writes the message."""
        return self.output if self.output is not None else self.input_trigger

    def refitted_parameters(self):
        """What a closed-form refit writes: the last layer, and when the synthesizer is linear
        also the layers that read the context and its products."""
        layers = [self.last_layer]
        if self.output is None:
            layers += [m for m in (self.input_context, self.input_products) if m is not None]
        return [p for layer in layers for p in layer.parameters()]

    def features(self, trigger, context=None):
        """What `last_layer` reads: the last hidden activations (the trigger itself when the
        synthesizer is linear)."""
        if self.output is None:
            if self.input_context is not None:
                raise ValueError("a linear synthesizer with a context writes its message with "
                                 "two layers; its features are not one layer's input")
            return trigger
        x = F.relu(self._first(trigger, context))
        for layer in self.hidden:
            x = F.relu(layer(x))
        return x

    def _first(self, trigger, context):
        if trigger.shape[-1] != self.trigger_dim:
            raise ValueError(
                f"BasicSynthesizer expects a trigger with last dimension {self.trigger_dim}, "
                f"got shape {tuple(trigger.shape)} (for nested states wrap it in StateSynthesizer)"
            )
        x = self.input_trigger(trigger)
        if self.input_context is not None:
            if context is None:
                raise ValueError(
                    "BasicSynthesizer was built with context_dim but got no context; "
                    "wrap the calls in dni.synthesizer_context(context)"
                )
            features = self.context_features(context, trigger.dtype)
            x = x + self.input_context(features)
            if self.input_products is not None:
                x = x + self.input_products(self.product_features(trigger, features))
        return x

    def product_features(self, trigger, context_features):
        """`(..., product_rank * context_dim)`: the standardised trigger's coordinates along
        `product_basis`, each times every context feature. A copy task's future gradient
        carries the readout's error, state against target: a product that no linear map of
        [trigger; context] can form."""
        dtype = trigger.dtype
        z = ((trigger - self.product_mean.to(dtype)) / self.product_scale.to(dtype)) \
            @ self.product_basis.to(dtype)
        return (z[..., :, None] * context_features[..., None, :]).flatten(-2)

    @torch.no_grad()
    def set_product_basis(self, triggers):
        """Fit `product_features`' directions to the rows `triggers` `(N, trigger_dim)`: their
        mean and standard deviation, and the first `product_rank` principal directions of
        the standardised rows (zero where there are fewer rows)."""
        x = triggers.double()
        mean = x.mean(0)
        sd = x.std(0) if len(x) > 1 else torch.zeros_like(mean)
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        directions = torch.linalg.svd((x - mean) / sd, full_matrices=False).Vh
        basis = torch.zeros_like(self.product_basis, dtype=x.dtype)
        rank = min(self.product_rank, directions.shape[0])
        basis[:, :rank] = directions[:rank].T
        for buf, value in ((self.product_mean, mean), (self.product_scale, sd),
                           (self.product_basis, basis)):
            buf.copy_(value)

    def context_features(self, context, dtype):
        """The context as `input_context` reads it: class labels one-hot encoded."""
        if not context.is_floating_point():
            return F.one_hot(context.long(), self.context_dim).to(dtype)
        return context.to(dtype)


def state_dim(state, batch_dim=None):
    """Features per example of a (nested) state: what StateSynthesizer's inner MLP sees.

    Example: an LSTM state `(h, c)`, each `(layers, B, H)`, has `2 * layers * H`.
    """
    return sum(t.numel() // nest.batch_size(t, batch_dim) for t in nest.flatten(state))


class StateSynthesizer(nn.Module):
    """Apply a flat synthesizer to a nested state.

    Every tensor of the trigger is moved to batch-first, flattened per example and
    concatenated along the feature dimension; the inner synthesizer maps `(B, D)` to
    `(B, D)`, and its output is split and reshaped back into the trigger's structure.

        (h, c): (layers, B, H) each  ->  (B, 2*layers*H)  -> inner ->  back to (h, c)

    Args:
        synthesizer: a module mapping `(B, D)` (and a context) to `(B, D)`.
        batch_dim: the batch dimension of every state tensor; None: the dimension before
            the features (`(layers, B, H)` -> 1, `(B, H)` -> 0).
    """

    def __init__(self, synthesizer, batch_dim=None):
        super().__init__()
        self.synthesizer = synthesizer
        self.batch_dim = batch_dim

    @classmethod
    def mlp(cls, state_dim, n_hidden=1, hidden_dim=None, context_dim=None, batch_dim=None,
            product_rank=0):
        """A StateSynthesizer around a `BasicSynthesizer(state_dim, n_hidden, ...)`."""
        inner = BasicSynthesizer(state_dim, n_hidden=n_hidden, hidden_dim=hidden_dim,
                                 context_dim=context_dim, product_rank=product_rank)
        return cls(inner, batch_dim=batch_dim)

    def zero_output_(self):
        """Zero the inner synthesizer's output where it knows how; False where it cannot."""
        fn = getattr(self.synthesizer, "zero_output_", None)
        if fn is None:
            return False
        fn()
        return True

    def flatten(self, state):
        """`(B, D)`: every tensor of `state` batch-first, flattened per example, concatenated."""
        tensors = nest.flatten(state)
        return torch.cat([t.movedim(d, 0).reshape(t.shape[d], -1)
                          for t, d in zip(tensors, map(self._batch_dim, tensors))], dim=1)

    def refitted_parameters(self):
        """What a closed-form refit writes (`BasicSynthesizer.refitted_parameters`)."""
        return self.synthesizer.refitted_parameters()

    def features(self, state, context=None):
        """What the inner synthesizer's last layer reads at `state`, `(B, F)`, and that layer
        (`BasicSynthesizer.features`, `.last_layer`): what a closed-form refit needs."""
        return self.synthesizer.features(self.flatten(state), context), \
            self.synthesizer.last_layer

    def forward(self, trigger, context=None):
        return self.unflatten(trigger, self.synthesizer(self.flatten(trigger), context))

    def unflatten(self, state, flat):
        """`flatten`'s inverse: `(B, D)` back into the structure and shapes of `state`."""
        tensors = nest.flatten(state)
        dims = [self._batch_dim(t) for t in tensors]
        pieces = flat.split([t.numel() // t.shape[d] for t, d in zip(tensors, dims)], dim=1)
        out = [
            p.reshape(t.movedim(d, 0).shape).movedim(0, d)
            for p, t, d in zip(pieces, tensors, dims)
        ]
        return nest.unflatten(state, out)

    def _batch_dim(self, t):
        d = nest.batch_dimension(t, self.batch_dim)
        if d is None:
            raise ValueError("StateSynthesizer needs state tensors with a batch dimension")
        return d


class GRUSynthesizer(nn.Module):
    """The flat core of `RecurrentSynthesizer`: `(B, D)` boundary states -> `(B, D)` messages,
    with a memory `(B, H)` per stream carried from boundary to boundary.

        h = GRUCell(x, memory)        message = W [h; x] + b     (W, b zero at the start)

    Calling it does not move the memory: `advance(x)` does.
    """

    def __init__(self, dim, hidden_dim=None):
        super().__init__()
        self.hidden_dim = hidden_dim or dim
        self.cell = nn.GRUCell(dim, self.hidden_dim)
        self.readout = nn.Linear(self.hidden_dim + dim, dim)
        self.memory = None  # (B, H), detached; None: every stream starts afresh
        self.zero_output_()

    @torch.no_grad()
    def zero_output_(self):
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)

    def carried(self, x):
        """The memory for a batch like `x`: zeros when there is none for that many streams."""
        m = self.memory
        if m is None or m.shape[0] != x.shape[0]:
            return x.new_zeros(x.shape[0], self.hidden_dim)
        return m.to(device=x.device, dtype=x.dtype)

    def message(self, x, memory):
        return self.readout(torch.cat([self.cell(x, memory), x], dim=1))

    def forward(self, x, context=None):
        if context is not None:
            raise ValueError("RecurrentSynthesizer takes no context (cDNI); use "
                             "StateSynthesizer.mlp(..., context_dim=...)")
        return self.message(x, self.carried(x))

    @torch.no_grad()
    def advance(self, x):
        self.memory = self.cell(x, self.carried(x)).detach()

    def reset_streams(self, mask):
        """Zero the memory of the streams where `mask` (B,) is True (no host sync)."""
        if self.memory is not None and self.memory.shape[0] == mask.shape[0]:
            self.memory = self.memory * (~mask.to(self.memory.device)).to(self.memory.dtype)[:, None]

    def get_extra_state(self):
        return {"memory": self.memory}

    def set_extra_state(self, state):
        self.memory = state.get("memory")


class RecurrentSynthesizer(StateSynthesizer):
    """A synthesizer with a memory of the stream: a GRU over the boundary states.

    At boundary k it reads the whole state s_k (flattened as by `StateSynthesizer`) and its
    memory of the stream's earlier boundaries, and writes the message from the GRU's new
    hidden state and s_k itself; the output layer starts at zero, so training starts as
    plain TBPTT, and with the GRU's part unused it is the linear synthesizer.

    The memory is carried and reset like the model's state: `TBPTTRunner` calls `advance`
    once per chunk, at the chunk's trigger, `reset_streams` for the streams that restart
    inside a chunk and `reset` at the end of a stream. It is carried detached (the GRU learns
    through one boundary at a time, as the model learns through one chunk) and is part of
    `state_dict()` (a checkpoint resumes it). Called on a batch of another width (e.g. the
    diagnostics' own episodes) it starts from an empty memory. Replay and refit, whose
    stored triggers lack the memory, and contexts (cDNI) are refused.

    Args:
        state_dim: features per example of the state (`state_dim(state)`).
        hidden_dim: the GRU's width (default: state_dim).
        batch_dim: as for `StateSynthesizer`.
    """

    recurrent = True

    def __init__(self, state_dim, hidden_dim=None, batch_dim=None):
        super().__init__(GRUSynthesizer(state_dim, hidden_dim), batch_dim=batch_dim)

    @property
    def memory(self):
        """The carried memory, `(B, hidden_dim)`, or None before the first boundary."""
        return self.synthesizer.memory

    def memory_for(self, state):
        """The memory the message at `state` reads now (zeros for a new batch width)."""
        return self.synthesizer.carried(self.flatten(state))

    def message(self, state, memory):
        """The message at `state` from a given `memory` (not the carried one)."""
        return self.unflatten(state, self.synthesizer.message(self.flatten(state), memory))

    def advance(self, state):
        """Move the memory past the boundary `state` (detached)."""
        self.synthesizer.advance(self.flatten(nest.detach(state)))

    def reset_streams(self, mask):
        self.synthesizer.reset_streams(mask)

    def reset(self):
        """Forget every stream (a new stream starts)."""
        self.synthesizer.memory = None

    def features(self, state, context=None):
        raise ValueError("a recurrent synthesizer cannot be refit in closed form (its message "
                         "depends on its memory); use dni.synthesizer=mlp with dni.refit")
