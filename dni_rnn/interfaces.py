"""Decoupled Neural Interfaces: backward (synthetic gradients), forward (synthetic inputs)
and bidirectional (both), in the message-passing vocabulary of Jaderberg et al. 2016.

Scales and units, stated once:
- A synthesizer's message for a `BackwardInterface` estimates `target_scale * dL/ds`, where
  L is the loss the caller backpropagates (a mean-reduced loss makes these gradients
  1/(B*T) small; `target_scale` lets the synthesizer work in other units).
- Its regression loss at a trigger is the squared error summed over features and averaged
  over the batch: `sum((message - target_scale * g)**2) / B`, B read off the batch
  dimension (default: the dimension before the features, so `(layers, B, H)` -> 1).
"""
import torch
from torch import nn

from . import deferred, nest
from .synthesizers import current_context


class TriggerStats:
    """How well a synthesizer's message fitted the real gradient that reached its trigger.

    Filled during the backward pass; read it afterwards. Values are 0-d tensors (no
    device sync until you call `float()` on them).
    """

    def __init__(self, batch_size):
        self.batch_size = batch_size
        self.squared_error = 0.0
        self.dot = 0.0
        self.message_sq = 0.0
        self.target_sq = 0.0
        self.gradient_sq = 0.0
        self.elements = 0
        self.filled = False
        self.reference_dot = 0.0
        self.reference_sq = 0.0
        self.has_reference = False
        self.gradients = None  # {tensor index: real gradient}, when make_trigger(keep=True)

    def add(self, message, target, gradient, error=None):
        """Fold in one tensor of the trigger; `error`: `message - target` if already known."""
        error = message - target if error is None else error
        self.squared_error = _plus(self.squared_error, error.pow(2).sum())
        self.dot = _plus(self.dot, (message * target).sum())
        self.message_sq = _plus(self.message_sq, message.pow(2).sum())
        self.target_sq = _plus(self.target_sq, target.pow(2).sum())
        self.gradient_sq = _plus(self.gradient_sq, gradient.pow(2).sum())
        self.elements += gradient.numel()
        self.filled = True

    def add_reference(self, reference, gradient):
        """Score a reference estimate of the gradient (e.g. the synthetic gradient injected
        at this boundary one chunk earlier): sums of <reference, gradient> and |reference|^2."""
        self.reference_dot = _plus(self.reference_dot, (reference * gradient).sum())
        self.reference_sq = _plus(self.reference_sq, reference.pow(2).sum())
        self.has_reference = True

    @property
    def loss(self):
        """The synthesizer's regression loss (squared error summed, averaged over batch)."""
        return self.squared_error / self.batch_size

    @property
    def cosine(self):
        """Cosine between the synthetic and the real gradient at the trigger (0 if either is 0)."""
        if not self.filled:
            return torch.zeros(())
        denom = (self.message_sq * self.target_sq).sqrt()
        # no device sync: a zero denominator has a zero dot product, so 0 / tiny = 0
        return self.dot / denom.clamp_min(torch.finfo(denom.dtype).tiny)

    @property
    def gradient_norm(self):
        """Norm of the real gradient at the trigger, in gradient units (any target_scale)."""
        return self.gradient_sq ** 0.5

    @property
    def gradient_mean_square(self):
        """Mean square of the real gradient's elements at the trigger."""
        return self.gradient_sq / max(self.elements, 1)

    @property
    def message_norm(self):
        return self.message_sq ** 0.5

    @property
    def target_norm(self):
        return self.target_sq ** 0.5


def _plus(total, value):
    """`total + value`, where a total still at its starting 0.0 takes `value` as it is
    (`0.0 + value` is one more tensor operation and changes no value)."""
    return value if isinstance(total, float) and total == 0.0 else total + value


