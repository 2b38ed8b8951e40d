"""The paper's synthetic tasks: Copy and Repeat Copy, as continuous time-major streams.

Jaderberg et al. 2016 (DNI, section 3.1) train RNNs with truncated BPTT on the Copy and
Repeat Copy tasks of Graves et al. 2014 (Neural Turing Machines), applied continuously
across episode boundaries, with a curriculum that lengthens the sequence once the current
length is solved. Episodes here are concatenated along time, so a TBPTT runner can cut
the stream into chunks of any length (``TBPTTRunner.walk``); ``resets`` marks the
first step of every episode.

Copy, N = seq_len random 8-bit vectors x_0..x_{N-1} (K = bits channels):

    step      0 .. N-1        N          N+1 .. 2N         2N+1        L_ep = 2N + 2
    input     x_0 .. x_{N-1}  delim = 1  0                 0           D_in  = K + 1
    target    0               0          x_0 .. x_{N-1}    end = 1     D_out = K + 1
    mask      .               .          counted           counted

Repeat Copy, the same sequence, then the repeat count R (normalised as R / max_repeats
on its own channel), then the sequence R times and an end marker:

    step      0 .. N-1   N          N+1                   N+2 .. N+1+RN      N+2+RN
    input     x          delim = 1  count = R/max_repeats  0                  0
    target    0          0          0                     x repeated R times end = 1
    L_ep = N(R + 1) + 3,  D_in = K + 2,  D_out = K + 1

Tensors (L = n_episodes * L_ep, B = batch):

    inputs  (L, B, D_in)  float      targets (L, B, D_out) float
    mask    (L, B)        bool       True where the loss counts (the answer steps)
    resets  (L, B)        bool       True at step 0 of every episode

Curriculum: the paper lengthens N by one when the average error falls below 0.15 bits.
We count *wrong bits per episode* (outputs thresholded at 0.5, summed over the answer
steps and channels, averaged over episodes: ``bit_errors`` / number of episodes), so a step
happens once fewer than 0.15 bits per sequence are wrong on average. ``Curriculum`` only
compares the number it is given with its threshold, so another error measure (e.g. the
cross-entropy in bits per sequence) can be used with it as well.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .errors import CorpusError


class TaskBatch(NamedTuple):
    """A block of episodes, time-major (see the module docstring for the layouts)."""

    inputs: torch.Tensor   # (L, B, D_in) float
    targets: torch.Tensor  # (L, B, D_out) float
    mask: torch.Tensor     # (L, B) bool: loss counts here
    resets: torch.Tensor   # (L, B) bool: episode starts


def _rng(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if generator is not None:
        return generator
    if seed is not None:
        return torch.Generator().manual_seed(int(seed))
    return None  # torch's global generator


def _random_bits(n_episodes: int, seq_len: int, batch: int, bits: int,
                 g: torch.Generator | None) -> torch.Tensor:
    # (E, N, B, K) of {0., 1.}, p = 1/2 per bit as in Graves et al. 2014
    return torch.randint(0, 2, (n_episodes, seq_len, batch, bits), generator=g).float()


def episode_length(seq_len: int, repeats: int | None = None) -> int:
    """Steps in one episode: 2N + 2 for Copy, N(R + 1) + 3 for Repeat Copy."""
    return 2 * seq_len + 2 if repeats is None else seq_len * (repeats + 1) + 3


def _check(batch_size: int, seq_len: int, n_episodes: int, bits: int) -> None:
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len),
                    ("n_episodes", n_episodes), ("bits", bits)):
        if int(v) < 1:
            raise CorpusError(f"{name} must be positive, got {v}")


def _flatten(ep: torch.Tensor) -> torch.Tensor:
    # (E, L_ep, B, ...) -> (E * L_ep, B, ...): episodes one after another in time
    return ep.reshape(ep.shape[0] * ep.shape[1], *ep.shape[2:])


def copy_task(batch_size: int, seq_len: int, n_episodes: int = 1, *, bits: int = 8,
              seed: int | None = None, generator: torch.Generator | None = None,
              device=None) -> TaskBatch:
    """Copy episodes: read N random bit vectors and a delimiter, then write them back.

    Args:
        batch_size: B, independent streams.
        seq_len: N, vectors per episode.
        n_episodes: episodes per stream, one after another in time.
        bits: K, bits per vector (8 in the papers).
        seed: makes the block deterministic (ignored when ``generator`` is given).
        generator: a torch.Generator to draw from (keeps a stream going across calls).
        device: where to put the tensors.

    Returns:
        TaskBatch with L = n_episodes * (2N + 2), D_in = D_out = K + 1.
    """
    _check(batch_size, seq_len, n_episodes, bits)
    e, n, b, k = n_episodes, seq_len, batch_size, bits
    x = _random_bits(e, n, b, k, _rng(seed, generator))
    length = episode_length(n)
    inputs = torch.zeros(e, length, b, k + 1)
    targets = torch.zeros(e, length, b, k + 1)
    mask = torch.zeros(e, length, b, dtype=torch.bool)
    inputs[:, :n, :, :k] = x
    inputs[:, n, :, k] = 1.0                      # delimiter
    targets[:, n + 1:2 * n + 1, :, :k] = x        # the copy
    targets[:, 2 * n + 1, :, k] = 1.0             # end marker
    mask[:, n + 1:] = True
    resets = torch.zeros(e, length, b, dtype=torch.bool)
    resets[:, 0] = True
    out = TaskBatch(_flatten(inputs), _flatten(targets), _flatten(mask), _flatten(resets))
    return TaskBatch(*(t.to(device) for t in out)) if device is not None else out


def repeat_copy_task(batch_size: int, seq_len: int, repeats: int, n_episodes: int = 1, *,
                     bits: int = 8, max_repeats: int = 10, seed: int | None = None,
                     generator: torch.Generator | None = None, device=None) -> TaskBatch:
    """Repeat Copy episodes: read N vectors, a delimiter and R, then write them R times.

    Args:
        batch_size: B, independent streams.
        seq_len: N, vectors per episode.
        repeats: R, copies to write (the same for the whole block, so streams stay aligned).
        n_episodes: episodes per stream.
        bits: K, bits per vector.
        max_repeats: the count is given to the network as R / max_repeats.
        seed: makes the block deterministic (ignored when ``generator`` is given).
        generator: a torch.Generator to draw from.
        device: where to put the tensors.

    Returns:
        TaskBatch with L = n_episodes * (N(R + 1) + 3), D_in = K + 2, D_out = K + 1.
    """
    _check(batch_size, seq_len, n_episodes, bits)
    if repeats < 1 or max_repeats < 1:
        raise CorpusError(f"repeats and max_repeats must be positive, got {repeats}, {max_repeats}")
    e, n, b, k, r = n_episodes, seq_len, batch_size, bits, repeats
    x = _random_bits(e, n, b, k, _rng(seed, generator))
    length = episode_length(n, r)
    inputs = torch.zeros(e, length, b, k + 2)
    targets = torch.zeros(e, length, b, k + 1)
    mask = torch.zeros(e, length, b, dtype=torch.bool)
    inputs[:, :n, :, :k] = x
    inputs[:, n, :, k] = 1.0                      # delimiter
    inputs[:, n + 1, :, k + 1] = r / max_repeats  # normalised repeat count
    start = n + 2
    targets[:, start:start + r * n, :, :k] = x.repeat(1, r, 1, 1)  # x_0..x_{N-1}, R times
    targets[:, start + r * n, :, k] = 1.0         # end marker
    mask[:, start:] = True
    resets = torch.zeros(e, length, b, dtype=torch.bool)
    resets[:, 0] = True
    out = TaskBatch(_flatten(inputs), _flatten(targets), _flatten(mask), _flatten(resets))
    return TaskBatch(*(t.to(device) for t in out)) if device is not None else out


def offset_streams(batch: TaskBatch, max_offset: int,
                   generator: torch.Generator | None = None) -> TaskBatch:
    """Start each stream at a random phase: stream b is delayed by r_b blank steps.

    With every stream at the same phase, every chunk of a TBPTT walk holds the same part of
    an episode in all B streams (only reading, or only writing). Delaying stream b by r_b,
    uniform in [0, max_offset), spreads the chunk boundaries over the episode. The blank
    steps read zeros and count no loss; the block keeps its length L, so the last episode
    of a delayed stream loses its last r_b steps (what is left of it still counts: its
    answers follow their inputs).

    Args:
        batch: episodes from ``copy_task`` or ``repeat_copy_task``.
        max_offset: the offsets' bound, usually the episode length.
        generator: where the offsets are drawn from.
    """
    if int(max_offset) < 1:
        raise CorpusError(f"max_offset must be positive, got {max_offset}")
    steps, b = batch.mask.shape
    offsets = torch.randint(0, int(max_offset), (b,), generator=generator)
    time = torch.arange(steps).unsqueeze(1) - offsets.unsqueeze(0)   # (L, B) source step
    valid = time >= 0
    src = time.clamp(min=0)

    def shift(t):
        index = src.reshape(steps, b, *([1] * (t.dim() - 2))).expand_as(t)
        out = t.gather(0, index)
        keep = valid.reshape(steps, b, *([1] * (t.dim() - 2)))
        return out * keep if out.dtype != torch.bool else out & keep

    resets = shift(batch.resets)
    resets[0] = True
    return TaskBatch(shift(batch.inputs), shift(batch.targets), shift(batch.mask), resets)


def bit_errors(outputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
               logits: bool = True) -> torch.Tensor:
    """Wrong bits on the counted steps: the numerator of the curriculum's error.

    Args:
        outputs: (L, B, D_out) network outputs, logits (or probabilities if not ``logits``).
        targets: (L, B, D_out) targets in {0, 1}.
        mask: (L, B) bool, the steps that count.
        logits: whether ``outputs`` are logits (threshold 0) or probabilities (0.5).

    Returns:
        A scalar tensor: the number of wrong bits (divide by the episodes seen, e.g.
        ``resets.sum()``, for bits per sequence).
    """
    predicted = outputs > (0.0 if logits else 0.5)
    wrong = (predicted != (targets > 0.5)) & mask.unsqueeze(-1)
    return wrong.sum().to(torch.float32)


class Curriculum:
    """Lengthen a task when the current length is solved (error below a threshold).

    Args:
        start: the first value (sequence length N, or the repeat count R).
        step: how much to add when solved.
        threshold: solved means ``error < threshold`` (0.15 bits per sequence, as in the
            DNI paper; see the module docstring for the error measure).
        max_len: the largest value, or None for no limit.
        patience: consecutive solved updates needed before a step (1: step at once).
    """

    def __init__(self, start: int = 1, step: int = 1, threshold: float = 0.15,
                 max_len: int | None = None, patience: int = 1):
        if start < 1 or step < 1 or patience < 1:
            raise CorpusError("Curriculum start, step and patience must be positive")
        if max_len is not None and max_len < start:
            raise CorpusError(f"Curriculum max_len {max_len} is below start {start}")
        self.start, self.step, self.threshold = int(start), int(step), float(threshold)
        self.max_len, self.patience = max_len, int(patience)
        self.value = self.start
        self.solved_in_a_row = 0
        self.steps_taken = 0

    @property
    def length(self) -> int:
        """The current value (alias of ``value``)."""
        return self.value

    @property
    def at_max(self) -> bool:
        """Whether the value cannot grow any more."""
        return self.max_len is not None and self.value >= self.max_len

    def update(self, error: float) -> bool:
        """Record the latest error at the current value.

        Args:
            error: the average error (e.g. wrong bits per sequence) at the current value.

        Returns:
            True if the value grew.
        """
        self.solved_in_a_row = self.solved_in_a_row + 1 if float(error) < self.threshold else 0
        if self.solved_in_a_row < self.patience or self.at_max:
            return False
        new = self.value + self.step
        self.value = min(new, self.max_len) if self.max_len is not None else new
        self.solved_in_a_row = 0
        self.steps_taken += 1
        return True

    def state_dict(self) -> dict:
        """Plain values only (safe inside a ``weights_only`` checkpoint)."""
        return {"start": self.start, "step": self.step, "threshold": self.threshold,
                "max_len": self.max_len, "patience": self.patience, "value": self.value,
                "solved_in_a_row": self.solved_in_a_row, "steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        for k in ("start", "step", "threshold", "max_len", "patience", "value",
                  "solved_in_a_row", "steps_taken"):
            setattr(self, k, state[k])

    def __repr__(self) -> str:
        return (f"Curriculum(value={self.value}, step={self.step}, threshold={self.threshold}, "
                f"max_len={self.max_len})")
