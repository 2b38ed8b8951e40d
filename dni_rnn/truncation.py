"""Truncation schedules: how many steps each TBPTT chunk covers.

A schedule is any callable `schedule() -> int`; an int means a fixed length. The random
schedule draws lengths as awd-lstm-lm does: the base length with probability p (else half
of it), then jittered by a normal draw, so chunk boundaries move between epochs. It does
not take awd-lstm-lm's learning-rate rescale by length / T: the runner's chunk loss is a
mean over the chunk's tokens, and the lr stays the optimizer's.
"""
import random


class FixedTruncation:
    """Every chunk covers `length` steps."""

    def __init__(self, length):
        self.length = check_length(length)

    def __call__(self):
        return self.length

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def __repr__(self):
        return f"FixedTruncation({self.length})"


class RandomTruncation:
    """Random chunk lengths around `length`, drawn as in awd-lstm-lm.

    Args:
        length: the base truncation length.
        std: standard deviation of the normal jitter.
        p_full: probability of using `length` rather than `length / 2` as the mean.
        min_length: lower bound on a chunk's length.
        seed: seeds the schedule's own generator (saved in checkpoints).
    """

    def __init__(self, length, std=5.0, p_full=0.95, min_length=1, seed=0):
        self.length = check_length(length)
        self.std, self.p_full = std, p_full
        self.min_length = check_length(min_length)
        self.rng = random.Random(seed)

    def __call__(self):
        mean = self.length if self.rng.random() < self.p_full else self.length / 2
        return max(self.min_length, int(round(self.rng.gauss(mean, self.std))))

    def state_dict(self):
        version, internal, gauss_next = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss_next": gauss_next}

    def load_state_dict(self, state):
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss_next"]))

    def __repr__(self):
        return f"RandomTruncation({self.length}, std={self.std}, p_full={self.p_full})"


def check_length(length):
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"a truncation length must be an integer >= 1, got {length!r}")
    return length


def next_length(schedule):
    """The schedule's next chunk length, checked: a schedule that gives a non-int fails here."""
    length = schedule()
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"the truncation schedule gave {length!r}; chunk lengths must be ints >= 1")
    return length


def as_schedule(truncation):
    """An int becomes a FixedTruncation; a callable schedule is returned as is."""
    if callable(truncation):
        return truncation
    return FixedTruncation(truncation)
