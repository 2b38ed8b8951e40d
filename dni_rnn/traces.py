"""BP(lambda) across chunk boundaries: the synthesizer also learns from later TD errors,
through eligibility traces (Pemberton & Costa, "BP(lambda): Online Learning via Synthetic
Gradients", TMLR 2024, arXiv 2401.07044; here a chunk boundary is their time step).

At boundary k (state s_k, chunk k from s_k to s_{k+1}, J_k = ds_{k+1}/ds_k) the synthesizer
predicts M_k = M(s_k), in target units, of the discounted future gradient

    G_k = dL_k/ds_k + gamma J_k^T G_{k+1}          (G = 0 past the end of a stream)

The runner's trigger receives the one-step target dL_k/ds_k + gamma J_k^T g_hat_{k+1} (its
bootstrap weight is gamma), so the TD error of boundary k is delta_k = target_k - M_k; DNI
regresses M_k onto that target and nothing else (lambda = 0). BP(lambda) also hands delta_k
to every earlier boundary i < k, carried back to s_i and discounted:

    grad_theta += -2/B sum_{i<k} (gamma lambda)^(k-i) (dM_i/dtheta)^T J_i^T ... J_{k-1}^T delta_k

which is the accumulating trace e_k = gamma lambda J_{k-1} e_{k-1} + dM_k/dtheta applied to
delta_k. Summed over a stream with the synthesizer held fixed, the updates are those of the
regression of every M_k onto the lambda-return

    G^lambda_k = dL_k/ds_k + gamma J_k^T ((1 - lambda) M_{k+1} + lambda G^lambda_{k+1}),

the one-step target at lambda = 0 and the Monte-Carlo return G_k at lambda = 1
(tests/test_bp_lambda.py checks both, and values between, in float64).

The trace is not kept as a matrix over the synthesizer's parameters (D x P per stream, D^3
numbers for a linear synthesizer). It is kept as the last `horizon` boundaries: each one's
state (and a recurrent synthesizer's memory there) and what pulls a vector at s_{i+1} back
to s_i, v -> J_i^T v, in one of two forms:

    the chunk itself     `KeptChunk`: its inputs, resets, copies of the model's weights and
                         the random-number state when it ran. It is run again from s_i (a
                         leaf) under those, once, when the first TD error reaches it; each
                         product is then one backward pass through that graph.
    its state Jacobian   J_i (B, D, D), from D backward passes through the chunk's graph
                         while it is alive; each product is a batched matrix-vector product.

Both give J_i at the parameters in force when chunk i ran, with the same dropout masks (the
optimizer has changed the model's parameters in place since). Carrying delta_k back through
h boundaries costs h products: a chunk costs a forward and up to `horizon` backward passes,
a Jacobian D backward passes, so chunks are kept when the state has more than `horizon`
features per stream, Jacobians otherwise. Memory: a copy of the model and one chunk's
activations per kept chunk, B x D^2 numbers per Jacobian. Either goes into a checkpoint as
it is: a resumed run runs the kept chunks again as the uninterrupted run does, and goes on
bit for bit.

Applying the trace to delta_k then takes one backward pass of the synthesizer over the
stored states. dM_i/dtheta is taken at the current parameters: a linear synthesizer's does
not depend on them, so for it this is the accumulating trace exactly. Boundaries more than
`horizon` chunks back are dropped (their weight is (gamma lambda)^horizon and less); a
stream that restarts inside a chunk has J = 0 there, which ends its trace.
"""
import torch

from . import nest
from .streams import forward_with_resets


def flat_streams(tensors, batch_dim=None):
    """`(B, D)`: every tensor batch-first, flattened per stream, concatenated (the order of
    `StateSynthesizer.flatten`)."""
    return torch.cat([t.movedim(d, 0).reshape(t.shape[d], -1)
                      for t, d in zip(tensors, _dims(tensors, batch_dim))], dim=1)


