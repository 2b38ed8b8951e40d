"""What DNI does at a chunk's two boundaries, apart from the walk that calls it.

For chunk k (docs/design.md, "One chunk with DNI"):

    begin     s_k -> trigger (the real gradient that reaches it trains M)
    record_chunk  just before the model's forward: BP(lambda) keeps how the chunk runs
    inject    at s_{k+1}: beta * g_hat into the deferred backward (capped, gated, zeroed for
              streams that restart), the bootstrap's second VJP when lambda != beta, Aux
    finish    after the backward: BP(lambda)'s share of the TD error for earlier boundaries
              (`traces.py`), the end of a stream
    account   after the backward and the chunk's one host sync: the target RMS, the
              calibration, the metrics, the guard (which may reset the synthesizer)
    replay    after the optimizer step: extra synthesizer updates on recent triggers

`TBPTTRunner` builds one from its DNI keywords, or takes one (`TBPTTRunner(..., dni=step)`).
"""
import math
import warnings
from dataclasses import dataclass

import torch

from . import deferred, nest
from .interfaces import BackwardInterface
from .replay import SynthReplay
from .stability import (Calibration, DivergenceGuard, TargetRMS, cap_norm,
                        forget_optimizer_state, zero_output_)
from .streams import zero_streams
from .synthesizers import current_context, state_dim
from .traces import KeptChunk, SynthTraces, flat_streams, message_at, state_jacobian


@dataclass
class Boundary:
    """One chunk's DNI bookkeeping, from `begin` to `account`."""

    scale: object            # the target scale in force (a number or a 0-d tensor)
    beta: float              # the injection weight in force (0 during warmup)
    gate: object             # the calibration gate in force (1 without calibration)
    trigger: object = None
    injected: object = None  # |beta * gate * capped g_hat|, on the device
    capped: object = None    # fraction of streams the cap scaled down
    aux: object = None       # the DNI + Aux loss
    proposal: object = None  # (mean square, RMS) proposed in `pending`, committed in `account`
    state: object = None     # the incoming state (BP(lambda) traces)
    memory: object = None    # a recurrent synthesizer's memory at the trigger (traces)
    pullback: object = None  # the chunk's J (B, D, D) or `KeptChunk` (traces)
    model: object = None     # the model, to run kept chunks again (traces)
    context: object = None   # the synthesizer's context at the trigger (cDNI), for replay


