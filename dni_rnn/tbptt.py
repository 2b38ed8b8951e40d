"""The TBPTT runner: chunk sequences, carry state, and (optionally) replace the truncated
future gradient with a synthetic one (DNI).

One chunk k covers steps [a, b) of a time-major stream:

    inputs  (N, B, ...)   ----[ a ........ b )----
    state s_k  -> make_trigger -> model -> s_{k+1} -> g_hat_{k+1} = M(s_{k+1})
    objective:  L_k + beta * <g_hat_{k+1}, s_{k+1}>            (one deferred backward)
    M's target at s_k:  dL_k/ds_k + lambda * J_k^T g_hat_{k+1}  (J_k = ds_{k+1}/ds_k)

lambda == beta comes free with the one backward pass; any other lambda adds
(lambda - beta) * J_k^T g_hat_{k+1} at the trigger, computed by a second vector-Jacobian
product through the recurrent core only (docs/design.md, "One chunk with DNI").
"""
import math
from dataclasses import dataclass, asdict

import torch

from . import deferred, nest
from .interfaces import BackwardInterface
from .replay import SynthReplay
from .stability import (Calibration, DivergenceGuard, TargetRMS, cap_norm,
                        forget_optimizer_state, zero_output_)
from .synthesizers import current_context, state_dim
from .truncation import as_schedule


class NonFiniteLossError(RuntimeError):
    """A chunk produced a NaN or infinite loss or gradient; no parameter was changed."""


@dataclass
class ChunkMetrics:
    """What one training chunk did. Synthesizer fields are None for plain TBPTT.

    loss: the chunk's mean loss; tokens: steps x streams; grad_norm: model gradient norm
    before clipping; synth_loss: the synthesizer's regression loss at the trigger;
    cosine: cosine between synthetic and real gradient at the trigger; synthetic_norm /
    real_norm: their norms (gradient units); aux_loss: the DNI + Aux loss; target_rms: the
    running RMS of the real gradients at the triggers; capped: fraction of streams whose
    synthetic gradient `sg_cap` scaled down; injected_norm: the norm of what was injected at
    the chunk's end (beta * gate * capped g_hat); sg_scale: beta in force; calibration:
    the gate in force at the chunk's end (`stability.Calibration`); recovery: why the
    guard reset the synthesizer after this chunk (else None).

    The runner reads one batch of numbers from the device per chunk (what it decides on:
    the non-finite checks, the target RMS, the guard); the other fields are kept as 0-d
    tensors and read when first accessed (a field always reads as a Python number).
    `read_metrics(list)` reads many chunks' fields with one host sync, as `logs.Meter` does
    once per log interval.
    """

    step: int
    length: int
    loss: float
    tokens: int
    grad_norm: float = None
    synth_loss: float = None
    cosine: float = None
    synthetic_norm: float = None
    real_norm: float = None
    aux_loss: float = None
    target_rms: float = None
    capped: float = None
    injected_norm: float = None
    sg_scale: float = None
    calibration: float = None
    recovery: str = None
    skipped: bool = False

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if isinstance(value, torch.Tensor):  # a value still on the device: read it once
            value = value.item()
            object.__setattr__(self, name, value)
        return value

    def as_dict(self):
        return asdict(self)


