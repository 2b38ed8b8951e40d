"""Time-major streams shared by training and evaluation: state resets per stream, a model
run over a chunk with resets, and evaluation without an optimizer."""
import torch

from . import nest
from .metrics import read_values


def check_streams(inputs, targets, resets=None):
    """One-line errors for streams that are not time-major `(N, B, ...)` alike."""
    if inputs.dim() < 2 or targets.dim() < 2 or inputs.shape[:2] != targets.shape[:2]:
        raise ValueError(
            f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must be "
            "time-major streams (N, B, ...) with the same N and B"
        )
    if resets is not None and tuple(resets.shape) != tuple(inputs.shape[:2]):
        raise ValueError(f"resets must have shape {tuple(inputs.shape[:2])}, got {tuple(resets.shape)}")


def initial_state(model, inputs, state=None):
    """`state`, or the model's `init_state(B)` for streams `inputs` when it is None."""
    if state is not None:
        return state
    init = getattr(model, "init_state", None)
    if init is None:
        raise ValueError("pass an initial state, or give the model init_state(batch_size)")
    return init(inputs.shape[1])


def zero_streams(state, mask, batch_dim=None):
    """Zero the streams where `mask` (B,) is True, keeping the graph elsewhere."""
    if not bool(mask.any()):
        return state
    return _zero_streams_where(state, mask, batch_dim)


def _zero_streams_where(state, mask, batch_dim=None):
    """`zero_streams` for a mask known to hold a True (no host sync)."""
    def zero(t):
        dim = nest.batch_dimension(t, batch_dim)
        shape = [1] * t.dim()
        shape[dim] = -1
        return t * (~mask).to(t.dtype).reshape(shape)

    return nest.map_state(zero, state)


def forward_with_resets(model, inputs, state, resets=None, batch_dim=None, split_first=False):
    """Run `model` over a chunk, zeroing streams' state where `resets` says.

    The chunk is cut at every step where some stream restarts (and after step 1 with
    `split_first`); each piece runs as one call, so fused kernels stay fused.

    Returns:
        (outputs, state, the state after the first piece: step 1 with split_first)
    """
    T = inputs.shape[0]
    cuts, restarts = {0, T}, set()
    if resets is not None:  # one host sync: the steps where some stream restarts
        restarts = set(torch.nonzero(resets.any(dim=1)).flatten().tolist())
        cuts.update(restarts)
    if split_first and T > 1:
        cuts.add(1)
    cuts = sorted(cuts)
    outputs, first = [], None
    for a, b in zip(cuts[:-1], cuts[1:]):
        if a in restarts:
            state = _zero_streams_where(state, resets[a], batch_dim)
        out, state = model(inputs[a:b], state)
        outputs.append(out)
        if first is None:
            first = state
    outputs = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    return outputs, state, first


@torch.no_grad()
def evaluate(model, loss_fn, inputs, targets, state=None, resets=None, chunk_length=35,
             batch_dim=None):
    """Mean loss over time-major streams, weighted by tokens; no optimizer, no update.

    The state is carried across chunks of `chunk_length` steps (the length changes memory
    and speed, not the result, except through resets) and zeroed where `resets` says.

    Args:
        model: `forward(inputs, state) -> (outputs, state)`.
        loss_fn: `loss_fn(outputs, targets) -> mean loss`.
        inputs, targets: `(N, B, ...)` time-major.
        state: the initial state (None: `model.init_state(B)`).
        resets: optional `(N, B)` bool.
    Returns:
        (mean loss, final state)
    """
    state = initial_state(model, inputs, state)
    was_training = model.training
    model.eval()
    losses, weights, N = [], [], inputs.shape[0]
    try:
        for a in range(0, N, chunk_length):
            b = min(a + chunk_length, N)
            outputs, state, _ = forward_with_resets(
                model, inputs[a:b], state, resets[a:b] if resets is not None else None,
                batch_dim)
            losses.append(loss_fn(outputs, targets[a:b]))
            weights.append((b - a) * inputs.shape[1])
    finally:
        model.train(was_training)
    total = 0.0
    for loss, tokens in zip(read_values(losses), weights):  # one host sync, not one a chunk
        total += loss * tokens
    return total / max(sum(weights), 1), state
