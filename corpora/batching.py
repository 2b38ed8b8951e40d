"""Batching a 1-D id stream into B parallel streams, cutting TBPTT chunks, splitting ranks.

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

Chunks of T steps, targets shifted by one step (T = 2):

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

from typing import Iterable, Iterator

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


def chunk_spans(n_steps: int, bptt: int | Iterable[int]) -> Iterator[tuple[int, int]]:
    """(start, length) of each chunk over a stream of ``n_steps`` rows with shifted targets.

    Args:
        n_steps: N, the rows of the batchified data.
        bptt: T, an int, or an iterable of lengths used one per chunk (a variable
            truncation schedule); iteration ends with the data or the iterable.

    Yields:
        (i, T_k) with i + T_k <= N - 1, so that rows i+1 .. i+T_k exist as targets.
    """
    lengths = iter(lambda: bptt, None) if isinstance(bptt, int) else iter(bptt)
    i = 0
    for t in lengths:
        if i >= n_steps - 1:
            return
        if int(t) < 1:
            raise CorpusError(f"truncation length must be positive, got {t}")
        length = min(int(t), n_steps - 1 - i)
        yield i, length
        i += length


def get_chunk(data: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs rows [i, i+T) and targets rows [i+1, i+1+T), clipped at the end.

    Args:
        data: (N, B) batchified ids.
        i: the first row.
        bptt: T.

    Returns:
        x (T', B), y (T', B) with T' = min(T, N - 1 - i).
    """
    length = min(bptt, data.size(0) - 1 - i)
    return data[i:i + length], data[i + 1:i + 1 + length]


def iter_chunks(data: torch.Tensor, bptt: int | Iterable[int]
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Walk the streams chunk by chunk.

    Args:
        data: (N, B) batchified ids.
        bptt: T, or an iterable of per-chunk lengths (see ``chunk_spans``).

    Yields:
        (x, y): (T_k, B) inputs and (T_k, B) targets, y[t] = the id after x[t].
    """
    for i, length in chunk_spans(data.size(0), bptt):
        yield data[i:i + length], data[i + 1:i + 1 + length]


def iter_masked_chunks(data: torch.Tensor, mask: torch.Tensor, bptt: int | Iterable[int]
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Like ``iter_chunks``, also giving each chunk's rows of the document mask.

    Args:
        data: (N, B) batchified ids.
        mask: (N, B) bool document starts (``batchify_mask``).
        bptt: T, or an iterable of per-chunk lengths.

    Yields:
        (x, y, m): m (T_k, B) bool is True where x[t, b] starts a document, i.e. where the
        state of stream b must be reset before step t.
    """
    if mask.shape != data.shape:
        raise CorpusError(f"mask shape {tuple(mask.shape)} differs from data shape "
                          f"{tuple(data.shape)}")
    for i, length in chunk_spans(data.size(0), bptt):
        yield data[i:i + length], data[i + 1:i + 1 + length], mask[i:i + length]
