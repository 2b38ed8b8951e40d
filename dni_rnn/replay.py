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
generator (saved in checkpoints), so a run with replay resumes bit for bit. A synthesizer
conditioned on a context (cDNI) is replayed with the context each trigger had (a tensor
with the streams first, kept beside the trigger).

Refit (`ridge` > 0) learns from the same buffer in closed form instead: after every update
the synthesizer's last layer is set to the ridge regression of the buffered targets on the
features that layer reads (the trigger itself for a linear synthesizer), so it fits the
last `chunks` chunks exactly as they are, however fast the model moves. The features are
standardised inside the solve (float64) and the penalty is `ridge` x the number of rows on
each standardised feature; the result is folded back into the layer's weight and bias.
For a linear synthesizer the features are the buffered triggers themselves, so the buffer
keeps the running sums (of x, x x^T, x g^T, g) over its chunks: a refit adds the sums of the
chunks written since the last one and subtracts those of the chunks they replaced, then
solves one d x d system. That costs two chunks' products instead of the whole buffer's, and
2 d^2 floats in all. The running sums are recomputed from the buffer every `chunks` refits,
so float64 rounding cannot build up, and they travel in checkpoints, so a resumed run is
bit-identical. An MLP's features move with its weights and are recomputed every time. A
linear synthesizer with a context reads [trigger; context]: the solve is over both, split
back into its two input layers. With product features (`dni.products`) it also reads the
products of the trigger's first principal components with the context; their directions
are fitted to the buffered triggers whenever the sums are recomputed (so between two
recomputes the features are fixed data, as the running sums need), and the solve covers
all three parts.

