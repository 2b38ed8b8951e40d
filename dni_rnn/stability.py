"""Keeping DNI bounded: target units, a cap on the synthetic gradient, and a guard.

The synthesizer's bootstrapped target `dL_k/ds_k + lambda * J_k^T g_hat_{k+1}` contains
its own output, so it can feed on itself whenever `lambda * J` amplifies, as TD learning
without a discount can (docs/dni.md, "The problem"). Three pieces, each off-able
and each measured in docs/dni.md:

- `TargetRMS`: a running RMS of the real gradients that reach the triggers. With
  `target_scale="rms"` the synthesizer regresses onto `g / rms`, in O(1) units on every
  task (Adam's fixed step size makes raw targets of 1e-4 mostly noise).
- `cap_norm`: the synthetic gradient of each example is at most `sg_cap` times that RMS
  norm, so the injection, and through it the bootstrapped term of the next target, stays
  within a fixed multiple of the real gradients.
- `DivergenceGuard`: watches the target scale and the injected gradient; when either runs
  away, the runner re-zeroes the synthesizer's output, forgets its optimizer
  state and the RMS, and halves beta (and lambda) instead of only warning.
"""
import collections
import math

import torch

from . import nest


class TargetRMS:
    """Running root-mean-square of the synthesizer's targets, per state element.

    An exponential moving average of the mean square with Adam's bias correction. A
    trigger whose real gradient is exactly zero (every stream restarted inside the chunk,
    as in episodic tasks) carries no scale and is left out.

    Args:
        decay: weight of the past per update (0.99: about the last hundred chunks).
    """

    def __init__(self, decay=0.99):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"rms decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.reset()

    def reset(self):
        self.mean_square = None
        self.updates = 0
        self.rms = None  # value() as a Python float, kept so that callers need no device sync
        self._value = None  # value() as a 0-d tensor, computed once per update

    @property
    def known(self):
        return self.updates > 0

    def update(self, mean_square):
        """Fold in one trigger's mean square (a 0-d tensor); zeros are skipped."""
        ms = mean_square.detach()
        if not float(ms) > 0:
            return
        proposal, rms = self.propose(ms)
        self.commit(proposal, float(rms), rms)

    def propose(self, mean_square):
        """`update` in two halves, for a caller that reads its device values once per chunk:
        the mean square and RMS (0-d tensors) after folding in `mean_square`; `commit` them
        if `mean_square` was read to be > 0, else drop them.

        Returns:
            (the new mean square, its bias-corrected RMS)
        """
        ms = mean_square.detach()
        new = (1 - self.decay) * ms if self.mean_square is None \
            else self.decay * self.mean_square + (1 - self.decay) * ms
        return new, (new / (1 - self.decay ** (self.updates + 1))).sqrt()

    def commit(self, mean_square, rms, value=None):
        """Keep a `propose`d mean square; `rms` is its RMS read as a float, `value` the
        0-d tensor it was read from (the same arithmetic as `value()`: kept, not redone)."""
        self.mean_square = mean_square
        self.updates += 1
        self.rms = rms
        self._value = value

    def value(self):
        """The bias-corrected RMS (a 0-d tensor); call only when `known`."""
        if self._value is None:
            self._value = (self.mean_square / (1 - self.decay ** self.updates)).sqrt()
        return self._value

    def state_dict(self):
        return {"mean_square": self.mean_square, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state):
        self.mean_square, self.updates = state["mean_square"], int(state["updates"])
        self.decay = float(state["decay"])
        self._value = None
        self.rms = float(self.value()) if self.known else None


def per_example_norm(state, batch_dim=None):
    """The norm over all of a (nested) state's features, per example: `(B,)`."""
    total = None
    for t in nest.flatten(state):
        d = nest.batch_dimension(t, batch_dim)
        sq = t.pow(2).movedim(d, 0).reshape(t.shape[d], -1).sum(dim=1)
        total = sq if total is None else total + sq
    return total.sqrt()


