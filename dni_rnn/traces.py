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
state (and a recurrent synthesizer's memory there) and the chunk's state Jacobian J_i
(B x D x D, from D vector-Jacobian products through the chunk while its graph is alive).
Applying it to delta_k takes matrix-vector products through the stored J_i and one backward
pass of the synthesizer over the stored states. dM_i/dtheta is taken at the current
parameters: a linear synthesizer's does not depend on them, so for it this is the
accumulating trace exactly. Boundaries more than `horizon` chunks back are dropped (their
weight is (gamma lambda)^horizon and less); a stream that restarts inside a chunk has J = 0
there, which ends its trace.
"""
import torch

from . import nest


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


def state_jacobian(inputs, outputs, batch_dim=None):
    """Per stream, the Jacobian of the (nested) `outputs` with respect to the (nested)
    `inputs`: `(B, D_out, D_in)`, flattened as by `flat_streams`; one vector-Jacobian product
    per output feature (streams are independent, so one product serves all of them). The
    graph is kept for the backward pass that follows."""
    ins, outs = nest.flatten(inputs), nest.flatten(outputs)
    batch = ins[0].shape[_dims(ins[:1], batch_dim)[0]]
    d_in = sum(t.numel() // batch for t in ins)
    d_out = sum(t.numel() // batch for t in outs)
    jac = outs[0].new_zeros(batch, d_out, d_in)
    live = [k for k, o in enumerate(outs) if o.requires_grad]
    if not live:
        return jac
    for i in range(d_out):
        basis = outs[0].new_zeros(batch, d_out)
        basis[:, i] = 1
        cotangents = _unflat(basis, outs, batch_dim)
        grads = torch.autograd.grad([outs[k] for k in live], ins, [cotangents[k] for k in live],
                                    retain_graph=True, allow_unused=True)
        jac[:, i] = flat_streams([g if g is not None else torch.zeros_like(t)
                                  for g, t in zip(grads, ins)], batch_dim)
    return jac


def message_at(synthesizer, state, memory=None):
    """The synthesizer's message at `state`; a recurrent one's from the given memory."""
    if memory is not None:
        return synthesizer.message(state, memory)
    return synthesizer(state, None)


class SynthTraces:
    """The synthesizer's eligibility trace, kept as the last `horizon` boundaries.

    Args:
        decay: BP(lambda)'s lambda in [0, 1]; the trace decays by gamma * decay per chunk
            (0: off, nothing is kept: the one-step bootstrapped target of DNI).
        horizon: how many boundaries the trace reaches back.
        batch_dim: the batch dimension of state tensors (None: the one before the features).
    """

    def __init__(self, decay=0.0, horizon=32, batch_dim=None):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"trace_decay (BP(lambda)'s lambda) must lie in [0, 1], got {decay}")
        if int(horizon) < 1:
            raise ValueError(f"trace_horizon must be >= 1 chunk, got {horizon}")
        self.decay, self.horizon, self.batch_dim = float(decay), int(horizon), batch_dim
        self.entries = []  # oldest first: (state, memory or None, J (B, D, D))

    def __bool__(self):
        return self.decay > 0

    def clear(self):
        self.entries = []

    def push(self, state, memory, jacobian):
        """Keep boundary k: its state, the synthesizer's memory there (None) and J_k."""
        if self.entries and self.entries[-1][2].shape != jacobian.shape:
            self.clear()  # other streams: not the continuation of the kept ones
        self.entries.append((nest.detach(state), memory, jacobian))
        del self.entries[:-self.horizon]

    def backward(self, synthesizer, delta, weight, batch):
        """Add the earlier boundaries' share of the TD error `delta` `(B, D)` (in target
        units, at the current boundary) to the synthesizer's gradients; `weight` is gamma *
        lambda, `batch` the B of the regression loss `sum((M - target)^2) / B`."""
        if not self.entries or weight == 0:
            return
        u, w, total = delta.detach(), 1.0, 0.0
        for state, memory, jac in reversed(self.entries):
            u = torch.bmm(u.unsqueeze(1), jac.to(u.device)).squeeze(1)  # J_i^T u per stream
            w *= weight
            state = nest.map_state(lambda t: t.to(u.device), state)
            if memory is not None:
                memory = memory.to(u.device)
            message = message_at(synthesizer, state, memory)
            total = total + w * (flat_streams(nest.flatten(message), self.batch_dim) * u).sum()
        (-2.0 / batch * total).backward()

    def state_dict(self):
        return {"entries": [{"state": s, "memory": m, "jacobian": j} for s, m, j in self.entries]}

    def load_state_dict(self, state):
        self.entries = [(e["state"], e["memory"], e["jacobian"]) for e in state["entries"]]