With `decay` below 1 the refit weighs each chunk by decay^age (age 0: the newest), so the
fit follows the moving target more closely than a window of equal weights; the rows count
by their weights in the standardisation and the penalty. The running sums age by one factor
of `decay` per chunk added. At `decay` 1 every weight is 1 and nothing is multiplied.
"""
import torch

from . import nest
from .synthesizers import BasicSynthesizer


class SynthReplay:
    """A ring buffer of (trigger state, real gradient) per stream, and replayed updates.

    Args:
        steps: extra synthesizer updates per chunk (0: none).
        chunks: how many recent chunks' boundaries the buffer holds.
        batch_dim: the batch dimension of state tensors (None: the one before the features).
        ridge: refit the synthesizer's last layer in closed form after every update, with
            this ridge penalty (0: no refit; with `steps` 0 too, nothing is kept).
        refit_every: refit after one update in this many (the first after the buffer
            starts, then every `refit_every`-th); the buffer still takes every chunk.
        decay: the refit's weight of a chunk per chunk of age, in (0, 1] (1: equal weights).
    """

    def __init__(self, steps, chunks=32, batch_dim=None, ridge=0.0, refit_every=1, decay=1.0):
        if steps < 0 or chunks < 1 or ridge < 0 or refit_every < 1 or not 0 < decay <= 1:
            raise ValueError(f"replay needs steps >= 0, chunks >= 1, ridge >= 0, refit_every "
                             f">= 1 and 0 < decay <= 1, got {steps}, {chunks}, {ridge}, "
                             f"{refit_every}, {decay}")
        self.steps, self.chunks, self.batch_dim = int(steps), int(chunks), batch_dim
        self.ridge, self.refit_every, self.decay = float(ridge), int(refit_every), float(decay)
        self.clear()

    def clear(self):
        self.states = self.grads = None  # per state tensor: (..., chunks * B, ...)
        self.structure, self.width, self.filled, self.slot = None, 0, 0, 0
        self.contexts = None  # (chunks * B, ...): each trigger's context, when it had one
        self.updates = 0  # since the buffer started: when the next refit is due
        self.added, self.added_at = 0, [0] * self.chunks  # chunks kept; when each slot's was
        self._reset_sums()

    def _reset_sums(self):
        # a linear synthesizer's refit: sums over the chunks in `counted`, the rows replaced
        # since the last refit (still in the sums, with when they were added), refits since
        # the sums were last exact, and `added` when the sums' weights were last brought up
        self.sums, self.counted, self.leaving, self.since_exact = None, set(), [], 0
        self.sums_at = 0

    def _weight(self, added_at):
        """The refit's weight of the chunk added as number `added_at`, now."""
        return self.decay ** (self.added - 1 - added_at)

    def __bool__(self):
        return self.steps > 0 or self.ridge > 0

    def add(self, state, gradient, context=None):
        """Keep one chunk's triggers, the real gradients that reached them (detached) and the
        synthesizer's context there (cDNI; a tensor with the streams first, or None)."""
        tensors, grads = nest.flatten(state), nest.flatten(gradient)
        dims = [nest.batch_dimension(t, self.batch_dim) for t in tensors]
        width = tensors[0].shape[dims[0]]
        shapes = [tuple(t.shape) for t in tensors]
        if context is not None and (not torch.is_tensor(context) or context.dim() < 1
                                    or context.shape[0] != width):
            raise ValueError(f"replay keeps a context only as a tensor with the {width} streams "
                             f"first; got {type(context).__name__} "
                             f"{tuple(getattr(context, 'shape', ()))}")
        ctx_shape = None if context is None else tuple(context.shape[1:])
        kept_shape = None if self.contexts is None else tuple(self.contexts.shape[1:])
        if (self.states is None or shapes != self._shapes or width != self.width
                or ctx_shape != kept_shape):
            self.structure, self.width, self._shapes, self._dims = state, width, shapes, dims
            self.states = [self._empty(t, d) for t, d in zip(tensors, dims)]
            self.grads = [self._empty(t, d) for t, d in zip(tensors, dims)]
            self.contexts = None if context is None else self._empty(context, 0)
            self.filled = self.slot = 0
            self._reset_sums()
        if self.states[0].device != tensors[0].device:  # resumed from a checkpoint on the CPU
            self.states = [t.to(tensors[0].device) for t in self.states]
            self.grads = [t.to(tensors[0].device) for t in self.grads]
            if self.contexts is not None:
                self.contexts = self.contexts.to(tensors[0].device)
            self._reset_sums()
        if self.slot in self.counted:  # its rows leave the sums at the next refit
            self.leaving.append((*self._rows(self.slot, clone=True), self.added_at[self.slot]))
            self.counted.discard(self.slot)
        a, b = self.slot * width, (self.slot + 1) * width
        for bufs, source in ((self.states, tensors), (self.grads, grads)):
            for buf, t, d in zip(bufs, source, dims):
                buf.narrow(d, a, b - a).copy_(t.detach())
        if context is not None:
            self.contexts[a:b].copy_(context.detach())
        self.added_at[self.slot] = self.added
        self.added += 1
        self.slot = (self.slot + 1) % self.chunks
        self.filled = min(self.filled + 1, self.chunks)

    def _empty(self, t, d):
        shape = list(t.shape)
        shape[d] = shape[d] * self.chunks
        return torch.zeros(shape, dtype=t.dtype, device=t.device)

    def sample(self, with_context=False):
        """(states, gradients): `width` streams drawn uniformly from the filled buffer; with
        `with_context`, also their contexts (None when the triggers had none)."""
        device = self.states[0].device
        idx = torch.randint(0, self.filled * self.width, (self.width,)).to(device)
        pick = lambda bufs: nest.unflatten(
            self.structure, [b.index_select(d, idx) for b, d in zip(bufs, self._dims)])
        if not with_context:
            return pick(self.states), pick(self.grads)
        contexts = self.contexts.index_select(0, idx) if self.contexts is not None else None
        return pick(self.states), pick(self.grads), contexts

    def regression_loss(self, synthesizer, scale):
        """The synthesizer's loss on one replayed minibatch, as at a trigger:
        sum((M(s, context) - scale * g)^2) / streams."""
        states, grads, context = self.sample(with_context=True)
        message = nest.check_same_structure(states, synthesizer(states, context),
                                            "synthesizer message")
        return sum((m - scale * g).pow(2).sum() for m, g in zip(message, nest.flatten(grads))) \
            / self.width

    def refit_due(self):
        """Count one update; whether its refit runs (`refit_every`)."""
        self.updates += 1
        return self.ridge > 0 and (self.updates - 1) % self.refit_every == 0

    @torch.no_grad()
    def refit(self, synthesizer, scale):
        """Set the last layer of `synthesizer` (a `StateSynthesizer`) to the ridge regression
        of every buffered target, scale x the real gradient, on its features there."""
        n = self.filled * self.width
        if n < 2:
            return
        linear = _is_linear(synthesizer)
        if self.decay < 1:  # the rows count by their weights
            n = self.width * sum(self._weight(self.added_at[j]) for j in range(self.filled))
        if linear:
            layer = synthesizer.synthesizer.last_layer
            sx, sxx, sxg, sg = self._running_sums(synthesizer)
        else:
            rows = self.filled * self.width
            context = self.contexts[:rows] if self.contexts is not None else None
            features, layer = synthesizer.features(self._filled(self.states), context)
            X, G = features.double(), synthesizer.flatten(self._filled(self.grads)).double()
            w = self._row_weights(X)  # all 1 (exactly) when the decay is off
            wX = X * w
            sx, sxx, sxg, sg = wX.sum(0), X.T @ wX, wX.T @ G, (G * w).sum(0)
        # standardised ridge from the sums: Z = (X - mu) / sd, targets Y = scale * G
        mu, g_mean = sx / n, sg / n
        centred = sxx - n * torch.outer(mu, mu)
        sd = (centred.diagonal().clamp(min=0) / (n - 1)).sqrt()
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        A = centred / torch.outer(sd, sd)
        A = A + self.ridge * n * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        b = scale * (sxg - n * torch.outer(mu, g_mean)) / sd[:, None]
        W = torch.linalg.solve(A, b) / sd[:, None]  # (features, outputs)
        layer.bias.copy_(scale * g_mean - mu @ W)
        inner = synthesizer.synthesizer if linear else None
        if linear and inner.input_context is not None:  # rows: [trigger; context; products]
            d, c = inner.trigger_dim, inner.context_dim
            layer.weight.copy_(W[:d].T)
            inner.input_context.weight.copy_(W[d:d + c].T)
            if inner.input_products is not None:
                inner.input_products.weight.copy_(W[d + c:].T)
        else:
            layer.weight.copy_(W.T)

    def _filled(self, bufs):
        """The filled rows of buffers `bufs` (states or gradients), as a state (views)."""
        rows = self.filled * self.width
        return nest.unflatten(self.structure, [b.narrow(d, 0, rows)
                                               for b, d in zip(bufs, self._dims)])

    def _rows(self, j, clone=False):
        """Chunk slot j's (states, gradients, context), views into the buffer or copies."""
        take = (lambda t: t.clone()) if clone else (lambda t: t)
        rows = lambda bufs: [take(b.narrow(d, j * self.width, self.width))
                             for b, d in zip(bufs, self._dims)]
        context = (None if self.contexts is None
                   else take(self.contexts[j * self.width:(j + 1) * self.width]))
        return rows(self.states), rows(self.grads), context

    def _row_weights(self, rows):
        """Each buffered row's refit weight, as a column beside `rows` (slot-major rows)."""
        w = torch.tensor([self._weight(self.added_at[j]) for j in range(self.filled)],
                         dtype=rows.dtype, device=rows.device)
        return w.repeat_interleave(self.width)[:, None]

    def _moments(self, synthesizer, rows, weight=1.0):
        states, grads, context = rows
        X = synthesizer.flatten(nest.unflatten(self.structure, states)).double()
        G = synthesizer.flatten(nest.unflatten(self.structure, grads)).double()
        inner = synthesizer.synthesizer
        if inner.input_context is not None:
            C = inner.context_features(context, X.dtype)
            parts = [X, C]
            if inner.input_products is not None:
                parts.append(inner.product_features(X, C))
            X = torch.cat(parts, 1)
        wX = weight * X  # a weight of 1 changes no bit
        return [wX.sum(0), X.T @ wX, wX.T @ G, weight * G.sum(0)]

    def _running_sums(self, synthesizer):
        """The (decay-weighted) sums of x, x x^T, x g^T and g over every filled chunk, brought
        up to date."""
        if self.sums is None or self.since_exact >= self.chunks:
            self.sums, self.counted, self.leaving, self.since_exact = None, set(), [], 0
            inner = synthesizer.synthesizer
            if inner.input_products is not None:  # the products' directions follow the buffer
                inner.set_product_basis(synthesizer.flatten(self._filled(self.states)))
            for j in range(self.filled):
                m = self._moments(synthesizer, self._rows(j), self._weight(self.added_at[j]))
                self.sums = m if self.sums is None else [s + x for s, x in zip(self.sums, m)]
                self.counted.add(j)
        else:
            if self.decay < 1:  # every chunk in the sums has aged since they were brought up
                for s in self.sums:
                    s.mul_(self.decay ** (self.added - self.sums_at))
            for *rows, added_at in self.leaving:
                for s, x in zip(self.sums, self._moments(synthesizer, rows,
                                                          self._weight(added_at))):
                    s.sub_(x)
            self.leaving = []
            for j in range(self.filled):
                if j not in self.counted:
                    for s, x in zip(self.sums, self._moments(synthesizer, self._rows(j),
                                                              self._weight(self.added_at[j]))):
                        s.add_(x)
                    self.counted.add(j)
            self.since_exact += 1
        self.sums_at = self.added
        return self.sums

    def state_dict(self):
        if self.states is None:
            return {"filled": 0}
        return {"states": self.states, "grads": self.grads, "structure": self.structure,
                "width": self.width, "filled": self.filled, "slot": self.slot,
                "shapes": self._shapes, "dims": self._dims, "contexts": self.contexts,
                "sums": self.sums, "counted": sorted(self.counted), "leaving": self.leaving,
                "since_exact": self.since_exact, "updates": self.updates,
                "added": self.added, "added_at": list(self.added_at), "sums_at": self.sums_at}

    def load_state_dict(self, state):
        self.clear()
        if not state.get("filled"):
            return
        own = lambda tensors: [t.clone() for t in tensors]  # refits change them in place
        self.states, self.grads = own(state["states"]), own(state["grads"])
        self.structure, self.width = state["structure"], int(state["width"])
        self.filled, self.slot = int(state["filled"]), int(state["slot"])
        self._shapes, self._dims = [tuple(s) for s in state["shapes"]], list(state["dims"])
        self.updates = int(state.get("updates", 0))
        if "added" in state:
            self.added, self.added_at = int(state["added"]), list(state["added_at"])
        else:  # saved before the decay: the slots' order from the ring (the newest before slot)
            self.added = self.filled
            self.added_at = [self.filled - 1 - (self.slot - 1 - j) % self.chunks
                             for j in range(self.chunks)]
        self.contexts = state.get("contexts")
        if self.contexts is not None:
            self.contexts = self.contexts.clone()
        # checkpoints before the running sums recompute them, and so do checkpoints before
        # the decay when it is on (their sums carry no ages)
        if state.get("sums") is not None and ("added" in state or self.decay == 1):
            self.sums, self.counted = own(state["sums"]), set(state["counted"])
            self.leaving = [(own(s), own(g), c, *(rest or [0]))  # ages only matter with decay
                            for s, g, c, *rest in state["leaving"]]
            self.since_exact = int(state["since_exact"])
            self.sums_at = int(state.get("sums_at", self.added))


def _is_linear(synthesizer):
    """Whether a `StateSynthesizer` is linear in the flattened trigger (and its context): its
    refit features are fixed data, so each chunk's sums can be kept."""
    inner = getattr(synthesizer, "synthesizer", None)
    return isinstance(inner, BasicSynthesizer) and inner.output is None