def cap_norm(state, max_norm, batch_dim=None):
    """Scale each example of `state` down so that its norm is at most `max_norm`.

    Examples already within the bound are returned unchanged (bit for bit): a cap that
    does not bind leaves the update exact.

    Args:
        state: a tensor or nested state of tensors, each with a batch dimension.
        max_norm: a float or 0-d tensor.
    Returns:
        (the capped state, the fraction of examples that were scaled down, a 0-d tensor)
    """
    norms = per_example_norm(state, batch_dim)
    over = norms > max_norm
    factor = torch.where(over, max_norm / norms.clamp_min(1e-30), torch.ones_like(norms))
    capped = over.to(norms.dtype).mean()

    def scale(t):
        d = nest.batch_dimension(t, batch_dim)
        shape = [1] * t.dim()
        shape[d] = -1
        return t * factor.reshape(shape)

    return nest.map_state(scale, state), capped


class DivergenceGuard:
    """Decides when a DNI run is diverging, so that the runner can recover.

    It fires on either sign, after a burn-in:
    - the running RMS of the targets grew more than `growth` times above its smallest value
      of the last `horizon` chunks. A bootstrapped target that feeds on itself grows
      geometrically, chunk after chunk; a task's own gradients change more slowly (a
      curriculum step, a solved task that gets harder). Values seen in the burn-in after a
      recovery do not lower the floor. After a recovery that this rule caused, the floor
      starts again from the values judged after the burn-in: the synthesizer was re-zeroed,
      so a target that fed on itself starts again from the task's own scale and, if it runs
      away again, fires again; a task whose own gradients grew (a copy curriculum's first
      lengths: 950x in 150 chunks, docs/dni.md) fires once instead of at every burn-in
      until the old floor leaves the horizon;
    - the injected synthetic gradient (beta times the capped g_hat) outweighed the real
      gradient more than `ratio` times, on average over about `window` chunks: the model
      is being driven by the synthesizer rather than by its task;
    - anything is not finite.

    Args:
        growth: allowed growth of the target RMS over its recent floor.
        horizon: chunks that the floor looks back over.
        ratio: allowed injected / real gradient norm (averaged).
        window: chunks the ratio is averaged over (an EMA of that span).
        burn_in: chunks after the start and after each recovery before anything is judged.
    """

    def __init__(self, growth=100.0, horizon=500, ratio=1.0, window=50, burn_in=50):
        self.growth, self.horizon = float(growth), int(horizon)
        self.ratio, self.window, self.burn_in = float(ratio), int(window), int(burn_in)
        self.chunks = 0
        self.recent = collections.deque()  # (chunk, rms), rms increasing: a sliding minimum
        self.recovered = False
        self.grew = False  # the last verdict was the growth rule's
        self.restart()

    def restart(self, recovered=False):
        """Start judging afresh, after a recovery when `recovered` (the floor is kept, unless
        the growth rule fired: then it is built again after the burn-in)."""
        self.seen = 0
        self.ratio_avg = None
        self.recovered = self.recovered or recovered
        if recovered and self.grew:
            self.recent.clear()
        self.grew = False

    @property
    def floor(self):
        return self.recent[0][1] if self.recent else math.inf

    def _remember(self, rms):
        while self.recent and self.recent[-1][1] >= rms:
            self.recent.pop()
        self.recent.append((self.chunks, rms))

    def check(self, rms, injected_norm, real_norm):
        """Feed one chunk's numbers (floats; None while unknown); returns a reason or None."""
        self.chunks += 1
        self.seen += 1
        while self.recent and self.recent[0][0] <= self.chunks - self.horizon:
            self.recent.popleft()
        if not all(math.isfinite(v) for v in (rms or 0.0, injected_norm or 0.0, real_norm)):
            return "the synthesizer's target or output is not finite"
        if injected_norm is not None and real_norm > 0:
            r, a = injected_norm / real_norm, 2.0 / (self.window + 1)
            self.ratio_avg = r if self.ratio_avg is None else (1 - a) * self.ratio_avg + a * r
        if rms is None:  # no target scale measured yet
            return None
        if self.seen <= self.burn_in:
            if not self.recovered:  # after a recovery the scale is suspect until judged
                self._remember(rms)
            return None
        if rms > self.growth * self.floor:
            self.grew = True
            return (f"the target RMS grew {rms / self.floor:.0f}x within {self.horizon} chunks "
                    f"(from {self.floor:.2e} to {rms:.2e})")
        if self.ratio_avg is not None and self.ratio_avg > self.ratio:
            return f"the injected synthetic gradient averaged {self.ratio_avg:.1f}x the real one"
        self._remember(rms)
        return None

    def state_dict(self):
        return {"chunks": self.chunks, "seen": self.seen, "recent": list(self.recent),
                "ratio_avg": self.ratio_avg, "recovered": self.recovered, "grew": self.grew}

    def load_state_dict(self, state):
        if "recent" not in state:  # an earlier guard's state: judge afresh
            return
        self.chunks, self.seen = int(state["chunks"]), int(state["seen"])
        self.recent = collections.deque((int(c), float(v)) for c, v in state["recent"])
        self.ratio_avg, self.recovered = state["ratio_avg"], bool(state["recovered"])
        self.grew = bool(state.get("grew", False))


