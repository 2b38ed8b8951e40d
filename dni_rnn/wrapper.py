"""`DNI(rnn)`: synthetic gradients for an existing recurrent module in one line.

    rnn = dni.DNI(nn.LSTM(32, 64, num_layers=2))
    for x, y in chunks:                                  # x: (T, B, 32)
        out, state = rnn(x, state)                       # state is cut and made a trigger
        loss = criterion(head(out), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()

No deferred block is needed: the synthetic gradient for the outgoing state rides on the
backward pass of the outputs (a node that is the identity on `outputs` and, in backward,
also sends `sg_scale * g_hat` into the outgoing state). The bootstrap weight is therefore
`sg_scale` (one pass); use `TBPTTRunner` for a separate lambda, resets and metrics.
"""
import torch
from torch import nn

from . import nest
from .interfaces import BackwardInterface
from .models import core_init_state
from .synthesizers import StateSynthesizer, state_dim


class _AttachSyntheticGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, outputs, grads, *states):
        ctx.grads = grads
        return outputs.view_as(outputs)

    @staticmethod
    def backward(ctx, grad_outputs):
        return (grad_outputs, None, *ctx.grads)


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
        outputs = _AttachSyntheticGradient.apply(outputs, grads, *nest.flatten(new_state))
        return outputs, new_state

    def init_state(self, batch_size):
        return core_init_state(self.rnn, batch_size)

    @property
    def last_stats(self):
        """The synthesizer's fit at the last trigger (see `TriggerStats`)."""
        return self.interface.last_stats
