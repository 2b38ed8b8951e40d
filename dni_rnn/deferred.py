"""Deferred backward: collect every backward of a step and run them as one.

Synthetic and real gradients pass through the same graph nodes; backpropagating them one
after another would traverse the graph twice. Inside `defer_backward()` every
`dni_rnn.backward(tensor, grad)` (and every `BackwardInterface.backward`) is collected and
the block ends with a single `torch.autograd.backward`. Because backprop is linear, that
equals one backward of the summed objective.
"""
import contextlib
import contextvars

import torch

from . import nest

_active = contextvars.ContextVar("dni_rnn_deferred_backward", default=None)


class DeferredBackward:
    """A buffer of (tensor, grad) pairs owned by one `defer_backward()` block."""

    def __init__(self):
        self.tensors = []
        self.grads = []

    def __len__(self):
        return len(self.tensors)

    def add(self, tensor, grad=None):
        """Queue `tensor.backward(grad)`; `tensor` may be a nested state with matching `grad`."""
        tensors, grads = _pairs(tensor, grad)
        self.tensors.extend(tensors)
        self.grads.extend(grads)

    def run(self):
        """Run everything collected as one `torch.autograd.backward` and empty the buffer."""
        tensors, grads = self.tensors, self.grads
        self.tensors, self.grads = [], []
        if tensors:
            torch.autograd.backward(tensors, grads)

    def discard(self):
        self.tensors, self.grads = [], []


@contextlib.contextmanager
def defer_backward():
    """Collect all backwards inside the block; run them as one when it ends.

    Nested blocks join the outermost one (only it runs the backward). If the block raises,
    what was collected is discarded and nothing is backpropagated.

    Yields:
        the `DeferredBackward` buffer in use.
    """
    outer = _active.get()
    if outer is not None:
        yield outer
        return
    buffer = DeferredBackward()
    token = _active.set(buffer)
    try:
        yield buffer
    except BaseException:
        buffer.discard()
        raise
    finally:
        _active.reset(token)
    buffer.run()


def backward(tensor, grad=None):
    """`tensor.backward(grad)`, deferred to the end of the enclosing `defer_backward()` block.

    Args:
        tensor: a tensor (or nested state of tensors) that requires grad.
        grad: the gradient w.r.t. `tensor`, same structure and shapes; None for a scalar.
    """
    buffer = _active.get()
    if buffer is not None:
        buffer.add(tensor, grad)
    else:
        tensors, grads = _pairs(tensor, grad)
        torch.autograd.backward(tensors, grads)


def is_deferring():
    """True inside a `defer_backward()` block."""
    return _active.get() is not None


def _pairs(tensor, grad):
    tensors = nest.flatten(tensor)
    if grad is None:
        grads = [None] * len(tensors)
    else:
        grads = nest.flatten(grad)
        if len(grads) != len(tensors):
            raise ValueError(f"dni_rnn.backward: {len(grads)} grads for {len(tensors)} tensors")
    for i, (t, g) in enumerate(zip(tensors, grads)):
        if not t.requires_grad:
            raise RuntimeError(
                f"dni_rnn.backward: tensor {i} of shape {tuple(t.shape)} does not require grad "
                "(was it detached, or computed under torch.no_grad()?)"
            )
        if g is None and t.numel() != 1:
            raise ValueError(
                f"dni_rnn.backward: grad can be omitted only for a scalar, got shape {tuple(t.shape)}"
            )
        if g is not None and g.shape != t.shape:
            raise ValueError(
                f"dni_rnn.backward: grad of shape {tuple(g.shape)} for a tensor of shape "
                f"{tuple(t.shape)}; they must match"
            )
    return tensors, grads
