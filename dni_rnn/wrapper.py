"""`DNI(rnn)`: synthetic gradients for an existing recurrent module in one line.

    rnn = dni.DNI(nn.LSTM(32, 64, num_layers=2))
    for x, y in chunks:                                  # x: (T, B, 32)
        out, state = rnn(x, state)                       # state is cut and made a trigger
        loss = criterion(head(out), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()

No deferred block is needed: the synthetic gradient for the outgoing state rides on the
backward pass (a node that is the identity on `outputs` and the outgoing state and, in
backward, adds `sg_scale * g_hat` to the state's gradient once, whichever of them the loss
uses: the outputs, the final hidden state as a classifier would, or both).

This is the exact DNI of docs/design.md ("One chunk with DNI"), without the runner's stability mechanisms (targets in
running-RMS units, the cap, the guard; docs/dni.md): with raw targets it can diverge. The bootstrap weight is therefore
`sg_scale` (one pass); use `TBPTTRunner` for a separate lambda, resets and metrics.
"""
import torch
from torch import nn

from . import nest
from .interfaces import BackwardInterface
from .models import core_init_state
from .synthesizers import StateSynthesizer, state_dim


class _AttachSyntheticGradient(torch.autograd.Function):
    """Identity on (outputs, *states); backward adds the synthetic gradients to the states'."""

    @staticmethod
    def forward(ctx, grads, outputs, *states):
        ctx.grads = grads
        return (outputs.view_as(outputs), *(s.view_as(s) for s in states))

    @staticmethod
    def backward(ctx, grad_outputs, *grad_states):
        # unused outputs arrive as zeros (materialised grads), so the sum is always defined
        return (None, grad_outputs, *(g + sg for g, sg in zip(grad_states, ctx.grads)))


class DNI(nn.Module):
    """Wrap `rnn` (`forward(inputs, state) -> (outputs, state)`) with synthetic gradients.

    Args:
        rnn: an nn.LSTM / nn.GRU / nn.RNN or any module with that signature.
        synthesizer: a synthesizer over the rnn's state; default: a one-hidden-layer MLP
            (`StateSynthesizer.mlp`) for nn.LSTM / nn.GRU / nn.RNN.
        sg_scale: weight of the synthetic gradient (and the bootstrap weight).
        target_scale: units of the synthesizer's targets (see `BackwardInterface`).
    """

    def __init__(self, rnn, synthesizer=None, sg_scale=0.1, target_scale=1.0, n_hidden=1, hidden_dim=None):
        super().__init__()
        if synthesizer is None:
            if not isinstance(rnn, nn.RNNBase):
                raise ValueError("DNI needs a synthesizer for a custom module, e.g. "
                                 "StateSynthesizer.mlp(dni.state_dim(state))")
            dim = state_dim(core_init_state(rnn, 1))
            synthesizer = StateSynthesizer.mlp(dim, n_hidden=n_hidden, hidden_dim=hidden_dim)
        self.rnn = rnn
        self.interface = BackwardInterface(synthesizer, target_scale=target_scale)
        self.sg_scale = sg_scale

    def forward(self, inputs, state=None):
        if state is None:
            state = self.init_state(inputs.shape[1])
        if not self.training:
            return self.rnn(inputs, state)
        trigger = self.interface.make_trigger(state)
        outputs, new_state = self.rnn(inputs, trigger)
        g_hat = self.interface.synthesize(new_state)
        grads = tuple(self.sg_scale * g for g in nest.flatten(g_hat))
        outputs, *states = _AttachSyntheticGradient.apply(grads, outputs, *nest.flatten(new_state))
        return outputs, nest.unflatten(new_state, states)

    def init_state(self, batch_size):
        return core_init_state(self.rnn, batch_size)

    @property
    def last_stats(self):
        """The synthesizer's fit at the last trigger (see `TriggerStats`)."""
        return self.interface.last_stats