def _unflat(flat, like, batch_dim=None):
    """`flat_streams`' inverse: `(B, D)` -> tensors shaped like `like`."""
    dims = _dims(like, batch_dim)
    pieces = flat.split([t.numel() // t.shape[d] for t, d in zip(like, dims)], dim=1)
    return [p.reshape(t.movedim(d, 0).shape).movedim(0, d) for p, t, d in zip(pieces, like, dims)]


def _dims(tensors, batch_dim):
    return [nest.batch_dimension(t, batch_dim) for t in tensors]


def _width(tensors, batch_dim):
    """(B, D): streams and features per stream of flattened tensors."""
    batch = tensors[0].shape[_dims(tensors[:1], batch_dim)[0]]
    return batch, sum(t.numel() // batch for t in tensors)


def state_vjp(inputs, outputs, cotangent, batch_dim=None):
    """Per stream, `cotangent` `(B, D_out)` pulled back from the (nested) `outputs` to the
    (nested) `inputs`: `(B, D_in)`, v -> (d outputs / d inputs)^T v, flattened as by
    `flat_streams`. One backward pass; the graph is kept."""
    ins, outs = nest.flatten(inputs), nest.flatten(outputs)
    live = [k for k, o in enumerate(outs) if o.requires_grad]
    if not live:
        return cotangent.new_zeros(_width(ins, batch_dim))
    cotangents = _unflat(cotangent, outs, batch_dim)
    grads = torch.autograd.grad([outs[k] for k in live], ins, [cotangents[k] for k in live],
                                retain_graph=True, allow_unused=True)
    return flat_streams([g if g is not None else torch.zeros_like(t)
                         for g, t in zip(grads, ins)], batch_dim)


def state_jacobian(inputs, outputs, batch_dim=None):
    """Per stream, the Jacobian of the (nested) `outputs` with respect to the (nested)
    `inputs`: `(B, D_out, D_in)`, flattened as by `flat_streams`; one vector-Jacobian product
    per output feature (streams are independent, so one product serves all of them). The
    graph is kept."""
    outs = nest.flatten(outputs)
    batch, d_out = _width(outs, batch_dim)
    rows = []
    for i in range(d_out):
        basis = outs[0].new_zeros(batch, d_out)
        basis[:, i] = 1
        rows.append(state_vjp(inputs, outs, basis, batch_dim))
    return torch.stack(rows, dim=1)


def message_at(synthesizer, state, memory=None):
    """The synthesizer's message at `state`; a recurrent one's from the given memory."""
    if memory is not None:
        return synthesizer.message(state, memory)
    return synthesizer(state, None)


class KeptChunk:
    """How chunk i ran, to run it again from its boundary state s_i to s_{i+1} (module doc).

    Args:
        inputs: the chunk's inputs `(T, B, ...)`.
        resets: `(T, B)` bool, the streams that restarted inside it (None: none).
        weights: copies of the model's parameters and buffers, by name, when it ran.
        rng: the random-number state before its forward (CPU, and CUDA or None).
    """

    def __init__(self, inputs, resets, weights, rng):
        self.inputs, self.resets, self.weights, self.rng = inputs, resets, weights, rng
        self.graph = None  # (s_i as a leaf, s_{i+1}) once run again

    @staticmethod
    def can_run(model):
        """Whether `model` can run as it was from copies of its named parameters and buffers
        (`torch.func.functional_call`): a module whose `named_parameters` hold all of its
        `parameters`."""
        if not isinstance(model, torch.nn.Module):
            return False
        named = {id(p) for _, p in model.named_parameters()}
        return all(id(p) in named for p in model.parameters())

    @classmethod
    def record(cls, model, inputs, resets=None):
        """A chunk about to run `model` over `inputs` `(T, B, ...)` (just before its forward:
        the random-number state is the one it will draw from)."""
        weights = {name: t.detach().clone()
                   for name, t in [*model.named_parameters(), *model.named_buffers()]}
        device = inputs.device
        rng = (torch.get_rng_state(),
               torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        # copies: a view would hold (and save) the whole stream, or change with a reused buffer
        return cls(inputs.clone(), resets.clone() if resets is not None else None, weights, rng)

    def pull_back(self, u, state, model, batch_dim=None, split_first=False):
        """J_i^T u per stream.

        Args:
            u: `(B, D)`, at s_{i+1}.
            state: s_i, the chunk's boundary state.
            model, batch_dim, split_first: what ran the chunk, `forward_with_resets(model,
                inputs, state, resets, batch_dim, split_first)`; the first call runs it again
                so, under the chunk's weights and random-number state, and keeps the graph.
        Returns:
            `(B, D)`, at s_i.
        """
        if self.graph is None:
            device = u.device  # a checkpoint is loaded onto the CPU
            self.weights = {name: w.to(device) for name, w in self.weights.items()}
            self.inputs = self.inputs.to(device)
            if self.resets is not None:
                self.resets = self.resets.to(device)

            def then(x, s):  # the model as it was
                return torch.func.functional_call(model, self.weights, (x, s))

            start = nest.map_state(lambda t: t.detach().requires_grad_(), state)
            cpu, cuda = self.rng
            with torch.random.fork_rng(devices=[device] if cuda is not None else []):
                torch.set_rng_state(cpu)  # the same dropout masks
                if cuda is not None:
                    torch.cuda.set_rng_state(cuda, device)
                end = forward_with_resets(then, self.inputs, start, self.resets, batch_dim,
                                          split_first)[1]
            self.graph = (start, end)
        return state_vjp(*self.graph, u, batch_dim)

    def state_dict(self):
        """Everything but the graph (which a load leaves to the first `pull_back`)."""
        return {"inputs": self.inputs, "resets": self.resets, "weights": self.weights,
                "rng_cpu": self.rng[0], "rng_cuda": self.rng[1]}

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["inputs"], state["resets"], state["weights"],
                   (state["rng_cpu"], state["rng_cuda"]))


class SynthTraces:
    """The synthesizer's eligibility trace, kept as the last `horizon` boundaries.

    Args:
        decay: BP(lambda)'s lambda in [0, 1]; the trace decays by gamma * decay per chunk
            (0: off, nothing is kept: the one-step bootstrapped target of DNI).
        horizon: how many boundaries the trace reaches back.
        batch_dim: the batch dimension of state tensors (None: the one before the features).
        jacobians: how a boundary is kept (module doc): None: its state Jacobian when the
            state has at most `horizon` features per stream, its chunk otherwise; True:
            always the Jacobian; False: always the chunk.
    """

    def __init__(self, decay=0.0, horizon=32, batch_dim=None, jacobians=None):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"trace_decay (BP(lambda)'s lambda) must lie in [0, 1], got {decay}")
        if int(horizon) < 1:
            raise ValueError(f"trace_horizon must be >= 1 chunk, got {horizon}")
        self.decay, self.horizon, self.batch_dim = float(decay), int(horizon), batch_dim
        self.jacobians = jacobians
        self.entries = []  # oldest first: (state, memory or None, J (B, D, D) or KeptChunk)

    def __bool__(self):
        return self.decay > 0

    def clear(self):
        self.entries = []

    def keeps_chunks(self, state):
        """Whether a boundary with `state` is kept as its chunk (else as its Jacobian)."""
        if self.jacobians is None:
            return _width(nest.flatten(state), self.batch_dim)[1] > self.horizon
        return not self.jacobians

    def push(self, state, memory, pullback):
        """Keep boundary k: its state, the synthesizer's memory there (None) and J_k, as the
        Jacobian `(B, D, D)` or a `KeptChunk`."""
        if self.entries and _shapes(self.entries[-1][0]) != _shapes(state):
            self.clear()  # other streams: not the continuation of the kept ones
        self.entries.append((nest.detach(state), memory, pullback))
        del self.entries[:-self.horizon]

    def backward(self, synthesizer, delta, weight, batch, model=None, split_first=False):
        """Add the earlier boundaries' share of the TD error `delta` `(B, D)` (in target
        units, at the current boundary) to the synthesizer's gradients; `weight` is gamma *
        lambda, `batch` the B of the regression loss `sum((M - target)^2) / B`; `model` and
        `split_first` run kept chunks again (`KeptChunk.pull_back`)."""
        if not self.entries or weight == 0:
            return
        u, w, total = delta.detach(), 1.0, 0.0
        for state, memory, pullback in reversed(self.entries):
            state = nest.map_state(lambda t: t.to(u.device), state)
            if isinstance(pullback, KeptChunk):  # J_i^T u per stream
                u = pullback.pull_back(u, state, model, self.batch_dim, split_first)
            else:
                u = torch.bmm(u.unsqueeze(1), pullback.to(u.device)).squeeze(1)
            w *= weight
            if memory is not None:
                memory = memory.to(u.device)
            message = message_at(synthesizer, state, memory)
            total = total + w * (flat_streams(nest.flatten(message), self.batch_dim) * u).sum()
        (-2.0 / batch * total).backward()

    def state_dict(self):
        return {"entries": [{"state": s, "memory": m, **(
            {"chunk": p.state_dict()} if isinstance(p, KeptChunk) else {"jacobian": p})}
            for s, m, p in self.entries]}

    def load_state_dict(self, state):
        self.entries = [(e["state"], e["memory"], KeptChunk.from_state_dict(e["chunk"])
                         if "chunk" in e else e["jacobian"]) for e in state["entries"]]


def _shapes(state):
    return [t.shape for t in nest.flatten(state)]