class DNIStep:
    """Synthetic gradients at chunk boundaries: the synthesizer, its units and safeguards.

    Args:
        synthesizer: module `(state, context) -> gradient estimate` shaped like the state.
        sg_scale: beta, the weight of the synthetic gradient injected at each chunk end.
        bootstrap: lambda in [0, 1], the weight of J^T g_hat in the synthesizer's target;
            None: equal to `sg_scale` (free, one backward pass).
        warmup: updates during which the synthesizer trains but nothing is injected.
        target_scale: "rms", "raw", "sum" or a number (see `TBPTTRunner`).
        sg_cap: per-stream cap in running RMS norms of the real gradients (None: none).
        guard: recover from a diverging synthesizer (`stability.DivergenceGuard`).
        calibrate: gate the injection by its measured calibration (`stability.Calibration`).
        aux_head, aux_weight: DNI + Aux.
        batch_dim: batch dimension of state tensors (None: the one before the features).
        replay, replay_chunks: replayed synthesizer updates (`replay.SynthReplay`).
        refit: the ridge penalty of a closed-form refit of the synthesizer's last layer on
            the replay buffer after every update (0: off; `replay.SynthReplay`). The refitted
            parameters (`StateSynthesizer.refitted_parameters`) stop requiring grad: only the
            refit moves them, and between refits they keep its solution.
        refit_every: refit after one update in this many (1: every update).
        refit_decay: the refit's weight of a buffered chunk per chunk of age (1: equal).
        trace_decay: BP(lambda)'s lambda: the synthesizer also learns from later chunks' TD
            errors through eligibility traces that decay by bootstrap * trace_decay per chunk,
            `bootstrap` being BP(lambda)'s discount gamma (0: off; `traces.SynthTraces`).
        trace_horizon: how many chunks back the traces reach.
    """

    def __init__(self, synthesizer, sg_scale=0.1, bootstrap=None, warmup=0, target_scale="rms",
                 sg_cap=1.0, guard=True, calibrate=False, aux_head=None, aux_weight=0.0,
                 batch_dim=None, replay=0, replay_chunks=32, refit=0.0, trace_decay=0.0,
                 trace_horizon=32, refit_every=1, refit_decay=1.0):
        self.check_settings(sg_scale, bootstrap, target_scale, sg_cap)
        self.recurrent = getattr(synthesizer, "recurrent", False)
        if self.recurrent and (replay or refit):
            raise ValueError("replay and refit need a feed-forward synthesizer (a recurrent "
                             "one's message depends on a memory that replayed triggers lack); "
                             "set replay=0 and refit=0")
        self.sg_scale = float(sg_scale)
        self.bootstrap = self.sg_scale if bootstrap is None else float(bootstrap)
        if aux_weight and aux_head is None:
            raise ValueError("aux_weight > 0 needs an aux_head (e.g. StateSynthesizer.mlp(...))")
        self.interface = BackwardInterface(synthesizer, batch_dim)
        self.warmup, self.target_scale = int(warmup), target_scale
        self.sg_cap = float(sg_cap) if sg_cap else None
        self.aux_head, self.aux_weight = aux_head, float(aux_weight)
        self.batch_dim = batch_dim
        self.target_rms = TargetRMS()
        self.guard = DivergenceGuard() if guard else None
        self.calibration = Calibration() if calibrate else None
        self._reference = None  # the g_hat injected at the last chunk's end, before the gate
        self.recoveries = 0
        self._recovered = False
        self.replay = SynthReplay(replay, replay_chunks, batch_dim, ridge=refit,
                                  refit_every=refit_every, decay=refit_decay)
        self.traces = SynthTraces(trace_decay, trace_horizon, batch_dim)
        if refit:  # set in closed form; a gradient step between refits only moves them off it
            if not hasattr(synthesizer, "refitted_parameters"):
                raise ValueError("refit needs a StateSynthesizer (its last layer is refitted); "
                                 f"got {type(synthesizer).__name__}; set refit=0")
            for p in synthesizer.refitted_parameters():
                p.requires_grad_(False)
        self.params = list(synthesizer.parameters())
        if self.aux_on:
            self.params += list(aux_head.parameters())

    @staticmethod
    def check_settings(sg_scale, bootstrap, target_scale, sg_cap):
        """One-line errors for settings out of range (also for a runner without DNI)."""
        lam = float(sg_scale) if bootstrap is None else float(bootstrap)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"bootstrap (lambda) must lie in [0, 1], got {bootstrap}")
        if float(sg_scale) < 0:
            raise ValueError(f"sg_scale (beta) must be >= 0, got {sg_scale}")
        if not (target_scale in ("rms", "raw", "sum") or isinstance(target_scale, (int, float))):
            raise ValueError(f"target_scale must be 'rms', 'raw', 'sum' or a number, got {target_scale!r}")
        if sg_cap is not None and sg_cap < 0:
            raise ValueError(f"sg_cap must be > 0 (or None: no cap), got {sg_cap}")

    def check_optimizer(self, model_params, optimizer):
        """One-line errors for a synthesizer that shares parameters with the model or that
        no optimizer steps."""
        model_ids = {id(p) for p in model_params}
        if any(id(p) in model_ids for p in self.params):
            raise ValueError("the synthesizer's parameters must not be part of the model")
        if optimizer is None:
            return
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.params if id(p) not in in_opt and p.requires_grad]
        if missing:
            raise ValueError(
                f"{len(missing)} synthesizer parameters are in no optimizer; add them to the "
                "optimizer (e.g. list(model.parameters()) + list(synth.parameters())) or pass "
                "synth_optimizer"
            )

    @property
    def synthesizer(self):
        return self.interface.synthesizer

    @property
    def aux_on(self):
        return self.aux_head is not None and self.aux_weight > 0

    # ---- units ------------------------------------------------------------------------

    def scale(self, tokens):
        """The target scale for a chunk of `tokens` steps x streams."""
        if self.target_scale == "rms":
            # before any target was measured: 0 (nothing to regress on, nothing injected)
            return self.target_rms.value().reciprocal() if self.target_rms.known else 0.0
        if self.target_scale == "raw":
            return 1.0
        if self.target_scale == "sum":
            return float(tokens)
        return float(self.target_scale)

    def is_zero(self, scale):
        """`not scale` without a device sync: a tensor scale is 1 / the target RMS, zero only
        where the RMS overflowed (its float is kept by `TargetRMS`)."""
        if isinstance(scale, torch.Tensor):
            return self.target_rms.rms == math.inf
        return not scale

    # ---- the chunk's start ---------------------------------------------------------------

    def begin(self, state, step, tokens):
        """Make the incoming state a trigger; the chunk's `Boundary`."""
        boundary = Boundary(scale=self.scale(tokens),
                            beta=self.sg_scale if step >= self.warmup else 0.0,
                            gate=self.calibration.gate() if self.calibration is not None else 1.0)
        boundary.context = current_context()
        if self.traces and boundary.context is not None:
            raise ValueError("BP(lambda) traces do not support a synthesizer context (cDNI); "
                             "set trace_decay=0 or drop the context")
        reference, self._reference = self._reference, None
        if reference is not None:
            refs, tensors = nest.flatten(reference), nest.flatten(state)
            if [r.shape for r in refs] != [t.shape for t in tensors]:
                reference = None  # not the continuation of the last chunk's streams
            else:  # (a resumed checkpoint holds it on the CPU)
                reference = nest.unflatten(state, [r.to(t.device) for r, t in zip(refs, tensors)])
        boundary.trigger = self.interface.make_trigger(state, target_scale=boundary.scale,
                                                       reference=reference,
                                                       keep=bool(self.replay) or bool(self.traces))
        if self.traces:
            boundary.state = nest.detach(state)
        if self.recurrent:  # the message at the trigger read the memory before this boundary
            if self.traces:
                boundary.memory = self.synthesizer.memory_for(state)
            self.synthesizer.advance(state)
        return boundary

    def record_chunk(self, b, future, model, inputs, resets=None):
        """Just before the chunk's forward `forward_with_resets(model, inputs, trigger, resets,
        batch_dim, aux_on)`: with traces that keep chunks rather than Jacobians, how this one
        runs (`traces.KeptChunk`)."""
        if self.traces:
            b.model = model
            if future and self.traces.keeps_chunks(b.state):
                if KeptChunk.can_run(model):
                    b.pullback = KeptChunk.record(model, inputs, resets)
                else:  # `inject` takes the Jacobian
                    warnings.warn("BP(lambda): the model's named_parameters() miss some of its "
                                  "parameters(), so its chunks cannot run again as they were; "
                                  "the traces keep state Jacobians (D backward passes a chunk)",
                                  stacklevel=2)

    # ---- the chunk's end -----------------------------------------------------------------

    def inject(self, b, new_state, first=None, next_resets=None, resets=None):
        """Inside the deferred block: beta * gate * g_hat at `new_state`, the bootstrap
        correction, the Aux loss; with traces that keep Jacobians, the chunk's. `resets` (T, B):
        the streams that restarted inside the chunk (a recurrent synthesizer forgets them)."""
        if self.recurrent and resets is not None:
            self.synthesizer.reset_streams(resets.any(dim=0))
        g_hat, b.capped = self.synthesize(new_state, b.scale)
        if next_resets is not None:
            g_hat = zero_streams(g_hat, next_resets, self.batch_dim)
        predicted = g_hat
        if self.calibration is not None:
            self._reference = predicted
            g_hat = nest.map_state(lambda g: b.gate * g, g_hat)
        if b.beta:
            deferred.backward(new_state, nest.map_state(lambda g: b.beta * g, g_hat))
        b.injected = b.beta * _sum(g.pow(2).sum() for g in nest.flatten(g_hat)).sqrt()
        if self.bootstrap != b.beta:
            self._bootstrap_correction(b.trigger, new_state, g_hat, self.bootstrap - b.beta)
        if self.aux_on:
            b.aux = self._aux_loss(first, predicted, b.scale)
            deferred.backward(self.aux_weight * b.aux)
        if self.traces and b.pullback is None:
            b.pullback = state_jacobian(b.trigger, new_state, self.batch_dim)

    def synthesize(self, new_state, scale):
        """g_hat at a boundary, capped per stream at sg_cap x the targets' RMS norm, and the
        fraction of streams capped (None: no cap)."""
        if self.is_zero(scale):  # "rms" before any target was seen: the output is still zero
            return nest.map_state(torch.zeros_like, nest.detach(new_state)), None
        g_hat = self.interface.synthesize(new_state, target_scale=scale)
        capped = None
        if self.sg_cap is not None and self.target_rms.known:
            dim = state_dim(g_hat, self.batch_dim)
            bound = self.sg_cap * self.target_rms.value() * math.sqrt(dim)
            g_hat, capped = cap_norm(g_hat, bound, self.batch_dim)
        return g_hat, capped

    def _bootstrap_correction(self, trigger, new_state, g_hat, weight):
        """Add weight * J^T g_hat at the trigger (a second VJP through the recurrent core)."""
        triggers, outs = nest.flatten(trigger), nest.flatten(new_state)
        vjp = torch.autograd.grad(outs, triggers, nest.flatten(g_hat), retain_graph=True,
                                  allow_unused=True)
        grads = [weight * v if v is not None else torch.zeros_like(t) for v, t in zip(vjp, triggers)]
        deferred.backward(triggers, grads)

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

    # ---- after the backward ----------------------------------------------------------------

    def finish(self, b, future):
        """After the chunk's backward, before the gradients are synced and clipped: BP(lambda)
        hands this boundary's TD error to the earlier ones (`traces.py`) and keeps this one;
        at the end of a stream (`future` False) the traces and a recurrent memory end."""
        if self.traces:
            self._trace_backward(b)
            if future:
                self.traces.push(b.state, b.memory, b.pullback)
            else:
                self.traces.clear()
        if not future and self.recurrent:
            self.synthesizer.reset()

    def _trace_backward(self, b):
        stats = self.interface.last_stats
        if not self.traces.entries or not stats.filled or self.is_zero(b.scale):
            return
        tensors = nest.flatten(b.state)
        real = [stats.gradients.get(i, torch.zeros_like(t)) for i, t in enumerate(tensors)]
        with torch.no_grad():
            message = nest.flatten(message_at(self.synthesizer, b.state, b.memory))
        delta = b.scale * flat_streams(real, self.batch_dim) \
            - flat_streams(message, self.batch_dim)  # TD error, target units
        self.traces.backward(self.synthesizer, delta, self.bootstrap * self.traces.decay,
                             stats.batch_size, b.model, self.aux_on)

    def restart(self):
        """The streams start again from zero (a skipped chunk): the traces and a recurrent
        synthesizer's memory end."""
        self.traces.clear()
        if self.recurrent:
            self.synthesizer.reset()

    def pending(self, b):
        """What `account` decides on, still on the device: (mean square of the real
        gradient at the trigger, the RMS it proposes, the real gradient's norm)."""
        stats = self.interface.last_stats
        if not stats.filled:
            return [None, None, None]
        mean_square = stats.gradient_mean_square  # a property: one division a call
        b.proposal = self.target_rms.propose(mean_square)
        return [mean_square, b.proposal[1], stats.gradient_norm]

    def account(self, b, metrics, numbers, optimizers):
        """After the chunk's one host sync (`numbers`: `pending()` and the injected norm, as
        Python numbers): the target RMS, the calibration, the metrics and the guard."""
        mean_square, rms, real, injected = numbers
        zero_scale = self.is_zero(b.scale)  # before this chunk's target joins the RMS
        stats = self.interface.last_stats
        metrics.sg_scale, metrics.capped = self.sg_scale, b.capped
        if b.aux is not None:
            metrics.aux_loss = b.aux.detach()
        if self.calibration is not None:
            if stats.has_reference:
                self.calibration.update(stats.reference_dot, stats.reference_sq)
            metrics.calibration = b.gate
        if not stats.filled:
            return
        if mean_square > 0:  # a trigger whose streams all restarted carries no scale
            self.target_rms.commit(b.proposal[0], rms, b.proposal[1])
        metrics.synth_loss = stats.loss
        metrics.cosine = stats.cosine
        metrics.synthetic_norm = stats.message_norm / b.scale if not zero_scale else 0.0
        metrics.real_norm = real
        metrics.injected_norm = injected
        metrics.target_rms = self.target_rms.rms
        if self.guard is not None:
            reason = self.guard.check(metrics.target_rms, injected, real)
            if reason:
                self.recover(reason, metrics, optimizers)

    def recover(self, reason, metrics, optimizers):
        """The guard fired: restart the synthesizer from zero with half the coupling."""
        zeroed = zero_output_(self.interface.synthesizer)
        if self.aux_head is not None:
            zero_output_(self.aux_head)
        for p in self.params:  # this chunk's step must not move them off zero again
            p.grad = None
        for opt in optimizers:
            if opt is not None:
                forget_optimizer_state(opt, self.params)
        self.target_rms.reset()
        self.replay.clear()  # its targets may be the runaway ones
        self.traces.clear()  # so may the TD errors it would hand back
        self._recovered = True  # nor is this chunk's own trigger kept (`keep`)
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

    def forget_reference(self):
        """A chunk that failed: its g_hat is scored nowhere."""
        self._reference = None

    # ---- replay ----------------------------------------------------------------------------

    def keep(self, state, context=None):
        """Keep the chunk's trigger, its context (cDNI) and the real gradient that reached it
        (replay on)."""
        stats = self.interface.last_stats
        recovered, self._recovered = self._recovered, False
        if not self.replay or recovered or stats is None or stats.gradients is None:
            return
        tensors = nest.flatten(state)
        grads = [stats.gradients.get(i, torch.zeros_like(t)) for i, t in enumerate(tensors)]
        self.replay.add(state, nest.unflatten(state, grads), context)

    def replay_steps(self, tokens, optimizer, others, sync=None, clip=None):
        """`replay.steps` more synthesizer updates on recent triggers (nothing else moves:
        every other gradient, of `others` too, is None, so `optimizer` leaves them alone),
        then the closed-form refit when `replay.ridge` is on."""
        scale = self.scale(tokens)
        if not self.replay or not self.replay.filled or self.is_zero(scale):
            return
        trainable = any(p.requires_grad for p in self.interface.synthesizer.parameters())
        steps = self.replay.steps if trainable else 0
        for _ in range(steps):  # none when the refit sets every synthesizer parameter
            for p in list(others) + self.params:
                p.grad = None
            self.replay.regression_loss(self.interface.synthesizer, scale).backward()
            if sync is not None:
                sync.after_backward(self.params)
            if clip:
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            optimizer.step()
        if self.replay.refit_due():  # after the steps: they may have moved the features
            self.replay.refit(self.interface.synthesizer, scale)

    # ---- checkpoints -----------------------------------------------------------------------

    def state_dict(self):
        return {"sg_scale": self.sg_scale, "bootstrap": self.bootstrap,
                "target_rms": self.target_rms.state_dict(),
                "guard": self.guard.state_dict() if self.guard is not None else None,
                "recoveries": self.recoveries,
                "calibration": (self.calibration.state_dict()
                                if self.calibration is not None else None),
                "reference": self._reference,
                "replay": self.replay.state_dict() if self.replay else None,
                **({"traces": self.traces.state_dict()} if self.traces else {})}

    def load_state_dict(self, state):
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
        if self.traces and state.get("traces") is not None:
            self.traces.load_state_dict(state["traces"])


def _sum(tensors):
    """sum() without its leading `0 +` (one tensor operation fewer)."""
    tensors = iter(tensors)
    total = next(tensors)
    for t in tensors:
        total = total + t
    return total