def zero_output_(synthesizer):
    """Make `synthesizer` output zeros again (its `zero_output_()`); False if it has none."""
    fn = getattr(synthesizer, "zero_output_", None)
    return fn is not None and fn() is not False


def forget_optimizer_state(optimizer, params):
    """Drop the optimizer's per-parameter state (Adam moments, momentum) for `params`."""
    for p in params:
        optimizer.state.pop(p, None)


class Calibration:
    """How much of the synthetic gradient to trust, measured on the run itself.

    The synthesizer is fitted to a moving target (the model it predicts for keeps
    changing, partly under the synthetic gradient's own push), and out of sample its
    output can point away from the gradient it predicts: measured on the copy tasks and
    PTB words with the shipped settings, it did after the first few hundred updates
    (docs/dni.md, "Calibration"). This keeps the least-squares scale of the injected
    synthetic gradient against the real gradient that reached the same boundary one
    chunk later (the synthesizer's own target),

        c = EMA(<g_hat, g>) / EMA(|g_hat|^2),

    and the runner injects `gate * g_hat` with `gate = clamp(c, 0, 1)`: all of a calibrated
    predictor (an oracle's c is 1, so DNI stays exact), none of one that predicts nothing
    or points the wrong way (plain TBPTT then, not a random push). Before anything was
    measured the gate is 0. Everything stays on the device (no host sync).

    Args:
        decay: weight of the past per update (0.99: about the last hundred chunks).
    """

    def __init__(self, decay=0.99):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"calibration decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.reset()

    def reset(self):
        self.dot = None
        self.square = None

    def update(self, dot, square):
        """Fold in one boundary's <g_hat, g> and |g_hat|^2 (0-d tensors)."""
        dot, square = dot.detach(), square.detach()
        if self.dot is None:
            self.dot, self.square = dot, square
        else:
            self.dot = self.decay * self.dot + (1 - self.decay) * dot
            self.square = self.decay * self.square + (1 - self.decay) * square

    def gate(self):
        """clamp(c, 0, 1) as a 0-d tensor; 0.0 before any measurement."""
        if self.dot is None:
            return 0.0
        # |g_hat|^2 == 0 has <g_hat, g> == 0 too: 0 / tiny = 0, no sync needed
        tiny = torch.finfo(self.square.dtype).tiny
        return (self.dot / self.square.clamp_min(tiny)).clamp(0.0, 1.0)

    def state_dict(self):
        return {"dot": self.dot, "square": self.square, "decay": self.decay}

    def load_state_dict(self, state):
        self.dot, self.square = state["dot"], state["square"]
        self.decay = float(state["decay"])