class _SyntheticGradientUpdater(torch.autograd.Function):
    """Identity on the trigger; in backward, turns the real gradient g that reaches the
    trigger into the regression gradient for the message: d/dm sum((m - s*g)^2)/B."""

    @staticmethod
    def forward(ctx, trigger, message, stats, scale, reference, index):
        ctx.save_for_backward(message)
        ctx.stats, ctx.scale, ctx.reference, ctx.index = stats, scale, reference, index
        return trigger.view_as(trigger)

    @staticmethod
    def backward(ctx, grad):
        (message,) = ctx.saved_tensors
        target = ctx.scale * grad
        error = message - target
        ctx.stats.add(message.detach(), target, grad, error)
        if ctx.reference is not None:
            ctx.stats.add_reference(ctx.reference, grad)
        if ctx.stats.gradients is not None:
            ctx.stats.gradients[ctx.index] = grad.detach()
        if isinstance(ctx.scale, (int, float)) and ctx.scale == 0:  # 0: measure only
            grad_message = torch.zeros_like(message)
        else:
            grad_message = 2.0 * error / ctx.stats.batch_size
        # the trigger is a fresh leaf: the real gradient stops here
        return None, grad_message, None, None, None, None


class BackwardInterface(nn.Module):
    """Synthetic gradients for a state (a tensor or nested tuple / list / dict of tensors).

    Recurrent use (one truncated chunk):

        state = interface.make_trigger(state)        # the synthesizer learns here
        outputs, state = rnn(inputs, state)
        interface.backward(state, factor=beta)       # synthetic gradient for the future

    Feed-forward use (update unlock): `x = interface(x)` between part A and part B.

    With one backward pass, the real gradient that reaches the previous trigger carries
    `factor * J^T g_hat` (backprop is linear): `factor` is both the synthetic-gradient scale
    and the bootstrap weight of the synthesizer's target. The TBPTT runner offers a
    separate bootstrap weight; this low-level API does one pass and nothing hidden.

    In eval mode both calls are identities and nothing is collected.

    Args:
        synthesizer: a module `forward(trigger, context) -> message`, the message shaped
            like the trigger.
        batch_dim: batch dimension of the state tensors (None: the one before the features).
        target_scale: the synthesizer predicts `target_scale * gradient`.
    """

    def __init__(self, synthesizer, batch_dim=None, target_scale=1.0):
        super().__init__()
        self.synthesizer = synthesizer
        self.batch_dim = batch_dim
        self.target_scale = target_scale
        self.last_stats = None

    def make_trigger(self, state, target_scale=None, reference=None, keep=False):
        """Mark `state` as a trigger: the real gradient that reaches it trains the synthesizer.

        The returned state is detached from `state`'s history (a fresh leaf that requires
        grad), with the same structure.

        Args:
            state: a tensor or nested tuple / list / dict of tensors.
            target_scale: overrides the interface's `target_scale` for this trigger; 0
                measures the real gradient (`last_stats`) without training the synthesizer.
            reference: optional estimate of the gradient at `state`, structured like it
                (in gradient units): `last_stats` also scores it against the real gradient
                (`reference_dot`, `reference_sq`).
            keep: also keep the real gradient that reaches each tensor of the trigger
                (`last_stats.gradients`, by position in `nest.flatten`), e.g. for replay.
        Returns:
            the trigger, structured like `state`. `self.last_stats` (a `TriggerStats`) is
            filled once the backward pass has reached it.
        """
        if not self.training:
            return state
        tensors, messages = self._messages(state)
        scale = self._scale(target_scale)
        stats = TriggerStats(nest.batch_size(tensors[0], self.batch_dim))
        if keep:
            stats.gradients = {}
        refs = [None] * len(tensors)
        if reference is not None:
            refs = [r.detach() for r in
                    nest.check_same_structure(state, reference, "reference gradient")]
        outs = [
            _SyntheticGradientUpdater.apply(t.detach().requires_grad_(), m, stats, scale, r, i)
            for i, (t, m, r) in enumerate(zip(tensors, messages, refs))
        ]
        self.last_stats = stats
        return nest.unflatten(state, outs)

    def synthesize(self, state, target_scale=None):
        """The synthetic gradient `g_hat ~ dL/d state` (detached, structured like `state`)."""
        with torch.no_grad():
            _, messages = self._messages(state)
        scale = self._scale(target_scale)
        return nest.unflatten(state, [m / scale for m in messages])

    def _messages(self, state):
        """The state's detached tensors and the synthesizer's message tensors for it."""
        tensors = [t.detach() for t in nest.flatten(state)]
        detached = nest.unflatten(state, tensors)
        message = self.synthesizer(detached, current_context())
        return tensors, nest.check_same_structure(detached, message, "synthesizer message")

    def _scale(self, target_scale):
        return self.target_scale if target_scale is None else target_scale

    def backward(self, state, factor=1.0, target_scale=None):
        """Backpropagate `factor * g_hat` into `state` (deferred inside `defer_backward()`).

        Args:
            state: the state at the end of the part whose future gradient is synthesized.
            factor: the synthetic-gradient scale (also the bootstrap weight, see class doc).
            target_scale: overrides the interface's `target_scale` for this call.
        Returns:
            g_hat (unscaled by `factor`), or None in eval mode.
        """
        if not self.training:
            return None
        for i, t in enumerate(nest.flatten(state)):
            if not t.requires_grad:
                raise RuntimeError(
                    f"BackwardInterface.backward: state tensor {i} of shape {tuple(t.shape)} "
                    "does not require grad; pass the state produced by the network, not a "
                    "detached copy"
                )
        g_hat = self.synthesize(state, target_scale)
        grads = [factor * g for g in nest.flatten(g_hat)]
        deferred.backward(state, nest.unflatten(state, grads))
        return g_hat

    def forward(self, x):
        """Feed-forward update unlock: part A gets a synthetic gradient now; part B's real
        gradient trains the synthesizer. Identity in eval mode."""
        if not self.training:
            return x
        self.backward(x)
        return self.make_trigger(x)


