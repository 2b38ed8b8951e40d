"""Batching a 1-D id stream into B parallel streams, and splitting them across ranks.

The layout is pytorch/examples word_language_model's, time-major ``(N, B)``:

    ids = [a b c d e f g h i j k l m n o p q r s t u v w x y z]   (26 ids), B = 4
    -> N = 26 // 4 = 6 steps per stream; the last 26 % 4 = 2 ids (y, z) are dropped

              b=0 b=1 b=2 b=3
        t=0  [ a   g   m   s ]
        t=1  [ b   h   n   t ]
        t=2  [ c   i   o   u ]      column b is the contiguous slice ids[b*N:(b+1)*N]
        t=3  [ d   j   p   v ]      and is read top to bottom, one step per row
        t=4  [ e   k   q   w ]
        t=5  [ f   l   r   x ]

Chunks of T steps, targets shifted by one step (T = 2; cut by `TBPTTRunner.walk`):

        chunk 0: x = rows 0..1 [[a g m s], [b h n t]]   y = rows 1..2
        chunk 1: x = rows 2..3                           y = rows 3..4
        chunk 2: x = row  4    (only N-1 = 5 inputs have a target)   y = row 5

The recurrent state of stream b flows from one chunk to the next; a document-boundary
mask ``(N, B)`` bool, batchified the same way, is True where a new document starts, i.e.
where a runner resets stream b's state before reading x[t, b].

DDP: W ranks on a global batch B each take B/W whole streams (columns), so together they
see exactly the streams one process on B sees:

        rank r takes columns [r*B/W, (r+1)*B/W)        e.g. B=4, W=2: rank 0 [a g], rank 1 [m s]
"""

from __future__ import annotations

import torch

from .errors import CorpusError


def batchify(ids: torch.Tensor, batch_size: int, device=None) -> torch.Tensor:
    """Arrange a 1-D stream into ``batch_size`` parallel streams.

    Args:
        ids: (N_total,) tensor (ids, or any per-position values).
        batch_size: B, the number of streams.
        device: where to put the result (default: where ``ids`` is).

    Returns:
        (N, B) contiguous tensor, N = N_total // B; the tail N_total % B is dropped.
    """
    if ids.dim() != 1:
        raise CorpusError(f"batchify expects a 1-D stream, got shape {tuple(ids.shape)}")
    if batch_size < 1:
        raise CorpusError(f"batch_size must be positive, got {batch_size}")
    n = ids.numel() // batch_size
    if n == 0:
        raise CorpusError(f"a stream of {ids.numel()} ids is too short for {batch_size} streams")
    data = ids[: n * batch_size].view(batch_size, n).t().contiguous()
    return data.to(device) if device is not None else data


def batchify_mask(mask: torch.Tensor, batch_size: int, device=None) -> torch.Tensor:
    """Arrange a 1-D bool document-start mask exactly like its ids (``batchify``).

    Args:
        mask: (N_total,) bool, True at the first token of each document.
        batch_size: B.
        device: where to put the result.

    Returns:
        (N, B) bool, aligned with ``batchify(ids, batch_size)``.
    """
    if mask.dtype != torch.bool:
        raise CorpusError(f"a document mask must be bool, got {mask.dtype}")
    return batchify(mask, batch_size, device)


def split_streams(data: torch.Tensor, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's share of the streams: columns [r*B/W, (r+1)*B/W).

    Args:
        data: (N, B, ...) batchified ids, masks or features (streams along ``dim``).
        rank: r, this process's rank.
        world_size: W, the number of ranks; it must divide B.
        dim: the stream dimension.

    Returns:
        (N, B/W, ...) view of this rank's streams.
    """
    b = data.shape[dim]
    if world_size < 1 or not 0 <= rank < world_size:
        raise CorpusError(f"rank {rank} is not in a world of size {world_size}")
    if b % world_size:
        raise CorpusError(f"global batch {b} does not split across {world_size} ranks "
                          f"(batch % world_size = {b % world_size}); "
                          f"pick a multiple of {world_size}")
    per = b // world_size
    return data.narrow(dim, rank * per, per)