def read_metrics(metrics):
    """Read every field still held as a tensor, of all `metrics`, with one host sync.

    Args:
        metrics: an iterable of ChunkMetrics.
    Returns:
        the same ChunkMetrics, every field a Python number.
    """
    metrics = list(metrics)
    held = [(m, k, v) for m in metrics for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
    for (m, k, _), value in zip(held, read_values([v for _, _, v in held])):
        object.__setattr__(m, k, value)
    return metrics


def read_values(values):
    """Python numbers of `values` (0-d tensors and numbers); the tensors in one host sync."""
    tensors = [v.detach().reshape(()) for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return list(values)
    if len({t.device for t in tensors}) > 1:
        tensors = [t.to(tensors[0].device) for t in tensors]
    read = iter(torch.stack(tensors).tolist())  # dtypes promote: float32 -> float64 is exact
    return [next(read) if isinstance(v, torch.Tensor) else v for v in values]


class TBPTTRunner:
    """Truncated BPTT over time-major streams, with or without synthetic gradients.

    Args:
        model: `forward(inputs, state) -> (outputs, state)`, inputs time-major `(T, B, ...)`.
            If it has `init_state(batch_size)`, `run` can start without a state.
        loss_fn: `loss_fn(outputs, targets) -> scalar`, the chunk's mean loss.
        optimizer: steps the model (and the synthesizer, unless `synth_optimizer` is given);
            None for a runner that only evaluates and synthesizes (`train_chunk` refuses).
        truncation: chunk length: an int, or a schedule `() -> int` (see `RandomTruncation`).
        synthesizer: module `(state, context) -> gradient estimate` shaped like the state
            (e.g. `StateSynthesizer.mlp(state_dim(state))`); None: plain TBPTT.
        sg_scale: beta, the weight of the synthetic gradient injected at each chunk end.
        bootstrap: lambda in [0, 1], the weight of J^T g_hat in the synthesizer's target;
            None: equal to `sg_scale` (free). Defaults are the stable setting of docs/dni.md.
        clip: max gradient norm of the model's parameters (None: no clip).
        synth_clip: max gradient norm of the synthesizer's parameters, clipped separately
            (a shared clip measurably hurts; docs/dni.md).
        warmup: optimizer steps during which the synthesizer trains but nothing is injected.
        target_scale: units of the synthesizer's targets: "rms" (divided by the running RMS
            of the real gradients at the triggers: O(1) on any task), "raw" (gradients of
            the mean loss as they are), "sum" (times the chunk's tokens: gradients of the
            summed loss), or a number.
        sg_cap: the synthetic gradient of each stream is scaled down to at most `sg_cap`
            times the running RMS norm of the real gradients at the triggers (None or 0:
            no cap). A cap that does not bind leaves the update exact.
        calibrate: inject `gate * g_hat`, the gate in [0, 1] being the measured
            least-squares scale of past synthetic gradients against the real gradients
            that reached the same boundaries a chunk later (`stability.Calibration`): 1 for
            a synthesizer that predicts (an oracle keeps DNI exact), 0 for one that does
            not. Assumes consecutive `train_chunk` calls continue the same streams while
            `future` is True (as `walk` does).
        guard: recover from a diverging synthesizer (see `stability.DivergenceGuard`):
            re-zero its output, forget its optimizer state and target RMS, halve beta and
            lambda. `ChunkMetrics.recovery` says when and why.
        aux_head: for DNI + Aux, a module `(state, context) -> estimate` shaped like the
            state; `aux_weight` > 0 turns it on (see `_aux_loss`).
        aux_weight: weight of the auxiliary loss.
        synth_optimizer: an optimizer of its own for the synthesizer (and aux head).
        batch_dim: batch dimension of state tensors (None: the one before the features).
        on_nonfinite: "raise" (stop with NonFiniteLossError) or "skip" (drop the update,
            restart the state, go on).
        sync: data parallel (`distributed.GradientSync`): after each backward, gradients
            are averaged and trigger statistics summed over the ranks; None: one process.
        replay: extra synthesizer updates per chunk on minibatches of recent triggers and
            the real gradients that reached them (`replay.SynthReplay`); 0: off.
        replay_chunks: how many recent chunks the replay buffer holds.
    """

    def __init__(self, model, loss_fn, optimizer, truncation=35, synthesizer=None,
                 sg_scale=0.1, bootstrap=None, clip=0.25, synth_clip=None, warmup=0,
                 target_scale="rms", sg_cap=1.0, guard=True, calibrate=False, aux_head=None,
                 aux_weight=0.0, synth_optimizer=None, batch_dim=None, on_nonfinite="raise",
                 sync=None, replay=0, replay_chunks=32):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.sync = sync
        if sync is not None:  # a rank's trigger gradients are W x one process's
            target_scale = sync.local_target_scale(target_scale)
        self.schedule = as_schedule(truncation)
        self.sg_scale = float(sg_scale)
        self.bootstrap = self.sg_scale if bootstrap is None else float(bootstrap)
        if not 0.0 <= self.bootstrap <= 1.0:
            raise ValueError(f"bootstrap (lambda) must lie in [0, 1], got {bootstrap}")
        if self.sg_scale < 0:
            raise ValueError(f"sg_scale (beta) must be >= 0, got {sg_scale}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if not (target_scale in ("rms", "raw", "sum") or isinstance(target_scale, (int, float))):
            raise ValueError(f"target_scale must be 'rms', 'raw', 'sum' or a number, got {target_scale!r}")
        if sg_cap is not None and sg_cap < 0:
            raise ValueError(f"sg_cap must be > 0 (or None: no cap), got {sg_cap}")
        if aux_weight and aux_head is None:
            raise ValueError("aux_weight > 0 needs an aux_head (e.g. StateSynthesizer.mlp(...))")
        if aux_weight and synthesizer is None:
            raise ValueError("DNI + Aux needs a synthesizer")
        self.clip, self.synth_clip = clip, synth_clip
        self.warmup, self.target_scale = int(warmup), target_scale
        self.aux_head, self.aux_weight = aux_head, float(aux_weight)
        self.synth_optimizer, self.batch_dim = synth_optimizer, batch_dim
        self.on_nonfinite = on_nonfinite
        self.sg_cap = float(sg_cap) if sg_cap else None
        self.target_rms = TargetRMS()
        self.guard = DivergenceGuard() if guard and synthesizer is not None else None
        self.calibration = Calibration() if calibrate and synthesizer is not None else None
        self._reference = None  # the g_hat injected at the last chunk's end, before the gate
        self.replay = SynthReplay(replay if synthesizer is not None else 0, replay_chunks,
                                  batch_dim)
        self.recoveries = 0
        self.interface = BackwardInterface(synthesizer, batch_dim) if synthesizer is not None else None
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.synth_params = []
        if synthesizer is not None:
            self.synth_params = list(synthesizer.parameters())
            if aux_head is not None and aux_weight:
                self.synth_params += list(aux_head.parameters())
            self._check_params()
        self.step = 0

    def _check_params(self):
        model_ids = {id(p) for p in self.model_params}
        if any(id(p) in model_ids for p in self.synth_params):
            raise ValueError("the synthesizer's parameters must not be part of the model")
        opt = self.synth_optimizer or self.optimizer
        if opt is None:
            return
        in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
        missing = [p for p in self.synth_params if id(p) not in in_opt]
        if missing:
            raise ValueError(
                f"{len(missing)} synthesizer parameters are in no optimizer; add them to the "
                "optimizer (e.g. list(model.parameters()) + list(synth.parameters())) or pass "
                "synth_optimizer"
            )

    # ---- one chunk -------------------------------------------------------------------

    def train_chunk(self, inputs, targets, state, resets=None, future=True, next_resets=None):
        """Train on one chunk and return the carried (detached) state and its metrics.

        Args:
            inputs, targets: `(T, B, ...)` time-major.
            state: the state entering the chunk.
            resets: optional `(T, B)` bool; stream b's state is zeroed before step t where
                True (gradients stop there).
            future: whether the stream goes on after this chunk (no synthetic gradient at
                the end of a sequence).
            next_resets: optional `(B,)` bool; streams that restart right after this chunk
                get no synthetic gradient.
        Returns:
            (state, ChunkMetrics)
        """
        if self.optimizer is None:
            raise ValueError("this runner has no optimizer: it can evaluate and synthesize, "
                             "not train; pass one to TBPTTRunner")
        T, B = inputs.shape[0], inputs.shape[1]
        self.optimizer.zero_grad(set_to_none=True)
        if self.synth_optimizer is not None:
            self.synth_optimizer.zero_grad(set_to_none=True)
        metrics = ChunkMetrics(step=self.step, length=T, loss=math.nan, tokens=T * B)
        try:
            if self.interface is None:
                new_state = self._plain_chunk(inputs, targets, state, resets, metrics)
            else:
                new_state = self._dni_chunk(inputs, targets, state, resets, future,
                                            next_resets, metrics)
            self._step()
            if self.replay:
                self._replay_steps(metrics.tokens)
        except NonFiniteLossError:
            if self.on_nonfinite == "raise":
                raise
            self.optimizer.zero_grad(set_to_none=True)
            if self.synth_optimizer is not None:
                self.synth_optimizer.zero_grad(set_to_none=True)
            metrics.skipped = True
            self.step += 1
            return nest.map_state(torch.zeros_like, state), metrics
        self.step += 1
        return nest.detach(new_state), metrics

    def _plain_chunk(self, inputs, targets, state, resets, metrics):
        outputs, new_state, _ = self._forward(inputs, state, resets)
        loss = self._loss(outputs, targets, metrics)
        loss.backward()
        self._synchronize()
        if self.sync is not None:  # the global chunk loss (the same on every rank)
            loss = self.sync.mean(loss)
        norm = self._clip_model()
        loss, norm = read_values([loss, norm])  # the chunk's one host sync
        self._check_loss(loss, metrics)
        self._check_grad_norm(norm, metrics)
        return new_state

    def _dni_chunk(self, inputs, targets, state, resets, future, next_resets, metrics):
        scale = self._scale(metrics.tokens)
        beta = self.sg_scale if self.step >= self.warmup else 0.0
        reference, self._reference = self._reference, None
        if reference is not None:
            refs, tensors = nest.flatten(reference), nest.flatten(state)
            if [r.shape for r in refs] != [t.shape for t in tensors]:
                reference = None  # not the continuation of the last chunk's streams
            else:  # (a resumed checkpoint holds it on the CPU)
                reference = nest.unflatten(state, [r.to(t.device) for r, t in zip(refs, tensors)])
        gate = self.calibration.gate() if self.calibration is not None else 1.0
        with deferred.defer_backward():
            trigger = self.interface.make_trigger(state, target_scale=scale, reference=reference,
                                                  keep=bool(self.replay))
            outputs, new_state, first = self._forward(inputs, trigger, resets, split_first=self._aux_on())
            loss = self._loss(outputs, targets, metrics)
            deferred.backward(loss)
            g_hat = injected = capped = aux = None
            if future:
                g_hat, capped = self._synthesize(new_state, scale)
                if next_resets is not None:
                    g_hat = self._zero_streams(g_hat, next_resets)
                predicted = g_hat
                if self.calibration is not None:
                    self._reference = predicted
                    g_hat = nest.map_state(lambda g: gate * g, g_hat)
                if beta:
                    deferred.backward(new_state, nest.map_state(lambda g: beta * g, g_hat))
                injected = beta * _sum(g.pow(2).sum() for g in nest.flatten(g_hat)).sqrt()
                if self.bootstrap != beta:
                    self._bootstrap_correction(trigger, new_state, g_hat, self.bootstrap - beta)
                if self._aux_on():
                    aux = self._aux_loss(first, predicted, scale)
                    deferred.backward(self.aux_weight * aux)
        injected = self._synchronize(self.interface.last_stats, injected)
        if self.sync is not None:
            loss = self.sync.mean(loss)
        norm = self._clip_model()
        zero_scale = self._is_zero(scale)  # before this chunk's target joins the RMS
        stats = self.interface.last_stats
        mean_square = proposal = rms = real = None
        if stats.filled:
            mean_square = stats.gradient_mean_square
            proposal, rms = self.target_rms.propose(mean_square)
            real = stats.gradient_norm
        # the chunk's one host sync: everything decided on below
        loss, norm, mean_square, rms, real, injected = read_values(
            [loss, norm, mean_square, rms, real, injected])
        self._check_loss(loss, metrics)
        metrics.sg_scale, metrics.capped = self.sg_scale, capped
        if aux is not None:
            metrics.aux_loss = aux.detach()
        if self.calibration is not None:
            if stats.has_reference:
                self.calibration.update(stats.reference_dot, stats.reference_sq)
            metrics.calibration = gate
        if stats.filled:
            if mean_square > 0:  # a trigger whose streams all restarted carries no scale
                self.target_rms.commit(proposal, rms)
            metrics.synth_loss = stats.loss
            metrics.cosine = stats.cosine
            metrics.synthetic_norm = stats.message_norm / scale if not zero_scale else 0.0
            metrics.real_norm = real
            metrics.injected_norm = injected
            metrics.target_rms = self.target_rms.rms
            if self.guard is not None:
                reason = self.guard.check(metrics.target_rms, injected, real)
                if reason:
                    self._recover(reason, metrics)
        self._check_grad_norm(norm, metrics)
        if self.replay and stats.gradients is not None:
            tensors = nest.flatten(state)
            grads = [stats.gradients.get(i, torch.zeros_like(t)) for i, t in enumerate(tensors)]
            self.replay.add(state, nest.unflatten(state, grads))
        return new_state

    def _replay_steps(self, tokens):
        """`replay.steps` more synthesizer updates on recent triggers (nothing else moves:
        every other gradient is None, so the optimizer leaves those parameters alone)."""
        scale = self._scale(tokens)
        if not self.replay.filled or self._is_zero(scale):
            return
        optimizer = self.synth_optimizer or self.optimizer
        for _ in range(self.replay.steps):
            for p in self.model_params + self.synth_params:
                p.grad = None
            self.replay.regression_loss(self.interface.synthesizer, scale).backward()
            if self.sync is not None:
                self.sync.after_backward(self.synth_params)
            if self.synth_clip:
                torch.nn.utils.clip_grad_norm_(self.synth_params, self.synth_clip)
            optimizer.step()

    def _synchronize(self, stats=None, injected=None):
        """Data parallel: average gradients, sum trigger statistics and the injected norm
        over the ranks, so that every rank takes the same decisions (no-op alone)."""
        if self.sync is None:
            return injected
        return self.sync.after_backward(self.model_params + self.synth_params, stats,
                                        [injected])[0]

    def _synthesize(self, new_state, scale):
        """g_hat at the chunk's end, capped per stream at sg_cap x the targets' RMS norm, and
        the fraction of streams capped (None: no cap)."""
        if self._is_zero(scale):  # "rms" before any target was seen: the output is still zero
            return nest.map_state(torch.zeros_like, nest.detach(new_state)), None
        g_hat = self.interface.synthesize(new_state, target_scale=scale)
        capped = None
        if self.sg_cap is not None and self.target_rms.known:
            dim = state_dim(g_hat, self.batch_dim)
            bound = self.sg_cap * self.target_rms.value() * math.sqrt(dim)
            g_hat, capped = cap_norm(g_hat, bound, self.batch_dim)
        return g_hat, capped

    def _is_zero(self, scale):
        """`not scale` without a device sync: a tensor scale is 1 / the target RMS, zero only
        where the RMS overflowed (its float is kept by `TargetRMS`)."""
        if isinstance(scale, torch.Tensor):
            return self.target_rms.rms == math.inf
        return not scale

    @torch.no_grad()
    def synthetic_gradient(self, state, tokens):
        """The synthetic gradient this runner would inject at a boundary with `state`, before
        beta: the synthesizer's output in gradient units, capped; zeros for plain TBPTT.

        Args:
            state: the state at the boundary.
            tokens: steps x streams of a chunk (for `target_scale="sum"`).
        """
        if self.interface is None:
            return nest.map_state(torch.zeros_like, nest.detach(state))
        return self._synthesize(state, self._scale(tokens))[0]

    def _recover(self, reason, metrics):
        """The guard fired: restart the synthesizer from zero with half the coupling."""
        zeroed = zero_output_(self.interface.synthesizer)
        if self.aux_head is not None:
            zero_output_(self.aux_head)
        for p in self.synth_params:  # this chunk's step must not move them off zero again
            p.grad = None
        for opt in (self.optimizer, self.synth_optimizer):
            if opt is not None:
                forget_optimizer_state(opt, self.synth_params)
        self.target_rms.reset()
        self.replay.clear()  # its targets may be the runaway ones
        if self.calibration is not None:
            self.calibration.reset()
            self._reference = None
        self.guard.restart(recovered=True)
        self.sg_scale *= 0.5
        self.bootstrap *= 0.5
        self.recoveries += 1
        action = "re-zeroed the synthesizer's output, " if zeroed else ""
        metrics.recovery = (f"{reason}; {action}reset its optimizer state and target RMS, "
                            f"beta -> {self.sg_scale:.3g}, lambda -> {self.bootstrap:.3g}")

    def _bootstrap_correction(self, trigger, new_state, g_hat, weight):
        """Add weight * J^T g_hat at the trigger (a second VJP through the recurrent core)."""
        triggers, outs = nest.flatten(trigger), nest.flatten(new_state)
        vjp = torch.autograd.grad(outs, triggers, nest.flatten(g_hat), retain_graph=True,
                                  allow_unused=True)
        grads = [weight * v if v is not None else torch.zeros_like(t) for v, t in zip(vjp, triggers)]
        deferred.backward(triggers, grads)

    def _aux_on(self):
        return self.aux_head is not None and self.aux_weight > 0

    def _aux_loss(self, state_after_first_step, g_hat, scale):
        """DNI + Aux: the core, through its state one step into the chunk, also predicts
        the synthetic gradient at the chunk's end. The gradient of this regression reaches
        the model (and the aux head), so the core is pushed to carry what the future
        gradient depends on (Jaderberg et al. 2016, Sec. 3.2, "DNI + Aux")."""
        prediction = self.aux_head(state_after_first_step, current_context())
        preds = nest.check_same_structure(state_after_first_step, prediction, "aux head message")
        targets = nest.flatten(g_hat)
        batch = nest.batch_size(targets[0], self.batch_dim)
        return sum((p - scale * t).pow(2).sum() for p, t in zip(preds, targets)) / batch

    def _loss(self, outputs, targets, metrics):
        loss = self.loss_fn(outputs, targets)
        metrics.loss = loss.detach()
        return loss

    def _check_loss(self, loss, metrics):
        """After the backward, before anything else changes: a non-finite loss stops here."""
        metrics.loss = loss
        if not math.isfinite(loss):
            self._reference = None  # this chunk's g_hat is scored nowhere
            raise NonFiniteLossError(
                f"chunk {self.step}: loss is {loss}; lower the learning rate or "
                "tighten clip, or pass on_nonfinite='skip'"
            )

    def _clip_model(self):
        """Clip the model's gradients (never the synthesizer's); their norm, on the device."""
        return torch.nn.utils.clip_grad_norm_(self.model_params,
                                              self.clip if self.clip else math.inf)

    def _check_grad_norm(self, norm, metrics):
        metrics.grad_norm = norm
        if not math.isfinite(norm):
            raise NonFiniteLossError(f"chunk {self.step}: gradient norm is {norm}")

    def _step(self):
        if self.synth_clip and self.synth_params:
            torch.nn.utils.clip_grad_norm_(self.synth_params, self.synth_clip)
        self.optimizer.step()
        if self.synth_optimizer is not None:
            self.synth_optimizer.step()

    def _scale(self, tokens):
        if self.target_scale == "rms":
            # before any target was measured: 0 (nothing to regress on, nothing injected)
            return 1.0 / self.target_rms.value() if self.target_rms.known else 0.0
        if self.target_scale == "raw":
            return 1.0
        if self.target_scale == "sum":
            return float(tokens)
        return float(self.target_scale)

    def _forward(self, inputs, state, resets, split_first=False):
        return forward_with_resets(self.model, inputs, state, resets, self.batch_dim, split_first)

    def _zero_streams(self, state, mask):
        return zero_streams(state, mask, self.batch_dim)

    # ---- whole streams -----------------------------------------------------------------

    def walk(self, inputs, targets, state=None, resets=None, start=0, final=True):
        """Train chunk by chunk from step `start`: the one chunk walk, resumable.

        A generator: after each chunk it yields `(end, state, metrics)`, where `end` is the
        position the next chunk starts from and `state` the carried (detached) state.
        Stop iterating at any point; `walk(..., state=state, start=end)` goes on from there
        (the truncation schedule's and the runner's own state live in `state_dict()`).

        Args:
            inputs, targets: `(N, B, ...)` time-major streams.
            state: the state entering step `start` (None: `model.init_state(B)`).
            resets: optional `(N, B)` bool marks of sequence starts (state zeroed there).
            start: the step to start from.
            final: the streams end at N: no synthetic gradient after the last chunk.
        """
        self._check_streams(inputs, targets, resets)
        state = self._initial_state(inputs, state)
        self.model.train()
        if self.interface is not None:
            self.interface.train()
        a, N = start, inputs.shape[0]
        while a < N:
            b = min(a + self._next_length(), N)
            state, metrics = self.train_chunk(
                inputs[a:b], targets[a:b], state,
                resets=resets[a:b] if resets is not None else None,
                future=b < N or not final,
                next_resets=resets[b] if resets is not None and b < N else None)
            yield b, state, metrics
            a = b

    def run(self, inputs, targets, state=None, resets=None, on_chunk=None, final=True):
        """Train over time-major streams chunk by chunk (all of `walk`).

        Args:
            inputs, targets: `(N, B, ...)`.
            state: the initial state (None: `model.init_state(B)`).
            resets: optional `(N, B)` bool marks of sequence starts (state zeroed there).
            on_chunk: called with each ChunkMetrics (logging, progress bars).
            final: the streams end here: no synthetic gradient after the last chunk.
        Returns:
            (state, list of ChunkMetrics)
        """
        history = []
        for _, state, metrics in self.walk(inputs, targets, state, resets, final=final):
            history.append(metrics)
            if on_chunk is not None:
                on_chunk(metrics)
        return state, history

    def evaluate(self, inputs, targets, state=None, resets=None, chunk_length=None):
        """`evaluate(self.model, self.loss_fn, ...)` in chunks of T (see the free function)."""
        self._check_streams(inputs, targets, resets)
        state = self._initial_state(inputs, state)
        return evaluate(self.model, self.loss_fn, inputs, targets, state, resets,
                        chunk_length or self._eval_length(), self.batch_dim)

    def _eval_length(self):
        return getattr(self.schedule, "length", 35)

    def _next_length(self):
        length = self.schedule()
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"the truncation schedule gave {length!r}; chunk lengths must be ints >= 1")
        return length

    def _initial_state(self, inputs, state):
        if state is not None:
            return state
        init = getattr(self.model, "init_state", None)
        if init is None:
            raise ValueError("pass an initial state, or give the model init_state(batch_size)")
        return init(inputs.shape[1])

    @staticmethod
    def _check_streams(inputs, targets, resets):
        if inputs.dim() < 2 or targets.dim() < 2 or inputs.shape[:2] != targets.shape[:2]:
            raise ValueError(
                f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must be "
                "time-major streams (N, B, ...) with the same N and B"
            )
        if resets is not None and tuple(resets.shape) != tuple(inputs.shape[:2]):
            raise ValueError(f"resets must have shape {tuple(inputs.shape[:2])}, got {tuple(resets.shape)}")

    # ---- checkpoints -------------------------------------------------------------------

    def state_dict(self):
        """Runner state for resuming: step count and the truncation schedule's generator."""
        sched = self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else {}
        return {"step": self.step, "schedule": sched, "sg_scale": self.sg_scale,
                "bootstrap": self.bootstrap, "target_rms": self.target_rms.state_dict(),
                "guard": self.guard.state_dict() if self.guard is not None else None,
                "recoveries": self.recoveries,
                "calibration": (self.calibration.state_dict()
                                if self.calibration is not None else None),
                "reference": self._reference,
                "replay": self.replay.state_dict() if self.replay else None}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        if hasattr(self.schedule, "load_state_dict"):
            self.schedule.load_state_dict(state["schedule"])
        if "target_rms" in state:  # checkpoints before the guard have none of these
            self.sg_scale, self.bootstrap = float(state["sg_scale"]), float(state["bootstrap"])
            self.target_rms.load_state_dict(state["target_rms"])
            if self.guard is not None and state["guard"] is not None:
                self.guard.load_state_dict(state["guard"])
            self.recoveries = int(state["recoveries"])
        if self.calibration is not None:  # checkpoints before the gate: measure afresh
            if state.get("calibration") is not None:
                self.calibration.load_state_dict(state["calibration"])
            self._reference = state.get("reference")
        if self.replay and state.get("replay") is not None:
            self.replay.load_state_dict(state["replay"])


def _sum(tensors):
    """sum() without its leading `0 +` (one tensor operation fewer)."""
    tensors = iter(tensors)
    total = next(tensors)
    for t in tensors:
        total = total + t
    return total


# ---- shared by training and evaluation ------------------------------------------------

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
    if state is None:
        state = model.init_state(inputs.shape[1])
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
