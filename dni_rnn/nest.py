"""Nested recurrent states: flatten to a list of tensors and rebuild the same structure.

A state is a tensor or any nesting of tuples, lists and dicts of tensors: an LSTM's
`(h, c)` of shape `(layers, B, H)` each, a GRU's `h`, a custom cell's tuple. Namedtuples
keep their type.
"""
import torch


def flatten(state):
    """Return the tensors of `state` in a fixed depth-first order (dict keys sorted).

    Args:
        state: a tensor or nested tuple / list / dict of tensors.
    Returns:
        list of tensors.
    """
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state) for t in flatten(state[key])]
    if isinstance(state, (tuple, list)):
        return [t for item in state for t in flatten(item)]
    raise TypeError(
        f"a state must be a tensor or nested tuple/list/dict of tensors, got {type(state).__name__}"
    )


def unflatten(like, tensors):
    """Rebuild the structure of `like` from a flat list of tensors (inverse of `flatten`)."""
    tensors = list(tensors)
    rebuilt, used = _unflatten(like, tensors, 0)
    if used != len(tensors):
        raise ValueError(f"structure holds {used} tensors, got {len(tensors)}")
    return rebuilt


def _unflatten(like, tensors, i):
    if isinstance(like, torch.Tensor):
        return tensors[i], i + 1
    if isinstance(like, dict):
        out = {}
        for key in sorted(like):
            out[key], i = _unflatten(like[key], tensors, i)
        return {key: out[key] for key in like}, i
    items = []
    for item in like:
        rebuilt, i = _unflatten(item, tensors, i)
        items.append(rebuilt)
    if isinstance(like, tuple) and hasattr(like, "_fields"):  # namedtuple
        return type(like)(*items), i
    return type(like)(items), i


def map_state(fn, state):
    """Apply `fn` to every tensor of `state`, keeping the structure."""
    return unflatten(state, [fn(t) for t in flatten(state)])


def detach(state):
    """Detach every tensor of `state` (the carry between truncated chunks)."""
    return map_state(lambda t: t.detach(), state)


def batch_dimension(tensor, batch_dim=None):
    """`batch_dim` if given, else the dimension before the features.

    `(B, H)` -> 0, `(layers, B, H)` -> 1, `(B,)` -> 0. A 0-d tensor has no batch dimension
    (returns None).
    """
    if batch_dim is not None:
        return batch_dim
    if tensor.dim() == 0:
        return None
    return max(tensor.dim() - 2, 0)


def batch_size(tensor, batch_dim=None):
    """Number of examples in `tensor` along `batch_dim` (default: see `batch_dimension`)."""
    dim = batch_dimension(tensor, batch_dim)
    return 1 if dim is None else tensor.shape[dim]


def check_same_structure(reference, other, what):
    """Raise a one-line ValueError unless `other` has `reference`'s structure and shapes.

    Args:
        reference: the expected state (e.g. the trigger).
        other: the state to check (e.g. a synthesizer's message).
        what: a short description used in the error, e.g. "synthesizer message".
    Returns:
        the flat tensors of `other`.
    """
    ref = flatten(reference)
    try:
        got = flatten(other)
    except TypeError as err:
        raise ValueError(f"{what}: {err}") from None
    if len(got) != len(ref) or _skeleton(reference) != _skeleton(other):
        raise ValueError(
            f"{what} has structure {_describe(other)}, expected {_describe(reference)} "
            "(a synthesizer must return a message shaped like its trigger)"
        )
    for i, (r, g) in enumerate(zip(ref, got)):
        if r.shape != g.shape:
            raise ValueError(
                f"{what}: tensor {i} has shape {tuple(g.shape)}, expected {tuple(r.shape)} "
                "(a synthesizer must return a message shaped like its trigger)"
            )
    return got


def _skeleton(state):
    if isinstance(state, torch.Tensor):
        return "T"
    if isinstance(state, dict):
        return {k: _skeleton(v) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return tuple(_skeleton(s) for s in state)
    return type(state).__name__


def _describe(state):
    if isinstance(state, torch.Tensor):
        return "tensor" + str(tuple(state.shape))
    if isinstance(state, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in state.items()) + "}"
    if isinstance(state, (tuple, list)):
        return "(" + ", ".join(_describe(s) for s in state) + ")"
    return type(state).__name__
