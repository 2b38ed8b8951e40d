"""Replay for the synthesizer: more regression steps on the recent boundaries.

Why (docs/dni.md, "Why the synthesizer predicted nothing"): the future gradient that a
synthesizer regresses onto moves with the model. A synthesizer fitted offline to a frozen
copy of the demo's LSTM keeps a cosine of 0.93 with the true future gradient 10 updates
later and 0.65 after 100, but one regression step per chunk on the chunk's B streams, all
at one phase of the task, is too slow to follow: in training its cosine stayed about 0.
Replay keeps the last `chunks` triggers with the real gradients that reached them and
takes `steps` extra synthesizer updates per chunk on minibatches drawn from them, so the
synthesizer sees many phases per update and keeps up with the model.

The buffer holds gradients in gradient units and scales them by the target scale in force
when they are replayed (a running RMS moves; with `target_scale="sum"` and random chunk
lengths, that is the current chunk's token count). Streams are drawn with torch's global
generator (saved in checkpoints), so a run with replay resumes bit for bit. Replayed
triggers carry no context: a synthesizer conditioned on one (cDNI) cannot be replayed.
"""
import torch

from . import nest


class SynthReplay:
    """A ring buffer of (trigger state, real gradient) per stream, and replayed updates.

    Args:
        steps: extra synthesizer updates per chunk (0: off, nothing is kept).
        chunks: how many recent chunks' boundaries the buffer holds.
        batch_dim: the batch dimension of state tensors (None: the one before the features).
    """

    def __init__(self, steps, chunks=32, batch_dim=None):
        if steps < 0 or chunks < 1:
            raise ValueError(f"replay needs steps >= 0 and chunks >= 1, got {steps}, {chunks}")
        self.steps, self.chunks, self.batch_dim = int(steps), int(chunks), batch_dim
        self.clear()

    def clear(self):
        self.states = self.grads = None  # per state tensor: (..., chunks * B, ...)
        self.structure, self.width, self.filled, self.slot = None, 0, 0, 0

    def __bool__(self):
        return self.steps > 0

    def add(self, state, gradient):
        """Keep one chunk's triggers and the real gradients that reached them (detached)."""
        tensors, grads = nest.flatten(state), nest.flatten(gradient)
        dims = [nest.batch_dimension(t, self.batch_dim) for t in tensors]
        width = tensors[0].shape[dims[0]]
        shapes = [tuple(t.shape) for t in tensors]
        if self.states is None or shapes != self._shapes or width != self.width:
            self.structure, self.width, self._shapes, self._dims = state, width, shapes, dims
            self.states = [self._empty(t, d) for t, d in zip(tensors, dims)]
            self.grads = [self._empty(t, d) for t, d in zip(tensors, dims)]
            self.filled = self.slot = 0
        if self.states[0].device != tensors[0].device:  # resumed from a checkpoint on the CPU
            self.states = [t.to(tensors[0].device) for t in self.states]
            self.grads = [t.to(tensors[0].device) for t in self.grads]
        a, b = self.slot * width, (self.slot + 1) * width
        for bufs, source in ((self.states, tensors), (self.grads, grads)):
            for buf, t, d in zip(bufs, source, dims):
                buf.narrow(d, a, b - a).copy_(t.detach())
        self.slot = (self.slot + 1) % self.chunks
        self.filled = min(self.filled + 1, self.chunks)

    def _empty(self, t, d):
        shape = list(t.shape)
        shape[d] = shape[d] * self.chunks
        return torch.zeros(shape, dtype=t.dtype, device=t.device)

    def sample(self):
        """(states, gradients): `width` streams drawn uniformly from the filled buffer."""
        device = self.states[0].device
        idx = torch.randint(0, self.filled * self.width, (self.width,)).to(device)
        pick = lambda bufs: nest.unflatten(
            self.structure, [b.index_select(d, idx) for b, d in zip(bufs, self._dims)])
        return pick(self.states), pick(self.grads)

    def regression_loss(self, synthesizer, scale, context=None):
        """The synthesizer's loss on one replayed minibatch, as at a trigger:
        sum((M(s) - scale * g)^2) / streams."""
        states, grads = self.sample()
        message = nest.check_same_structure(states, synthesizer(states, context),
                                            "synthesizer message")
        return sum((m - scale * g).pow(2).sum() for m, g in zip(message, nest.flatten(grads))) \
            / self.width

    def state_dict(self):
        if self.states is None:
            return {"filled": 0}
        return {"states": self.states, "grads": self.grads, "structure": self.structure,
                "width": self.width, "filled": self.filled, "slot": self.slot,
                "shapes": self._shapes, "dims": self._dims}

    def load_state_dict(self, state):
        self.clear()
        if not state.get("filled"):
            return
        self.states, self.grads = list(state["states"]), list(state["grads"])
        self.structure, self.width = state["structure"], int(state["width"])
        self.filled, self.slot = int(state["filled"]), int(state["slot"])
        self._shapes, self._dims = [tuple(s) for s in state["shapes"]], list(state["dims"])