class ForwardInterface(nn.Module):
    """Synthetic inputs (forward unlock): part B can run on a message predicted from a
    trigger known to both parts (in the paper, the network's input).

    Args:
        synthesizer: maps `(trigger, context)` to a message shaped like the real activation.
        batch_dim: batch dimension of the message (None: the one before the features).
    """

    def __init__(self, synthesizer, batch_dim=None):
        super().__init__()
        self.synthesizer = synthesizer
        self.batch_dim = batch_dim
        self.last_loss = None

    def send(self, message, trigger):
        """Regress the synthesizer onto the real `message` (deferred inside `defer_backward()`)."""
        if not self.training:
            return
        prediction = self.synthesizer(nest.detach(trigger), current_context())
        predicted = nest.check_same_structure(message, prediction, "synthesizer message")
        real = [m.detach() for m in nest.flatten(message)]
        loss = sum(
            (p - r).pow(2).sum() / nest.batch_size(r, self.batch_dim)
            for p, r in zip(predicted, real)
        )
        self.last_loss = loss.detach()
        deferred.backward(loss)

    def receive(self, trigger):
        """A synthetic message predicted from `trigger` (detached from the synthesizer)."""
        with torch.no_grad():
            return self.synthesizer(nest.detach(trigger), current_context())

    def forward(self, message, trigger):
        if not self.training:
            return message
        self.send(message, trigger)
        return self.receive(trigger)


class BidirectionalInterface(nn.Module):
    """Complete unlock: part B runs on a synthetic input, part A learns from a synthetic
    gradient, and the real gradient w.r.t. the synthetic input trains the gradient
    synthesizer.

    Args:
        forward_synthesizer: predicts the activation from the trigger (e.g. the input).
        backward_synthesizer: predicts the gradient w.r.t. the activation.
    """

    def __init__(self, forward_synthesizer, backward_synthesizer, batch_dim=None):
        super().__init__()
        self.forward_interface = ForwardInterface(forward_synthesizer, batch_dim)
        self.backward_interface = BackwardInterface(backward_synthesizer, batch_dim)

    def send(self, message, trigger):
        """Part A's end: train the input synthesizer and backpropagate a synthetic gradient."""
        if not self.training:
            return
        self.forward_interface.send(message, trigger)
        self.backward_interface.backward(message)

    def receive(self, trigger):
        """Part B's start: a synthetic input whose real gradient trains the gradient synthesizer."""
        return self.backward_interface.make_trigger(self.forward_interface.receive(trigger))

    def forward(self, message, trigger):
        if not self.training:
            return message
        self.send(message, trigger)
        return self.receive(trigger)
